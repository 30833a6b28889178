"""Block-masked (group-causal) attention as torch.library custom ops that dispatch to a backend.

``block_masked_attention(q, k, v, token_grans=None, *, scale=None, seq_lens=None, q_rope=None,
k_rope=None)``: padded (B, H, N, D) inputs; ``block_masked_attention_varlen``: packed rows of
samples of their own lengths, no padding. The public entries validate the user's input once
(errors name the argument, its value and what is allowed); the custom ops
``adaperceiver::block_masked_attention`` / ``_varlen`` / ``_backward`` have fake
implementations and autograd, so ``torch.compile`` traces them as single nodes. Which backend
runs is decided in dispatch.py; backends only say what they cannot take.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

from . import dispatch
from ._common import autocast_inputs, check_float_tensor
from .schedule import check_grans, ranges, to_device

__all__ = ["block_masked_attention", "block_masked_attention_varlen"]


def _rope_pair(rope):
    return (None, None) if rope is None else rope


@torch.library.custom_op("adaperceiver::block_masked_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  token_grans: Optional[list[int]], scale: float,
                  seq_lens: Optional[torch.Tensor], q_cos: Optional[torch.Tensor],
                  q_sin: Optional[torch.Tensor], k_cos: Optional[torch.Tensor],
                  k_sin: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    q_rope = None if q_cos is None else (q_cos, q_sin)
    k_rope = None if k_cos is None else (k_cos, k_sin)
    backend = dispatch.select("attention", (q, k, v, token_grans, seq_lens, q_rope, k_rope),
                              q.device.type)
    out, lse = backend.attention_forward(q, k, v, token_grans, scale, seq_lens, q_rope, k_rope)
    # the op's output is heads-last, (B, Nq, H, Dv): the model reads it as (B, Nq, C) with no
    # copy, and a backend that writes that layout (returning its (B, H, Nq, Dv) view) pays none
    return out.transpose(1, 2).contiguous(), lse.contiguous()


@_attention_op.register_fake
def _(q, k, v, token_grans, scale, seq_lens, q_cos, q_sin, k_cos, k_sin):
    B, H, Nq, _ = q.shape
    return (q.new_empty(B, Nq, H, v.shape[-1]),
            q.new_empty(B, H, Nq, dtype=torch.float32))


@torch.library.custom_op("adaperceiver::block_masked_attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           token_grans: Optional[list[int]], scale: float,
                           seq_lens: Optional[torch.Tensor], q_cos: Optional[torch.Tensor],
                           q_sin: Optional[torch.Tensor], k_cos: Optional[torch.Tensor],
                           k_sin: Optional[torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_rope = None if q_cos is None else (q_cos, q_sin)
    k_rope = None if k_cos is None else (k_cos, k_sin)
    backend = dispatch.select("attention", (q, k, v, token_grans, seq_lens, q_rope, k_rope),
                              q.device.type)
    # grad_out and out are heads-last (B, Nq, H, Dv), as the forward op returns them
    dq, dk, dv = backend.attention_backward(grad_out.transpose(1, 2), q, k, v,
                                            out.transpose(1, 2), lse, token_grans, scale,
                                            seq_lens, q_rope, k_rope)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, token_grans, scale, seq_lens, q_cos, q_sin, k_cos, k_sin):
    # contiguous, as the op returns them (empty_like would keep a transposed input's strides,
    # and a traced graph would then view the real, contiguous gradients wrongly)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, token_grans, scale, seq_lens, q_cos, q_sin, k_cos, k_sin = inputs
    out, lse = output
    # lse is an output for kernels to share (the backward reads it), not a differentiable
    # result: autograd says so instead of returning a zero gradient
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, seq_lens, q_cos, q_sin, k_cos, k_sin)
    ctx.token_grans, ctx.scale = token_grans, scale


def _attention_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse, seq_lens, q_cos, q_sin, k_cos, k_sin = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, ctx.token_grans, ctx.scale,
                                        seq_lens, q_cos, q_sin, k_cos, k_sin)
    return dq, dk, dv, None, None, None, None, None, None, None


_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


def _check_rope(name: str, rope, n: int, D: int, device) -> None:
    """``rope`` is None or (cos, sin) float tables of shape (n, D/2) on ``device``."""
    if rope is None:
        return
    if D % 2:
        raise ValueError(f"{name} needs an even head_dim; got D={D}")
    if (not isinstance(rope, (tuple, list)) or len(rope) != 2
            or any(not isinstance(r, torch.Tensor) or tuple(r.shape) != (n, D // 2)
                   or not r.dtype.is_floating_point or r.device != device for r in rope)):
        got = ([(tuple(r.shape), r.dtype, str(r.device))
                if isinstance(r, torch.Tensor) else type(r).__name__ for r in rope]
               if isinstance(rope, (tuple, list)) else type(rope).__name__)
        raise ValueError(f"{name} must be (cos, sin) float tables of shape ({n}, {D // 2}) on "
                         f"{device}, got {got}")


def _check_scale(scale, D: int) -> float:
    """The softmax scale: 1/sqrt(D) by default, else a real number (NaN and inf are allowed:
    they propagate as in the reference)."""
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.device.type == "cpu":
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale={scale!r} is not allowed; allowed: a real number or None "
                        f"(1/sqrt(head_dim) = {1.0 / math.sqrt(D):.4g})")
    return float(scale)


def _check_seq_lens(seq_lens, batch: int, n_max: int, device) -> Optional[torch.Tensor]:
    """The padded op's ``seq_lens``: None, a sequence of ints or a 1-d int tensor with one
    length per sample, each in 0..n_max; as int32 on ``device``. Host values are checked; a
    tensor already on an accelerator is taken as it is (reading it would wait for the device)."""
    if seq_lens is None:
        return None
    what = (f"a sequence or 1-d int tensor of {batch} lengths in 0..{n_max} (one per sample, at "
            "most max(Nq, Nk))")
    if isinstance(seq_lens, torch.Tensor):
        if (seq_lens.shape != (batch,) or seq_lens.dtype.is_floating_point
                or seq_lens.dtype.is_complex or seq_lens.dtype == torch.bool):
            raise ValueError(f"seq_lens of dtype {seq_lens.dtype} and shape "
                             f"{tuple(seq_lens.shape)} is not allowed; allowed: {what}")
        if seq_lens.device.type != "cpu":
            return seq_lens.to(device=device, dtype=torch.int32)
        values = seq_lens.tolist()
    else:
        try:
            values = list(seq_lens)
        except TypeError:
            raise ValueError(f"seq_lens={seq_lens!r} is not allowed; allowed: {what}") from None
        if len(values) != batch:
            raise ValueError(f"seq_lens has {len(values)} entries, the batch {batch}; allowed: "
                             f"{what}")
    for n in values:
        if (isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n)
                or int(n) != n or not 0 <= n <= n_max):
            raise ValueError(f"seq_lens entry {n!r} is not allowed; allowed: {what}")
    return to_device([int(n) for n in values], device, torch.int32)


def _check_attention(q, k, v, token_grans, seq_lens, q_rope, k_rope):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, "(B, H, N, D)")
        if t.device != q.device or t.dtype != q.dtype:
            raise ValueError(f"{name} is {t.dtype} on {t.device}; q is {q.dtype} on {q.device}:"
                             " q, k and v must share dtype and device")
    B, H, Nq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
        raise ValueError(f"shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} do not "
                         "fit: need q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv)")
    if D < 1 or v.shape[3] < 1:
        raise ValueError(f"head_dim D={D}, Dv={v.shape[3]} is not allowed; allowed: >= 1")
    if token_grans is not None:
        token_grans = check_grans(token_grans)
        if Nq != k.shape[2]:
            raise ValueError(f"token_grans needs self-attention (Nq == Nk); got Nq={Nq}, "
                             f"Nk={k.shape[2]}")
    seq_lens = _check_seq_lens(seq_lens, B, max(Nq, k.shape[2]), q.device)
    _check_rope("q_rope", q_rope, Nq, D, q.device)
    _check_rope("k_rope", k_rope, k.shape[2], D, q.device)
    return token_grans, seq_lens


def block_masked_attention(q, k, v, token_grans: Optional[Sequence[int]] = None, *,
                           scale: Optional[float] = None, seq_lens: Optional[torch.Tensor] = None,
                           q_rope=None, k_rope=None, heads_last: bool = False) -> torch.Tensor:
    """Group-causal attention: q (B, H, Nq, D), k/v (B, H, Nk, D) -> (B, H, Nq, D).

    The mask, the NaN/inf semantics and the lse contract: docs/design.md, "Op contracts".

    ``token_grans=None``: no mask. ``seq_lens``: (B,) ints in 0..max(Nq, Nk) (a sequence or an
    int tensor); sample b uses its first min(seq_lens[b], Nq) queries and min(seq_lens[b], Nk)
    keys, the rest of its output is zero. ``q_rope``/``k_rope``: (cos, sin) tables
    (N, D/2) applied inside the op as interleaved-pair RoPE. Inputs may be strided views (for
    instance (B, N, H, D) projections transposed). The result is a (B, H, Nq, D) view of a
    heads-last buffer; ``heads_last=True`` returns that buffer, (B, Nq, H, D), contiguous.
    """
    q, k, v = autocast_inputs(q, k, v)
    token_grans, seq_lens = _check_attention(q, k, v, token_grans, seq_lens, q_rope, k_rope)
    scale = _check_scale(scale, q.shape[-1])
    qc, qs = _rope_pair(q_rope)
    kc, ks = _rope_pair(k_rope)
    out = _attention_op(q, k, v, token_grans, scale, seq_lens, qc, qs, kc, ks)[0]
    return out if heads_last else out.transpose(1, 2)


# ----------------------------------------------------------------------------- packed rows
# Self-attention of samples of their own lengths with no padding: q, k, v (R, H, D) hold sample
# b's seq_lens[b] rows after those of the samples before it (the model's packed latents), and the
# output comes back in the same rows. A backend with a packed kernel (cpp, triton, cuda) runs it
# as it is; elsewhere the rows are padded to (B, H, max seq_len, D), run through the padded op's
# backend with seq_lens, and packed again, which gives the same result. The backward always goes
# the padded way.
def _padded_rows(seq_lens: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed rows' places in a (B * N) padded layout, N = max seq_len, and seq_lens as an
    int32 tensor: host-known values built on ``device`` with no blocking copy."""
    n = max(seq_lens, default=0)
    rows = ranges([b * n for b in range(len(seq_lens))], seq_lens, device)
    return rows, to_device(seq_lens, device, torch.int32)


