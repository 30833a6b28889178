"""Triton Matryoshka FFN with per-sample widths: out[b] = fc2(GELU(fc1(x[b])[..., :h_b])).

Computes the forward (fc1 + bias + exact erf GELU fused, then fc2 reading only the first h_b
hidden columns) and the backward (dx, dW1, db1, dW2, db2) in fp32 accumulation for fp32, fp16
and bf16 inputs, any C, Hmax and widths.

Tile schedule. Rows are flattened to (B*N, C) and visited in "sorted order": samples sorted by
width, largest first (stable), so the per-row width ``row_h`` is nonincreasing along the sorted
rows (a monotone per-row bound, as the mask's row_end: docs/design.md, "Triton Matryoshka
FFN"). Rows are never copied: kernels read x / grad_out / write out / dx through ``row_ids``
(sorted position -> original flattened row).
  * fc1 (+ backward's dpre): one launch over a flat list of (row_tile, hidden_tile) work items
    built on the host; a row tile gets ceil(row_h[first row] / BLOCK_H) hidden tiles, so the
    work follows the sum of the samples' widths, not B * Hmax.
  * fc2 / dx: grid (row tile, C tile); the hidden reduction of a row tile stops at its first
    (= largest) row's width.
  * dW1 / dW2 / db1: grid (hidden tile, C tile); the row reduction of hidden tile j stops at
    R_j = number of rows wider than j * BLOCK_H, a prefix of the sorted rows.
What is skipped: hidden tiles past a row tile's largest width are neither loaded nor computed;
inside a visited tile, hidden units at or past a row's own width are masked (values zero).
The act / dpre scratch (rows padded to 64) is uninitialised: writers store every visited tile
(zeros past each row's width, up to the padded width) and readers predicate every load by the
row's width rounded up to 16 (a multiple of 16 keeps GPU loads vectorised and pipelined), which
the writers' tiles always cover. bf16 runs on GPUs only (the interpreter's bf16 is wrong).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from adaperceiver.kernels import fp32_dot_precision, interpreting
from adaperceiver.kernels.schedule import device_memo, ranges, to_device

__all__ = ["ffn_forward", "ffn_backward", "why_not", "ffn_schedule",
           "FfnSchedule", "Blocks", "default_blocks", "compile_specs", "COMPILE_SPECS"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _work_item(items_ptr, row_ids_ptr, row_h_ptr, M, HMAX, BLOCK_M: tl.constexpr,
               BLOCK_H: tl.constexpr):
    """The (row tile, hidden tile) work item number program_id(0) of the fc1 / dpre launch:
    its sorted rows (offs_m, in range: m_ok), their original rows (int64) and widths, and its
    hidden units (offs_h, in range: h_ok)."""
    pid = tl.program_id(0)
    rt = tl.load(items_ptr + 2 * pid)
    ht = tl.load(items_ptr + 2 * pid + 1)
    offs_m = rt * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    rows = tl.load(row_ids_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    rh = tl.load(row_h_ptr + offs_m, mask=m_ok, other=0)
    offs_h = ht * BLOCK_H + tl.arange(0, BLOCK_H)
    return offs_m, m_ok, rows, rh, offs_h, offs_h < HMAX


@triton.jit
def _fc1_gelu_kernel(x_ptr, row_ids_ptr, row_h_ptr, items_ptr, w1_ptr, b1_ptr, act_ptr, count_ptr,
                     M, C, HMAX, HPAD,
                     stride_xm, stride_xc, stride_w1h, stride_w1c, stride_am,
                     BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                     COUNT: tl.constexpr, PRECISION: tl.constexpr):
    """act[r, j] = GELU(x[row_ids[r]] . W1[j] + b1[j]) for j < row_h[r], 0 for j >= row_h[r],
    on the (row tile, hidden tile) work item number program_id(0). Columns up to HPAD (the
    scratch's padded width) are written, so readers may round a row's width up to 16."""
    offs_m, m_ok, rows, rh, offs_h, h_ok = _work_item(items_ptr, row_ids_ptr, row_h_ptr, M, HMAX,
                                                      BLOCK_M, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < C
        a = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xc,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w1_ptr + offs_h[None, :].to(tl.int64) * stride_w1h + kk[:, None] * stride_w1c,
                    mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        # PRECISION: fp32 inputs get full fp32 products ("ieee") at torch's "highest" float32
        # matmul precision, TF32 at "high"/"medium" (_precision); ignored for 16-bit inputs
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    b1 = tl.load(b1_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    pre = acc + b1[None, :]
    act = 0.5 * pre * (1.0 + tl.math.erf(pre * 0.7071067811865476))  # exact GELU, 1/sqrt(2)
    # units at or past the row's own width are zero: the tile may hold rows of narrower samples
    act = tl.where(offs_h[None, :] < rh[:, None], act, 0.0)
    tl.store(act_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_h[None, :],
             act.to(act_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_h < HPAD)[None, :])
    if COUNT:
        tl.atomic_add(count_ptr, 1)


@triton.jit
def _dpre_kernel(x_ptr, go_ptr, row_ids_ptr, row_h_ptr, items_ptr, w1_ptr, b1_ptr, w2_ptr,
                 dpre_ptr, act_ptr, count_ptr,
                 M, C, HMAX, HPAD,
                 stride_xm, stride_xc, stride_gm, stride_gc, stride_w1h, stride_w1c,
                 stride_w2c, stride_w2h, stride_am,
                 BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                 COUNT: tl.constexpr, PRECISION: tl.constexpr):
    """Backward, same work items as fc1: recomputes pre = x W1^T + b1 and writes
    act = GELU(pre) and dpre = (grad_out W2[:, tile]) * GELU'(pre), both zero past the row's
    width. The two products share the loop over C."""
    offs_m, m_ok, rows, rh, offs_h, h_ok = _work_item(items_ptr, row_ids_ptr, row_h_ptr, M, HMAX,
                                                      BLOCK_M, BLOCK_H)
    offs_h64 = offs_h.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    acc_pre = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < C
        mk = m_ok[:, None] & k_ok[None, :]
        kh = k_ok[:, None] & h_ok[None, :]
        a = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xc, mask=mk,
                    other=0.0)
        w1 = tl.load(w1_ptr + offs_h64[None, :] * stride_w1h + kk[:, None] * stride_w1c,
                     mask=kh, other=0.0)
        acc_pre = tl.dot(a, w1, acc_pre, input_precision=PRECISION)
        g = tl.load(go_ptr + rows[:, None] * stride_gm + kk[None, :] * stride_gc, mask=mk,
                    other=0.0)
        w2 = tl.load(w2_ptr + kk[:, None].to(tl.int64) * stride_w2c
                     + offs_h64[None, :] * stride_w2h, mask=kh, other=0.0)
        acc_g = tl.dot(g, w2, acc_g, input_precision=PRECISION)
    b1 = tl.load(b1_ptr + offs_h, mask=h_ok, other=0.0).to(tl.float32)
    pre = acc_pre + b1[None, :]
    cdf = 0.5 * (1.0 + tl.math.erf(pre * 0.7071067811865476))
    pdf = tl.exp(-0.5 * pre * pre) * 0.3989422804014327  # 1/sqrt(2 pi)
    on = offs_h[None, :] < rh[:, None]
    act = tl.where(on, pre * cdf, 0.0)
    dpre = tl.where(on, acc_g * (cdf + pre * pdf), 0.0)
    out_off = offs_m[:, None].to(tl.int64) * stride_am + offs_h[None, :]
    # written up to the padded width, zeros past the row's width (see _fc1_gelu_kernel)
    st = m_ok[:, None] & (offs_h < HPAD)[None, :]
    tl.store(act_ptr + out_off, act.to(act_ptr.dtype.element_ty), mask=st)
    tl.store(dpre_ptr + out_off, dpre.to(dpre_ptr.dtype.element_ty), mask=st)
    if COUNT:
        tl.atomic_add(count_ptr, 1)


@triton.jit
def _rows_by_hidden_kernel(a_ptr, w_ptr, bias_ptr, out_ptr, row_ids_ptr, row_h_ptr, count_ptr,
                           M, C,
                           stride_am, stride_wk, stride_wc, stride_om, stride_oc,
                           HAS_BIAS: tl.constexpr, W_K_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, COUNT: tl.constexpr,
                           PRECISION: tl.constexpr):
    """out[row_ids[r], c] = sum_{k < row_h[r]} a[r, k] * w[k, c] (+ bias[c]).

    fc2 (a = activations, w[k, c] = W2[c, k]) and dx (a = dpre, w = W1). The reduction of a row
    tile stops at its first row's width, the largest of the tile (rows are sorted).

    Bounds are rounded up to 16 where the reduction axis is the contiguous one, so that the GPU
    can vectorise (and pipeline) those loads: ``a`` holds zeros up to each row's width rounded
    to 16 (its writers guarantee it), and with W_K_PAD ``w`` holds zeros in its padded columns.
    """
    rt = tl.program_id(0)
    ct = tl.program_id(1)
    m0 = rt * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    rh = tl.load(row_h_ptr + offs_m, mask=m_ok, other=0)
    rh16 = (rh + 15) // 16 * 16
    kmax = tl.load(row_h_ptr + m0)
    if W_K_PAD:
        k_lim = (kmax + 15) // 16 * 16
    else:
        k_lim = kmax
    offs_c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = offs_m[:, None].to(tl.int64) * stride_am
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    n_k = 0
    for k0 in range(0, kmax, BLOCK_K):
        kk = k0 + offs_k
        # per-row bound: a row never reads past its own width (rounded up to 16), so no other
        # column of the scratch has to have been written
        a = tl.load(a_ptr + a_rows + kk[None, :],
                    mask=m_ok[:, None] & (kk[None, :] < rh16[:, None]), other=0.0)
        w = tl.load(w_ptr + kk[:, None].to(tl.int64) * stride_wk + offs_c[None, :] * stride_wc,
                    mask=(kk[:, None] < k_lim) & c_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        n_k += 1
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    rows = tl.load(row_ids_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_c[None, :] * stride_oc,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])
    if COUNT:
        tl.atomic_add(count_ptr, n_k)


@triton.jit
def _hidden_by_cols_kernel(a_ptr, x_ptr, row_ids_ptr, row_h_ptr, row_bound_ptr, out_ptr, db_ptr,
                           count_ptr,
                           HMAX, C,
                           stride_am, stride_xm, stride_xc, stride_oh, stride_oc,
                           HAS_DB: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
                           BLOCK_R: tl.constexpr, COUNT: tl.constexpr,
                           PRECISION: tl.constexpr):
    """out[j, c] = sum_r a[r, j] * x[row_ids[r], c] over rows r with j < row_h[r]; db[j] =
    sum_r a[r, j] (C tile 0 only).

    dW1 (a = dpre, x = x) and dW2 (a = act, x = grad_out, out strides transposed). The rows
    wider than the tile's first unit are the prefix [0, row_bound[ht]) of the sorted rows; the
    row loop stops there. Hidden tiles no row reaches store zeros."""
    ht = tl.program_id(0)
    ct = tl.program_id(1)
    rmax = tl.load(row_bound_ptr + ht)
    offs_h = ht * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < HMAX
    offs_c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    dbacc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    n_r = 0
    for r0 in range(0, rmax, BLOCK_R):
        rr = r0 + offs_r
        r_ok = rr < rmax
        rh16 = (tl.load(row_h_ptr + rr, mask=r_ok, other=0) + 15) // 16 * 16
        rows = tl.load(row_ids_ptr + rr, mask=r_ok, other=0).to(tl.int64)
        # (BLOCK_H, BLOCK_R): a transposed view, predicated by each row's width rounded up to
        # 16 (zeros are written up to there; the rounding lets the GPU vectorise)
        at = tl.load(a_ptr + rr[None, :].to(tl.int64) * stride_am + offs_h[:, None],
                     mask=(offs_h[:, None] < rh16[None, :]), other=0.0)
        xv = tl.load(x_ptr + rows[:, None] * stride_xm + offs_c[None, :] * stride_xc,
                     mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(at, xv, acc, input_precision=PRECISION)
        if HAS_DB:
            dbacc += tl.sum(at.to(tl.float32), axis=1)
        n_r += 1
    tl.store(out_ptr + offs_h[:, None].to(tl.int64) * stride_oh + offs_c[None, :] * stride_oc,
             acc.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & c_ok[None, :])
    if HAS_DB:
        if ct == 0:
            tl.store(db_ptr + offs_h, dbacc.to(db_ptr.dtype.element_ty), mask=h_ok)
    if COUNT:
        tl.atomic_add(count_ptr, n_r)


# ----------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class FfnSchedule:
    """Host-side schedule of one mixed-width batch (pure Python, cached per shape).

    ``order``: samples sorted by width, largest first (stable); ``widths``: their widths in
    that order. Sorted row r belongs to sample ``order[r // n]``. ``tile_width[rt]``: the width
    of row tile rt's first (largest) row; ``items``: the (row_tile, hidden_tile) work items of
    the fc1 / dpre launch, ceil(tile_width[rt] / block_h) per row tile; ``row_bound[ht]``: the
    number of sorted rows wider than ht * block_h (the rows hidden tile ht reduces over).
    """
    order: tuple[int, ...]
    widths: tuple[int, ...]
    n_rows_per_sample: int
    block_m: int
    block_h: int
    tile_width: tuple[int, ...]
    items: tuple[tuple[int, int], ...]
    row_bound: tuple[int, ...]

    @property
    def n_rows(self) -> int:
        return len(self.order) * self.n_rows_per_sample

    @property
    def n_row_tiles(self) -> int:
        return len(self.tile_width)

    @property
    def tiles(self) -> int:
        """(row tile, hidden tile) pairs computed: sum over row tiles of their hidden tiles."""
        return len(self.items)

    def full_width_tiles(self, hmax: int) -> int:
        """What the same row tiles would cost at full width ``hmax``."""
        return self.n_row_tiles * _cdiv(hmax, self.block_h)

    def row_tiles_visited(self, block_r: int) -> int:
        """Row blocks of ``block_r`` reduced over, summed over hidden tiles (dW kernels, per C
        tile)."""
        return sum(_cdiv(r, block_r) for r in self.row_bound)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ffn_schedule(hidden: Sequence[int], n_rows_per_sample: int, block_m: int, block_h: int,
                 hmax: Optional[int] = None) -> FfnSchedule:
    """The schedule of a batch whose sample b has ``hidden[b]`` hidden units and
    ``n_rows_per_sample`` rows (see :class:`FfnSchedule`). ``hmax`` (default max(hidden)) sets
    how many hidden tiles ``row_bound`` covers."""
    hidden = tuple(int(h) for h in hidden)
    hmax = max(hidden, default=0) if hmax is None else int(hmax)
    for name, v in (("n_rows_per_sample", n_rows_per_sample), ("block_m", block_m),
                    ("block_h", block_h)):
        if int(v) != v or v < (0 if name == "n_rows_per_sample" else 1):
            raise ValueError(f"{name}={v!r} is not allowed; allowed: a "
                             f"{'non-negative' if name == 'n_rows_per_sample' else 'positive'} int")
    if any(h < 1 or h > hmax for h in hidden):
        raise ValueError(f"hidden={list(hidden)!r} is not allowed; allowed: ints in 1..{hmax}")
    return _schedule(hidden, int(n_rows_per_sample), int(block_m), int(block_h), hmax)


@lru_cache(maxsize=256)
def _schedule(hidden, n, block_m, block_h, hmax) -> FfnSchedule:
    # stable sort, largest width first: row widths become nonincreasing along the sorted rows
    order = tuple(sorted(range(len(hidden)), key=lambda b: -hidden[b]))
    widths = tuple(hidden[b] for b in order)
    n_rows = len(hidden) * n
    tile_width = tuple(widths[m0 // n] for m0 in range(0, n_rows, block_m))
    items = tuple((rt, ht) for rt, w in enumerate(tile_width) for ht in range(_cdiv(w, block_h)))
    row_bound = tuple(n * sum(1 for w in widths if w > ht * block_h)
                      for ht in range(_cdiv(hmax, block_h)))
    return FfnSchedule(order, widths, n, block_m, block_h, tile_width, items, row_bound)


def _schedule_tensors(sched: FfnSchedule, device):
    """row_ids (sorted row -> original flattened row), row_h and the work items (row tile,
    hidden tile) flattened, int32 on ``device``; built there from per-sample values
    (schedule.to_device / ranges: short copies, no host sync), once per schedule on a GPU
    (schedule.device_memo, keyed by what determines the schedule: a repeated
    configuration makes no copy, so it can be captured in a CUDA graph)."""
    key = ("ffn_schedule", sched.order, sched.widths, sched.n_rows_per_sample, sched.block_m,
           sched.block_h, len(sched.row_bound))
    return device_memo(key, device, lambda: _build_schedule_tensors(sched, device))


def _build_schedule_tensors(sched: FfnSchedule, device):
    n = sched.n_rows_per_sample
    row_ids = ranges([b * n for b in sched.order], [n] * len(sched.order), device, torch.int32)
    row_h = to_device(sched.widths, device, torch.int32).repeat_interleave(n)
    items = to_device([i for item in sched.items for i in item], device, torch.int32)
    return row_ids, row_h, items


# ----------------------------------------------------------------------------- tile sizes
@dataclass(frozen=True)
class Blocks:
    """Tile sizes: fc1/dpre (block_m x block_h, K step block_k); fc2/dx (block_m2 x block_c,
    K step block_k2); dW (block_h x block_c, row step block_r)."""
    block_m: int = 128
    block_h: int = 128
    block_k: int = 64
    block_m_bwd: int = 64   # dpre holds two accumulators: half the rows of fc1
    block_m2: int = 128
    block_c: int = 128
    block_k2: int = 64
    block_r: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        # powers of two for tl.arange; >= 16 for tl.dot on a GPU and because readers round a
        # row's width up to 16 and rely on the writers' hidden tiles covering that
        for name in ("block_m", "block_h", "block_k", "block_m_bwd", "block_m2", "block_c",
                     "block_k2", "block_r"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v!r} is not allowed; allowed: a power of two >= 16")


def default_blocks(dtype: torch.dtype, interpret: Optional[bool] = None) -> Blocks:
    """GPU tiles for ``dtype`` (fp32 halves the row tiles and K steps: at the 16-bit tiles it
    spills registers on sm_80/sm_90), or tiles of 32 under the interpreter (its cost is per
    program, not per element). No spills at these tiles: see COMPILE_SPECS."""
    if interpret if interpret is not None else interpreting():
        return Blocks(32, 32, 32, 32, 32, 32, 32, 32, 4, 1)
    if dtype == torch.float32:
        return Blocks(block_m=64, block_k=32, block_m_bwd=32, block_m2=64, block_k2=32,
                      block_r=32)
    return Blocks()


# ----------------------------------------------------------------------------- host side
def why_not(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden) -> list[str]:
    """Why this backend cannot run the FFN on these inputs (empty: it can). Not the device."""
    names = ("x", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    ts = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    why = []
    for name, t in zip(names, ts):
        if not isinstance(t, torch.Tensor):
            return [f"{name} is a {type(t).__name__}, not a tensor"]
    for name, t in zip(names, ts):
        if t.dtype not in _DTYPES:
            why.append(f"{name}.dtype={t.dtype} is not supported; allowed: float16, bfloat16, "
                       "float32")
        elif t.dtype != x.dtype:
            why.append(f"{name}.dtype={t.dtype} differs from x.dtype={x.dtype}; all five tensors "
                       "must share one dtype")
        if t.device != x.device:
            why.append(f"{name} is on {t.device}, x on {x.device}; all must share one device")
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and interpreting():
        why.append("bfloat16 under TRITON_INTERPRET=1 is not supported (the interpreter's bf16 "
                   "arithmetic is wrong); use float16/float32 or a GPU")
    if x.dim() != 3:
        why.append(f"x must be 3-d (B, N, C), got shape {tuple(x.shape)}")
        return why
    if fc1_weight.dim() != 2 or fc2_weight.dim() != 2:
        why.append(f"fc1_weight{tuple(fc1_weight.shape)} and fc2_weight{tuple(fc2_weight.shape)}"
                   " must be 2-d")
        return why
    hmax, c = fc1_weight.shape
    if (x.shape[-1] != c or tuple(fc1_bias.shape) != (hmax,)
            or tuple(fc2_weight.shape) != (c, hmax) or tuple(fc2_bias.shape) != (c,)):
        why.append(f"shapes x{tuple(x.shape)} fc1_weight{tuple(fc1_weight.shape)} "
                   f"fc1_bias{tuple(fc1_bias.shape)} fc2_weight{tuple(fc2_weight.shape)} "
                   f"fc2_bias{tuple(fc2_bias.shape)} do not fit; need fc1_weight (H, C), "
                   "fc1_bias (H,), fc2_weight (C, H), fc2_bias (C,)")
    try:
        hs = list(hidden)
    except TypeError:
        hs = None
    if (hs is None or len(hs) != x.shape[0]
            or any(isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= hmax
                   for h in hs)):
        why.append(f"hidden={hidden!r} is not allowed; allowed: a list of {x.shape[0]} ints in "
                   f"1..{hmax}")
    return why


def _check(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden, check: bool):
    """Raise with every reason ``why_not`` gives, unless the caller has asked it already
    (``check=False``: the dispatcher has)."""
    why = why_not(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden) if check else []
    if why:
        raise ValueError("Triton Matryoshka FFN cannot run on this input:\n  " + "\n  ".join(why))


def _alloc(shape, dtype, device) -> torch.Tensor:
    """Every output and scratch buffer comes from here, uninitialised (the tests replace it by
    a NaN-filling one to prove that every element is written before it is read or returned)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _hidden_buffer(m: int, hmax: int, dtype, device) -> torch.Tensor:
    """(m, hmax) scratch with rows padded to 64 elements (16-byte aligned rows let the GPU
    vectorise loads). Uninitialised: the kernels never read what they did not write."""
    return _alloc((m, _cdiv(hmax, 64) * 64), dtype, device)[:, :hmax]


def _k_padded(w: torch.Tensor) -> torch.Tensor:
    """fc2_weight (C, Hmax) with unit column stride, 16-aligned rows and zeros up to Hmax
    rounded to 16, as fc2's padded (vectorised) loads need: ``w`` itself when it already is
    (Hmax a multiple of 16, rows 16-aligned), else a zero-padded copy (C * Hmax elements,
    small next to the M * C * Hmax product)."""
    c, hmax = w.shape
    if w.stride(1) == 1 and w.stride(0) % 16 == 0 and hmax % 16 == 0:
        return w
    wp = torch.zeros(c, _cdiv(hmax, 64) * 64, dtype=w.dtype, device=w.device)
    wp[:, :hmax] = w
    return wp[:, :hmax]


def _precision(dtype) -> str:
    """tl.dot's input_precision: fp32 follows torch.get_float32_matmul_precision() ("ieee" at
    "highest", TF32 otherwise); 16-bit inputs ignore it ("ieee" keeps one build)."""
    return fp32_dot_precision("ieee") if dtype == torch.float32 else "ieee"


def _count_buffer(counters, device):
    return torch.zeros(1, dtype=torch.int32, device=device) if counters is not None else None


def _rows_by_hidden(a, w, bias, out, row_ids, row_h, cnt, bl: Blocks, *, w_k_pad: bool,
                    counting: bool) -> None:
    """out (M, C) = a[r, :row_h[r]] @ w[:row_h[r], :] (+ bias): fc2 in the forward (w = fc2's
    weight transposed, K-padded), dx in the backward (w = fc1's weight); w may be any strided
    view. One program per (row tile, column tile)."""
    M, C = out.shape
    _rows_by_hidden_kernel[(_cdiv(M, bl.block_m2), _cdiv(C, bl.block_c))](
        a, w, bias if bias is not None else a, out, row_ids, row_h, cnt, M, C,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, W_K_PAD=w_k_pad, BLOCK_M=bl.block_m2, BLOCK_C=bl.block_c,
        BLOCK_K=bl.block_k2, COUNT=counting, PRECISION=_precision(a.dtype),
        num_warps=bl.num_warps, num_stages=bl.num_stages)


def ffn_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden, *,
                blocks: Optional[Blocks] = None, counters: Optional[dict] = None,
                check: bool = True):
    """out (B, N, C) in x's dtype. ``hidden``: a list of B ints in 1..Hmax.

    ``counters``: when a dict is given, the kernels are run with their debug counter on and
    ``counters["fc1"]`` / ``counters["fc2"]`` receive the tiles they computed (fc1: work items;
    fc2: K steps summed over programs). ``check=False``: the caller has had ``why_not`` say
    nothing against this input (the dispatcher does)."""
    _check(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden, check)
    bl = blocks or default_blocks(x.dtype)
    B, N, C = x.shape
    hmax = fc1_weight.shape[0]
    M = B * N
    out = _alloc(x.shape, x.dtype, x.device)
    if M == 0:
        return out
    x2 = x.reshape(M, C)
    sched = ffn_schedule(hidden, N, bl.block_m, bl.block_h, hmax)
    row_ids, row_h, items = _schedule_tensors(sched, x.device)
    # columns a row tile never reaches are never written nor read: no zero fill needed
    act = _hidden_buffer(M, hmax, x.dtype, x.device)
    count = _count_buffer(counters, x.device)
    cnt = count if count is not None else row_h  # an unused valid pointer when COUNT is off
    _fc1_gelu_kernel[(sched.tiles,)](
        x2, row_ids, row_h, items, fc1_weight, fc1_bias, act, cnt,
        M, C, hmax, act.stride(0),
        x2.stride(0), x2.stride(1), fc1_weight.stride(0), fc1_weight.stride(1), act.stride(0),
        BLOCK_M=bl.block_m, BLOCK_H=bl.block_h, BLOCK_K=bl.block_k, COUNT=count is not None,
        PRECISION=_precision(x.dtype),
        num_warps=bl.num_warps, num_stages=bl.num_stages)
    if counters is not None:
        counters["fc1"] = int(count.item())
        count.zero_()
    w2 = _k_padded(fc2_weight)
    _rows_by_hidden(act, w2.t(), fc2_bias, out.view(M, C), row_ids, row_h, cnt, bl,
                    w_k_pad=True, counting=count is not None)
    if counters is not None:
        counters["fc2"] = int(count.item())
    return out


def ffn_backward(grad_out, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden, *,
                 blocks: Optional[Blocks] = None, counters: Optional[dict] = None,
                 check: bool = True):
    """(dx, dW1, db1, dW2, db2) of :func:`ffn_forward`; units past a sample's width get none.

    fc1 is recomputed (nothing is saved by the forward). dW/db accumulate in fp32 and are
    returned in the weights' dtype. ``counters``: "dpre" (work items), "dx" (K steps),
    "dw1" / "dw2" (row steps) when a dict is given. ``check``: as for :func:`ffn_forward`."""
    _check(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden, check)
    if grad_out.shape != x.shape[:-1] + (fc2_weight.shape[0],) or grad_out.dtype != x.dtype \
            or grad_out.device != x.device:
        raise ValueError(f"grad_out is {grad_out.dtype} {tuple(grad_out.shape)} on "
                         f"{grad_out.device}; need {x.dtype} {tuple(x.shape)} on {x.device}")
    bl = blocks or default_blocks(x.dtype)
    B, N, C = x.shape
    hmax = fc1_weight.shape[0]
    M = B * N
    dev = x.device
    dx = _alloc(x.shape, x.dtype, dev)
    dw1 = _alloc(fc1_weight.shape, fc1_weight.dtype, dev)
    db1 = _alloc(fc1_bias.shape, fc1_bias.dtype, dev)
    dw2 = _alloc(fc2_weight.shape, fc2_weight.dtype, dev)
    db2 = grad_out.reshape(M, C).sum(0, dtype=torch.float32).to(fc2_bias.dtype)
    if M == 0:
        return dx, dw1.zero_(), db1.zero_(), dw2.zero_(), db2
    x2 = x.reshape(M, C)
    g2 = grad_out.reshape(M, C)
    count = _count_buffer(counters, dev)

    def _take(name):
        if counters is not None:
            counters[name] = int(count.item())
            count.zero_()

    sched = ffn_schedule(hidden, N, bl.block_m_bwd, bl.block_h, hmax)
    row_ids, row_h, items = _schedule_tensors(sched, dev)
    cnt = count if count is not None else row_h
    act = _hidden_buffer(M, hmax, x.dtype, dev)
    dpre = _hidden_buffer(M, hmax, x.dtype, dev)
    _dpre_kernel[(sched.tiles,)](
        x2, g2, row_ids, row_h, items, fc1_weight, fc1_bias, fc2_weight, dpre, act, cnt,
        M, C, hmax, act.stride(0),
        x2.stride(0), x2.stride(1), g2.stride(0), g2.stride(1),
        fc1_weight.stride(0), fc1_weight.stride(1), fc2_weight.stride(0), fc2_weight.stride(1),
        act.stride(0),
        BLOCK_M=bl.block_m_bwd, BLOCK_H=bl.block_h, BLOCK_K=bl.block_k, COUNT=count is not None,
        PRECISION=_precision(x.dtype),
        num_warps=bl.num_warps, num_stages=bl.num_stages)
    _take("dpre")
    _rows_by_hidden(dpre, fc1_weight, None, dx.view(M, C), row_ids, row_h, cnt, bl,
                    w_k_pad=False, counting=count is not None)
    _take("dx")
    row_bound = to_device(sched.row_bound, dev, torch.int32)

    def hidden_by_cols(h_rows, c_rows, out, transposed, has_db):
        """out[j, c] (out[c, j] when transposed) = sum_r h_rows[r, j] c_rows[r, c], one program
        per (hidden tile, column tile); db1 too when has_db."""
        out_strides = out.stride()[::-1] if transposed else out.stride()
        _hidden_by_cols_kernel[(_cdiv(hmax, bl.block_h), _cdiv(C, bl.block_c))](
            h_rows, c_rows, row_ids, row_h, row_bound, out, db1, cnt, hmax, C,
            h_rows.stride(0), c_rows.stride(0), c_rows.stride(1), *out_strides,
            HAS_DB=has_db, BLOCK_H=bl.block_h, BLOCK_C=bl.block_c, BLOCK_R=bl.block_r,
            COUNT=count is not None, PRECISION=_precision(x.dtype), num_warps=bl.num_warps,
            num_stages=bl.num_stages)

    hidden_by_cols(dpre, x2, dw1, False, True)
    _take("dw1")
    # dW2[c, j] = sum_r grad_out[r, c] act[r, j]: the same kernel with the output transposed
    hidden_by_cols(act, g2, dw2, True, False)
    _take("dw2")
    return dx, dw1, db1, dw2, db2


# ----------------------------------------------------------------------------- GPU compiles
# Ahead-of-time compile descriptions (format: kernels/compile.py) of every kernel at the default
# 16-bit GPU tiles, specialised as Triton's runtime specialises a launch at the released shapes
# (C = 832, Hmax = 2138): unit strides become constexpr 1, and ":16" marks pointers and ints
# that are multiples of 16 (C-strided rows, the padded activation rows); Hmax-strided ones are
# not.
_INDEX_ARGS = {a: "*i32:16" for a in ("row_ids_ptr", "row_h_ptr", "items_ptr", "row_bound_ptr",
                                        "count_ptr")}


def _spec(name, kernel, types, consts, blocks, precision):
    """One kernel's compile description: the schedule's index pointers and C (a multiple of
    16) typed for every kernel, the debug counters off and the given dot precision."""
    fn = globals()[kernel]
    types = {**_INDEX_ARGS, "C": "i32:16", **types}
    consts = {**consts, "COUNT": False, "PRECISION": precision}
    sig = {}
    for arg in fn.arg_names:
        if arg in consts:
            sig[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            sig[arg] = types.get(arg, "*{dtype}:16")
        else:
            sig[arg] = types.get(arg, "i32")
    return {"name": name, "kernel": kernel, "signature": sig, "constexprs": dict(consts),
            "num_warps": blocks.num_warps, "num_stages": blocks.num_stages}


def _compile_specs(blocks: Blocks, precision: str = "ieee") -> list[dict]:
    c16 = "i32:16"
    fc2_tiles = {"BLOCK_M": blocks.block_m2, "BLOCK_C": blocks.block_c,
                 "BLOCK_K": blocks.block_k2}
    dw_tiles = {"BLOCK_H": blocks.block_h, "BLOCK_C": blocks.block_c, "BLOCK_R": blocks.block_r}
    specs = [
        ("ffn fc1+gelu", "_fc1_gelu_kernel",
         {"HPAD": c16, "stride_xm": c16, "stride_w1h": c16, "stride_am": c16},
         {"stride_xc": 1, "stride_w1c": 1, "BLOCK_M": blocks.block_m,
          "BLOCK_H": blocks.block_h, "BLOCK_K": blocks.block_k}),
        ("ffn bwd dpre", "_dpre_kernel",
         {"HPAD": c16, "stride_xm": c16, "stride_gm": c16, "stride_w1h": c16, "stride_am": c16},
         {"stride_xc": 1, "stride_gc": 1, "stride_w1c": 1, "stride_w2h": 1,
          "BLOCK_M": blocks.block_m_bwd, "BLOCK_H": blocks.block_h, "BLOCK_K": blocks.block_k}),
        ("ffn fc2", "_rows_by_hidden_kernel",
         {"stride_am": c16, "stride_wc": c16, "stride_om": c16},
         {"stride_wk": 1, "stride_oc": 1, "HAS_BIAS": True, "W_K_PAD": True, **fc2_tiles}),
        ("ffn bwd dx", "_rows_by_hidden_kernel",
         {"stride_am": c16, "stride_wk": c16, "stride_om": c16},
         {"stride_wc": 1, "stride_oc": 1, "HAS_BIAS": False, "W_K_PAD": False, **fc2_tiles}),
        ("ffn bwd dW1+db1", "_hidden_by_cols_kernel",
         {"stride_am": c16, "stride_xm": c16, "stride_oh": c16},
         {"stride_xc": 1, "stride_oc": 1, "HAS_DB": True, **dw_tiles}),
        ("ffn bwd dW2", "_hidden_by_cols_kernel",
         {"stride_am": c16, "stride_xm": c16},
         {"stride_xc": 1, "stride_oh": 1, "HAS_DB": False, **dw_tiles}),
    ]
    return [_spec(*spec, blocks, precision) for spec in specs]


def compile_specs(dtype: torch.dtype = torch.float16) -> list[dict]:
    """The specs at the default GPU tiles of ``dtype``, limited to the dtypes those tiles are
    for ("fp16"/"bf16" share theirs; fp32 has its own, names suffixed " fp32")."""
    if dtype == torch.float32:
        # both float32 matmul precisions: "highest" (ieee) and "high"/"medium" (tf32)
        return [{**s, "name": s["name"] + " fp32" + ("" if p == "ieee" else " tf32"),
                 "dtypes": ("fp32",)}
                for p in ("ieee", "tf32")
                for s in _compile_specs(default_blocks(dtype, interpret=False), p)]
    return [{**s, "dtypes": ("fp16", "bf16")}
            for s in _compile_specs(default_blocks(dtype, interpret=False))]


COMPILE_SPECS = compile_specs(torch.float16) + compile_specs(torch.float32)
