"""The compiled CPU kernels (adaperceiver._C, backend "cpp") against the float64 references.

Raw backend ops (torch.ops.adaperceiver.*_fwd/_bwd) and the autograd path through the public
ops under use_backend("cpp"): tails (lengths and head dims that are not tile multiples), random
grans, cross-attention (Nq != Nk, Nq = 1), seq_lens (incl. 0), RoPE, long key ranges (several
softmax chunks), mixed Matryoshka widths incl. 1 and Hmax; every element checked.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import adaperceiver
from adaperceiver import _ext
from adaperceiver.ops import (NoBackendError, block_masked_attention, matryoshka_ffn,
                              use_backend)
from adaperceiver.ops import cpp_backend
from adaperceiver.ops import reference as R
from adaperceiver.ops.inputs import AttentionInputs, FfnInputs
from helpers import case_id, mkldnn_off

pytestmark = pytest.mark.skipif(not _ext.available(),
                                reason=f"adaperceiver._C not loaded: {_ext.load_error()}")

ops = torch.ops.adaperceiver
NAN = float("nan")


def _poison_heap(*shapes):
    """Best effort: leave NaN-filled freed blocks of the output sizes for the allocator to hand
    out again, so an output element the kernel forgets to write shows up as NaN."""
    for s in shapes:
        t = torch.full(s, NAN)
        del t


def _close(a, b, atol, rtol=0.0, what=""):
    a64, b64 = a.double(), b.double()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert not torch.isnan(a64).any(), f"{what}: NaN in output"
    err = (a64 - b64).abs()
    bound = atol + rtol * b64.abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {a.numel()} elements off, max err "
                           f"{err.max().item():.3g}")


def _rand_grans(n, gen):
    k = int(torch.randint(1, 6, (1,), generator=gen))
    g = sorted(set(torch.randint(1, n + 8, (k,), generator=gen).tolist()))
    return g


# (B, H, Nq, Nk, D, grans, seq_lens, q_rope, k_rope)
ATTN_FIELDS = "B H Nq Nk D grans lens qrope krope"
ATTN_CASES = [
    (2, 3, 77, 77, 64, [5, 20, 32, 64], [77, 40], True, True),       # tails, RoPE, seq_lens
    (1, 2, 100, 100, 80, [32, 64, 96], None, False, False),          # D = 80: column tails
    (2, 2, 1, 50, 64, None, None, False, True),                      # cross, Nq = 1
    (2, 2, 13, 196, 64, None, [13, 7], True, False),                 # cross, lengths clip both
    (1, 1, 40, 600, 16, None, None, False, False),                   # 2 key chunks (KC = 512)
    (1, 2, 600, 600, 8, [100, 550], [590], True, True),              # long self, band in chunk 2
    (3, 1, 33, 33, 32, [32], [0, 1, 33], False, False),              # empty sample, N = 33
    (1, 1, 1, 1, 64, [1], None, True, True),                         # one token
]


def _attn_inputs(B, H, Nq, Nk, D, seq_lens, q_rope, k_rope, dtype=torch.float32):
    q = torch.randn(B, H, Nq, D).to(dtype)
    k = torch.randn(B, H, Nk, D).to(dtype)
    v = torch.randn(B, H, Nk, D).to(dtype)
    sl = None if seq_lens is None else torch.tensor(seq_lens, dtype=torch.int32)
    qr = R.rope_tables(Nq, D) if q_rope else None
    kr = R.rope_tables(Nk, D) if k_rope else None
    return q, k, v, sl, qr, kr


def _pair(r):
    return (None, None) if r is None else r


def _check_attention(q, k, v, grans, sl, qr, kr, atol):
    scale = 1.0 / math.sqrt(q.shape[-1])
    B, H, Nq, D = q.shape
    _poison_heap((B, H, Nq, v.shape[-1]), (B, H, Nq))
    out, lse = ops.block_masked_attention_fwd(q, k, v, grans, scale, sl, *_pair(qr), *_pair(kr))
    d = [t.double() for t in (q, k, v)]
    ro, rl = R.attention_forward(*d, grans, scale, sl, qr, kr)
    _close(out, ro, atol, what="out")
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Nq)
    assert torch.equal(torch.isinf(lse), torch.isinf(rl)), "lse -inf pattern differs"
    fin = torch.isfinite(rl)
    _close(lse[fin], rl[fin], atol, what="lse")
    if sl is not None:  # rows past a sample's length are exactly zero
        for b, n in enumerate(sl.tolist()):
            assert (out[b, :, max(n, 0):] == 0).all()
    go = torch.randn_like(out)
    _poison_heap(q.shape, k.shape, v.shape)
    grads = ops.block_masked_attention_bwd(go, q, k, v, out, lse, grans, scale, sl,
                                           *_pair(qr), *_pair(kr))
    rg = R.attention_backward(go.double(), *d, ro, rl, grans, scale, sl, qr, kr)
    for name, g, r in zip(("dq", "dk", "dv"), grads, rg):
        _close(g, r, atol, what=name)
    return out




@pytest.mark.parametrize("case", ATTN_CASES, ids=[case_id(c, ATTN_FIELDS) for c in ATTN_CASES])
def test_attention_fp32_matches_reference(case):
    B, H, Nq, Nk, D, grans, seq_lens, q_rope, k_rope = case
    q, k, v, sl, qr, kr = _attn_inputs(B, H, Nq, Nk, D, seq_lens, q_rope, k_rope)
    _check_attention(q, k, v, grans, sl, qr, kr, atol=1e-5)


def test_attention_random_grans_and_lengths():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    for _ in range(6):
        n = int(torch.randint(1, 150, (1,), generator=gen))
        B, H = int(torch.randint(1, 4, (1,), generator=gen)), 2
        D = [8, 16, 24, 64][int(torch.randint(0, 4, (1,), generator=gen))]
        grans = _rand_grans(n, gen)
        lens = torch.randint(0, n + 3, (B,), generator=gen).tolist()
        rope = bool(torch.randint(0, 2, (1,), generator=gen))
        q, k, v, sl, qr, kr = _attn_inputs(B, H, n, n, D, lens, rope, rope)
        _check_attention(q, k, v, grans, sl, qr, kr, atol=1e-5)


def test_attention_bf16_loose():
    q, k, v, sl, qr, kr = _attn_inputs(2, 2, 70, 70, 64, [70, 35], True, True, torch.bfloat16)
    scale = 0.125
    out, lse = ops.block_masked_attention_fwd(q, k, v, [16, 48], scale, sl, *qr, *kr)
    assert out.dtype == torch.bfloat16
    ro, rl = R.attention_forward(q.double(), k.double(), v.double(), [16, 48], scale, sl, qr, kr)
    _close(out, ro, 3e-2, 2e-2, what="bf16 out")
    go = torch.randn_like(out)
    grads = ops.block_masked_attention_bwd(go, q, k, v, out, lse, [16, 48], scale, sl, *qr, *kr)
    rg = R.attention_backward(go.double(), q.double(), k.double(), v.double(), ro, rl, [16, 48],
                              scale, sl, qr, kr)
    for name, g, r in zip(("dq", "dk", "dv"), grads, rg):
        assert g.dtype == torch.bfloat16
        _close(g, r, 6e-2, 3e-2, what=f"bf16 {name}")


def test_attention_autograd_through_public_op():
    B, H, N, D = 2, 2, 45, 32
    grans = [8, 30]
    q, k, v, sl, qr, kr = _attn_inputs(B, H, N, N, D, [45, 20], True, True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with use_backend("cpp"):
        out = block_masked_attention(*leaves, grans, seq_lens=sl, q_rope=qr, k_rope=kr)
    go = torch.randn_like(out)
    out.backward(go)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = R.attention(*ref_leaves, grans, seq_lens=sl, q_rope=qr, k_rope=kr)
    ref.backward(go.double())
    _close(out.detach(), ref.detach(), 1e-5, what="out")
    for name, a, b in zip("qkv", leaves, ref_leaves):
        _close(a.grad, b.grad, 1e-5, what=f"d{name}")


def test_attention_dispatch_picks_cpp_on_cpu():
    q, k, v, sl, qr, kr = _attn_inputs(1, 1, 8, 8, 16, None, False, False)
    assert cpp_backend.why_not_attention(AttentionInputs.build(q, k, v, [4])) == []


def test_attention_bad_input_errors():
    q, k, v, _, _, _ = _attn_inputs(1, 1, 8, 8, 16, None, False, False)
    with pytest.raises(RuntimeError, match=r"token_grans=\[4, 2\] is not allowed"):
        ops.block_masked_attention_fwd(q, k, v, [4, 2], 0.25, None, None, None, None, None)
    with pytest.raises(RuntimeError, match=r"q.dtype=Double is not supported.*float32"):
        ops.block_masked_attention_fwd(q.double(), k.double(), v.double(), None, 0.25, None,
                                       None, None, None, None)
    with pytest.raises(RuntimeError, match=r"seq_lens must be an int32/int64 tensor of shape"):
        ops.block_masked_attention_fwd(q, k, v, None, 0.25, torch.tensor([1.0]), None, None,
                                       None, None)
    with pytest.raises(RuntimeError, match=r"q_rope tables must be \(8, 8\)"):
        c = torch.ones(8, 4)
        ops.block_masked_attention_fwd(q, k, v, None, 0.25, None, c, c, None, None)
    reasons = cpp_backend.why_not_attention(AttentionInputs.build(q.double(), k.double(),
                                                                  v.double()))
    assert any("float64" in r and "float32" in r for r in reasons), reasons
    # (built by hand: q on another device than k and v is no valid input)
    reasons = cpp_backend.why_not_attention(AttentionInputs(q.to("meta"), k, v, None, 0.25,
                                                            None, None, None))
    assert any("meta" in r and "CPU tensors only" in r for r in reasons), reasons
    with use_backend("cpp"), pytest.raises(NoBackendError, match=r"cpp: q.dtype=torch.float64"):
        block_masked_attention(q.double(), k.double(), v.double(), [4])


# ----------------------------------------------------------------------------------- FFN
def _ffn_inputs(B, N, C, Hmax, Cout, dtype=torch.float32):
    x = torch.randn(B, N, C)
    w1 = torch.randn(Hmax, C) / math.sqrt(C)
    b1 = torch.randn(Hmax) * 0.5
    w2 = torch.randn(Cout, Hmax) / math.sqrt(Hmax)
    b2 = torch.randn(Cout) * 0.5
    return [t.to(dtype) for t in (x, w1, b1, w2, b2)]


FFN_CASES = [
    (5, 7, 40, 70, 24, [70, 1, 33, 70, 1]),    # mixed, non-adjacent groups, 1 and Hmax
    (4, 9, 33, 50, 33, [50, 50, 17, 17]),      # adjacent groups (in-place views)
    (3, 1, 16, 20, 8, [20, 20, 20]),           # one width, N = 1
    (2, 5, 24, 37, 19, [1, 1]),                # width 1 only
    (3, 1030, 8, 12, 8, [12, 5, 12]),          # runs of >= 1024 rows: in place, no gather
]


@pytest.mark.parametrize("case", FFN_CASES, ids=[case_id(c, "B N C H Cout hidden") for c in FFN_CASES])
def test_ffn_fp32_matches_reference(case):
    B, N, C, Hmax, Cout, hidden = case
    args = _ffn_inputs(B, N, C, Hmax, Cout)
    _poison_heap((B, N, Cout))
    out = ops.matryoshka_ffn_fwd(*args, hidden)
    d = [t.double() for t in args]
    _close(out, R.ffn_forward(*d, hidden), 1e-5, 1e-6, what="ffn out")
    go = torch.randn_like(out)
    _poison_heap((B, N, C), (Hmax, C))
    grads = ops.matryoshka_ffn_bwd(go, *args, hidden)
    ref = R.ffn_backward(go.double(), *d, hidden)
    for name, g, r in zip(("dx", "dW1", "db1", "dW2", "db2"), grads, ref):
        if name == "dx":
            _close(g, r, 1e-5, 1e-6, what=name)
        else:
            # weight/bias grads are sums over B*N rows (O(sqrt(B*N)) values) in an order the GEMM
            # library picks per CPU: an element that cancels to near zero keeps the rounding of
            # its terms, so the bound is relative to the gradient's largest element (1e-5)
            _close(g, r, 1e-5 * max(1.0, r.abs().max().item()), 1e-5, what=name)
    # units past the widest sample get exactly no gradient
    hw = max(hidden)
    assert (grads[1][hw:] == 0).all() and (grads[2][hw:] == 0).all()
    assert (grads[3][:, hw:] == 0).all()


def test_ffn_bias_gelu_over_the_whole_range():
    """fc1's bias and the exact GELU run as one vectorised pass on the CPU (its own erf): with
    identity fc1/fc2 the op returns GELU(x + b1) + b2, checked against float64 over
    pre-activations from -12 to 12 (both tails of erf, and 0), at a width with a vector tail."""
    torch.manual_seed(7)
    C = 67                                       # 4 x 16 lanes + a tail of 3
    x = torch.randn(3, 41, C) * 4
    b1 = torch.linspace(-8, 8, C)
    b2 = torch.randn(C)
    eye = torch.eye(C)
    _poison_heap((3, 41, C))
    out = ops.matryoshka_ffn_fwd(x, eye, b1, eye, b2, [C, C, 40])
    pre = (x + b1).double()
    want = torch.nn.functional.gelu(pre) + b2.double()
    want[2, :, 40:] = b2[40:].double()           # sample 2 has 40 hidden units
    assert pre.abs().max() > 10
    _close(out, want, 1e-6, 1e-6, what="bias + GELU")


def test_ffn_random_widths_autograd():
    B, N, C, Hmax, Cout = 6, 5, 28, 45, 28
    hidden = torch.randint(1, Hmax + 1, (B,)).tolist()
    hidden[0], hidden[-1] = 1, Hmax
    args = _ffn_inputs(B, N, C, Hmax, Cout)
    leaves = [t.clone().requires_grad_() for t in args]
    with use_backend("cpp"):
        out = matryoshka_ffn(*leaves, hidden)
    go = torch.randn_like(out)
    out.backward(go)
    ref_leaves = [t.double().requires_grad_() for t in args]
    ref = R.matryoshka_ffn(*ref_leaves, hidden)
    ref.backward(go.double())
    _close(out.detach(), ref.detach(), 1e-5, 1e-6, what="out")
    for name, a, b in zip(("x", "W1", "b1", "W2", "b2"), leaves, ref_leaves):
        _close(a.grad, b.grad, 1e-5, 1e-6, what=f"d{name}")


def test_ffn_bf16_loose():
    B, N, C, Hmax, Cout = 3, 6, 32, 48, 32
    hidden = [48, 7, 30]
    args = _ffn_inputs(B, N, C, Hmax, Cout, torch.bfloat16)
    out = ops.matryoshka_ffn_fwd(*args, hidden)
    assert out.dtype == torch.bfloat16
    d = [t.double() for t in args]
    _close(out, R.ffn_forward(*d, hidden), 5e-2, 2e-2, what="bf16 out")
    go = torch.randn_like(out)
    grads = ops.matryoshka_ffn_bwd(go, *args, hidden)
    for name, g, r in zip(("dx", "dW1", "db1", "dW2", "db2"), grads,
                          R.ffn_backward(go.double(), *d, hidden)):
        assert g.dtype == torch.bfloat16
        _close(g, r, 1e-1, 3e-2, what=f"bf16 {name}")


def test_ffn_bad_input_errors():
    args = _ffn_inputs(2, 3, 8, 10, 8)
    with pytest.raises(RuntimeError, match=r"hidden=11 is not allowed; allowed: ints in 1..10"):
        ops.matryoshka_ffn_fwd(*args, [11, 1])
    with pytest.raises(RuntimeError, match=r"hidden has 1 entries; the batch has 2"):
        ops.matryoshka_ffn_fwd(*args, [1])
    with pytest.raises(RuntimeError, match=r"x.dtype=Double is not supported"):
        ops.matryoshka_ffn_fwd(*[t.double() for t in args], [1, 1])
    reasons = cpp_backend.why_not_ffn(FfnInputs(args[0].to("meta"), *args[1:], [1, 1]))
    assert any("meta" in r for r in reasons), reasons
    assert cpp_backend.why_not_ffn(FfnInputs.build(*args, [1, 1])) == []


# ------------------------------------------------------------------ library coexistence
@pytest.mark.parametrize("order", ["ext_first", "python_first"])
def test_torch_library_coexists_with_python_custom_ops(order):
    first, second = ("adaperceiver._C", "adaperceiver.ops") if order == "ext_first" else (
        "adaperceiver.ops", "adaperceiver._C")
    code = (f"import torch, importlib; importlib.import_module('{first}'); "
            f"importlib.import_module('{second}'); o = torch.ops.adaperceiver; "
            "names = ['block_masked_attention_fwd', 'block_masked_attention_bwd', "
            "'matryoshka_ffn_fwd', 'matryoshka_ffn_bwd', 'block_masked_attention', "
            "'matryoshka_ffn']; [getattr(o, n) for n in names]; "
            "x = torch.randn(1, 2, 4); w = torch.randn(3, 4); "
            "print(o.matryoshka_ffn(x, w, torch.zeros(3), torch.randn(4, 3), torch.zeros(4), "
            "[2]).shape)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([1, 2, 4])" in res.stdout


def test_attention_value_dim_differs_from_head_dim():
    q, k, _, sl, qr, kr = _attn_inputs(2, 2, 50, 50, 32, [50, 21], True, True)
    v = torch.randn(2, 2, 50, 40)  # Dv = 40: 32 + an 8-wide column tail in the P V product
    _check_attention(q, k, v, [10, 30], sl, qr, kr, atol=1e-5)


@pytest.mark.parametrize("n_q, n_k, grans", [(77, 77, [10, 33, 64]), (1, 45, None),
                                             (33, 20, None)])
def test_strided_heads_last_inputs_with_rope_read_in_place(n_q, n_k, grans):
    """The model hands the op (B, N, H, D) projections seen as (B, H, N, D): float32 inputs are
    read in place and RoPE applied as rows load (no rotated copies); results equal the float64
    reference."""
    from adaperceiver.ops import reference as R
    B, H, D = 3, 4, 64
    xq = torch.randn(B, n_q, 3 * H * D)          # q columns interleaved with others: strided
    xk = torch.randn(B, n_k, 2 * H * D)
    q = xq[..., :H * D].view(B, n_q, H, D).transpose(1, 2)
    k, v = (t.view(B, n_k, H, D).transpose(1, 2) for t in xk.split(H * D, -1))
    assert not q.is_contiguous() and q.stride(-1) == 1
    q_rope = R.rope_tables(n_q, D) if grans is not None else None
    k_rope = R.rope_tables(n_k, D)
    seq = torch.tensor([n_q, max(1, n_q // 2), 1], dtype=torch.int32) if grans else None
    with adaperceiver.use_backend("cpp"):
        out = adaperceiver.ops.block_masked_attention(q, k, v, grans, seq_lens=seq,
                                                      q_rope=q_rope, k_rope=k_rope)
    d64 = (lambda r: None if r is None else tuple(t.double() for t in r))
    want = R.attention(q.double(), k.double(), v.double(), grans, seq_lens=seq,
                       q_rope=d64(q_rope), k_rope=d64(k_rope))
    assert torch.isfinite(out).all()
    assert (out.double() - want).abs().max().item() <= 1e-5


# ---- bfloat16 / float16 on AMX tiles (attention.cpp: attention_fwd_tiles) ----
# The tile path runs where build_info()["cpu_attention_<dtype>"] == "amx"; the float32 kernel
# runs the same inputs with torch.backends.mkldnn disabled (the tiles go through oneDNN's
# brgemm), so both paths are compared in one process.
# (B, H, Nq, Nk, D, Dv, grans, seq_lens, rope, heads_last)
TILE_FIELDS = "B H Nq Nk D Dv grans lens rope heads_last"
TILE_CASES = [
    (2, 3, 77, 77, 64, 64, [5, 20, 37, 64], [77, 40], True, False),  # odd kend, row/key tails
    (1, 2, 300, 300, 80, 80, [32, 100, 256], None, True, False),     # D = 80, 2 key chunks
    (2, 2, 520, 520, 128, 128, None, [520, 301], False, True),       # D = 128, 3 chunks, strided
    (1, 2, 45, 45, 33, 33, [7, 45], None, False, False),             # odd D: a padded pair
    (2, 2, 50, 50, 32, 40, [10, 30], [50, 21], True, False),         # Dv != D
    (2, 2, 13, 196, 64, 64, None, [13, 7], True, False),             # cross attention, lengths
    (3, 1, 33, 33, 64, 64, [32], [0, 1, 33], False, False),          # empty sample, one row
]
LOWP = [torch.bfloat16, torch.float16]


def _tile_inputs(case, dtype, seed):
    B, H, Nq, Nk, D, Dv, grans, lens, rope, heads_last = case
    g = torch.Generator().manual_seed(seed)
    if heads_last:  # (B, N, H, D) projections seen as (B, H, N, D), as the model hands them
        q = torch.randn(B, Nq, H, D, generator=g).to(dtype).transpose(1, 2)
        k = torch.randn(B, Nk, H, D, generator=g).to(dtype).transpose(1, 2)
        v = torch.randn(B, Nk, H, Dv, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, H, Nq, D, generator=g).to(dtype)
        k = torch.randn(B, H, Nk, D, generator=g).to(dtype)
        v = torch.randn(B, H, Nk, Dv, generator=g).to(dtype)
    sl = None if lens is None else torch.tensor(lens)
    qr = R.rope_tables(Nq, D) if rope else None
    kr = R.rope_tables(Nk, D) if rope else None
    return q, k, v, grans, sl, qr, kr


def _fwd(q, k, v, grans, sl, qr, kr):
    B, H, Nq, _ = q.shape
    _poison_heap((B, Nq, H, v.shape[-1]), (B, H, Nq))
    return ops.block_masked_attention_fwd(q, k, v, grans, 1.0 / math.sqrt(q.shape[-1]), sl,
                                          *_pair(qr), *_pair(kr))


def _rule_err(x, truth):
    return (x.double() - truth).abs().max().item()


def test_build_info_names_the_attention_paths():
    """cpu_attention_bf16 / _fp16 (the forward) and cpu_attention_bwd_bf16 / _fp16 (the
    backward) say "amx" exactly where the CPU has the tiles for the dtype, nothing lowered them
    (ADAPERCEIVER_CPU_ISA) and oneDNN is enabled; for bfloat16 without the tiles,
    "avx512-bf16" where the CPU has AVX512-BF16 (and -BW, -VL) under the same conditions;
    "float32" otherwise."""
    import os
    caps = torch._C._cpu._get_cpu_capability()
    info = _ext.build_info()
    env = os.environ.get("ADAPERCEIVER_CPU_ISA", "").strip().lower()
    tiles = bool(caps.get("avx512_f") and caps.get("amx_tile") and caps.get("amx_bf16")) and \
        env in ("", "amx")
    dots = bool(caps.get("avx512_f") and caps.get("avx512_bf16") and caps.get("avx512_bw")
                and caps.get("avx512_vl")) and env in ("", "amx")
    assert info["cpu_attention_bf16"] == ("amx" if tiles else "avx512-bf16" if dots
                                          else "float32")
    assert info["cpu_attention_fp16"] == ("amx" if tiles and caps.get("amx_fp16") else "float32")
    assert info["cpu_attention_bwd_bf16"] == info["cpu_attention_bf16"]
    assert info["cpu_attention_bwd_fp16"] == info["cpu_attention_fp16"]
    for tag in ("bf16", "fp16"):   # a reason exactly where the dtype computes in float32
        assert (info[f"cpu_attention_{tag}_why_not"] is None) == \
            (info[f"cpu_attention_{tag}"] != "float32")
    with mkldnn_off():
        off = _ext.build_info()
    assert off["cpu_attention_bf16"] == off["cpu_attention_fp16"] == "float32"
    if info["cpu_attention_bf16"] != "float32":
        assert "torch.backends.mkldnn is disabled" in off["cpu_attention_bf16_why_not"]
    assert off["cpu_attention_bwd_bf16"] == off["cpu_attention_bwd_fp16"] == "float32"


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("case", TILE_CASES, ids=[case_id(c, TILE_FIELDS) for c in TILE_CASES])
def test_tiles_match_the_float32_path_and_the_rule(case, dtype):
    """Both paths on the same 16-bit inputs: each within flash-attn's rule (error vs float64
    <= 2x the plain reference's in dtype, plus 1e-4 of the largest magnitude), within that of
    each other, the same lse finiteness, zeros past a sample's length; outputs written into
    NaN-poisoned memory."""
    tag = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if _ext.build_info()[f"cpu_attention_{tag}"] == "float32":
        pytest.skip(f"{tag} attention runs in float32 here (no 16-bit products for it)")
    q, k, v, grans, sl, qr, kr = _tile_inputs(case, dtype, seed=7)
    out, lse = _fwd(q, k, v, grans, sl, qr, kr)
    with mkldnn_off():
        assert _ext.build_info()[f"cpu_attention_{tag}"] == "float32"
        out32, lse32 = _fwd(q, k, v, grans, sl, qr, kr)
    assert out.dtype == dtype and lse.dtype == torch.float32
    scale = 1.0 / math.sqrt(q.shape[-1])
    ref, _ = R.attention_forward(q, k, v, grans, scale, sl, qr, kr)
    d64 = (lambda r: None if r is None else tuple(t.double() for t in r))
    truth, truth_lse = R.attention_forward(q.double(), k.double(), v.double(), grans, scale, sl,
                                           d64(qr), d64(kr))
    floor = 1e-4 * truth.abs().max().item()
    bound = 2 * _rule_err(ref, truth) + floor
    assert not out.isnan().any() and not out32.isnan().any()
    assert _rule_err(out, truth) <= bound, (_rule_err(out, truth), bound)
    assert _rule_err(out32, truth) <= bound
    assert _rule_err(out, out32.double()) <= bound
    fin = truth_lse.isfinite()
    assert torch.equal(lse.isfinite(), fin) and torch.equal(lse32.isfinite(), fin)
    assert (lse[fin].double() - truth_lse[fin]).abs().max().item() <= 2e-2
    if sl is not None:
        for b, n in enumerate(sl.tolist()):
            assert (out[b, :, max(n, 0):] == 0).all() and (lse[b, :, max(n, 0):] == -math.inf).all()


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("scale", [-0.3, -40.0, 0.0, 2.5, 1e-3])
def test_tiles_any_finite_scale(scale, dtype):
    """The tiles' softmax takes the max of the raw scores times a positive scale and the scaled
    max otherwise (microkernel.cpp, softmax_row_avx512): negative, zero, large and tiny scales
    over three key chunks with tails and a group boundary inside a tile, each within
    flash-attn's rule of the float64 truth, the same lse finiteness, on poisoned memory."""
    tag = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if _ext.build_info()[f"cpu_attention_{tag}"] == "float32":
        pytest.skip(f"{tag} attention runs in float32 here (no 16-bit products for it)")
    g = torch.Generator().manual_seed(11)
    B, H, N, D = 2, 2, 533, 64
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))
    grans, sl = [20, 300, 533], torch.tensor([533, 411])
    _poison_heap((B, N, H, D), (B, H, N))
    out, lse = ops.block_masked_attention_fwd(q, k, v, grans, scale, sl, None, None, None, None)
    ref, _ = R.attention_forward(q, k, v, grans, scale, sl)
    truth, truth_lse = R.attention_forward(q.double(), k.double(), v.double(), grans, scale, sl)
    bound = 2 * _rule_err(ref, truth) + 1e-4 * truth.abs().max().item()
    assert not out.isnan().any()
    assert _rule_err(out, truth) <= bound, (_rule_err(out, truth), bound)
    fin = truth_lse.isfinite()
    assert torch.equal(lse.isfinite(), fin)
    assert (lse[fin].double() - truth_lse[fin]).abs().max().item() <= 2e-2


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_tiles_packed_rows_match_padded(dtype):
    """The packed (varlen) kernel on tiles: the padded kernel's values on the owned rows."""
    tag = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if _ext.build_info()[f"cpu_attention_{tag}"] == "float32":
        pytest.skip(f"{tag} attention runs in float32 here (no 16-bit products for it)")
    lens, H, D, grans = [50, 0, 37, 301], 3, 64, [16, 37, 64, 256]
    g = torch.Generator().manual_seed(11)
    rows = sum(lens)
    q, k, v = (torch.randn(rows, H, D, generator=g).to(dtype) for _ in range(3))
    tables = R.rope_tables(max(lens), D)
    _poison_heap((rows, H, D))
    out, lse = ops.block_masked_attention_varlen_fwd(q, k, v, lens, grans, 0.125, *tables,
                                                     *tables)
    P = [torch.zeros(len(lens), H, max(lens), D, dtype=dtype) for _ in range(3)]
    s = 0
    for b, n in enumerate(lens):
        for p, x in zip(P, (q, k, v)):
            p[b, :, :n] = x[s:s + n].transpose(0, 1)
        s += n
    pout, plse = ops.block_masked_attention_fwd(*P, grans, 0.125, torch.tensor(lens), *tables,
                                                *tables)
    want = torch.cat([pout[b, :, :n].transpose(0, 1) for b, n in enumerate(lens)])
    assert torch.equal(out, want)
    assert torch.equal(lse, plse)


