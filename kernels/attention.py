"""Triton block-masked latent attention of AdaPerceiver (forward and backward).

Computes softmax(scale * rope(q) rope(k)^T + mask) v for the group-causal mask (docs/design.md,
"The block mask": query row i sees keys k < row_end[i], row_end nondecreasing; no mask:
row_end = Nk), per-sample lengths ``seq_lens`` (rows and keys past the length are dropped,
their outputs are zero) and optional interleaved-pair RoPE. RoPE is applied once per row: the
operand a program owns (q in the forward and dq, k in dk/dv) is rotated on load; the operand it
reads tile after tile (k in the forward and dq, q in dk/dv) is rotated beforehand by the
``_rope_rows`` pre-pass into a scratch copy, instead of once per tile that reads it. The forward's tiles are autotuned on a
GPU per (head_dim, dtype, arch, shape bucket) among ``fwd_candidates`` (see "autotuning").

Tile schedule (see kernels/schedule.py, the one place it is defined):
  forward / dq: one program per (query tile [m0, m1), batch * head). Key tiles below
    min(row_end[m0], n) // BLOCK_N are fully visible (stage 1, no mask); key tiles up to
    ceil(min(row_end[m1 - 1], n) / BLOCK_N) are masked per row (stage 2); none beyond.
  dk/dv: one program per (key tile [n0, n1), batch * head), the mirror: query tiles before the
    first row that sees key n0 are skipped, tiles before the first row that sees key n1 - 1 are
    masked per row, the rest (up to the sample's length) need no key mask.
What is skipped: query tiles past a sample's length do no work (they store zeros / -inf), key
tiles past a row tile's bound are never loaded, and only the tiles a row bound cuts (stage 2,
and its dk/dv mirror) pay for the per-row mask.
Packed rows (``attention_varlen_forward``, the forward kernel with PACKED): q, k, v and out are
(R, H, D) rows of samples of their own lengths, one after another; the program of (query tile,
sample * head) starts at the sample's first row, so a mixed batch is never padded (the
backward of the packed op pads: adaperceiver/ops/attention.py).
Online softmax in fp32 with exp2; lse is stored in natural log (the backend contract of
adaperceiver/ops/dispatch.py), -inf on rows that see no key.
NaN / inf: no guard replaces a non-finite value. A NaN or inf that a row reaches through its
allowed keys (its q, a visible key's k or v, the scale) makes that row's output NaN as in the
reference (lse +inf for a +inf score, as torch's logsumexp); masked and padded positions are
never read, so a NaN there reaches only rows that share a loaded tile with it (the dense
reference, multiplying 0 by NaN, spreads it to every row): tests/test_kernels_attention.py
checks that the NaN set lies between the block-sparse and the dense reference's.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
import triton.testing

from adaperceiver.kernels import fp32_dot_precision, interpreting
from adaperceiver.kernels.schedule import check_grans, row_end, to_device

__all__ = ["attention_forward", "attention_backward", "attention_varlen_forward",
           "why_not", "why_not_varlen",
           "COMPILE_SPECS", "Tiles", "default_tiles"]

LOG2E = 1.4426950408889634   # the kernels work in base 2 (exp2); lse is stored in base e
HEAD_DIMS = (32, 64, 128)
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# ----------------------------------------------------------------------------- tile sizes
@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch options of the three main kernels.

    fwd_*: forward (query tile M x key tile N); dkdv_*: dk/dv (key tile N, inner query tile M);
    dq_*: dq (query tile M x key tile N); the delta preprocess uses dq_m rows per program.
    ``tl.dot`` needs every dimension >= 16 on a GPU.
    """
    fwd_m: int
    fwd_n: int
    dkdv_m: int
    dkdv_n: int
    dq_m: int
    dq_n: int
    fwd_warps: int = 4
    fwd_stages: int = 2
    dkdv_warps: int = 4
    dkdv_stages: int = 2
    dq_warps: int = 4
    dq_stages: int = 2


def default_tiles(head_dim: int, interpret: Optional[bool] = None,
                  dtype: torch.dtype = torch.float16) -> Tiles:
    """GPU tile sizes (fp16/bf16 ones checked spill-free by tests/test_kernels_compile.py), or
    big tiles under the interpreter, whose cost is per program and per op, not per element."""
    if interpreting() if interpret is None else interpret:
        return Tiles(32, 32, 32, 32, 32, 32)
    if dtype == torch.float32:
        # fp32 operands (3xTF32 dots) take twice the registers and shared memory of fp16 ones;
        # at head_dim 128 the accumulators fit in registers with 16-row key tiles (dk/dv) and
        # 16-row query tiles (forward, dq)
        if head_dim <= 64:
            return Tiles(32, 32, 32, 32, 32, 32, fwd_warps=8, fwd_stages=2, dkdv_warps=8,
                         dkdv_stages=2, dq_warps=8, dq_stages=2)
        return Tiles(16, 32, 32, 16, 16, 32, fwd_warps=4, fwd_stages=1, dkdv_warps=8,
                     dkdv_stages=1, dq_warps=8, dq_stages=1)
    if head_dim <= 64:
        return Tiles(64, 32, 32, 64, 64, 32, fwd_warps=4, fwd_stages=3, dkdv_warps=8,
                     dkdv_stages=3, dq_warps=8, dq_stages=3)
    # head_dim 128: the dk/dv accumulators (2 x BLOCK_N x 128 fp32) and the RoPE operands
    # need smaller key tiles and 8 warps to stay in registers
    return Tiles(64, 32, 32, 32, 32, 32, fwd_warps=8, fwd_stages=2, dkdv_warps=8,
                 dkdv_stages=2, dq_warps=8, dq_stages=2)


