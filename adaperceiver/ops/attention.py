"""Block-masked (group-causal) attention as torch.library custom ops that dispatch to a backend.

``block_masked_attention(q, k, v, token_grans=None, *, scale=None, seq_lens=None, q_rope=None,
k_rope=None)``: padded (B, H, N, D) inputs; ``block_masked_attention_varlen``: packed rows of
samples of their own lengths, no padding. The public entries build one inputs object per call
(inputs.py: the user's input validated once, errors naming the argument, its value and what is
allowed; defaults resolved once); the custom ops
``adaperceiver::block_masked_attention`` / ``_varlen`` / ``_backward`` have fake
implementations and autograd, so ``torch.compile`` traces them as single nodes; a call that
needs none of that (no gradient recorded, nothing tracing or watching the dispatcher:
``_common.call_op``) runs the op's body, the same backend call, itself. Which backend
runs is decided in dispatch.py, which hands the inputs object to the backends; they only say
what they cannot take.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.utils.flop_counter import register_flop_formula

from . import dispatch
from ._common import autocast_inputs, call_op, save_call, saved_call
from .inputs import AttentionInputs, PackedAttentionInputs
from .schedule import ranges, to_device

__all__ = ["block_masked_attention", "block_masked_attention_varlen"]


@torch.library.custom_op("adaperceiver::block_masked_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  token_grans: Optional[list[int]], scale: float,
                  seq_lens: Optional[torch.Tensor], q_cos: Optional[torch.Tensor],
                  q_sin: Optional[torch.Tensor], k_cos: Optional[torch.Tensor],
                  k_sin: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_forward(AttentionInputs.from_flat(q, k, v, token_grans, scale, seq_lens,
                                                        q_cos, q_sin, k_cos, k_sin))


def _attention_forward(inp: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward op's body: the selected backend's forward, heads-last."""
    out, lse = dispatch.select("attention", inp).attention_forward(inp)
    # the op's output is heads-last, (B, Nq, H, Dv): the model reads it as (B, Nq, C) with no
    # copy, and a backend that writes that layout (returning its (B, H, Nq, Dv) view) pays none
    return out.transpose(1, 2).contiguous(), lse.contiguous()


@_attention_op.register_fake
def _(q, k, v, *args):
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
    inp = AttentionInputs.from_flat(q, k, v, token_grans, scale, seq_lens, q_cos, q_sin, k_cos,
                                    k_sin)
    # grad_out and out are heads-last (B, Nq, H, Dv), as the forward op returns them
    dq, dk, dv = dispatch.select("attention", inp).attention_backward(
        inp, grad_out.transpose(1, 2), out.transpose(1, 2), lse)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, *args):
    # contiguous, as the op returns them (empty_like would keep a transposed input's strides,
    # and a traced graph would then view the real, contiguous gradients wrongly)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    # lse is an output for kernels to share (the backward reads it), not a differentiable
    # result: autograd says so instead of returning a zero gradient
    ctx.mark_non_differentiable(output[1])
    save_call(ctx, inputs, output)


def _attention_grad(ctx, grad_out, grad_lse):
    (q, k, v, *rest), (out, lse) = saved_call(ctx)
    grads = _attention_backward_op(grad_out, q, k, v, out, lse, *rest)
    return (*grads, *[None] * len(rest))


_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)


def block_masked_attention(q, k, v, token_grans: Optional[Sequence[int]] = None, *,
                           scale: Optional[float] = None, seq_lens: Optional[torch.Tensor] = None,
                           q_rope=None, k_rope=None, heads_last: bool = False) -> torch.Tensor:
    """Group-causal attention: q (B, H, Nq, D), k/v (B, H, Nk, D) -> (B, H, Nq, D).

    The mask, the NaN/inf semantics and the lse contract: docs/design.md, "Op contracts".

    ``token_grans=None``: no mask. ``seq_lens``: (B,) ints in 0..max(Nq, Nk) (a sequence or an
    int tensor); sample b uses its first min(seq_lens[b], Nq) queries and min(seq_lens[b], Nk)
    keys, the rest of its output is zero. ``q_rope``/``k_rope``: a :class:`~.inputs.Rope` or
    (cos, sin) pair of tables (N, D/2) applied inside the op as interleaved-pair RoPE. Inputs
    may be strided views (for instance (B, N, H, D) projections transposed). The result is a
    (B, H, Nq, D) view of a heads-last buffer; ``heads_last=True`` returns that buffer,
    (B, Nq, H, D), contiguous.
    """
    inp = AttentionInputs.build(*autocast_inputs(q, k, v), token_grans, scale=scale,
                                seq_lens=seq_lens, q_rope=q_rope, k_rope=k_rope)
    out = call_op(_attention_op, _attention_forward, inp)[0]
    return out if heads_last else out.transpose(1, 2)