@pytest.mark.parametrize("dtype", [*LOWP, torch.float32], ids=str)
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_values_reach_only_rows_that_see_them(dtype, bad):
    """Grans that split a query tile (20, 40 inside tiles of 32 or 64 rows): a NaN / inf value
    row at key 25 reaches exactly the rows that see key 25, as in the reference; rows 0..19 have
    weight 0 on it, and 0 times a non-finite value must not reach them. float32: the float32
    kernel's band; bfloat16 / float16: the AMX tiles (skipped where they do not run)."""
    if dtype != torch.float32:
        tag = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        if _ext.build_info()[f"cpu_attention_{tag}"] == "float32":
            pytest.skip(f"{tag} attention runs in float32 here (no 16-bit products for it)")
    n, grans = 300, [20, 40, 130, 300]     # 300 keys: the non-finite rows sit in two chunks
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, n, 64, generator=g).to(dtype) for _ in range(3))
    v[0, 1, 25, 3] = bad
    v[1, 0, 270, 60] = bad                   # in the second chunk of 256 keys, group 130..299
    out, _ = ops.block_masked_attention_fwd(q, k, v, grans, 0.125, None, None, None, None, None)
    ref = R.attention(q.double(), k.double(), v.double(), grans, scale=0.125)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    fin = out.isfinite()
    assert not fin[0, 1, 20:].all(-1).any() and fin[0, 1, :20].all()
    assert not fin[1, 0, 130:].all(-1).any() and fin[1, 0, :130].all()  # the group 130..299
    torch.testing.assert_close(out[fin].double(), ref[fin], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_tiles_keep_value_rows_past_a_tile_out(dtype):
    """A tile reads its keys' value rows in chunks rounded up to 32 keys (and pairs of keys):
    those past its last key must weigh 0 against zeros, not against the next group's values.
    v poisoned at key 37 (the pair partner of key 36, a tile's last) and at key 40 (inside the
    rounded chunk): rows 0..31, whose tile ends at key 37, stay bit for bit the clean output."""
    tag = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if _ext.build_info()[f"cpu_attention_{tag}"] == "float32":
        pytest.skip(f"{tag} attention runs in float32 here (no 16-bit products for it)")
    n, grans = 100, [37, 64, 100]
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 64, generator=g).to(dtype) for _ in range(3))
    base, _ = ops.block_masked_attention_fwd(q, k, v, grans, 0.125, None, None, None, None, None)
    for key in (37, 40):
        vp = v.clone()
        vp[0, 1, key, 4] = NAN
        out, _ = ops.block_masked_attention_fwd(q, k, vp, grans, 0.125, None, None, None, None,
                                                None)
        assert torch.equal(out[0, 1, :32], base[0, 1, :32]), f"v[{key}] reached rows < 32"
        assert out[0, 1, 37:].isnan().any(-1).all()         # rows that read the key
        assert torch.equal(out[0, 0], base[0, 0])


