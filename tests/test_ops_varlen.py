"""block_masked_attention_varlen: self-attention over packed rows (samples of their own lengths,
no padding) against float64 reference attention on the padded form, on every CPU path: the
packed kernels (cpp; Triton under the interpreter), the padded fallback (reference; bfloat16 on
cpp), gradients, and the errors."""
import math

import pytest
import torch

from adaperceiver import _ext, ops
from adaperceiver.ops import dispatch
from adaperceiver.ops.inputs import PackedAttentionInputs
from adaperceiver.ops.reference import rope_tables
from adaperceiver.testing import TOLERANCES, reference_attention
from helpers import INTERPRET

NAN = float("nan")
cpp = pytest.mark.skipif(not _ext.available(),
                         reason=f"adaperceiver._C not loaded: {_ext.load_error()}")


def _packed_inputs(lens, H, D, dtype=torch.float32, requires_grad=False):
    """q, k, v (R, H, D) as the model passes them: heads of one fused (R, 3 H D) projection,
    here with NaN columns between and after them, which a kernel must never read."""
    R = sum(lens)
    buf = torch.full((R, 3 * H * D + 5), NAN, dtype=dtype)
    for i in range(3):
        buf[:, i * H * D:(i + 1) * H * D] = torch.randn(R, H * D, dtype=dtype)
    q, k, v = (buf[:, i * H * D:(i + 1) * H * D].view(R, H, D) for i in range(3))
    if requires_grad:
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    return q, k, v


def _padded(t, lens):
    """(R, H, D) -> (B, H, N, D), zeros past each length (for the reference)."""
    n, out, o = max(lens), [], 0
    for L in lens:
        out.append(torch.cat([t[o:o + L], t.new_zeros(n - L, *t.shape[1:])]))
        o += L
    return torch.stack(out).transpose(1, 2)


def _packed(t, lens):
    """(B, H, N, D) -> (R, H, D): each sample's first lens[b] rows."""
    return torch.cat([t[b, :, :L].transpose(0, 1) for b, L in enumerate(lens)])


def _reference(q, k, v, lens, grans, rope):
    ref = reference_attention(_padded(q, lens), _padded(k, lens), _padded(v, lens), grans,
                              seq_lens=torch.tensor(lens), q_rope=rope, k_rope=rope)
    return _packed(ref, lens)


def _reference_lse(q, k, v, lens, grans, rope):
    """(B, H, max len) float32 lse of the padded reference, -inf past each length."""
    from adaperceiver.ops.reference import attention_forward
    rope64 = tuple(r.double() for r in rope) if rope is not None else None
    _, lse = attention_forward(*(_padded(t.double(), lens) for t in (q, k, v)), grans,
                               seq_lens=torch.tensor(lens), q_rope=rope64, k_rope=rope64)
    return lse.float()


def _close(got, want, dtype=torch.float32):
    atol, rtol = TOLERANCES[dtype]
    assert torch.isfinite(got).all(), "non-finite output"
    torch.testing.assert_close(got.double(), want, atol=atol * want.abs().max().item(),
                               rtol=rtol)


# lengths: tails that are not multiples of the 32-row tiles, an empty sample, one short sample
CASES = [
    ([77, 0, 128, 33], 2, 64, [32, 64, 96, 128], True),
    ([5, 40, 1], 3, 32, None, False),
    ([96], 1, 64, [32, 96], True),
]


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=cpp), "reference"])
@pytest.mark.parametrize("case", CASES, ids=["grans_rope_tails", "no_mask", "one_sample"])
def test_varlen_matches_padded_reference(backend, case):
    lens, H, D, grans, with_rope = case
    q, k, v = _packed_inputs(lens, H, D)
    rope = rope_tables(max(lens), D, device="cpu") if with_rope else None
    with ops.use_backend(backend):
        got = ops.block_masked_attention_varlen(q, k, v, lens, grans, q_rope=rope, k_rope=rope)
    assert got.shape == (sum(lens), H, D)
    _close(got, _reference(q, k, v, lens, grans, rope))