def _pad(t: torch.Tensor, rows: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """(R, H, D) packed rows -> (B, H, N, D), zeros past each sample's length."""
    B, n = len(seq_lens), max(seq_lens, default=0)
    out = t.new_zeros(B * n, *t.shape[1:]).index_copy_(0, rows, t)
    return out.view(B, n, *t.shape[1:]).transpose(1, 2)


def _pack(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, N, H, D) (heads-last, padded) -> (R, H, D) packed rows."""
    return t.reshape(-1, *t.shape[2:]).index_select(0, rows)


@torch.library.custom_op("adaperceiver::block_masked_attention_varlen", mutates_args=())
def _attention_varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                         token_grans: Optional[list[int]], scale: float,
                         q_cos: Optional[torch.Tensor], q_sin: Optional[torch.Tensor],
                         k_cos: Optional[torch.Tensor], k_sin: Optional[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    q_rope = None if q_cos is None else (q_cos, q_sin)
    k_rope = None if k_cos is None else (k_cos, k_sin)
    return _attention_varlen_forward(q, k, v, seq_lens, token_grans, scale, q_rope, k_rope)


def _attention_varlen_forward(q, k, v, seq_lens, token_grans, scale, q_rope, k_rope):
    """The packed op's body: a backend's packed kernel, else padded through the padded op's."""
    args = (q, k, v, seq_lens, token_grans, q_rope, k_rope)
    backend = dispatch.select_kernel("attention_varlen", args, q.device.type)
    if backend is not None:
        out, lse = backend.attention_varlen_forward(q, k, v, seq_lens, token_grans, scale,
                                                    q_rope, k_rope)
        return out.contiguous(), lse.contiguous()
    rows, lens = _padded_rows(seq_lens, q.device)
    qp, kp, vp = (_pad(t, rows, seq_lens) for t in (q, k, v))
    backend = dispatch.select("attention", (qp, kp, vp, token_grans, lens, q_rope, k_rope),
                              q.device.type)
    out, lse = backend.attention_forward(qp, kp, vp, token_grans, scale, lens, q_rope, k_rope)
    return _pack(out.transpose(1, 2), rows), lse.contiguous()


@_attention_varlen_op.register_fake
def _(q, k, v, seq_lens, token_grans, scale, q_cos, q_sin, k_cos, k_sin):
    return (q.new_empty(q.shape[0], q.shape[1], v.shape[-1]),
            q.new_empty(len(seq_lens), q.shape[1], max(seq_lens, default=0),
                        dtype=torch.float32))


def _attention_varlen_setup(ctx, inputs, output):
    q, k, v, seq_lens, token_grans, scale, q_cos, q_sin, k_cos, k_sin = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)   # as for the padded op
    ctx.save_for_backward(q, k, v, out, lse, q_cos, q_sin, k_cos, k_sin)
    ctx.seq_lens, ctx.token_grans, ctx.scale = seq_lens, token_grans, scale


