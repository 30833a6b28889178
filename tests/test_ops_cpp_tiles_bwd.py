"""The CPU attention backward of bfloat16 / float16 in 16 bits (csrc/cpu/attention.cpp:
attention_bwd_tiles) against a float64 truth, by flash-attn's rule.

Where build_info()["cpu_attention_bwd_<dtype>"] is "amx" (AMX tiles) or "avx512-bf16"
(AVX512-BF16 dot products) the backward's five products run in the dtype with P and dS
rounded to it; with torch.backends.mkldnn disabled the same
inputs take the float32 backward (16-bit inputs converted up front), so both paths are compared
in one process. Shapes: RoPE, grans that split the 64-row query tiles, seq_lens shorter than N
(rows and keys past them get exactly zero gradient), head dims that are not multiples of 16 or
32 (30, 33, 66), N not a multiple of the tile, several key chunks (256 keys each), Dv != D,
cross attention, heads-last strided inputs, packed rows through the public op. Gradients are
written into NaN-poisoned memory and compared whole.
"""
from __future__ import annotations

import math

import pytest
import torch

import adaperceiver
from adaperceiver import _ext
from adaperceiver.ops import block_masked_attention, block_masked_attention_varlen
from adaperceiver.ops import reference as R
from helpers import case_id, mkldnn_off, pad_rows, unpad_rows

pytestmark = pytest.mark.skipif(not _ext.available(),
                                reason=f"adaperceiver._C not loaded: {_ext.load_error()}")

ops = torch.ops.adaperceiver
NAN = float("nan")
LOWP = [torch.bfloat16, torch.float16]

# (B, H, Nq, Nk, D, Dv, grans, seq_lens, rope, heads_last)
CASES = [
    (2, 3, 77, 77, 64, 64, [20, 40, 64], [77, 40], True, False),     # grans split a tile, lengths
    (1, 2, 300, 300, 80, 80, [20, 40, 100, 256], None, True, False),  # 2 key chunks, D = 80
    (2, 2, 130, 130, 30, 30, [20, 40, 130], [130, 57], True, True),  # D = 30 (not /16), strided
    (1, 2, 45, 45, 33, 33, [7, 45], None, False, False),             # odd D: a padded pair
    (2, 1, 70, 70, 66, 66, [33, 70], [61, 70], True, False),         # D = 66, odd tile rows
    (2, 2, 50, 50, 32, 40, [10, 30], [50, 21], True, False),         # Dv != D
    (2, 2, 13, 196, 64, 64, None, [13, 7], True, False),             # cross attention, lengths
    (3, 1, 33, 33, 64, 64, [32], [0, 1, 33], False, False),          # empty sample, one row
    (1, 1, 600, 600, 64, 64, [20, 40, 300, 600], [590], True, False),  # 3 chunks, band in each
]


def _tag(dtype):
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _skip_without_tiles(dtype):
    tag = _tag(dtype)
    if _ext.build_info()[f"cpu_attention_bwd_{tag}"] == "float32":
        pytest.skip(f"{tag} attention backward runs in float32 here (no 16-bit products for it)")


def _poison_heap(*shapes):
    """Freed NaN-filled blocks of the gradients' sizes for the allocator to hand out again, so
    an element the kernel forgets to write shows up as NaN."""
    for s in shapes:
        t = torch.full(s, NAN)
        del t


def _pair(r):
    return (None, None) if r is None else r


def _inputs(case, dtype, seed):
    B, H, Nq, Nk, D, Dv, grans, lens, rope, heads_last = case
    g = torch.Generator().manual_seed(seed)

    def rand(n, d):
        if heads_last:  # (B, N, H, D) projections seen as (B, H, N, D), as the model hands them
            return torch.randn(B, n, H, d, generator=g).to(dtype).transpose(1, 2)
        return torch.randn(B, H, n, d, generator=g).to(dtype)
    q, k, v, go = rand(Nq, D), rand(Nk, D), rand(Nk, Dv), rand(Nq, Dv)
    sl = None if lens is None else torch.tensor(lens)
    qr = R.rope_tables(Nq, D) if rope else None
    kr = R.rope_tables(Nk, D) if rope else None
    return q, k, v, go, grans, sl, qr, kr