def test_varlen_triton_packed_kernel_matches_reference():
    """Triton's forward kernel with PACKED (each program starts at its sample's first row),
    under the interpreter: tails, an empty sample, grans and RoPE (on a GPU machine the
    kernel runs on the device in test_kernels_attention.py)."""
    pytest.importorskip("triton")
    if not INTERPRET:
        pytest.skip("Triton on CPU tensors needs its interpreter (TRITON_INTERPRET=1)")
    lens, H, D, grans = [40, 17, 64, 0, 5], 2, 32, [16, 32, 64]
    q, k, v = _packed_inputs(lens, H, D)
    rope = rope_tables(64, D, device="cpu")
    inputs = PackedAttentionInputs.build(q, k, v, lens, grans, q_rope=rope, k_rope=rope)
    with ops.use_backend("triton"):
        assert dispatch.select_kernel("attention_varlen", inputs).__name__.endswith(
            "triton_backend")
        got = ops.block_masked_attention_varlen(q, k, v, lens, grans, q_rope=rope, k_rope=rope)
    _close(got, _reference(q, k, v, lens, grans, rope))
    from adaperceiver.kernels import attention as A
    out, lse = A.attention_varlen_forward(q, k, v, lens, grans, None, rope, rope)
    torch.testing.assert_close(lse, _reference_lse(q, k, v, lens, grans, rope), atol=1e-5,
                               rtol=1e-5)
    assert torch.isneginf(lse[1, :, 17:]).all() and torch.isneginf(lse[3]).all()


@cpp
def test_varlen_cpp_kernel_writes_every_row_and_the_padded_lse():
    """The C++ packed kernel on its own: every output row written (the heap is left full of NaN
    blocks of the output's size first), lse as the padded kernel's, -inf past each length."""
    lens, H, D, grans = [70, 3, 0, 128], 2, 64, [32, 64, 128]
    q, k, v = _packed_inputs(lens, H, D)
    rope = rope_tables(128, D, device="cpu")
    scale = 1 / math.sqrt(D)
    for _ in range(3):
        t = torch.full((sum(lens), H, D), NAN)
        del t
    out, lse = torch.ops.adaperceiver.block_masked_attention_varlen_fwd(
        q, k, v, lens, grans, scale, *rope, *rope)
    _close(out, _reference(q, k, v, lens, grans, rope))
    pout, plse = torch.ops.adaperceiver.block_masked_attention_fwd(
        *(_padded(t, lens).contiguous() for t in (q, k, v)), grans, scale,
        torch.tensor(lens, dtype=torch.int32), *rope, *rope)
    torch.testing.assert_close(lse, plse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, _reference_lse(q, k, v, lens, grans, rope), atol=1e-5,
                               rtol=1e-5)
    assert torch.isneginf(lse[1, :, 3:]).all() and torch.isneginf(lse[2]).all()


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=cpp), "reference"])
def test_varlen_gradients_match_padded_reference(backend):
    lens, H, D, grans = [50, 96, 9], 2, 32, [32, 64, 96]
    q, k, v = _packed_inputs(lens, H, D, requires_grad=True)
    rope = rope_tables(96, D, device="cpu")
    with ops.use_backend(backend):
        out = ops.block_masked_attention_varlen(q, k, v, lens, grans, q_rope=rope, k_rope=rope)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    rope64 = tuple(r.double() for r in rope)
    with ops.use_backend("reference"):
        ref = ops.block_masked_attention(_padded(q64, lens), _padded(k64, lens),
                                         _padded(v64, lens), grans, seq_lens=torch.tensor(lens),
                                         q_rope=rope64, k_rope=rope64)
    want = torch.autograd.grad(_packed(ref, lens), (q64, k64, v64), go.double())
    for name, g, w in zip("qkv", grads, want):
        assert g.shape == w.shape, name
        _close(g, w)


@cpp
def test_varlen_takes_the_cpp_kernel_or_says_why():
    lens, H, D = [40, 24], 2, 32
    q, k, v = _packed_inputs(lens, H, D)
    inputs = PackedAttentionInputs.build(q, k, v, lens)
    assert dispatch.select_kernel("attention_varlen", inputs).__name__.endswith("cpp_backend")
    why = dispatch.available_backends("attention_varlen", inputs)
    assert why["cpp"] == [] and why["reference"] == ["reference backend has no "
                                                     "attention_varlen kernel"]
    assert why["cuda"], why       # CPU tensors (or no CUDA part built): it says why
    # bfloat16: the packed cpp kernel takes it (float32 inside)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    inputs_b = PackedAttentionInputs.build(qb, kb, vb, lens)
    assert dispatch.select_kernel("attention_varlen", inputs_b).__name__.endswith("cpp_backend")
    # float64: no packed kernel takes it (cpp says why), so the op pads and runs the padded
    # reference
    qd, kd, vd = (t.double() for t in (q, k, v))
    inputs_d = PackedAttentionInputs.build(qd, kd, vd, lens)
    assert any("float64" in r for r in dispatch.available_backends(
        "attention_varlen", inputs_d)["cpp"])
    assert dispatch.select_kernel("attention_varlen", inputs_d) is None
    assert ops.block_masked_attention_varlen(qd, kd, vd, lens).dtype == torch.float64
    got = ops.block_masked_attention_varlen(qb, kb, vb, lens)
    assert got.dtype == torch.bfloat16
    _close(got.float(), _reference(qb.float(), kb.float(), vb.float(), lens, None, None),
           torch.bfloat16)