def _attention_varlen_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse, q_cos, q_sin, k_cos, k_sin = ctx.saved_tensors
    seq_lens = ctx.seq_lens
    rows, lens = _padded_rows(seq_lens, q.device)
    qp, kp, vp = (_pad(t, rows, seq_lens) for t in (q, k, v))
    # the padded backward op takes grad_out and out heads-last, (B, N, H, Dv)
    go, op = (_pad(t, rows, seq_lens).transpose(1, 2) for t in (grad_out, out))
    dq, dk, dv = _attention_backward_op(go, qp, kp, vp, op, lse, ctx.token_grans, ctx.scale,
                                        lens, q_cos, q_sin, k_cos, k_sin)
    return (*(_pack(g.transpose(1, 2), rows) for g in (dq, dk, dv)),
            None, None, None, None, None, None, None)


_attention_varlen_op.register_autograd(_attention_varlen_grad,
                                       setup_context=_attention_varlen_setup)


def _check_seq_lens_list(seq_lens, rows: int) -> list[int]:
    if isinstance(seq_lens, torch.Tensor):
        if seq_lens.dim() != 1 or seq_lens.device.type != "cpu" or seq_lens.is_floating_point():
            raise ValueError(f"seq_lens must be a sequence of ints or a 1-d CPU int tensor, got "
                             f"{seq_lens.dtype} shape {tuple(seq_lens.shape)} on "
                             f"{seq_lens.device}")
        seq_lens = seq_lens.tolist()
    try:
        seq_lens = list(seq_lens)
    except TypeError:
        raise ValueError(f"seq_lens={seq_lens!r} is not allowed; allowed: a sequence of ints >= 0 "
                         "(one per sample) or a 1-d CPU int tensor") from None
    for n in seq_lens:
        if (isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n)
                or int(n) != n or n < 0):
            raise ValueError(f"seq_lens entry {n!r} is not allowed; allowed: ints >= 0")
    seq_lens = [int(n) for n in seq_lens]
    if sum(seq_lens) != rows:
        raise ValueError(f"seq_lens={seq_lens} sum to {sum(seq_lens)} rows; q has {rows} rows "
                         "(allowed: lengths that sum to q.shape[0])")
    return seq_lens


