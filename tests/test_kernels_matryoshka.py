"""Triton Matryoshka FFN (kernels/matryoshka.py) against the float64 masked full-width reference
(adaperceiver.ops.reference), on the GPU when there is one, else under TRITON_INTERPRET=1
(helpers.TRITON_DEVICE).

Every output and scratch buffer the kernels get is NaN-filled first (``poison`` fixture), so a
result element that is not written, or a scratch element read before it is written, shows up
as a NaN; every element is compared. bf16 cannot run under the interpreter (its bf16 arithmetic
is wrong): there it is covered by the GPU compiles of tests/test_kernels_compile.py, on a GPU by
the cases below. fp16/bf16 are also held to flash-attn's rule (error vs float64 <= 2x the plain
PyTorch reference's in the same dtype).
"""
import math

import pytest
import torch

from helpers import (TRITON_DEVICE, TRITON_DTYPES, TRITON_LOW_DTYPES, case_id, dtype_params,
                     flash_rule)
from adaperceiver.kernels import matryoshka as mk
from adaperceiver.ops import matryoshka_ffn, use_backend
from adaperceiver.ops import reference as ref

# many tiles on small shapes (the interpreter default, used when blocks=None, is 32 everywhere)
SMALL = mk.Blocks(16, 16, 16, 16, 16, 16, 16, 16, 4, 1)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """NaN-fill every buffer the kernels receive (outputs and act / dpre scratch)."""
    def nan_alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(mk, "_alloc", nan_alloc)


def make(B, N, C, H, dtype, scale_b=0.5):
    """O(1) inputs: x, grad_out ~ N(0, 1); weights ~ N(0, 1/fan_in); biases ~ N(0, scale_b^2).
    Rounded to ``dtype`` first; the float64 reference uses the rounded values."""
    x = torch.randn(B, N, C)
    w1 = torch.randn(H, C) / math.sqrt(C)
    b1 = torch.randn(H) * scale_b
    w2 = torch.randn(C, H) / math.sqrt(H)
    b2 = torch.randn(C) * scale_b
    go = torch.randn(B, N, C)
    return [t.to(device=TRITON_DEVICE, dtype=dtype) for t in (x, w1, b1, w2, b2, go)]


def f64(ts):
    return [t.double() for t in ts]


def err(got, want):
    assert got.shape == want.shape and got.dtype != torch.float64
    assert torch.isfinite(got).all(), "non-finite element: a poisoned element was not written"
    return (got.double() - want).abs().max().item()


# fp32: inputs and reference share the same values, only the kernel's fp32 rounding differs.
# Forward: O(1) outputs, sums of C or Hmax O(1/sqrt) terms -> error ~ eps32 * few = 1e-6.
# Gradients: dx sums Hmax terms, dW / db sum M = B*N rows of O(1) products (|ref| grows like
# sqrt(M)); the bound is relative to the largest reference element: eps32 * sqrt(K) * margin.
FP32_FWD = 1e-5
FP32_BWD_REL = 1e-5
# fp16: the kernel rounds act / dpre to fp16 (as torch does in fp16) and the results to fp16:
# half an ulp (2^-11 ~ 4.9e-4 of the largest element) for the final rounding plus the
# intermediate rounding carried through the second product; bound 2e-3 of the largest
# reference element, about 2 fp16 ulps. Measured over 12 seeds x these cases: fp16 <= 6.9e-4,
# fp32 <= 9.2e-7 (forward absolute, gradients relative).
FP16_REL = 2e-3
# bf16 (GPU only): 8 mantissa bits against fp16's 11, the same bound in ulps
REL = {torch.float16: FP16_REL, torch.bfloat16: 8 * FP16_REL}


def check_forward(x, w1, b1, w2, b2, hidden, dtype, blocks=None):
    want = ref.ffn_forward(*f64((x, w1, b1, w2, b2)), hidden)
    got = mk.ffn_forward(x, w1, b1, w2, b2, hidden, blocks=blocks)
    assert got.dtype == dtype
    e = err(got, want)
    tol = FP32_FWD if dtype == torch.float32 else REL[dtype] * max(1.0, want.abs().max().item())
    assert e <= tol, f"forward max abs error {e:.3g} > {tol:.3g}"


