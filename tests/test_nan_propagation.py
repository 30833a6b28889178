"""NaN and inf propagate exactly as in the reference, on every backend, padded and packed.

A property test: random shapes, masks, lengths and RoPE, with a few elements of q, k or v (or
the scale) poisoned with NaN, +inf or -inf. Each backend's output must have the reference's
NaN and +-inf pattern (same rows, heads and columns), and the finite elements its values. The
reference sums over the (query, key) pairs a row reads, so a row is NaN exactly when something
it reads is (or inf arithmetic makes it so). A kernel that guards its running max or sum so
that NaN turns into a number fails here.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import adaperceiver
from helpers import INTERPRET
from adaperceiver import ops
from adaperceiver.ops import dispatch
from adaperceiver.ops import reference as R
from adaperceiver.ops.inputs import AttentionInputs, PackedAttentionInputs

POISON = (math.nan, math.inf, -math.inf)


def _can(backend: str, op: str, inputs) -> bool:
    """Whether ``backend`` takes ``inputs`` (cases it cannot take are drawn again)."""
    ok = not dispatch.available_backends(op, inputs)[backend]
    assume(ok)
    return ok


@st.composite
def cases(draw, packed: bool, backend: str):
    small = backend == "triton"   # its interpreter is slow: fewer, smaller cases
    B = draw(st.integers(1, 2 if small else 3))
    H = draw(st.integers(1, 1 if small else 2))
    D = 32 if small else draw(st.sampled_from([8, 32]))   # Triton takes 32, 64, 128
    lens = [draw(st.integers(1 if packed else 0, 20 if small else 40)) for _ in range(B)]
    N = max(max(lens), 1)
    grans = draw(st.one_of(st.none(), st.lists(st.integers(1, 48), min_size=1, max_size=5,
                                               unique=True).map(sorted)))
    use_lens = packed or draw(st.booleans())
    rope = draw(st.booleans())
    poisons = draw(st.lists(st.tuples(st.sampled_from("qkv"), st.integers(0, B - 1),
                                      st.integers(0, H - 1), st.integers(0, N - 1),
                                      st.integers(0, D - 1), st.sampled_from(POISON)),
                            min_size=1, max_size=3))
    scale = draw(st.sampled_from([None, None, None, math.nan, math.inf, -math.inf]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return dict(B=B, H=H, N=N, D=D, lens=lens if use_lens else None, grans=grans, rope=rope,
                poisons=poisons, scale=scale, seed=seed)


def _inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    q, k, v = (torch.randn(c["B"], c["H"], c["N"], c["D"], generator=g) for _ in range(3))
    for name, b, h, n, d, val in c["poisons"]:
        {"q": q, "k": k, "v": v}[name][b, h, n, d] = val
    rope = R.rope_tables(c["N"], c["D"]) if c["rope"] else None
    return q, k, v, rope


def assert_same_nonfinite(got, want, what, may_leak=None, tol=(2e-4, 2e-5)):
    """got has want's NaN / +inf / -inf pattern and, elsewhere, its values. ``may_leak``: where
    got may also be NaN when want is not (see :func:`_leaks`); nowhere may a NaN or inf of
    want become a number."""
    extra = torch.isnan(got) & ~torch.isnan(want)
    if may_leak is not None:
        extra &= ~may_leak
    checks = (("NaN", torch.isnan(want) & ~torch.isnan(got)), ("NaN", extra),
              ("+inf", (got == math.inf) != (want == math.inf)),
              ("-inf", (got == -math.inf) != (want == -math.inf)))
    for name, bad in checks:
        if may_leak is not None and name != "NaN":
            bad = bad & ~(may_leak & torch.isnan(got))
        assert not bad.any(), (f"{what}: {name} pattern differs at {bad.nonzero()[:5].tolist()}"
                               f" (got {got[bad][:5].tolist()}, reference "
                               f"{want[bad][:5].tolist()})")
    fin = torch.isfinite(want) & torch.isfinite(got)
    torch.testing.assert_close(got[fin], want[fin], rtol=tol[0], atol=tol[1], msg=what)


def _leaks(c, shape, backward: bool):
    """Where a tiled kernel may give NaN that the reference does not: a NaN or inf in v at a
    key that a row does not read still meets that row's zero probability inside a tile that
    crosses a group boundary (0 * NaN, as in flash-attention), in that column of the output.
    In the backward the same holds for q, k and v alike (dk sums ds^T q over a tile's rows,
    dq sums ds k over its keys, dp reads v), so a poisoned (sample, head) may leak NaN across
    its slice. A poisoned forward q or k, or scale, has no such slack: the scores of pairs a
    row does not read are replaced, not multiplied."""
    leak = torch.zeros(shape, dtype=torch.bool)
    for name, b, h, n, d, val in c["poisons"]:
        if backward:
            leak[b, h] = True
        elif name == "v":
            leak[b, h, :, d] = True
    return leak


def _padded_forward(backend, c):
    q, k, v, rope = _inputs(c)
    lens = None if c["lens"] is None else torch.tensor(c["lens"])
    want = R.attention(q, k, v, c["grans"], scale=c["scale"], seq_lens=lens, q_rope=rope,
                       k_rope=rope)
    _can(backend, "attention", AttentionInputs.build(q, k, v, c["grans"], seq_lens=lens,
                                                     q_rope=rope, k_rope=rope))
    with adaperceiver.use_backend(backend):
        got = ops.block_masked_attention(q, k, v, c["grans"], scale=c["scale"], seq_lens=lens,
                                         q_rope=rope, k_rope=rope)
    assert_same_nonfinite(got, want, f"{backend} padded {c}", _leaks(c, want.shape, False))


def _packed(t, lens):
    return torch.cat([t[b, :, :n].transpose(0, 1) for b, n in enumerate(lens)])


def _packed_forward(backend, c):
    q, k, v, rope = _inputs(c)
    lens = c["lens"]
    want = R.attention(q, k, v, c["grans"], scale=c["scale"], seq_lens=torch.tensor(lens),
                       q_rope=rope, k_rope=rope).transpose(1, 2)
    want = torch.cat([want[b, :n] for b, n in enumerate(lens)])
    qp, kp, vp = (_packed(t, lens) for t in (q, k, v))
    _can(backend, "attention_varlen", PackedAttentionInputs.build(qp, kp, vp, lens, c["grans"],
                                                                  q_rope=rope, k_rope=rope))
    with adaperceiver.use_backend(backend):
        got = ops.block_masked_attention_varlen(qp, kp, vp, lens, c["grans"], scale=c["scale"],
                                                q_rope=rope, k_rope=rope)
    leak = _leaks(c, (c["B"], c["H"], c["N"], c["D"]), False).transpose(1, 2)
    leak = torch.cat([leak[b, :n] for b, n in enumerate(lens)])
    assert_same_nonfinite(got, want, f"{backend} packed {c}", leak)


def _backend_grads(backend, c, q, k, v, rope, lens, go):
    """(out, (dq, dk, dv)) of ``backend``'s padded op on case c's inputs, upstream gradient go
    (cases the backend cannot take are drawn again)."""
    _can(backend, "attention", AttentionInputs.build(q, k, v, c["grans"], seq_lens=lens,
                                                     q_rope=rope, k_rope=rope))
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    with adaperceiver.use_backend(backend):
        o = ops.block_masked_attention(qq, kk, vv, c["grans"], scale=c["scale"], seq_lens=lens,
                                       q_rope=rope, k_rope=rope)
        return o.detach(), torch.autograd.grad(o, (qq, kk, vv), go)


def _padded_backward(backend, c):
    """Gradients of a NaN- or inf-poisoned forward: the same pattern as the reference's
    backward (dq, dk, dv), with a random (finite) upstream gradient."""
    q, k, v, rope = _inputs(c)
    lens = None if c["lens"] is None else torch.tensor(c["lens"])
    scale = 1 / math.sqrt(c["D"]) if c["scale"] is None else c["scale"]
    out, lse = R.attention_forward(q, k, v, c["grans"], scale, lens, rope, rope)
    go = torch.randn_like(out)
    want = R.attention_backward(go, q, k, v, out, lse, c["grans"], scale, lens, rope, rope)
    _, got = _backend_grads(backend, c, q, k, v, rope, lens, go)
    for name, g, w in zip("qkv", got, want):
        assert_same_nonfinite(g, w, f"{backend} d{name} {c}", _leaks(c, w.shape, True))


def _padded_backward_lowp(backend, c):
    """As _padded_backward, in bfloat16 (float16 where its attention runs in 16 bits): the
    16-bit backward where build_info says "amx" or "avx512-bf16", else the float32 backward of
    the 16-bit inputs. The reference runs in float32 on the same rounded inputs and outputs; finite
    values agree to bfloat16's rounding of P and dS."""
    from adaperceiver import _ext
    dtype = torch.float16 if _ext.build_info()["cpu_attention_bwd_fp16"] != "float32" and \
        c["seed"] % 2 else torch.bfloat16
    q, k, v, rope = (t.to(dtype) if torch.is_tensor(t) else t for t in _inputs(c))
    lens = None if c["lens"] is None else torch.tensor(c["lens"])
    scale = 1 / math.sqrt(c["D"]) if c["scale"] is None else c["scale"]
    go = torch.randn(*q.shape[:-1], v.shape[-1],
                     generator=torch.Generator().manual_seed(c["seed"])).to(dtype)
    o, got = _backend_grads(backend, c, q, k, v, rope, lens, go)
    f = [t.float() for t in (q, k, v)]
    lse = R.attention_forward(*f, c["grans"], scale, lens, rope, rope)[1]
    want = R.attention_backward(go.float(), *f, o.float(), lse, c["grans"], scale,
                                lens, rope, rope)
    for name, g, w in zip("qkv", got, want):
        assert_same_nonfinite(g.float(), w, f"{backend} {dtype} d{name} {c}",
                              _leaks(c, w.shape, True), tol=(8e-2, 8e-2))