def fwd_candidates(head_dim: int, dtype: torch.dtype = torch.float16) -> list[Tiles]:
    """The forward tile configurations the GPU autotuner chooses among for (head_dim, dtype)
    (the default first), each compiled ahead of time for sm_80 and sm_90 without spills
    (COMPILE_SPECS, benchmarks/triton_resources.md). Only the forward fields differ."""
    t = default_tiles(head_dim, interpret=False, dtype=dtype)
    if dtype == torch.float32:
        options = []           # fp32 is for checking: its default tiles only
    elif head_dim <= 64:
        options = [(64, 64, 4, 3), (128, 64, 8, 3), (32, 32, 4, 3)]
    else:
        options = [(64, 64, 8, 2), (128, 32, 8, 2), (32, 32, 4, 2)]
    return [t] + [dataclasses.replace(t, fwd_m=m, fwd_n=n, fwd_warps=w, fwd_stages=st)
                  for m, n, w, st in options]


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _rope(x, cos, sin, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rotate interleaved pairs (x[2i], x[2i+1]) of a (ROWS, HEAD_DIM) tile by (cos, sin)
    (ROWS, HEAD_DIM // 2) float32; returns float32. The inverse rotation is (cos, -sin)."""
    x0, x1 = tl.split(tl.reshape(x.to(tl.float32), (ROWS, HEAD_DIM // 2, 2)))
    return tl.reshape(tl.join(x0 * cos - x1 * sin, x0 * sin + x1 * cos), (ROWS, HEAD_DIM))


@triton.jit
def _load_rows(base, offs, stride, limit, ROPE: tl.constexpr, Cos, Sin, HEAD_DIM: tl.constexpr,
               ROWS: tl.constexpr):
    """Load a (ROWS, HEAD_DIM) tile of rows ``offs`` (rows >= limit read as 0); with ROPE, rotate
    it by the tables' rows ``offs`` and round back to the input dtype, as the reference does.

    The rotation is written per column, r[d] = x[d] c[d // 2] -+ x[d ^ 1] s[d // 2] (minus on
    even d), from a second load of the tile with pair-swapped columns (a cache hit): no
    reshape/split/join, so the tile keeps one register layout inside the key loops."""
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs[:, None] < limit
    x = tl.load(base + offs[:, None] * stride + offs_d[None, :], mask=rows, other=0.0)
    if ROPE:
        xs = tl.load(base + offs[:, None] * stride + (offs_d ^ 1)[None, :], mask=rows, other=0.0)
        t = offs[:, None] * (HEAD_DIM // 2) + (offs_d // 2)[None, :]
        cos = tl.load(Cos + t, mask=rows, other=1.0)
        sin = tl.load(Sin + t, mask=rows, other=0.0)
        sin = tl.where((offs_d % 2 == 1)[None, :], sin, -sin)
        x = (x.to(tl.float32) * cos + xs.to(tl.float32) * sin).to(base.dtype.element_ty)
    return x


@triton.jit
def _unrope_store(base, x, offs, stride, limit, keep, ROPE: tl.constexpr, Cos, Sin,
                  HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
    """Store a gradient tile w.r.t. rotated rows as the gradient w.r.t. the unrotated rows
    (inverse rotation), zero on rows not in ``keep``; rows >= limit are not written."""
    offs_d = tl.arange(0, HEAD_DIM)
    if ROPE:
        offs_h = tl.arange(0, HEAD_DIM // 2)
        t = offs[:, None] * (HEAD_DIM // 2) + offs_h[None, :]
        cos = tl.load(Cos + t, mask=offs[:, None] < limit, other=1.0)
        sin = tl.load(Sin + t, mask=offs[:, None] < limit, other=0.0)
        x = _rope(x, cos, -sin, ROWS, HEAD_DIM)
    x = tl.where(keep[:, None], x, 0.0)
    tl.store(base + offs[:, None] * stride + offs_d[None, :], x.to(base.dtype.element_ty),
             mask=offs[:, None] < limit)


@triton.jit
def _program(H):
    """(tile, bh, b, h) of this program: every kernel here runs on a (tiles, B * H) grid, tile
    being its query, key or row tile and bh = b * H + h. b and h are int64, so that the base
    offsets they scale cannot overflow."""
    bh = tl.program_id(1)
    return tl.program_id(0), bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _first_row(SeqStarts, b, PACKED: tl.constexpr):
    """Row of sample b's first row: SeqStarts[b] for packed rows (R, H, D), whose launches pass
    batch strides of 0; 0 for padded samples, which start at their own batch offset."""
    row0 = b * 0
    if PACKED:
        row0 = tl.load(SeqStarts + b).to(tl.int64)
    return row0


@triton.jit
def _lengths(SeqLens, b, N_Q, N_K, HAS_LENS: tl.constexpr):
    """(rows, keys) of sample b: its seq_len clips both (cross-attention included)."""
    len_q = N_Q
    len_k = N_K
    if HAS_LENS:
        n = tl.maximum(tl.load(SeqLens + b), 0)
        len_q = tl.minimum(len_q, n)
        len_k = tl.minimum(len_k, n)
    return len_q, len_k


@triton.jit
def _row_schedule(RowEnd, offs_m, len_q, len_k, BLOCK_N: tl.constexpr):
    """Per-row key bounds of a query tile and its key-tile stages [0, n_full) / [n_full, n_end).

    Rows past the length borrow the last valid row's bound, so every row of the tile sees at
    least key 0 (no -inf - -inf in the online softmax); they are zeroed at the store. The tile
    bounds come from the smallest and largest row bound (rows m0 and m1 - 1: row_end is
    nondecreasing)."""
    active = tl.min(offs_m, 0) < len_q
    rows = tl.minimum(offs_m, tl.maximum(len_q - 1, 0))
    bound = tl.minimum(tl.load(RowEnd + rows), len_k)
    n_full = tl.where(active, tl.min(bound, 0) // BLOCK_N, 0)
    n_end = tl.where(active, tl.cdiv(tl.max(bound, 0), BLOCK_N), 0)
    return bound, n_full, n_end


@triton.jit
def _query_tile(RowEnd, SeqLens, Counter, H, N_Q, N_K, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, HAS_LENS: tl.constexpr, DEBUG: tl.constexpr):
    """The program's query tile (forward and dq): (b, h, bh, its rows offs_m, the sample's
    lengths, the rows' key bounds and the two key-tile stages [0, n_full) / [n_full, n_end))."""
    pid_m, bh, b, h = _program(H)
    len_q, len_k = _lengths(SeqLens, b, N_Q, N_K, HAS_LENS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    bound, n_full, n_end = _row_schedule(RowEnd, offs_m, len_q, len_k, BLOCK_N)
    if DEBUG:
        tl.atomic_add(Counter, n_end)
    return b, h, bh, offs_m, len_q, len_k, bound, n_full, n_end


@triton.jit
def _key_tile(t, keys, q, bound, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, K_ROPE: tl.constexpr, PRECISION: tl.constexpr):
    """Key tile t of ``keys`` = (k_base, v_base, stride_kn, stride_vn, key_limit, KCos, KSin):
    its rows offs_n, its k rows (rows >= key_limit read as 0) and the scaled scores of the
    query tile against it, -inf where a row's bound cuts them (MASKED): forward and dq."""
    k_base, _, stride_kn, _, key_limit, KCos, KSin = keys
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    k = _load_rows(k_base, offs_n, stride_kn, key_limit, K_ROPE, KCos, KSin, HEAD_DIM, BLOCK_N)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        qk = tl.where(offs_n[None, :] < bound[:, None], qk, float("-inf"))
    return offs_n, k, qk


@triton.jit
def _value_tile(offs_n, keys, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """The v rows offs_n of ``keys`` (rows >= key_limit read as 0). The forward loads them
    after its softmax step, which keeps the v tile out of the registers the scores need."""
    _, v_base, _, stride_vn, key_limit, KCos, KSin = keys
    return _load_rows(v_base, offs_n, stride_vn, key_limit, False, KCos, KSin, HEAD_DIM, BLOCK_N)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, keys, bound, tile_lo, tile_hi, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               K_ROPE: tl.constexpr, PRECISION: tl.constexpr):
    """One stage of the online softmax over key tiles [tile_lo, tile_hi)."""
    for t in range(tile_lo, tile_hi):
        offs_n, _, qk = _key_tile(t, keys, q, bound, qk_scale, HEAD_DIM, BLOCK_N, MASKED,
                                  K_ROPE, PRECISION)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _value_tile(offs_n, keys, HEAD_DIM, BLOCK_N)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, RowEnd, SeqLens, SeqStarts, QCos, QSin, KCos, KSin, Counter,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
              H, N_Q, N_K, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LENS: tl.constexpr, Q_ROPE: tl.constexpr, K_ROPE: tl.constexpr,
              DEBUG: tl.constexpr, PRECISION: tl.constexpr, PACKED: tl.constexpr):
    b, h, bh, offs_m, len_q, len_k, bound, n_full, n_end = _query_tile(
        RowEnd, SeqLens, Counter, H, N_Q, N_K, BLOCK_M, BLOCK_N, HAS_LENS, DEBUG)
    row0 = _first_row(SeqStarts, b, PACKED)
    q_base = Q + b * stride_qb + row0 * stride_qn + h * stride_qh
    k_base = K + b * stride_kb + row0 * stride_kn + h * stride_kh
    v_base = V + b * stride_vb + row0 * stride_vn + h * stride_vh
    o_base = Out + b * stride_ob + row0 * stride_on + h * stride_oh
    # a packed sample has no rows past its length (the next sample's rows follow)
    o_rows = N_Q
    if PACKED:
        o_rows = len_q
    # rows and keys past the sample's length are read as zeros: padding costs no traffic
    q = _load_rows(q_base, offs_m, stride_qn, len_q, Q_ROPE, QCos, QSin, HEAD_DIM, BLOCK_M)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    keys = (k_base, v_base, stride_kn, stride_vn, len_k, KCos, KSin)
    # stage 1: key tiles every row of the tile sees in full
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, keys, bound, 0, n_full, qk_scale, HEAD_DIM,
                               BLOCK_N, False, K_ROPE, PRECISION)
    # stage 2: key tiles cut by some row's bound (or by the sample's length)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, keys, bound, n_full, n_end, qk_scale, HEAD_DIM,
                               BLOCK_N, True, K_ROPE, PRECISION)

    valid = offs_m < len_q
    l_safe = tl.where(valid, l_i, 1.0)
    out = tl.where(valid[:, None], acc / l_safe[:, None], 0.0)
    # a +inf score makes the row's softmax NaN (inf - inf) but its logsumexp +inf, as torch's
    # logsumexp gives; l is NaN there, so m decides. NaN scores keep lse NaN (through l).
    lse = tl.where(m_i == float("inf"), m_i, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    lse = tl.where(valid, lse, float("-inf"))
    offs_d = tl.arange(0, HEAD_DIM)
    o_ptrs = o_base + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < o_rows)
    tl.store(Lse + bh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)


@triton.jit
def _rope_rows(X, Out, Cos, Sin, SeqLens, SeqStarts, Counter,
               stride_xb, stride_xh, stride_xn, stride_ob, stride_oh, stride_on,
               H, N, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LENS: tl.constexpr,
               PACKED: tl.constexpr, DEBUG: tl.constexpr):
    """Out = rope(X) for the rows [n0, n0 + BLOCK_N) of one (sample, head), rounded to X's dtype
    as the kernels' on-load rotation (and the reference) round it. Rows past the sample's
    length are neither read nor written (no kernel reads them). One program per (row tile,
    sample * head): each row is rotated once per call, however many tiles later read it."""
    pid_n, bh, b, h = _program(H)
    n_rows, _ = _lengths(SeqLens, b, N, N, HAS_LENS)
    offs = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row0 = _first_row(SeqStarts, b, PACKED)
    x_base = X + b * stride_xb + row0 * stride_xn + h * stride_xh
    o_base = Out + b * stride_ob + row0 * stride_on + h * stride_oh
    x = _load_rows(x_base, offs, stride_xn, n_rows, True, Cos, Sin, HEAD_DIM, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    tl.store(o_base + offs[:, None] * stride_on + offs_d[None, :], x,
             mask=offs[:, None] < n_rows)
    if DEBUG:
        tl.atomic_add(Counter, tl.sum((offs < n_rows).to(tl.int32), 0))


@triton.jit
def _attn_bwd_delta(Out, DOut, Delta, stride_ob, stride_oh, stride_on,
                    stride_db, stride_dh, stride_dn, H, N_Q,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) in fp32 (rows past a length have O = 0, hence delta = 0)."""
    pid_m, bh, b, h = _program(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m[:, None] < N_Q
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DOut + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dn
                 + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh.to(tl.int64) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _backward_lse(lse_base, offs_m, row_ok):
    """The rows' lse in base 2 for p = exp2(score - lse). Rows past the length read +inf, so
    their p is 0. A valid row's +inf lse (a +inf score: its forward output is NaN) becomes NaN,
    so that its p, hence its dv and dk, are NaN as in the reference, not exp2(x - inf) = 0."""
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(row_ok & (lse == float("inf")), float("nan"), lse)
    return lse * 1.4426950408889634


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qn, stride_dn, QCos, QSin, lse_base,
                delta_base, RowEnd, offs_n, len_q, len_k, tile_lo, tile_hi, qk_scale, N_Q,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                Q_ROPE: tl.constexpr, PRECISION: tl.constexpr):
    """dk/dv of one key tile over query tiles [tile_lo, tile_hi), scores kept transposed."""
    offs_d = tl.arange(0, HEAD_DIM)
    for t in range(tile_lo, tile_hi):
        offs_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, offs_m, stride_qn, len_q, Q_ROPE, QCos, QSin, HEAD_DIM, BLOCK_M)
        # rows past the length: lse = +inf makes p = 0 and dO = 0, so they add nothing
        row_ok = offs_m < len_q
        lse = _backward_lse(lse_base, offs_m, row_ok)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        if MASKED:
            bound = tl.minimum(tl.load(RowEnd + offs_m, mask=offs_m < N_Q, other=0), len_k)
            qkT = tl.where(offs_n[:, None] < bound[None, :], qkT, float("-inf"))
        pT = tl.math.exp2(qkT - lse[None, :])
        do = tl.load(do_base + offs_m[:, None] * stride_dn + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DOut, Lse, Delta, DK, DV, RowEnd, SeqLens, QCos, QSin, KCos, KSin,
                   Counter, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
                   stride_gb, stride_gh, stride_gn,
                   H, N_Q, N_K, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_LENS: tl.constexpr, Q_ROPE: tl.constexpr, K_ROPE: tl.constexpr,
                   DEBUG: tl.constexpr, PRECISION: tl.constexpr):
    pid_n, bh, b, h = _program(H)
    len_q, len_k = _lengths(SeqLens, b, N_Q, N_K, HAS_LENS)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    active = n0 < len_k
    n_last = tl.maximum(tl.minimum(n0 + BLOCK_N, len_k) - 1, 0)
    # The mirror schedule. row_end is nondecreasing, so the first query row that sees key j is
    # the number of rows whose bound is <= j: counted in vector chunks (no host table).
    r_first = 0
    r_full = 0
    for m in range(0, N_Q, BLOCK_M):
        offs = m + tl.arange(0, BLOCK_M)
        re = tl.load(RowEnd + offs, mask=offs < N_Q, other=2147483647)
        r_first += tl.sum((re <= n0).to(tl.int32), 0)
        r_full += tl.sum((re <= n_last).to(tl.int32), 0)
    m_end = tl.where(active, tl.cdiv(len_q, BLOCK_M), 0)
    # (r_first < len_q always holds for valid inputs; the guard keeps a tile of rows that
    # are all past the length from being visited if it did not)
    m_start = tl.where(r_first < len_q, tl.minimum(r_first // BLOCK_M, m_end), m_end)
    m_full = tl.minimum(tl.maximum(tl.cdiv(r_full, BLOCK_M), m_start), m_end)
    if DEBUG:
        tl.atomic_add(Counter, m_end - m_start)

    k = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, stride_kn, len_k, K_ROPE, KCos,
                   KSin, HEAD_DIM, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn
                + offs_d[None, :], mask=offs_n[:, None] < len_k, other=0.0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DOut + b * stride_db + h * stride_dh
    lse_base = Lse + bh.to(tl.int64) * N_Q
    delta_base = Delta + bh.to(tl.int64) * N_Q
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    # stage 1: query tiles holding rows that see only part of this key tile
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qn, stride_dn, QCos, QSin,
                         lse_base, delta_base, RowEnd, offs_n, len_q, len_k, m_start, m_full,
                         qk_scale, N_Q, HEAD_DIM, BLOCK_M, True, Q_ROPE, PRECISION)
    # stage 2: query tiles whose every row sees the whole key tile
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, stride_qn, stride_dn, QCos, QSin,
                         lse_base, delta_base, RowEnd, offs_n, len_q, len_k, m_full, m_end,
                         qk_scale, N_Q, HEAD_DIM, BLOCK_M, False, Q_ROPE, PRECISION)

    # keys past the length get no gradient (stage 2 does not mask them)
    keep = offs_n < len_k
    g_off = b * stride_gb + h * stride_gh
    _unrope_store(DK + g_off, dk * sm_scale, offs_n, stride_gn, N_K, keep, K_ROPE, KCos, KSin,
                  HEAD_DIM, BLOCK_N)
    _unrope_store(DV + g_off, dv, offs_n, stride_gn, N_K, keep, False, KCos, KSin,
                  HEAD_DIM, BLOCK_N)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, keys, bound, tile_lo, tile_hi, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              K_ROPE: tl.constexpr, PRECISION: tl.constexpr):
    """dq of one query tile over key tiles [tile_lo, tile_hi)."""
    for t in range(tile_lo, tile_hi):
        offs_n, k, qk = _key_tile(t, keys, q, bound, qk_scale, HEAD_DIM, BLOCK_N, MASKED,
                                  K_ROPE, PRECISION)
        v = _value_tile(offs_n, keys, HEAD_DIM, BLOCK_N)
        p = tl.math.exp2(qk - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DOut, Lse, Delta, DQ, RowEnd, SeqLens, QCos, QSin, KCos, KSin,
                 Counter, stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_db, stride_dh, stride_dn,
                 stride_gb, stride_gh, stride_gn,
                 H, N_Q, N_K, sm_scale, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_LENS: tl.constexpr, Q_ROPE: tl.constexpr, K_ROPE: tl.constexpr,
                 DEBUG: tl.constexpr, PRECISION: tl.constexpr):
    b, h, bh, offs_m, len_q, len_k, bound, n_full, n_end = _query_tile(
        RowEnd, SeqLens, Counter, H, N_Q, N_K, BLOCK_M, BLOCK_N, HAS_LENS, DEBUG)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, len_q, Q_ROPE, QCos,
                   QSin, HEAD_DIM, BLOCK_M)
    row_ok = offs_m < len_q
    offs_d = tl.arange(0, HEAD_DIM)
    do = tl.load(DOut + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dn
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = _backward_lse(Lse + bh.to(tl.int64) * N_Q, offs_m, row_ok)
    delta = tl.load(Delta + bh.to(tl.int64) * N_Q + offs_m, mask=row_ok, other=0.0)
    keys = (K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh, stride_kn,
            stride_vn, len_k, KCos, KSin)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, keys, bound, 0, n_full, qk_scale, HEAD_DIM, BLOCK_N,
                   False, K_ROPE, PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, keys, bound, n_full, n_end, qk_scale, HEAD_DIM,
                   BLOCK_N, True, K_ROPE, PRECISION)
    _unrope_store(DQ + b * stride_gb + h * stride_gh, dq * sm_scale, offs_m, stride_gn, N_Q,
                  row_ok, Q_ROPE, QCos, QSin, HEAD_DIM, BLOCK_M)


# ----------------------------------------------------------------------------- host side
def why_not(q, k, v, token_grans=None, seq_lens=None, q_rope=None, k_rope=None) -> list[str]:
    """Why these kernels cannot take this input (empty: they can). The device is not checked
    here: the dispatcher does that."""
    reasons = []
    ts = {"q": q, "k": k, "v": v}
    for name, t in ts.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            return [f"{name} must be a 4-d tensor (B, H, N, D)"]
    for name, t in ts.items():
        if t.dtype not in _DTYPES:
            reasons.append(f"{name}.dtype={t.dtype} is not supported; allowed: float16, "
                           "bfloat16, float32")
        elif t.dtype == torch.bfloat16 and interpreting():
            reasons.append(f"{name}.dtype=bfloat16 is not supported under TRITON_INTERPRET=1 "
                           "(the interpreter's bf16 is broken); allowed there: float16, float32")
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            reasons.append(f"{name} has stride {t.stride(-1)} along head_dim; the kernels need "
                           "head_dim contiguous (stride 1)")
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        reasons.append(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if len({q.device, k.device, v.device}) > 1:
        reasons.append(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        reasons.append(f"head_dim={D} is not supported; allowed: {', '.join(map(str, HEAD_DIMS))}")
    if k.shape[-1] != D or v.shape[-1] != D:
        reasons.append(f"head dims differ: q {D}, k {k.shape[-1]}, v {v.shape[-1]}; the kernels "
                       "need one head_dim")
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
        reasons.append(f"shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} do not fit")
    Nq, Nk = q.shape[2], k.shape[2]
    if Nq == 0 or Nk == 0 or q.shape[0] == 0 or q.shape[1] == 0:
        reasons.append(f"empty input (q{tuple(q.shape)}, k{tuple(k.shape)})")
    if q.shape[0] * q.shape[1] > 65535:
        reasons.append(f"batch*heads={q.shape[0] * q.shape[1]} exceeds the grid limit 65535")
    if token_grans is not None and Nq != Nk:
        reasons.append(f"token_grans needs Nq == Nk, got Nq={Nq}, Nk={Nk}")
    if seq_lens is not None and (not isinstance(seq_lens, torch.Tensor)
                                 or seq_lens.shape != (q.shape[0],)
                                 or seq_lens.dtype not in (torch.int32, torch.int64)):
        reasons.append(f"seq_lens must be an int32/int64 tensor of shape ({q.shape[0]},)")
    return reasons + _rope_reasons(q_rope, k_rope, Nq, Nk, D)


def _rope_reasons(q_rope, k_rope, n_q: int, n_k: int, D: int) -> list[str]:
    """RoPE tables must be (cos, sin) float tables of shape (n, D/2) (padded: n = Nq for q and
    Nk for k; packed rows: the longest sample's length for both)."""
    return [f"{name} must be (cos, sin) float tables of shape ({n}, {D // 2})"
            for name, rope, n in (("q_rope", q_rope, n_q), ("k_rope", k_rope, n_k))
            if rope is not None and (len(rope) != 2 or any(
                not isinstance(r, torch.Tensor) or r.shape != (n, D // 2)
                or not r.dtype.is_floating_point for r in rope))]


def _raise_if(reasons: list[str], what: str) -> None:
    if reasons:
        raise ValueError(f"the Triton {what} cannot take this input:\n  " + "\n  ".join(reasons))


def _grans(token_grans) -> Optional[list[int]]:
    return None if token_grans is None else check_grans(token_grans)


def _scale(scale, head_dim: int) -> float:
    """The op's default softmax scale, 1/sqrt(head_dim), for direct callers that give none."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _table(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like if t is None else t.to(device=like.device, dtype=torch.float32).contiguous()


ROPE_BLOCK = 64   # rows per program of the RoPE pre-pass (32 under the interpreter)


def rotate_rows(x, rope, seq_lens=None, *, starts=None, rows_counter=None) -> torch.Tensor:
    """rope(x) into a new buffer, each row rotated once (the ``_rope_rows`` pre-pass): the
    forward and the dq kernel then read K already rotated instead of rotating each K tile for
    every query tile that reads it. ``x`` (B, H, N, D), or packed rows (R, H, D) with ``starts``
    (B,) and ``seq_lens`` (B,) device int32; rows past a length are left unwritten (no kernel
    reads them). ``rows_counter`` (int32, 1 element): the rows rotated are added to it."""
    packed = starts is not None
    D = x.shape[-1]
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if packed:
        B, H, n = seq_lens.shape[0], x.shape[1], rope[0].shape[0]
        sx, so = (0, x.stride(1), x.stride(0)), (0, out.stride(1), out.stride(0))
    else:
        B, H, n = x.shape[0], x.shape[1], x.shape[2]
        sx, so = (x.stride(0), x.stride(1), x.stride(2)), (out.stride(0), out.stride(1),
                                                            out.stride(2))
    if B * H == 0 or n == 0:
        return out
    block = 32 if interpreting() else ROPE_BLOCK
    cos, sin = (_table(t, out) for t in rope)
    lens = seq_lens if seq_lens is not None else cos
    _rope_rows[(triton.cdiv(n, block), B * H)](
        x, out, cos, sin, lens, starts if packed else lens,
        cos if rows_counter is None else rows_counter, *sx, *so, H, n,
        HEAD_DIM=D, BLOCK_N=block, HAS_LENS=seq_lens is not None, PACKED=packed,
        DEBUG=rows_counter is not None, num_warps=4)
    return out


def _args(q, k, token_grans, seq_lens, q_rope, k_rope, dummy_f32):
    """Device inputs shared by every kernel: row_end, seq_lens, the four RoPE tables. Unused
    pointers get a dummy tensor (their constexpr flag keeps the kernel from reading it)."""
    Nq, Nk = q.shape[2], k.shape[2]
    re = row_end(Nq, token_grans, Nk, device=q.device)
    lens = re if seq_lens is None else seq_lens.to(device=q.device, dtype=torch.int32)
    return re, lens, _tables(q_rope, k_rope, dummy_f32)


def _tables(q_rope, k_rope, dummy_f32) -> list[torch.Tensor]:
    """The four RoPE tables (q cos, q sin, k cos, k sin) as float32 kernel arguments; an absent
    one is ``dummy_f32`` (its constexpr flag keeps the kernel from reading it)."""
    return [_table(t, dummy_f32) for rope in (q_rope, k_rope)
            for t in ((None, None) if rope is None else rope)]


def _precision(dtype) -> str:
    # fp32 inputs get ~fp32-accurate products (3xTF32 on tensor cores) at the "highest" float32
    # matmul precision, plain TF32 at "high"/"medium" (as torch's matmuls); "ieee" would lower
    # to FMA loops that spill heavily. fp16/bf16 ignore this.
    return fp32_dot_precision("tf32x3") if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------- autotuning
# On a GPU the forward's tiles are chosen per (head_dim, dtype, GPU arch, shape bucket) among
# fwd_candidates (each compiled ahead of time without spills): the first call of a bucket times
# each candidate on the call's own inputs (triton.testing.do_bench, into the call's output
# buffers, which the final launch then rewrites) and memoises the fastest. The choice changes
# only the summation order (results agree to rounding); ADAPERCEIVER_TRITON_AUTOTUNE=0 keeps
# the default tiles. No tuning while a CUDA graph is being captured or the sync-debug mode is on
# (timing synchronises): those calls use the memoised choice, else the default.
_TUNED: dict = {}


def _bucket(n: int) -> int:
    return 1 << max(4, (max(int(n), 1) - 1).bit_length())


def _on_gpu(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and not interpreting()


def _tuning_allowed(t: torch.Tensor) -> bool:
    if os.environ.get("ADAPERCEIVER_TRITON_AUTOTUNE", "1") == "0":
        return False
    from torch._guards import detect_fake_mode
    if torch.compiler.is_compiling() or detect_fake_mode() is not None:
        return False           # tracing: nothing runs, nothing can be timed
    return (not torch.cuda.is_current_stream_capturing()
            and torch.cuda.get_sync_debug_mode() == 0)


def _bench(fn) -> float:
    """ms per call of ``fn`` on the GPU."""
    return triton.testing.do_bench(fn, warmup=5, rep=20)


def forward_tiles(q: torch.Tensor, shape_key: tuple, launch, tune: bool = True) -> Tiles:
    """The forward's tiles for this call (see above); ``launch(tiles)`` runs the forward."""
    D = q.shape[-1]
    default = default_tiles(D, dtype=q.dtype)
    if not _on_gpu(q):
        return default
    arch = torch.cuda.get_device_capability(q.device)
    key = (D, q.dtype, arch, shape_key[0], *map(_bucket, shape_key[1:4]), *shape_key[4:])
    hit = _TUNED.get(key)
    if hit is not None or not tune or not _tuning_allowed(q):
        return hit or default
    times = []
    for cand in fwd_candidates(D, q.dtype):
        try:
            times.append((_bench(lambda c=cand: launch(c)), cand))
        except Exception:  # noqa: BLE001 - a candidate that cannot run here is not chosen
            continue
    best = min(times, key=lambda x: x[0])[1] if times else default
    _TUNED[key] = best
    return best


def attention_forward(q, k, v, token_grans=None, scale=None, seq_lens=None, q_rope=None,
                      k_rope=None, *, tiles: Optional[Tiles] = None,
                      visit_counter: Optional[torch.Tensor] = None,
                      rope_counter: Optional[torch.Tensor] = None, check: bool = True):
    """(out, lse): out (B, H, Nq, D) in q's dtype, lse float32 (B, H, Nq), natural log, -inf
    on rows that see no key. ``visit_counter`` (int32, 1 element): when given, the kernel adds
    the number of key tiles it loads to it (a DEBUG build of the kernel); ``rope_counter``: the
    K rows rotated (by the pre-pass, once per row) are added to it. ``check=False``: the caller
    has had ``why_not`` say nothing against this input (the dispatcher does)."""
    if check:
        _raise_if(why_not(q, k, v, token_grans, seq_lens, q_rope, k_rope), "attention kernels")
    token_grans = _grans(token_grans)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    scale = _scale(scale, D)
    # written heads-last, (B, Nq, H, D), and returned as its (B, H, Nq, D) view: the op hands
    # that buffer to the model as (B, Nq, C) with no transpose copy
    out = torch.empty((B, Nq, H, v.shape[-1]), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    re, lens, (qc, qs, kc, ks) = _args(q, k, token_grans, seq_lens, q_rope, k_rope, lse)
    # K rotated once per row (the pre-pass), not once per query tile that reads it
    kr = k if k_rope is None else rotate_rows(k, k_rope, None if seq_lens is None else lens,
                                              rows_counter=rope_counter)

    def launch(t: Tiles):
        _attn_fwd[(triton.cdiv(Nq, t.fwd_m), B * H)](
            q, kr, v, out, lse, re, lens, lens, qc, qs, kc, ks,
            re if visit_counter is None else visit_counter,
            q.stride(0), q.stride(1), q.stride(2), kr.stride(0), kr.stride(1), kr.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            H, Nq, Nk, scale * LOG2E,
            HEAD_DIM=D, BLOCK_M=t.fwd_m, BLOCK_N=t.fwd_n, HAS_LENS=seq_lens is not None,
            Q_ROPE=q_rope is not None, K_ROPE=False, DEBUG=visit_counter is not None,
            PRECISION=_precision(q.dtype), PACKED=False, num_warps=t.fwd_warps,
            num_stages=t.fwd_stages)
    key = ("padded", Nq, Nk, B * H, seq_lens is not None, q_rope is not None)
    launch(tiles or forward_tiles(q, key, launch, visit_counter is None))
    return out, lse


def _as_padded_view(t: torch.Tensor) -> torch.Tensor:
    """Packed rows (R, H, D) seen as one (1, H, R, D) sample: what ``why_not`` checks."""
    return t.transpose(0, 1)[None]


def why_not_varlen(q, k, v, seq_lens, token_grans=None, q_rope=None, k_rope=None) -> list[str]:
    """Why the packed forward cannot take this input (empty: it can)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            return [f"{name} must be a 3-d tensor of packed rows (R, H, D)"]
    n = max(seq_lens, default=0)
    reasons = why_not(*(_as_padded_view(t) for t in (q, k, v)), token_grans)
    if n == 0 or len(seq_lens) * q.shape[1] > 65535:
        reasons.append(f"{len(seq_lens)} samples of up to {n} rows: need 1..65535 (sample, head) "
                       "programs and a non-empty sample")
    return reasons + _rope_reasons(q_rope, k_rope, n, n, q.shape[-1])


def attention_varlen_forward(q, k, v, seq_lens: Sequence[int], token_grans=None, scale=None,
                             q_rope=None, k_rope=None, *, tiles: Optional[Tiles] = None,
                             rope_counter: Optional[torch.Tensor] = None, check: bool = True):
    """Self-attention over packed rows: q, k, v (R, H, D), sample b's ``seq_lens[b]`` rows (host
    ints) following those of samples 0..b-1. (out, lse): out (R, H, D) in q's dtype, lse
    float32 (B, H, max seq_len), -inf past each length. The forward kernel above with
    PACKED: each program starts at its sample's first row; nothing is padded. ``check``: as
    for :func:`attention_forward`."""
    if check:
        _raise_if(why_not_varlen(q, k, v, seq_lens, token_grans, q_rope, k_rope),
                  "packed attention kernel")
    token_grans = _grans(token_grans)
    R, H, D = q.shape
    B, n = len(seq_lens), max(seq_lens)
    scale = _scale(scale, D)
    out = torch.empty((R, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, n), device=q.device, dtype=torch.float32)
    starts = [0]
    for L in seq_lens[:-1]:
        starts.append(starts[-1] + L)
    # host-known: converted on the host, copied without blocking (no sync on a GPU)
    lens = to_device(seq_lens, q.device, torch.int32)
    starts = to_device(starts, q.device, torch.int32)
    re = row_end(n, token_grans, n, device=q.device)
    qc, qs, kc, ks = _tables(q_rope, k_rope, lse)
    # K rotated once per row (the pre-pass), not once per query tile that reads it
    kr = k if k_rope is None else rotate_rows(k, k_rope, lens, starts=starts,
                                              rows_counter=rope_counter)
    def launch(t: Tiles):
        _attn_fwd[(triton.cdiv(n, t.fwd_m), B * H)](
            q, kr, v, out, lse, re, lens, starts, qc, qs, kc, ks, re,
            0, q.stride(1), q.stride(0), 0, kr.stride(1), kr.stride(0),
            0, v.stride(1), v.stride(0), 0, out.stride(1), out.stride(0),
            H, n, n, scale * LOG2E,
            HEAD_DIM=D, BLOCK_M=t.fwd_m, BLOCK_N=t.fwd_n, HAS_LENS=True,
            Q_ROPE=q_rope is not None, K_ROPE=False, DEBUG=False,
            PRECISION=_precision(q.dtype), PACKED=True, num_warps=t.fwd_warps,
            num_stages=t.fwd_stages)
    key = ("packed", n, R, B * H, True, q_rope is not None)
    launch(tiles or forward_tiles(q, key, launch))
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, token_grans=None, scale=None, seq_lens=None,
                       q_rope=None, k_rope=None, *, tiles: Optional[Tiles] = None,
                       visit_counters: Optional[dict] = None, check: bool = True):
    """(dq, dk, dv) w.r.t. the unrotated q, k and v. ``out`` and ``lse`` may come from any
    backend (shared contract). ``visit_counters``: optional {"dkdv": t, "dq": t} int32 tensors
    the kernels add their tile visits to (query tiles per key tile; key tiles per query tile).
    ``check``: as for :func:`attention_forward`.
    """
    if check:
        _raise_if(why_not(q, k, v, token_grans, seq_lens, q_rope, k_rope), "attention kernels")
    token_grans = _grans(token_grans)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if grad_out.shape != out.shape or grad_out.stride(-1) != 1:
        grad_out = grad_out.reshape(out.shape).contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    lse = lse.to(torch.float32).contiguous()
    scale = _scale(scale, D)
    t = tiles or default_tiles(D, dtype=q.dtype)
    re, lens, (qc, qs, kc, ks) = _args(q, k, token_grans, seq_lens, q_rope, k_rope, lse)
    flags = dict(HEAD_DIM=D, HAS_LENS=seq_lens is not None, PRECISION=_precision(q.dtype))
    counters = visit_counters or {}
    # the operand each program reads many tiles of comes pre-rotated, once per row: q for
    # dk/dv (every key tile reads the query tiles that see it), k for dq; the operand a program
    # owns is rotated on load (once) and its gradient rotated back on store
    lens_arg = None if seq_lens is None else lens
    qr = q if q_rope is None else rotate_rows(q, q_rope, lens_arg)
    kr = k if k_rope is None else rotate_rows(k, k_rope, lens_arg)

    delta = torch.empty((B, H, Nq), device=q.device, dtype=torch.float32)
    _attn_bwd_delta[(triton.cdiv(Nq, t.dq_m), B * H)](
        out, grad_out, delta, out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), H, Nq,
        HEAD_DIM=D, BLOCK_M=t.dq_m, num_warps=4)

    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=q.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=q.device, dtype=v.dtype)
    def strides(qq, kk):
        return (qq.stride(0), qq.stride(1), qq.stride(2), kk.stride(0), kk.stride(1),
                kk.stride(2), v.stride(0), v.stride(1), v.stride(2),
                grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    _attn_bwd_dkdv[(triton.cdiv(Nk, t.dkdv_n), B * H)](
        qr, k, v, grad_out, lse, delta, dk, dv, re, lens, qc, qs, kc, ks,
        counters.get("dkdv", re), *strides(qr, k), dk.stride(0), dk.stride(1), dk.stride(2),
        H, Nq, Nk, scale, scale * LOG2E, BLOCK_M=t.dkdv_m, BLOCK_N=t.dkdv_n,
        DEBUG="dkdv" in counters, num_warps=t.dkdv_warps, num_stages=t.dkdv_stages,
        Q_ROPE=False, K_ROPE=k_rope is not None, **flags)
    _attn_bwd_dq[(triton.cdiv(Nq, t.dq_m), B * H)](
        q, kr, v, grad_out, lse, delta, dq, re, lens, qc, qs, kc, ks,
        counters.get("dq", re), *strides(q, kr), dq.stride(0), dq.stride(1), dq.stride(2),
        H, Nq, Nk, scale, scale * LOG2E, BLOCK_M=t.dq_m, BLOCK_N=t.dq_n,
        DEBUG="dq" in counters, num_warps=t.dq_warps, num_stages=t.dq_stages,
        Q_ROPE=q_rope is not None, K_ROPE=False, **flags)
    return dq, dk, dv


# ----------------------------------------------------------------------------- AOT specs
def _signature(pointers, ints, floats, constexprs):
    sig = {name: ty for name, ty in pointers}
    # strides are multiples of 16 for head_dim 32/64/128 layouts, and Triton's runtime
    # specializes them so: the hint gives the same vectorized code as a launch would
    sig.update({name: "i32:16" if name.startswith("stride") else "i32" for name in ints})
    sig.update({name: "fp32" for name in floats})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


def _compile_specs(dtype: torch.dtype, dtypes: tuple, suffix: str = "") -> list[dict]:
    """Every @triton.jit kernel of this file at the GPU default tiles of ``dtype``, for each
    head_dim, with every optional feature on (RoPE, seq_lens: the largest register footprint;
    the RoPE flags each kernel is launched with) and off, and every forward tile candidate
    (FWD_CANDIDATES) with features on. Format: see adaperceiver/kernels/compile.py."""
    x, f32, i32 = "*{dtype}:16", "*fp32:16", "*i32:16"
    tables = [("QCos", f32), ("QSin", f32), ("KCos", f32), ("KSin", f32)]
    strides = lambda *ts: [f"stride_{t}{d}" for t in ts for d in "bhn"]  # noqa: E731
    prec = "tf32x3" if dtype == torch.float32 else "tf32"
    fwd_sig = [("Q", x), ("K", x), ("V", x), ("Out", x), ("Lse", f32), ("RowEnd", i32),
               ("SeqLens", i32), ("SeqStarts", i32), *tables, ("Counter", i32)]
    fwd_ints = strides("q", "k", "v", "o") + ["H", "N_Q", "N_K"]
    specs = []

    def add(name, kernel, warps, stages, consts, signature):
        specs.append({"name": name + suffix, "kernel": kernel, "num_warps": warps,
                      "num_stages": stages, "constexprs": consts, "signature": signature,
                      "dtypes": dtypes})

    for D in HEAD_DIMS:
        t = default_tiles(D, interpret=False, dtype=dtype)
        for feat in (True, False):
            tag = f"D={D}" + (" rope+lens" if feat else "")
            flags = {"HEAD_DIM": D, "HAS_LENS": feat, "DEBUG": False, "PRECISION": prec}
            # the packed forward (mixed batches' self-attention) is the rope+lens build; K
            # arrives rotated (the _rope_rows pre-pass), q is rotated on load
            for packed in (False, True) if feat else (False,):
                fwd_c = {**flags, "Q_ROPE": feat, "K_ROPE": False, "BLOCK_M": t.fwd_m,
                         "BLOCK_N": t.fwd_n, "PACKED": packed}
                add(f"attn_fwd {tag}" + (" packed" if packed else ""), "_attn_fwd",
                    t.fwd_warps, t.fwd_stages, fwd_c,
                    _signature(fwd_sig, fwd_ints, ["qk_scale"], fwd_c))
            bwd_ptrs = [("Q", x), ("K", x), ("V", x), ("DOut", x), ("Lse", f32),
                        ("Delta", f32)]
            rest = [("RowEnd", i32), ("SeqLens", i32), *tables, ("Counter", i32)]
            ints = strides("q", "k", "v", "d", "g") + ["H", "N_Q", "N_K"]
            dkdv_c = {**flags, "Q_ROPE": False, "K_ROPE": feat, "BLOCK_M": t.dkdv_m,
                      "BLOCK_N": t.dkdv_n}
            add(f"attn_bwd_dkdv {tag}", "_attn_bwd_dkdv", t.dkdv_warps, t.dkdv_stages, dkdv_c,
                _signature(bwd_ptrs + [("DK", x), ("DV", x)] + rest, ints,
                           ["sm_scale", "qk_scale"], dkdv_c))
            dq_c = {**flags, "Q_ROPE": feat, "K_ROPE": False, "BLOCK_M": t.dq_m,
                    "BLOCK_N": t.dq_n}
            add(f"attn_bwd_dq {tag}", "_attn_bwd_dq", t.dq_warps, t.dq_stages, dq_c,
                _signature(bwd_ptrs + [("DQ", x)] + rest, ints, ["sm_scale", "qk_scale"],
                           dq_c))
        delta_c = {"HEAD_DIM": D, "BLOCK_M": t.dq_m}
        add(f"attn_bwd_delta D={D}", "_attn_bwd_delta", 4, 1, delta_c,
            _signature([("Out", x), ("DOut", x), ("Delta", f32)],
                       strides("o", "d") + ["H", "N_Q"], [], delta_c))
        for packed in (False, True):
            rope_c = {"HEAD_DIM": D, "BLOCK_N": ROPE_BLOCK, "HAS_LENS": True, "PACKED": packed,
                      "DEBUG": False}
            add(f"rope_rows D={D}" + (" packed" if packed else ""), "_rope_rows", 4, 1,
                rope_c, _signature([("X", x), ("Out", x), ("Cos", f32), ("Sin", f32),
                                    ("SeqLens", i32), ("SeqStarts", i32), ("Counter", i32)],
                                   strides("x", "o") + ["H", "N"], [], rope_c))
        for c in fwd_candidates(D, dtype):
            if (c.fwd_m, c.fwd_n, c.fwd_warps, c.fwd_stages) == (t.fwd_m, t.fwd_n, t.fwd_warps,
                                                                  t.fwd_stages):
                continue
            fwd_c = {"HEAD_DIM": D, "HAS_LENS": True, "DEBUG": False, "PRECISION": prec,
                     "Q_ROPE": True, "K_ROPE": False, "BLOCK_M": c.fwd_m, "BLOCK_N": c.fwd_n,
                     "PACKED": False}
            add(f"attn_fwd D={D} rope+lens cand {c.fwd_m}x{c.fwd_n} w{c.fwd_warps} "
                f"s{c.fwd_stages}", "_attn_fwd", c.fwd_warps, c.fwd_stages, fwd_c,
                _signature(fwd_sig, fwd_ints, ["qk_scale"], fwd_c))
    return specs


COMPILE_SPECS = (_compile_specs(torch.float16, ("fp16", "bf16"))
                 + _compile_specs(torch.float32, ("fp32",), " fp32"))