def check_backward(go, x, w1, b1, w2, b2, hidden, dtype, blocks=None):
    want = ref.ffn_backward(*f64((go, x, w1, b1, w2, b2)), hidden)
    got = mk.ffn_backward(go, x, w1, b1, w2, b2, hidden, blocks=blocks)
    rel = FP32_BWD_REL if dtype == torch.float32 else REL[dtype]
    for name, g, w in zip(("dx", "dW1", "db1", "dW2", "db2"), got, want):
        assert g.dtype == dtype
        e = err(g, w)
        tol = rel * max(1.0, w.abs().max().item())
        assert e <= tol, f"{name}: max abs error {e:.3g} > {tol:.3g}"


# (B, N, C, H, hidden): widths include 1, Hmax, non-multiples of every tile, unsorted order,
# repeats; odd C and odd Hmax; C below a K step; Hmax below a hidden tile; N not a tile multiple
CASES = [
    (3, 7, 37, 75, [75, 1, 40]),
    (4, 5, 24, 41, [17, 41, 17, 33]),
    (3, 11, 53, 99, [1, 99, 64]),
    (2, 6, 13, 9, [9, 4]),
    (3, 8, 30, 90, [20, 5, 33]),  # no sample at Hmax: hidden tiles no row reaches
    (2, 9, 32, 64, [48, 64]),     # Hmax % 16 == 0: fc2 reads W2 in place (no padded copy)
    (4, 12, 64, 164, [82, 164, 123, 82]),  # the released ratio: int(w * 2.57), w = 32, 48, 64
]


