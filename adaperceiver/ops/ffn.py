"""The Matryoshka FFN as torch.library custom ops that dispatch to a backend.

``matryoshka_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden)``: fc2(GELU(fc1(x)))
with sample b using only the first ``hidden[b]`` hidden units. The public entry validates the
user's input once; the custom ops ``adaperceiver::matryoshka_ffn`` / ``_backward`` have fake
implementations and autograd (torch.compile traces them as single nodes).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch.utils.flop_counter import register_flop_formula

from . import dispatch
from ._common import autocast_inputs, check_float_tensor

__all__ = ["matryoshka_ffn", "normalize_hidden"]


@torch.library.custom_op("adaperceiver::matryoshka_ffn", mutates_args=())
def _ffn_op(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
            fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, hidden: list[int]) -> torch.Tensor:
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden)
    backend = dispatch.select("ffn", args, x.device.type)
    return backend.ffn_forward(*args).contiguous()


@_ffn_op.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden):
    return x.new_empty(*x.shape[:-1], fc2_weight.shape[0])


@torch.library.custom_op("adaperceiver::matryoshka_ffn_backward", mutates_args=())
def _ffn_backward_op(grad_out: torch.Tensor, x: torch.Tensor, fc1_weight: torch.Tensor,
                     fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor,
                     hidden: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden)
    backend = dispatch.select("ffn", args, x.device.type)
    return tuple(g.contiguous() for g in backend.ffn_backward(grad_out, *args))


@_ffn_backward_op.register_fake
def _(grad_out, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden):
    return tuple(torch.empty_like(t) for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias))


def _ffn_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, hidden = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2)
    ctx.hidden = hidden


def _ffn_grad(ctx, grad_out):
    return (*_ffn_backward_op(grad_out, *ctx.saved_tensors, ctx.hidden), None)


_ffn_op.register_autograd(_ffn_grad, setup_context=_ffn_setup)


def normalize_hidden(hidden, batch: int, hmax: int) -> list[int]:
    """``hidden`` (an int, or a length-B sequence/tensor of ints in 1..hmax) as a list of B ints."""
    if isinstance(hidden, torch.Tensor):
        if hidden.dim() == 0:
            hidden = int(hidden)
        elif hidden.dim() != 1 or hidden.dtype.is_floating_point or hidden.dtype == torch.bool:
            raise ValueError(f"hidden must be an int or a 1-d int tensor, got dtype "
                             f"{hidden.dtype} shape {tuple(hidden.shape)}")
        else:
            hidden = hidden.tolist()
    what = f"an int in 1..{hmax} or a length-{batch} sequence of them"
    if isinstance(hidden, (bool, str, bytes)):
        raise TypeError(f"hidden={hidden!r} is not allowed; allowed: {what}")
    if isinstance(hidden, numbers.Real):
        hidden = [hidden] * batch
    try:
        hidden = list(hidden)
    except TypeError:
        raise TypeError(f"hidden={hidden!r} is not allowed; allowed: {what}") from None
    if len(hidden) != batch:
        raise ValueError(f"hidden has {len(hidden)} entries; the batch has {batch} samples")
    for h in hidden:
        if (isinstance(h, bool) or not isinstance(h, numbers.Real) or not math.isfinite(h)
                or int(h) != h or not 1 <= int(h) <= hmax):
            raise ValueError(f"hidden={h!r} is not allowed; allowed: ints in 1..{hmax}")
    return [int(h) for h in hidden]


def matryoshka_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden) -> torch.Tensor:
    """fc2(GELU(fc1(x)[..., :h_b])) per sample b, fc2 reading its first h_b input columns.

    x (B, N, C); fc1_weight (Hmax, C); fc2_weight (C, Hmax); ``hidden`` an int or (B,) ints.
    """
    check_float_tensor("x", x, "(B, N, C)")
    x, fc1_weight, fc1_bias, fc2_weight, fc2_bias = autocast_inputs(x, fc1_weight, fc1_bias,
                                                              fc2_weight, fc2_bias)
    for name, t, layout in (("fc1_weight", fc1_weight, "(Hmax, C)"), ("fc1_bias", fc1_bias,
                                                                        "(Hmax)"),
                            ("fc2_weight", fc2_weight, "(C, Hmax)"), ("fc2_bias", fc2_bias,
                                                                      "(C)")):
        check_float_tensor(name, t, layout)
        if t.device != x.device or t.dtype != x.dtype:
            raise ValueError(f"{name} is {t.dtype} on {t.device}; x is {x.dtype} on {x.device}: "
                             "x and the FFN weights must share dtype and device")
    hmax, c = fc1_weight.shape
    if (x.shape[-1] != c or fc1_bias.shape != (hmax,) or fc2_weight.shape[1] != hmax
            or fc2_bias.shape != (fc2_weight.shape[0],)):
        raise ValueError(f"shapes x{tuple(x.shape)} fc1_weight{tuple(fc1_weight.shape)} "
                         f"fc1_bias{tuple(fc1_bias.shape)} fc2_weight{tuple(fc2_weight.shape)} "
                         f"fc2_bias{tuple(fc2_bias.shape)} do not fit")
    hidden = normalize_hidden(hidden, x.shape[0], hmax)
    return _ffn_op(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden)


# ----------------------------------------------------------------------------- FLOP formulas
# So that torch.utils.flop_counter.FlopCounterMode sees into the custom ops: the hidden units
# each sample needs. Backward: 2.5x (four matmuls plus the recomputed forward product).
def _ffn_flops(x_shape, w1_shape, b1_shape, w2_shape, b2_shape, hidden, **kwargs) -> int:
    B, N, C = x_shape
    return 2 * N * (C + w2_shape[0]) * sum(int(h) for h in hidden) * (B // len(hidden))


@register_flop_formula(torch.ops.adaperceiver.matryoshka_ffn)
def _(x_shape, w1_shape, b1_shape, w2_shape, b2_shape, hidden, out_shape=None, **kwargs) -> int:
    return _ffn_flops(x_shape, w1_shape, b1_shape, w2_shape, b2_shape, hidden)


@register_flop_formula(torch.ops.adaperceiver.matryoshka_ffn_backward)
def _(grad_shape, x_shape, w1_shape, b1_shape, w2_shape, b2_shape, hidden, out_shape=None,
      **kwargs) -> int:
    return 5 * _ffn_flops(x_shape, w1_shape, b1_shape, w2_shape, b2_shape, hidden) // 2