_CAPPED_CHILD = r"""
import torch
from adaperceiver import _ext
info = _ext.build_info()
why = info["cpu_attention_bf16_why_not"]
assert info["cpu_attention_bf16"] == info["cpu_attention_bwd_bf16"] == "float32", info
assert why and "cpublas::brgemm does not take BFloat16" in why and "frame #" not in why, why
g = torch.Generator().manual_seed(3)
q, k, v = (torch.randn(2, 3, 70, 64, generator=g).bfloat16() for _ in range(3))
op = torch.ops.adaperceiver.block_masked_attention_fwd
got = op(q, k, v, [32, 70], 0.125, None, None, None, None, None)
torch.backends.mkldnn.enabled = False      # the float32 kernel by the other road
want = op(q, k, v, [32, 70], 0.125, None, None, None, None, None)
assert all(torch.equal(a, b) for a, b in zip(got, want))
print("ok")
"""


def test_bf16_attention_computes_in_float32_where_brgemm_refuses_bf16():
    """With oneDNN capped below its bfloat16 instructions (ONEDNN_MAX_CPU_ISA=AVX2) torch's
    brgemm refuses bfloat16: the probe product says so once, build_info gives that reason (no
    backtrace) and the attention takes its float32 kernel, bit for bit the output it gives with
    oneDNN disabled, instead of failing on the first call."""
    caps = torch._C._cpu._get_cpu_capability()
    if not (caps.get("avx512_f") and caps.get("avx512_bf16")):
        pytest.skip("no AVX512-BF16: the bfloat16 attention never runs in 16 bits here")
    env = {k: v for k, v in os.environ.items() if k != "ADAPERCEIVER_CPU_ISA"}
    env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    res = subprocess.run([sys.executable, "-c", _CAPPED_CHILD], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.parametrize("D", [3, 8, 66])
def test_float16_inputs_convert_exactly_in_the_float32_kernel(D):
    """The float32 kernel reads float16 inputs converted exactly (F16C, 8 values a step, the
    tail value by value): its output is, bit for bit, the same kernel's on the inputs cast to
    float32, rounded to float16, and its lse the same. Subnormal, inf and NaN inputs; head dims
    below, at and past the 8-value step. torch.backends.mkldnn off keeps every CPU on the
    float32 kernel."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 45, D, generator=g) for _ in range(3))
    k[0, 0, 3] *= 1e-6                      # float16 subnormals (below 6.1e-5)
    v[0, 1, 5] = 3e-7
    v[1, 0, 7, 0] = math.inf
    q[1, 1, 9, D - 1] = math.nan
    q16, k16, v16 = (t.half() for t in (q, k, v))
    sub = k16[0, 0, 3].abs()
    assert ((sub > 0) & (sub < 6.1e-5)).any()
    op = torch.ops.adaperceiver.block_masked_attention_fwd
    args = ([16, 45], 0.3, None, None, None, None, None)
    with mkldnn_off():
        out16, lse16 = op(q16, k16, v16, *args)
        out32, lse32 = op(q16.float(), k16.float(), v16.float(), *args)
    torch.testing.assert_close(out16, out32.half(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse16, lse32, rtol=0, atol=0, equal_nan=True)
    assert out16.isnan().any() and out16.isfinite().any()