@pytest.mark.parametrize("dtype", dtype_params(TRITON_DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[case_id(c, "B N C H hidden") for c in CASES])
def test_forward_backward_match_reference(case, dtype):
    B, N, C, H, hidden = case
    x, w1, b1, w2, b2, go = make(B, N, C, H, dtype)
    check_forward(x, w1, b1, w2, b2, hidden, dtype)
    check_backward(go, x, w1, b1, w2, b2, hidden, dtype)
    # fc2 reads W2 in place only when it is already zero-padding-free (Hmax % 16 == 0)
    assert (mk._k_padded(w2) is w2) == (H % 16 == 0)


@pytest.mark.parametrize("dtype", dtype_params(TRITON_DTYPES))
def test_small_tiles_random_widths(dtype):
    """16-wide tiles: several row tiles straddle samples of different widths."""
    B, N, C, H = 5, 9, 35, 70
    hidden = torch.randint(1, H + 1, (B,)).tolist()
    hidden[0], hidden[1] = 1, H - 17  # Hmax is never reached: dW tiles past every width
    x, w1, b1, w2, b2, go = make(B, N, C, H, dtype)
    check_forward(x, w1, b1, w2, b2, hidden, dtype, blocks=SMALL)
    check_backward(go, x, w1, b1, w2, b2, hidden, dtype, blocks=SMALL)


@pytest.mark.parametrize("blocks", [
    mk.Blocks(32, 16, 16, 16, 64, 32, 32, 16, 4, 1),
    mk.default_blocks(torch.float16, interpret=False),
], ids=["mismatched", "gpu-default"])
def test_other_tilings(blocks):
    """Writers and readers of the act / dpre scratch on different tiles (the invariants must not
    depend on equal tiles), and the GPU default tiles."""
    B, N, C, H = 3, 13, 45, 87
    hidden = [33, 87, 1]
    x, w1, b1, w2, b2, go = make(B, N, C, H, torch.float16)
    check_forward(x, w1, b1, w2, b2, hidden, torch.float16, blocks=blocks)
    check_backward(go, x, w1, b1, w2, b2, hidden, torch.float16, blocks=blocks)


def test_full_width_and_repeated_calls():
    """All samples at Hmax; then calls with other widths on the same shapes: no state leaks."""
    B, N, C, H = 3, 6, 29, 50
    x, w1, b1, w2, b2, go = make(B, N, C, H, torch.float32)
    for hidden in ([H] * B, [3, 50, 27], [H] * B, [27, 3, 50]):
        check_forward(x, w1, b1, w2, b2, hidden, torch.float32)


def test_strided_inputs():
    """Non-contiguous x / grad_out and transposed weight views are read through their strides."""
    B, N, C, H = 2, 7, 33, 45
    hidden = [45, 20]
    x, w1, b1, w2, b2, go = make(B, N, C, H, torch.float32)
    xs = x.transpose(0, 1).contiguous().transpose(0, 1)       # (B, N, C) with N-major storage
    gs = go.transpose(0, 1).contiguous().transpose(0, 1)
    w1s = w1.t().contiguous().t()                              # (H, C) column-major
    w2s = w2.t().contiguous().t()
    assert not xs.is_contiguous() and not w1s.is_contiguous()
    check_forward(xs, w1s, b1, w2s, b2, hidden, torch.float32)
    check_backward(gs, xs, w1s, b1, w2s, b2, hidden, torch.float32)


def test_autograd_entry_point():
    """The custom op with the Triton kernels forced (the one autograd path): int / list /
    tensor widths, gradients through autograd."""
    B, N, C, H = 3, 5, 26, 47
    x, w1, b1, w2, b2, go = make(B, N, C, H, torch.float32)
    with use_backend("triton"):
        out_int = matryoshka_ffn(x, w1, b1, w2, b2, 30)
        assert err(out_int, ref.ffn_forward(*f64((x, w1, b1, w2, b2)), [30] * B)) <= FP32_FWD
        hidden = [47, 1, 22]
        leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
        out = matryoshka_ffn(*leaves, torch.tensor(hidden))
        out.backward(go)
    want = ref.ffn_backward(*f64((go, x, w1, b1, w2, b2)), hidden)
    for t, w in zip(leaves, want):
        assert err(t.grad, w) <= FP32_BWD_REL * max(1.0, w.abs().max().item())
    with pytest.raises(ValueError, match="hidden"):
        matryoshka_ffn(x, w1, b1, w2, b2, [1, 2])
    with pytest.raises(ValueError, match="hidden"):
        matryoshka_ffn(x, w1, b1, w2, b2, H + 1)


@pytest.mark.parametrize("dtype", dtype_params(TRITON_LOW_DTYPES))
def test_low_precision_flash_rule(dtype):
    """Forward and every gradient: error vs float64 <= 2x the plain PyTorch reference's (the
    masked full-width FFN run in ``dtype``), mixed widths with tails."""
    B, N, C, H = 4, 9, 48, 123
    hidden = [123, 17, 64, 90]
    x, w1, b1, w2, b2, go = make(B, N, C, H, dtype)
    ins = (x, w1, b1, w2, b2)
    got = (mk.ffn_forward(*ins, hidden), *mk.ffn_backward(go, *ins, hidden))
    truth = (ref.ffn_forward(*f64(ins), hidden), *ref.ffn_backward(*f64((go, *ins)), hidden))
    # plain: autograd through the reference run in ``dtype`` (its written-out backward works
    # in fp32, which is not the plain low-precision baseline)
    leaves = [t.clone().requires_grad_() for t in ins]
    plain_out = ref.matryoshka_ffn(*leaves, hidden)
    plain_out.backward(go)
    plain = (plain_out.detach(), *(t.grad for t in leaves))
    for name, g, p, t in zip(("out", "dx", "dW1", "db1", "dW2", "db2"), got, plain, truth):
        assert g.dtype == dtype and p.dtype == dtype
        e, bound = flash_rule(g, p, t)
        assert e <= bound, (name, e, bound)


# ----------------------------------------------------------------------------- tile counts
def expected_tiles(hidden, n, block_m, block_h):
    """Independent count: per row tile, the hidden tiles of its widest row."""
    row_w = [w for w in sorted(hidden, reverse=True) for _ in range(n)]
    return sum(-(-max(row_w[m0:m0 + block_m]) // block_h)
               for m0 in range(0, len(row_w), block_m))


def expected_row_steps(hidden, n, block_h, block_r, hmax):
    row_w = [w for w in hidden for _ in range(n)]
    return sum(-(-sum(1 for w in row_w if w > j * block_h) // block_r)
               for j in range(-(-hmax // block_h)))


@pytest.mark.parametrize("n", [16, 7])
def test_tile_counts_follow_widths(n):
    """Kernels' debug counters == the schedule == an independent count, which follows the sum of
    the widths: <= sum_b ceil(N/BM) ceil(h_b/BH) (equal when BM divides N) and strictly below
    the full-width count."""
    B, C, H = 4, 20, 96
    hidden = [96, 17, 50, 1]
    bl = SMALL
    x, w1, b1, w2, b2, go = make(B, n, C, H, torch.float32)
    sched = mk.ffn_schedule(hidden, n, bl.block_m, bl.block_h, H)
    want = expected_tiles(hidden, n, bl.block_m, bl.block_h)
    per_sample = sum(-(-n // bl.block_m) * -(-h // bl.block_h) for h in hidden)
    full = -(-B * n // bl.block_m) * -(-H // bl.block_h)
    assert sched.tiles == want <= per_sample
    assert (want == per_sample) == (n % bl.block_m == 0)
    assert want < full == sched.full_width_tiles(H)

    c_tiles = -(-C // bl.block_c)
    counters = {}
    mk.ffn_forward(x, w1, b1, w2, b2, hidden, blocks=bl, counters=counters)
    assert counters["fc1"] == want
    assert counters["fc2"] == c_tiles * expected_tiles(hidden, n, bl.block_m2, bl.block_k2)

    counters = {}
    mk.ffn_backward(go, x, w1, b1, w2, b2, hidden, blocks=bl, counters=counters)
    assert counters["dpre"] == expected_tiles(hidden, n, bl.block_m_bwd, bl.block_h)
    assert counters["dx"] == c_tiles * expected_tiles(hidden, n, bl.block_m2, bl.block_k2)
    rows = expected_row_steps(hidden, n, bl.block_h, bl.block_r, H)
    assert counters["dw1"] == counters["dw2"] == c_tiles * rows
    assert rows == sched.row_tiles_visited(bl.block_r)
    assert rows < -(-H // bl.block_h) * -(-B * n // bl.block_r)


def test_schedule_at_released_shapes():
    """B=64, N=256, widths from the released {1069, 1603, 2138}, GPU tiles: the number of work
    items is sum_b (N/BM) ceil(h_b/BH), not B*N/BM * ceil(Hmax/BH)."""
    widths = [1069, 1603, 2138]
    hidden = [widths[i] for i in torch.randint(0, 3, (64,)).tolist()]
    hidden[:3] = widths
    bl = mk.default_blocks(torch.float16, interpret=False)
    s = mk.ffn_schedule(hidden, 256, bl.block_m, bl.block_h, 2138)
    assert s.tiles == sum(256 // bl.block_m * -(-h // bl.block_h) for h in hidden)
    assert s.tiles < s.full_width_tiles(2138)
    # rows are sorted by width, largest first, and the sort is stable
    assert list(s.widths) == sorted(hidden, reverse=True)
    assert [hidden[b] for b in s.order] == list(s.widths)
    assert all(s.order[i] < s.order[i + 1] for i in range(63) if s.widths[i] == s.widths[i + 1])
    # every work item exists once, hidden tiles of a row tile are contiguous from 0
    assert len(set(s.items)) == len(s.items)
    with pytest.raises(ValueError, match="block_h"):
        mk.ffn_schedule(hidden, 256, 64, 0)
    with pytest.raises(ValueError, match="hidden"):
        mk.ffn_schedule([0, 3], 4, 16, 16)


# ----------------------------------------------------------------------------- input checks
def test_why_not_and_errors():
    B, N, C, H = 2, 3, 16, 20
    x, w1, b1, w2, b2, _ = make(B, N, C, H, torch.float32)
    assert mk.why_not(x, w1, b1, w2, b2, [20, 5]) == []
    why = mk.why_not(x.double(), w1.double(), b1.double(), w2.double(), b2.double(), [20, 5])
    assert any("x.dtype=torch.float64" in r for r in why)
    why = mk.why_not(x, w1.half(), b1, w2, b2, [20, 5])
    assert any("fc1_weight.dtype=torch.float16 differs" in r for r in why)
    why = mk.why_not(*(t.bfloat16() for t in (x, w1, b1, w2, b2)), [20, 5])
    # refused by the interpreter only (its bf16 is broken); a GPU runs it
    assert any("bfloat16 under TRITON_INTERPRET=1" in r for r in why) == (
        x.device.type == "cpu" and mk.interpreting())
    assert any("hidden" in r for r in mk.why_not(x, w1, b1, w2, b2, [21, 5]))
    assert any("hidden" in r for r in mk.why_not(x, w1, b1, w2, b2, [20]))
    assert any("do not fit" in r for r in mk.why_not(x, w1, b1, w2.t(), b2, [20, 5]))
    assert any("3-d" in r for r in mk.why_not(x[0], w1, b1, w2, b2, [20, 5]))
    with pytest.raises(ValueError, match="x.dtype=torch.float64"):
        mk.ffn_forward(x.double(), w1.double(), b1.double(), w2.double(), b2.double(), [20, 5])
    with pytest.raises(ValueError, match="grad_out"):
        mk.ffn_backward(x[:, :2], x, w1, b1, w2, b2, [20, 5])
    with pytest.raises(ValueError, match="block_h=24"):
        mk.Blocks(block_h=24)


def test_empty_batch():
    """No rows: empty output, zero weight gradients (nothing launched)."""
    x, w1, b1, w2, b2, _ = make(2, 0, 16, 20, torch.float32)
    assert mk.ffn_forward(x, w1, b1, w2, b2, [20, 5]).shape == (2, 0, 16)
    grads = mk.ffn_backward(x, x, w1, b1, w2, b2, [20, 5])
    assert [tuple(g.shape) for g in grads] == [(2, 0, 16), (20, 16), (20,), (16, 20), (16,)]
    assert all((g == 0).all() for g in grads[1:])


# ----------------------------------------------------------------------------- through the op
def test_custom_op_runs_triton_backend(monkeypatch):
    """torch.ops.adaperceiver.matryoshka_ffn under use_backend("triton"): forward and the
    autograd backward run these kernels and equal the reference; opcheck passes."""
    import adaperceiver.ops as ops
    import adaperceiver.ops.triton_backend as tb

    calls = []
    for name in ("ffn_forward", "ffn_backward"):
        def spy(*args, _f=getattr(tb, name), _n=name):
            calls.append(_n)
            return _f(*args)
        monkeypatch.setattr(tb, name, spy)

    B, N, C, H = 3, 5, 21, 43
    hidden = [43, 1, 30]
    x, w1, b1, w2, b2, go = make(B, N, C, H, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w1, b1, w2, b2)]
    with ops.use_backend("triton"):
        out = ops.matryoshka_ffn(*leaves, hidden)
        out.backward(go)
        assert calls == ["ffn_forward", "ffn_backward"]
        assert err(out.detach(), ref.ffn_forward(*f64((x, w1, b1, w2, b2)), hidden)) <= FP32_FWD
        want = ref.ffn_backward(*f64((go, x, w1, b1, w2, b2)), hidden)
        for t, w in zip(leaves, want):
            assert err(t.grad, w) <= FP32_BWD_REL * max(1.0, w.abs().max().item())
        torch.library.opcheck(torch.ops.adaperceiver.matryoshka_ffn.default,
                              (*leaves, hidden))