def _property_test(check, backend: str, packed: bool, examples: int):
    # Triton takes CPU tensors only in its interpreter; on a GPU machine the device kernels'
    # NaN handling is tested in test_kernels_attention.py and by make gpu-check
    @pytest.mark.skipif(backend == "triton" and not INTERPRET,
                        reason="Triton on CPU tensors needs its interpreter")
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(c=cases(packed, backend))
    def test(c):
        check(backend, c)
    return test


# one property test per (check, backend): test_<check>_<backend>, with fewer examples where the
# backend runs in an interpreter
EXAMPLES = {"cpp": 40, "triton": 8}
for _name, _check, _packed_case in (("padded_forward", _padded_forward, False),
                                    ("packed_forward", _packed_forward, True),
                                    ("padded_backward", _padded_backward, False)):
    for _backend, _n in EXAMPLES.items():
        _test = _property_test(_check, _backend, _packed_case, _n)
        _test.__name__ = f"test_{_name}_propagates_like_the_reference_{_backend}"
        globals()[_test.__name__] = _test
test_padded_backward_lowp_propagates_like_the_reference_cpp = _property_test(
    _padded_backward_lowp, "cpp", False, EXAMPLES["cpp"])


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("where", ["attn.q.weight", "attn.k.weight", "attn.v.weight",
                                   "ffn.fc1.weight", "ffn.fc2.bias"])
def test_a_nan_weight_gives_nan_logits(backend, where):
    """The issue's example: a NaN in one weight of block 3 must reach the logits."""
    from helpers import tiny_model
    model = tiny_model(depth=4).eval()
    with torch.no_grad():   # the state dict's tensors are views of the parameters (q, k, v:
        # row views of the one qkv Linear)
        model.blocks[2].state_dict()[where].view(-1)[0] = math.nan
    with adaperceiver.use_backend(backend), torch.inference_mode():
        for kw in (dict(num_tokens=64, depth=4), dict(num_tokens=[32, 64], mat_dim=[48, 96],
                                                      depth=[3, 4])):
            logits = model(torch.randn(2, 3, 64, 64), **kw).logits
            assert logits.isnan().all(), (backend, where, kw)