def block_masked_attention_varlen(q, k, v, seq_lens: Sequence[int],
                                  token_grans: Optional[Sequence[int]] = None, *,
                                  scale: Optional[float] = None, q_rope=None,
                                  k_rope=None) -> torch.Tensor:
    """Group-causal self-attention over packed rows, each sample with its own length.

    q, k (R, H, D), v (R, H, Dv): sample b's ``seq_lens[b]`` rows follow those of samples
    0..b-1 (R = sum of seq_lens; host ints, so no device value is read). Each sample attends
    within its own rows, positions counted from 0, exactly as ``block_masked_attention`` on the
    padded (B, H, max seq_len, D) form with ``seq_lens``. ``q_rope``/``k_rope``: (cos, sin)
    tables (max seq_len, D/2). Inputs may be strided views with unit stride along D (the
    model's q, k, v projections split into heads). Returns (R, H, Dv).
    """
    q, k, v = autocast_inputs(q, k, v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, "(R, H, D)")
    seq_lens = _check_seq_lens_list(seq_lens, q.shape[0])
    R, H, D = q.shape
    if k.shape != q.shape or v.shape[:2] != (R, H):
        raise ValueError(f"shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} do not "
                         "fit: need q and k (R, H, D), v (R, H, Dv), the same packed rows "
                         "(self-attention)")
    n = max(seq_lens, default=0)
    # the padded op's checks, on (1, H, R, D) views: dtypes, devices, grans
    token_grans, _ = _check_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)),
                                      token_grans, None, None, None)
    _check_rope("q_rope", q_rope, n, D, q.device)
    _check_rope("k_rope", k_rope, n, D, q.device)
    scale = _check_scale(scale, D)
    qc, qs = _rope_pair(q_rope)
    kc, ks = _rope_pair(k_rope)
    return _attention_varlen_op(q, k, v, seq_lens, token_grans, scale, qc, qs, kc, ks)[0]


# ----------------------------------------------------------------------------- FLOP formulas
# So that torch.utils.flop_counter.FlopCounterMode sees into the custom ops: the two matmuls over
# every (query, key) pair, masked or not (what a dense-mask reference computes). Backward: 2.5x
# (four matmuls plus the recomputed forward product).
def _attention_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    B, H, Nq, D = q_shape
    return 2 * B * H * Nq * k_shape[2] * (D + v_shape[3])


@register_flop_formula(torch.ops.adaperceiver.block_masked_attention)
def _(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention_flops(q_shape, k_shape, v_shape)


@register_flop_formula(torch.ops.adaperceiver.block_masked_attention_backward)
def _(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return 5 * _attention_flops(q_shape, k_shape, v_shape) // 2


# (its backward runs the padded backward op, which counts the padded B * N^2 pairs)
@register_flop_formula(torch.ops.adaperceiver.block_masked_attention_varlen)
def _(q_shape, k_shape, v_shape, seq_lens, *args, out_shape=None, **kwargs) -> int:
    return 2 * q_shape[1] * sum(n * n for n in seq_lens) * (q_shape[2] + v_shape[2])
