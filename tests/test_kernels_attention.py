"""The Triton block-masked attention (adaperceiver.kernels.attention) on the GPU when there is
one, else under TRITON_INTERPRET=1 (helpers.TRITON_DEVICE).

Forward and backward against the float64 reference (adaperceiver.ops.reference, autograd on it)
on fresh random inputs: mask shapes that are not tile multiples, cross-attention (Nq != Nk,
Nq = 1), seq_lens (including 0), RoPE on q and/or k, strided layouts. Every tensor the kernels
allocate is poisoned (NaN / a huge int) so an element a kernel forgets to write fails the test.
The visit count of every kernel is checked against the shared tile schedule and against an
independent count from the dense mask. fp16 (and bf16 on a GPU) are also held to flash-attn's
rule. Kept small: the interpreter runs each program in numpy.
"""
import math
import random
import types

import pytest
import torch

from helpers import TRITON_DEVICE, TRITON_LOW_DTYPES, dtype_params, flash_rule
from adaperceiver.bench.gpu_check import sparse_attention_reference
from adaperceiver.kernels import attention as A
from adaperceiver.ops import block_masked_attention as op_attention
from adaperceiver.ops import use_backend
from adaperceiver.ops.reference import attention as ref_attention
from adaperceiver.ops.reference import attention_backward as ref_backward
from adaperceiver.ops.reference import attention_forward as ref_forward
from adaperceiver.ops.reference import rope_tables
from adaperceiver.ops.schedule import block_mask, tile_schedule

SMALL = A.Tiles(16, 16, 16, 16, 16, 16)   # many tiles per sample: every stage is exercised
# fp32: forward 1e-5 (absolute). Gradients sum up to N products of O(1) terms in fp32
# (error ~ sqrt(N) * 6e-8 relative), so 2e-5 absolute on O(1) gradients; a wrong or missing
# term is O(0.01..1). fp16: inputs, P and dS are rounded to fp16 (unit roundoff u = 2^-11)
# before the products and the results are rounded to fp16: 4 u at the tensor's largest
# magnitude (measured: <= 1.7e-3 on gradients of magnitude <= 2.8).
TOL = {torch.float32: dict(out=1e-5, lse=1e-5, grad=2e-5),
       torch.float16: dict(out=4 * 2 ** -11, lse=4 * 2 ** -11, grad=4 * 2 ** -11)}


def _tol(dtype, kind, ref):
    """Absolute tolerance: fp32 fixed (x4 on a GPU, whose 3xTF32 products round differently
    from the interpreter's numpy fp32); fp16 relative to the largest finite |ref|."""
    if dtype == torch.float32:
        return TOL[dtype][kind] * (4 if TRITON_DEVICE == "cuda" else 1)
    finite = ref[torch.isfinite(ref)].abs()
    return TOL[dtype][kind] * max(1.0, finite.max().item() if finite.numel() else 1.0)


class _PoisonedTorch(types.SimpleNamespace):
    """Stands in for ``torch`` inside the kernel module: empty/empty_like return poison."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def _poison(t):
        return t.fill_(float("nan") if t.dtype.is_floating_point else 2 ** 30)

    def empty(self, *a, **k):
        return self._poison(torch.empty(*a, **k))

    def empty_like(self, *a, **k):
        return self._poison(torch.empty_like(*a, **k))


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(A, "torch", _PoisonedTorch())


def _inputs(B, H, Nq, Nk, D, dtype, lens=None, q_rope=False, k_rope=False, dev=TRITON_DEVICE):
    q = torch.randn(B, H, Nq, D, dtype=dtype, device=dev)
    k = torch.randn(B, H, Nk, D, dtype=dtype, device=dev)
    v = torch.randn(B, H, Nk, D, dtype=dtype, device=dev)
    seq_lens = None if lens is None else torch.tensor(lens, dtype=torch.int32, device=dev)
    qr = rope_tables(Nq, D, device=dev) if q_rope else None
    kr = rope_tables(Nk, D, device=dev) if k_rope else None
    return q, k, v, seq_lens, qr, kr


def _reference(q, k, v, grans, scale, seq_lens, qr, kr, grad_out):
    """float64 (out, lse, dq, dk, dv) by autograd through the reference."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = ref_forward(q64, k64, v64, grans, scale, seq_lens, qr, kr)
    out.backward(grad_out.double())
    return out.detach(), lse, q64.grad, k64.grad, v64.grad