def _backward(q, k, v, go, grans, sl, qr, kr):
    """(dq, dk, dv) of the raw backward op after the forward, into poisoned memory."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = ops.block_masked_attention_fwd(q, k, v, grans, scale, sl, *_pair(qr), *_pair(kr))
    _poison_heap(q.shape, k.shape, v.shape)
    return ops.block_masked_attention_bwd(go, q, k, v, out, lse, grans, scale, sl, *_pair(qr),
                                          *_pair(kr))


def _autograd(dt, q, k, v, go, grans, sl, qr, kr):
    """Plain PyTorch autograd through the reference in dtype dt (RoPE tables in float32, or
    float64 for the float64 truth)."""
    tables = (lambda r: None if r is None else tuple(t.double() for t in r)) \
        if dt == torch.float64 else (lambda r: r)
    leaves = [t.detach().to(dt).clone().requires_grad_(True) for t in (q, k, v)]
    R.attention(*leaves, grans, scale=1.0 / math.sqrt(q.shape[-1]), seq_lens=sl,
                q_rope=tables(qr), k_rope=tables(kr)).backward(go.to(dt))
    return [t.grad for t in leaves]


def _err(x, truth):
    return (x.double() - truth).abs().max().item()


def test_build_info_names_the_backward_path():
    """The backward takes the tiles exactly where the forward does (same conditions)."""
    info = _ext.build_info()
    for tag in ("bf16", "fp16"):
        assert info[f"cpu_attention_bwd_{tag}"] == info[f"cpu_attention_{tag}"]
    with mkldnn_off():
        off = _ext.build_info()
    assert off["cpu_attention_bwd_bf16"] == off["cpu_attention_bwd_fp16"] == "float32"


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[case_id(c, "B H Nq Nk D Dv grans lens rope heads_last") for c in CASES])
def test_tiles_backward_rule(case, dtype):
    """dq, dk, dv on the tiles: each within 2x the error of the plain reference's autograd in
    dtype (vs float64) plus 1e-4 of the truth's largest magnitude; the float32 backward on the
    same inputs within the same bound and of us; zero gradient on rows past a sample's length
    and keys past it, as the reference gives; no NaN anywhere (every element written)."""
    _skip_without_tiles(dtype)
    args = _inputs(case, dtype, seed=3)
    grads = _backward(*args)
    with mkldnn_off():
        assert _ext.build_info()[f"cpu_attention_bwd_{_tag(dtype)}"] == "float32"
        grads32 = _backward(*args)
    ref = _autograd(dtype, *args)
    truth = _autograd(torch.float64, *args)
    q, k, v = args[:3]
    sl = args[5]
    for name, g, g32, r, t, x in zip(("dq", "dk", "dv"), grads, grads32, ref, truth, (q, k, v)):
        assert g.dtype == dtype and g.shape == x.shape, name
        assert not g.isnan().any(), f"{name}: NaN (an element not written?)"
        bound = 2 * _err(r, t) + 1e-4 * t.abs().max().item()
        assert _err(g, t) <= bound, (name, _err(g, t), bound)
        assert _err(g32, t) <= bound, (name, "float32 path", _err(g32, t), bound)
        assert _err(g, g32.double()) <= bound, (name, "tiles vs float32 path")
        if sl is not None:
            for b, n in enumerate(sl.tolist()):
                assert (g[b, :, max(n, 0):] == 0).all(), f"{name}: rows past seq_lens[{b}]"
                assert (t[b, :, max(n, 0):] == 0).all()


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_tiles_backward_is_the_tile_path(dtype):
    """The two paths differ (P and dS are rounded to dtype on the tiles, not on the float32
    path), so the rule test above compares two different kernels."""
    _skip_without_tiles(dtype)
    args = _inputs(CASES[1], dtype, seed=4)
    grads = _backward(*args)
    with mkldnn_off():
        grads32 = _backward(*args)
    assert not any(torch.equal(a, b) for a, b in zip(grads, grads32))


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_tiles_backward_packed_rows_through_the_public_op(dtype):
    """Packed rows (varlen): the backward runs the padded op on heads-last grad_out / out; the
    gradients equal the padded public op's on the owned rows, and the rule holds."""
    _skip_without_tiles(dtype)
    lens, H, D, grans = [50, 0, 37, 130], 2, 64, [20, 40, 64, 130]
    g = torch.Generator().manual_seed(11)
    rows = sum(lens)
    q, k, v, go = (torch.randn(rows, H, D, generator=g).to(dtype) for _ in range(4))
    tables = R.rope_tables(max(lens), D)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with adaperceiver.use_backend("cpp"):
        out = block_masked_attention_varlen(*leaves, lens, grans, q_rope=tables, k_rope=tables)
    out.backward(go)
    packed = [t.grad for t in leaves]

    sl = torch.tensor(lens)
    P = [pad_rows(t, lens).requires_grad_(True) for t in (q, k, v)]
    with adaperceiver.use_backend("cpp"):
        pout = block_masked_attention(*P, grans, seq_lens=sl, q_rope=tables, k_rope=tables)
    pout.backward(pad_rows(go, lens))
    for a, p in zip(packed, P):
        assert not a.isnan().any()
        assert torch.equal(a, unpad_rows(p.grad, lens))
    args = (*(pad_rows(t, lens) for t in (q, k, v, go)), grans, sl, tables, tables)
    for a, r, t in zip(packed, _autograd(dtype, *args), _autograd(torch.float64, *args)):
        r, t = unpad_rows(r, lens), unpad_rows(t, lens)
        assert _err(a, t) <= 2 * _err(r, t) + 1e-4 * t.abs().max().item()