# ----------------------------------------------------------------------------- packed rows
# Self-attention of samples of their own lengths with no padding: q, k, v (R, H, D) hold sample
# b's seq_lens[b] rows after those of the samples before it (the model's packed latents), and the
# output comes back in the same rows. A backend with a packed kernel (cpp, triton, cuda) runs it
# as it is; elsewhere the rows are padded to (B, H, max seq_len, D), run through the padded op's
# backend with seq_lens, and packed again, which gives the same result. The backward always goes
# the padded way.
def _padded(inp: PackedAttentionInputs, *packed: torch.Tensor):
    """The packed call as a padded one: (AttentionInputs on (B, H, N, D), N = max seq_len, with
    seq_lens; the rows' places in the (B * N) padded layout; ``packed`` (R, H, D) tensors
    padded likewise). Host-known indices are built on the device with no blocking copy."""
    seq_lens, device = inp.seq_lens, inp.device
    B, n = len(seq_lens), max(seq_lens, default=0)
    rows = ranges([b * n for b in range(B)], seq_lens, device)

    def pad(t):
        out = t.new_zeros(B * n, *t.shape[1:]).index_copy_(0, rows, t)
        return out.view(B, n, *t.shape[1:]).transpose(1, 2)

    padded = AttentionInputs(pad(inp.q), pad(inp.k), pad(inp.v), inp.token_grans, inp.scale,
                             to_device(seq_lens, device, torch.int32), inp.q_rope, inp.k_rope)
    return padded, rows, [pad(t) for t in packed]


def _pack(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, N, H, D) (heads-last, padded) -> (R, H, D) packed rows."""
    return t.reshape(-1, *t.shape[2:]).index_select(0, rows)


@torch.library.custom_op("adaperceiver::block_masked_attention_varlen", mutates_args=())
def _attention_varlen_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                         token_grans: Optional[list[int]], scale: float,
                         q_cos: Optional[torch.Tensor], q_sin: Optional[torch.Tensor],
                         k_cos: Optional[torch.Tensor], k_sin: Optional[torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_varlen_forward(PackedAttentionInputs.from_flat(
        q, k, v, seq_lens, token_grans, scale, q_cos, q_sin, k_cos, k_sin))


def _attention_varlen_forward(inp: PackedAttentionInputs):
    """The packed op's body: a backend's packed kernel, else padded through the padded op's."""
    backend = dispatch.select_kernel("attention_varlen", inp)
    if backend is not None:
        out, lse = backend.attention_varlen_forward(inp)
        return out.contiguous(), lse.contiguous()
    padded, rows, _ = _padded(inp)
    out, lse = dispatch.select("attention", padded).attention_forward(padded)
    return _pack(out.transpose(1, 2), rows), lse.contiguous()


@_attention_varlen_op.register_fake
def _(q, k, v, seq_lens, *args):
    return (q.new_empty(q.shape[0], q.shape[1], v.shape[-1]),
            q.new_empty(len(seq_lens), q.shape[1], max(seq_lens, default=0),
                        dtype=torch.float32))


def _attention_varlen_grad(ctx, grad_out, grad_lse):
    flat, (out, lse) = saved_call(ctx)
    padded, rows, (go, op) = _padded(PackedAttentionInputs.from_flat(*flat), grad_out, out)
    # the padded backward op takes grad_out and out heads-last, (B, N, H, Dv)
    grads = _attention_backward_op(*padded.backward_flat(go.transpose(1, 2), op.transpose(1, 2),
                                                         lse))
    return (*(_pack(g.transpose(1, 2), rows) for g in grads), *[None] * (len(flat) - 3))


_attention_varlen_op.register_autograd(_attention_varlen_grad, setup_context=_attention_setup)


def block_masked_attention_varlen(q, k, v, seq_lens: Sequence[int],
                                  token_grans: Optional[Sequence[int]] = None, *,
                                  scale: Optional[float] = None, q_rope=None,
                                  k_rope=None) -> torch.Tensor:
    """Group-causal self-attention over packed rows, each sample with its own length.

    q, k (R, H, D), v (R, H, Dv): sample b's ``seq_lens[b]`` rows follow those of samples
    0..b-1 (R = sum of seq_lens; host ints, so no device value is read). Each sample attends
    within its own rows, positions counted from 0, exactly as ``block_masked_attention`` on the
    padded (B, H, max seq_len, D) form with ``seq_lens``. ``q_rope``/``k_rope``: a
    :class:`~.inputs.Rope` or (cos, sin) pair of tables (max seq_len, D/2). Inputs may be
    strided views with unit stride along D (the model's q, k, v projections split into heads).
    Returns (R, H, Dv).
    """
    inp = PackedAttentionInputs.build(*autocast_inputs(q, k, v), seq_lens, token_grans,
                                      scale=scale, q_rope=q_rope, k_rope=k_rope)
    return call_op(_attention_varlen_op, _attention_varlen_forward, inp)[0]


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