def _err(a, b):
    """max |a - b| over every element; -inf must match -inf exactly (counts as inf if not)."""
    a, b = a.double(), b.double()
    assert a.shape == b.shape
    both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    d = torch.where(both_inf, torch.zeros_like(a), (a - b).abs())
    return torch.nan_to_num(d, nan=float("inf")).max().item() if d.numel() else 0.0


def _check(B, H, Nq, Nk, D, grans, *, dtype=torch.float32, lens=None, q_rope=False,
           k_rope=False, scale=None, tiles=None, layout=None):
    q, k, v, seq_lens, qr, kr = _inputs(B, H, Nq, Nk, D, dtype, lens, q_rope, k_rope)
    if layout == "bnhd":   # q/k/v as views of (B, N, H, D) buffers, the model's projection layout
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        assert not q.is_contiguous()
    out, lse = A.attention_forward(q, k, v, grans, scale, seq_lens, qr, kr, tiles=tiles)
    grad_out = torch.randn_like(out)
    dq, dk, dv = A.attention_backward(grad_out, q, k, v, out, lse, grans, scale, seq_lens, qr,
                                      kr, tiles=tiles)
    r_out, r_lse, r_dq, r_dk, r_dv = _reference(q, k, v, grans, scale, seq_lens, qr, kr,
                                                grad_out)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert _err(out, r_out) <= _tol(dtype, "out", r_out), _err(out, r_out)
    assert _err(lse, r_lse) <= _tol(dtype, "lse", r_lse), _err(lse, r_lse)
    for name, g, r in (("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)):
        assert g.dtype == dtype and g.shape == r.shape
        assert _err(g, r) <= _tol(dtype, "grad", r), (name, _err(g, r))
    if seq_lens is not None:   # rows / keys past a length: exactly zero, lse -inf
        for b, n in enumerate(lens):
            assert (out[b, :, n:] == 0).all() and (lse[b, :, n:] == float("-inf")).all()
            assert (dq[b, :, n:] == 0).all() and (dk[b, :, n:] == 0).all()
            assert (dv[b, :, n:] == 0).all()
    return out


def _random_grans(n):
    """Strictly increasing grans, not tile multiples, sometimes ending below n (the mask
    then adds n as the last group end) and sometimes past n (those grans are dropped)."""
    cuts = sorted(random.sample(range(1, n + 8), k=random.randint(1, 5)))
    return cuts


@pytest.mark.parametrize("case", [
    # (N range, D, q_rope, k_rope, with seq_lens, tiles); B, H and N are drawn per run
    ((33, 50), 32, False, False, False, SMALL),
    ((60, 75), 64, True, True, True, SMALL),
    ((40, 70), 64, True, True, True, None),
    ((30, 45), 128, True, False, True, None),
], ids=["N33-50-D32-small-tiles", "N60-75-D64-rope-lens-small-tiles", "N40-70-D64-rope-lens",
        "N30-45-D128-qrope-lens"])
def test_self_attention_matches_reference(case):
    (lo, hi), D, q_rope, k_rope, with_lens, tiles = case
    random.seed(torch.initial_seed())
    B, H, N = random.randint(2, 3), random.randint(1, 2), random.randint(lo, hi)
    grans = _random_grans(N)
    lens = [random.randint(1, N) for _ in range(B)] if with_lens else None
    if lens is not None:
        lens[0] = N                       # one full-length sample
        if B > 2:
            lens[-1] = 0                  # and one empty sample
    _check(B, H, N, N, D, grans, lens=lens, q_rope=q_rope, k_rope=k_rope,
           scale=random.uniform(0.05, 0.3), tiles=tiles)


@pytest.mark.parametrize("Nq,Nk,grans,q_rope,k_rope", [
    (256, 256, [32, 64, 96, 128, 192, 256], True, True),    # a block's self-attention
    (256, 196, None, True, False),                          # read: latents <- 196 patches
])
def test_model_shapes(Nq, Nk, grans, q_rope, k_rope):
    _check(1, 1, Nq, Nk, 64, grans, q_rope=q_rope, k_rope=k_rope)


def test_fp16_matches_reference():
    _check(2, 2, 50, 50, 64, [7, 20, 33], dtype=torch.float16, lens=[50, 29], q_rope=True,
           k_rope=True, tiles=SMALL)


@pytest.mark.parametrize("Nq,Nk,q_rope,k_rope,lens,dtype", [
    (1, 50, False, True, [50, 17], torch.float32),     # the write head: one query, RoPE on k
    (40, 23, True, False, None, torch.float32),        # the read head's family: Nq > Nk
    (19, 67, False, False, [12, 67], torch.float32),
    (23, 40, True, True, [23, 9], torch.float16),
])
def test_cross_attention(Nq, Nk, q_rope, k_rope, lens, dtype):
    _check(2, 2, Nq, Nk, 32, None, dtype=dtype, lens=lens, q_rope=q_rope, k_rope=k_rope,
           tiles=SMALL)


def test_strided_layout():
    _check(2, 3, 33, 33, 32, [10, 20], lens=[33, 11], q_rope=True, k_rope=True, tiles=SMALL,
           layout="bnhd")


def test_special_masks():
    """grans of size 1 == causal attention; one gran covering N == no mask (full attention)."""
    B, H, N, D = 2, 2, 41, 32
    q, k, v, *_ = _inputs(B, H, N, N, D, torch.float32)
    causal = A.attention_forward(q, k, v, list(range(1, N + 1)), None, None, None, None,
                                 tiles=SMALL)[0]
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                                            is_causal=True)
    assert _err(causal, want) <= 1e-5
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    for grans in ([N], [N + 5], None):
        full = A.attention_forward(q, k, v, grans, None, None, None, None, tiles=SMALL)[0]
        assert _err(full, want) <= 1e-5


def test_backward_takes_reference_lse():
    """The backend contract: backward consumes (out, lse) written by another backend."""
    N, grans, lens = 39, [5, 18, 30], [39, 22]
    q, k, v, seq_lens, qr, kr = _inputs(2, 2, N, N, 64, torch.float32, lens, True, True)
    out, lse = ref_forward(q, k, v, grans, None, seq_lens, qr, kr)
    grad_out = torch.randn_like(out)
    got = A.attention_backward(grad_out, q, k, v, out, lse, grans, None, seq_lens, qr, kr,
                               tiles=SMALL)
    want = _reference(q, k, v, grans, None, seq_lens, qr, kr, grad_out)[2:]
    for g, r in zip(got, want):
        assert _err(g, r) <= TOL[torch.float32]["grad"]


def _dense_allowed(Nq, Nk, grans, n):
    """(Nq, Nk) bool from the dense block mask, with the sample's length n applied."""
    allowed = block_mask(Nq, grans, Nk)
    allowed &= (torch.arange(Nq) < n)[:, None] & (torch.arange(Nk) < n)[None, :]
    return allowed


def _tiles_with_scores(allowed, bm, bn):
    """How many (bm x bn) tiles of ``allowed`` hold at least one allowed score."""
    Nq, Nk = allowed.shape
    pad = torch.zeros(-(-Nq // bm) * bm, -(-Nk // bn) * bn, dtype=torch.bool)
    pad[:Nq, :Nk] = allowed
    return int(pad.unflatten(0, (-1, bm)).unflatten(2, (-1, bn)).any(3).any(1).sum())


@pytest.mark.parametrize("Nq,Nk,grans,lens", [
    (77, 77, [3, 20, 21, 50, 64], [77, 40, 1]),
    (64, 64, [32, 64], None),
    (70, 70, list(range(1, 71)), [70, 33, 0]),      # causal
    (20, 45, None, [45, 10, 20]),                    # cross-attention
])
def test_visit_counts(Nq, Nk, grans, lens):
    """Tiles loaded by each kernel == the shared schedule == tiles holding an allowed score."""
    H, D = 2, 32
    tiles = A.Tiles(16, 32, 32, 16, 32, 16)          # unequal tiles: no accidental symmetry
    B = 3 if lens is None else len(lens)
    q, k, v, seq_lens, *_ = _inputs(B, H, Nq, Nk, D, torch.float32, lens)
    lens = [min(Nq, Nk)] * B if lens is None else lens
    c_fwd, c_dkdv, c_dq = (torch.zeros(1, dtype=torch.int32, device=TRITON_DEVICE)
                           for _ in range(3))
    out, lse = A.attention_forward(q, k, v, grans, None, seq_lens, None, None, tiles=tiles,
                                   visit_counter=c_fwd)
    A.attention_backward(torch.randn_like(out), q, k, v, out, lse, grans, None, seq_lens,
                         None, None, tiles=tiles, visit_counters={"dkdv": c_dkdv, "dq": c_dq})
    lens_sched = [None if seq_lens is None else n for n in lens]
    sched = sum(tile_schedule(Nq, grans, tiles.fwd_m, tiles.fwd_n, Nk, n).visits
                for n in lens_sched) * H
    dense = [_dense_allowed(Nq, Nk, grans, max(Nq, Nk) if seq_lens is None else n)
             for n in lens]
    assert int(c_fwd) == sched == H * sum(_tiles_with_scores(a, tiles.fwd_m, tiles.fwd_n)
                                          for a in dense)
    assert int(c_dq) == H * sum(_tiles_with_scores(a, tiles.dq_m, tiles.dq_n) for a in dense)
    assert int(c_dkdv) == H * sum(_tiles_with_scores(a, tiles.dkdv_m, tiles.dkdv_n)
                                  for a in dense)
    # the schedule skips work: fewer tiles than the dense grid whenever something is masked
    grid = math.ceil(Nq / tiles.fwd_m) * math.ceil(Nk / tiles.fwd_n) * B * H
    assert int(c_fwd) <= grid


def test_public_entry_autograd():
    """The custom op's autograd with the Triton kernels forced (the one autograd path), vs
    autograd on the float64 reference."""
    B, H, N, D, grans = 2, 2, 36, 32, [9, 24]
    q, k, v, seq_lens, qr, kr = _inputs(B, H, N, N, D, torch.float32, [36, 20], True, True)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with use_backend("triton"):
        out = op_attention(q, k, v, grans, seq_lens=seq_lens, q_rope=qr, k_rope=kr)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    want = _reference(q, k, v, grans, None, seq_lens, qr, kr, grad_out)
    assert _err(out.detach(), want[0]) <= 1e-5
    for g, r in zip((q.grad, k.grad, v.grad), want[2:]):
        assert _err(g, r) <= TOL[torch.float32]["grad"]


def test_dispatch_and_opcheck():
    """The custom op with the Triton backend forced: same result, and torch.library.opcheck."""
    B, H, N, D, grans = 1, 2, 20, 32, [6, 13]
    q, k, v, seq_lens, qr, kr = _inputs(B, H, N, N, D, torch.float32, [17], True, True)
    with use_backend("triton"):
        out = op_attention(q, k, v, grans, seq_lens=seq_lens, q_rope=qr, k_rope=kr)
        want = ref_attention(q.double(), k.double(), v.double(), grans, seq_lens=seq_lens,
                             q_rope=qr, k_rope=kr)
        assert _err(out, want) <= 1e-5
        args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grans,
                1 / math.sqrt(D), seq_lens, *qr, *kr)
        torch.library.opcheck(torch.ops.adaperceiver.block_masked_attention, args)


@pytest.mark.parametrize("dtype", dtype_params(TRITON_LOW_DTYPES))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_low_precision_flash_rule(dtype, packed):
    """fp16 (and bf16 on a GPU): out and the gradients' error vs float64 at most 2x that of the
    plain PyTorch reference run in the same dtype (flash-attn's rule). Grans, RoPE on q and k,
    seq_lens with a tail; the packed-rows forward on the same samples."""
    B, H, N, D, grans, lens = 3, 2, 45, 64, [7, 20, 33], [45, 29, 12]
    q, k, v, seq_lens, qr, kr = _inputs(B, H, N, N, D, dtype, lens, True, True)
    scale = 0.2
    if packed:
        rows = torch.cat([torch.arange(b * N, b * N + n) for b, n in enumerate(lens)])
        pk = [t.transpose(1, 2).reshape(B * N, H, D)[rows.to(t.device)] for t in (q, k, v)]
        out = A.attention_varlen_forward(*pk, lens, grans, scale, qr, kr, tiles=SMALL)[0]
        truth, plain = (ref_forward(*(t.to(dt) for t in (q, k, v)), grans, scale, seq_lens,
                                    qr, kr)[0].transpose(1, 2).reshape(B * N, H, D)[
                                        rows.to(q.device)]
                        for dt in (torch.float64, dtype))
        err, bound = flash_rule(out, plain, truth)
        assert err <= bound, ("out", err, bound)
        return
    out, lse = A.attention_forward(q, k, v, grans, scale, seq_lens, qr, kr, tiles=SMALL)
    grad_out = torch.randn_like(out)
    got = (out, *A.attention_backward(grad_out, q, k, v, out, lse, grans, scale, seq_lens, qr,
                                      kr, tiles=SMALL))
    truth = _reference(q, k, v, grans, scale, seq_lens, qr, kr, grad_out)
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    plain_out = ref_forward(ql, kl, vl, grans, scale, seq_lens, qr, kr)[0]
    plain_out.backward(grad_out)
    plain = (plain_out.detach(), ql.grad, kl.grad, vl.grad)
    for name, g, p, t in zip(("out", "dq", "dk", "dv"), got, plain, (truth[0], *truth[2:])):
        assert g.dtype == dtype
        err, bound = flash_rule(g, p, t)
        assert err <= bound, (name, err, bound)


def test_why_not_and_errors():
    q = torch.randn(1, 2, 8, 32)
    assert A.why_not(q, q, q, [3, 8], None, None, None) == []
    reasons = " | ".join(A.why_not(torch.randn(1, 2, 8, 48), torch.randn(1, 2, 8, 48),
                                   torch.randn(1, 2, 8, 48), None, None, None, None))
    assert "head_dim=48" in reasons
    d = q.double()
    assert any("float64" in r for r in A.why_not(d, d, d, None, None, None, None))
    strided = torch.randn(1, 2, 32, 8).transpose(-1, -2)
    assert any("stride" in r for r in A.why_not(strided, strided, strided, None, None, None,
                                                None))
    kv = torch.randn(1, 2, 5, 32)
    assert any("Nq == Nk" in r for r in A.why_not(q, kv, kv, [2], None, None, None))
    assert any("v" in r for r in A.why_not(q, q, torch.randn(1, 2, 8, 64), None, None, None,
                                           None))
    h = q.half()
    assert A.why_not(h, h, h, None, None, None, None) == []
    b = q.bfloat16()
    # bf16 is refused by the interpreter only (its bf16 is broken); a GPU runs it
    assert any("bfloat16" in r for r in A.why_not(b, b, b, None, None, None, None)) == (
        A.interpreting())
    with pytest.raises(ValueError, match="head_dim=48"):
        A.attention_forward(*(torch.randn(1, 1, 4, 48) for _ in range(3)), None, None, None,
                            None, None)
    with pytest.raises(ValueError, match="token_grans"):
        A.attention_forward(q, q, q, [5, 3], None, None, None, None)


# ----------------------------------------------------------------------------- NaN / inf
POISON = {   # where one non-finite value goes (all inside the sample's length)
    "q_nan": ("q", (0, 1, 13, 5), float("nan")),
    "k_nan": ("k", (1, 0, 10, 0), float("nan")),
    "k_inf": ("k", (1, 1, 10, 3), float("inf")),
    "v_nan": ("v", (0, 1, 20, 3), float("nan")),
    "v_inf": ("v", (1, 0, 5, 7), float("-inf")),
    "scale_nan": ("scale", None, float("nan")),
    "scale_inf": ("scale", None, float("inf")),
}


@pytest.mark.parametrize("rope", [False, True], ids=["plain", "rope"])
@pytest.mark.parametrize("poison_at", list(POISON))
def test_nan_inf_propagate_between_sparse_and_dense_reference(poison_at, rope):
    """A NaN / inf in q, k, v or the scale (fp32, seq_lens, grans, RoPE): forward, backward and
    the packed forward. Elementwise, on positions inside each sample's length, the kernels'
    NaN set holds every NaN of the block-sparse reference (no guard turns a reached NaN into a
    number) and lies inside the reference backend's (which also sums over the pairs a row
    reads) widened by the tiles' slack: 0 * NaN inside a tile crossing a group boundary, in
    the poisoned v column forward, across the poisoned (sample, head) backward; where the
    bound is finite, ours equals the reference backend."""
    B, H, N, D, grans, lens = 2, 2, 40, 32, [8, 24, 40], [40, 31]
    q, k, v, seq_lens, qr, kr = _inputs(B, H, N, N, D, torch.float32, lens, rope, rope)
    scale = 0.3
    what, at, val = POISON[poison_at]
    if what == "scale":
        scale = val
    else:
        {"q": q, "k": k, "v": v}[what][at] = val
    out, lse = A.attention_forward(q, k, v, grans, scale, seq_lens, qr, kr, tiles=SMALL)
    go = torch.randn_like(out)
    dq, dk, dv = A.attention_backward(go, q, k, v, out, lse, grans, scale, seq_lens, qr, kr,
                                      tiles=SMALL)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    d_out, d_lse = ref_forward(q64, k64, v64, grans, scale, seq_lens, qr, kr)
    d_grads = ref_backward(go.double(), q64, k64, v64, d_out, d_lse, grans, scale, seq_lens, qr,
                           kr)
    leaves = [t.clone().requires_grad_() for t in (q64, k64, v64)]
    s_out, s_lse = sparse_attention_reference(*leaves, grans, scale, seq_lens, qr, kr)
    s_out.backward(go.double())
    valid = (torch.arange(N, device=q.device)[None, :]
             < seq_lens.long()[:, None])[:, None, :]                       # (B, 1, N)

    def slack(t, name):
        """Where a tiled kernel may be NaN beyond the reference backend (see the docstring)."""
        leak = torch.zeros(t.shape, dtype=torch.bool, device=t.device)
        if what == "scale":
            leak[...] = name != "out" and name != "lse"
        elif name in ("dq", "dk", "dv"):
            leak[at[0], at[1]] = True
        elif name == "out" and what == "v":
            leak[at[0], at[1], :, at[3]] = True
        return leak

    for name, ours, sparse, dense in (("out", out, s_out, d_out), ("lse", lse, s_lse, d_lse),
                                      ("dq", dq, leaves[0].grad, d_grads[0]),
                                      ("dk", dk, leaves[1].grad, d_grads[1]),
                                      ("dv", dv, leaves[2].grad, d_grads[2])):
        m = valid if ours.dim() == 3 else valid[..., None]
        m = m.expand_as(ours)
        o, s, d = (torch.isnan(t.detach()) & m for t in (ours, sparse, dense))
        d = d | (slack(ours, name) & m)
        dense = torch.where(d, torch.nan, dense)
        assert not (s & ~o).any(), (name, "a NaN the sparse reference has became a number",
                                    int((s & ~o).sum()))
        assert not (o & ~d).any(), (name, "NaN where the dense reference is finite",
                                    int((o & ~d).sum()))
        fin = m & ~torch.isnan(dense)
        big = dense[fin & torch.isfinite(dense)].abs()
        assert _err(ours[fin], dense[fin]) <= 1e-4 * max(
            1.0, big.max().item() if big.numel() else 1.0), name
    assert not torch.isfinite(out).all()   # the poison reached something
    # the packed forward (the same samples as packed rows): the same values and NaN
    rows = torch.cat([torch.arange(b * N, b * N + n) for b, n in enumerate(lens)])
    pk = [t.transpose(1, 2).reshape(B * N, H, D)[rows] for t in (q, k, v)]
    p_out = A.attention_varlen_forward(*pk, lens, grans, scale, qr, kr, tiles=SMALL)[0]
    want = out.transpose(1, 2).reshape(B * N, H, D)[rows]
    assert torch.equal(torch.isnan(p_out), torch.isnan(want))
    fin = ~torch.isnan(want)
    assert _err(p_out[fin], want[fin]) <= 1e-5


class _Spy:
    """Wraps a kernel: records each launch's constexpr flags, then launches it."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append({k: v for k, v in kwargs.items() if k.isupper()})
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_k_rope_applied_once_per_key_row(monkeypatch, packed):
    """With RoPE on k, the pre-pass rotates each key row once per call (its debug counter
    counts H x the rows inside the lengths, however many query tiles read them), and the
    forward kernel reads K already rotated (K_ROPE off): the result is unchanged."""
    seen = []
    monkeypatch.setattr(A, "_attn_fwd", _Spy(A._attn_fwd, seen))
    B, H, N, D, grans, lens = 3, 2, 70, 32, [5, 30, 64], [70, 41, 9]
    q, k, v, seq_lens, qr, kr = _inputs(B, H, N, N, D, torch.float32, lens, True, True)
    counter = torch.zeros(1, dtype=torch.int32, device=TRITON_DEVICE)
    if packed:
        rows = torch.cat([torch.arange(b * N, b * N + n) for b, n in enumerate(lens)])
        pk = [t.transpose(1, 2).reshape(B * N, H, D)[rows.to(t.device)] for t in (q, k, v)]
        out = A.attention_varlen_forward(*pk, lens, grans, None, qr, kr, tiles=SMALL,
                                         rope_counter=counter)[0]
        want = ref_forward(q.double(), k.double(), v.double(), grans, None, seq_lens, qr,
                           kr)[0].transpose(1, 2).reshape(B * N, H, D)[rows.to(q.device)]
    else:
        out = A.attention_forward(q, k, v, grans, None, seq_lens, qr, kr, tiles=SMALL,
                                  rope_counter=counter)[0]
        want = ref_forward(q.double(), k.double(), v.double(), grans, None, seq_lens, qr, kr)[0]
    assert _err(out, want) <= 1e-5
    assert int(counter) == H * sum(lens)            # once per key row inside the lengths
    query_tiles = -(-N // SMALL.fwd_m)
    assert int(counter) < H * sum(lens) * query_tiles / 2   # not once per query tile
    assert [s["K_ROPE"] for s in seen] == [False] and seen[0]["Q_ROPE"] is True


def test_forward_autotuner_picks_the_fastest_candidate_once_per_bucket(monkeypatch):
    """The GPU autotuner's logic, run here with a fake GPU gate and fake timings: each shape
    bucket times every candidate once and memoises the fastest; the forward then launches it
    (the result is the reference's); a repeated bucket does not time again; while tuning is not
    allowed (a CUDA graph capture) the memoised choice, else the default, is used."""
    timed = []
    fake_ms = {}

    def bench(fn):
        fn()
        timed.append(chosen[-1])
        return fake_ms[chosen[-1]]
    chosen = []
    real_fwd = A._attn_fwd

    class Record:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                chosen.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"]))
                return real_fwd[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(A, "_attn_fwd", Record())
    monkeypatch.setattr(A, "_on_gpu", lambda t: True)
    monkeypatch.setattr(A, "_bench", bench)
    allowed = [True]
    monkeypatch.setattr(A, "_tuning_allowed", lambda t: allowed[0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(A, "_TUNED", {})
    cands = A.fwd_candidates(32, torch.float16)
    assert len(cands) >= 3 and cands[0] == A.default_tiles(32, interpret=False)
    for i, c in enumerate(cands):      # the third candidate is the fastest
        fake_ms[(c.fwd_m, c.fwd_n, c.fwd_warps)] = 1.0 if i == 2 else 2.0 + i
    best = (cands[2].fwd_m, cands[2].fwd_n, cands[2].fwd_warps)

    q, k, v, seq_lens, qr, kr = _inputs(2, 2, 40, 40, 32, torch.float16, [40, 23], True, True)
    out = A.attention_forward(q, k, v, [8, 30], None, seq_lens, qr, kr)[0]
    assert len(timed) == len(cands) and chosen[-1] == best
    want = ref_forward(q.double(), k.double(), v.double(), [8, 30], None, seq_lens, qr, kr)[0]
    assert _err(out, want) <= _tol(torch.float16, "out", want)
    chosen.clear(), timed.clear()
    A.attention_forward(q, k, v, [8, 30], None, seq_lens, qr, kr)     # same bucket: memo
    assert not timed and chosen == [best]
    allowed[0] = False                 # e.g. capturing: no timing; a new bucket gets the default
    q2, k2, v2, *_ = _inputs(2, 2, 100, 100, 32, torch.float16)
    chosen.clear()
    A.attention_forward(q2, k2, v2, None)
    d = A.default_tiles(32, dtype=torch.float16)     # (the interpreter's, here)
    assert not timed and chosen == [(d.fwd_m, d.fwd_n, d.fwd_warps)]