def test_varlen_errors_name_the_parameter():
    q, k, v = _packed_inputs([10, 6], 2, 32)
    with pytest.raises(ValueError, match=r"seq_lens=\[10, 5\] sum to 15 rows; q has 16 rows"):
        ops.block_masked_attention_varlen(q, k, v, [10, 5])
    with pytest.raises(ValueError, match=r"seq_lens entry -1 is not allowed; allowed: ints >= 0"):
        ops.block_masked_attention_varlen(q, k, v, [17, -1])
    with pytest.raises(ValueError,
                       match=r"q_rope must be \(cos, sin\) float tables of shape \(10, 16\)"):
        ops.block_masked_attention_varlen(q, k, v, [10, 6], q_rope=rope_tables(16, 32))
    with pytest.raises(ValueError, match=r"q must be a 3-d tensor \(R, H, D\)"):
        ops.block_masked_attention_varlen(q[None], k, v, [10, 6])
    with pytest.raises(ValueError,
                       match=r"k\(8, 2, 32\) .* do not fit: need q and k \(R, H, D\)"):
        ops.block_masked_attention_varlen(q, k[:8], v, [10, 6])
    with pytest.raises(ValueError, match=r"seq_lens=None is not allowed; allowed: a sequence"):
        ops.block_masked_attention_varlen(q, k, v, None)
    with pytest.raises(ValueError, match=r"seq_lens entry nan is not allowed"):
        ops.block_masked_attention_varlen(q, k, v, [10, float("nan")])
    meta = tuple(t.to("meta") for t in rope_tables(10, 32))
    with pytest.raises(ValueError, match=r"k_rope must be .* on cpu, got \[\(\(10, 16\), "
                                         r"torch.float32, 'meta'\)"):
        ops.block_masked_attention_varlen(q, k, v, [10, 6], k_rope=meta)


@cpp
def test_varlen_cpp_op_checks_its_arguments():
    fwd = torch.ops.adaperceiver.block_masked_attention_varlen_fwd
    q, k, v = _packed_inputs([10, 6], 2, 32)
    with pytest.raises(RuntimeError, match=r"seq_lens sum to 15 rows; q has 16"):
        fwd(q, k, v, [10, 5], None, 1.0, None, None, None, None)
    with pytest.raises(RuntimeError, match=r"seq_lens\[1\]=-2 is not allowed"):
        fwd(q, k, v, [18, -2], None, 1.0, None, None, None, None)
    with pytest.raises(RuntimeError, match=r"q.dtype=Double is not supported"):
        fwd(q.double(), k.double(), v.double(), [10, 6], None, 1.0, None, None, None, None)
    with pytest.raises(RuntimeError, match=r"q_rope tables must be \(10, 16\)"):
        fwd(q, k, v, [10, 6], None, 1.0, *rope_tables(16, 32), None, None)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=cpp), "reference"])
def test_varlen_op_passes_opcheck(backend):
    """torch.library.opcheck: schema, fake implementation (shapes and strides), autograd
    registration and traced (AOT) forward and backward of the custom op."""
    lens, H, D = [20, 0, 7], 2, 32
    q, k, v = _packed_inputs(lens, H, D, requires_grad=True)
    rope = rope_tables(20, D, device="cpu")
    with ops.use_backend(backend):
        torch.library.opcheck(torch.ops.adaperceiver.block_masked_attention_varlen,
                              (q, k, v, lens, [8, 20], D ** -0.5, *rope, *rope))


def test_compiled_training_step_with_per_sample_tokens():
    """A traced training step of the model with per-sample token counts (the packed op and its
    padded backward in one graph) gives eager's loss and gradients."""
    from helpers import tiny_model
    model = tiny_model(depth=2).train()
    x = torch.randn(3, 3, 64, 64)
    kw = dict(num_tokens=[64, 32, 50], mat_dim=[48, 96, 72])

    def step(run):      # the compiled module shares the model's parameters
        model.zero_grad(set_to_none=True)
        loss = run(x, **kw).logits.square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    torch._dynamo.reset()
    eager_loss, eager_grads = step(model)
    compiled = torch.compile(model, backend="aot_eager")
    loss, grads = step(compiled)
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-5)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=name)
