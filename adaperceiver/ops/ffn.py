"""The Matryoshka FFN as torch.library custom ops that dispatch to a backend.

``matryoshka_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden)``: fc2(GELU(fc1(x)))
with sample b using only the first ``hidden[b]`` hidden units. The public entry builds one
``FfnInputs`` per call (inputs.py: the user's input validated once); the custom ops
``adaperceiver::matryoshka_ffn`` / ``_backward`` have fake implementations and autograd
(torch.compile traces them as single nodes); a call that needs none of that (no gradient
recorded, nothing tracing or watching the dispatcher: ``_common.call_op``) runs the
op's body, the same backend call, itself.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from . import dispatch
from ._common import autocast_dtype, autocast_inputs, call_op, save_call, saved_call
from .inputs import FfnInputs, _check_hidden, ffn_shapes_fit

__all__ = ["matryoshka_ffn"]


def _ffn_forward(inp: FfnInputs) -> torch.Tensor:
    """The forward op's body: the selected backend's forward."""
    return dispatch.select("ffn", inp).ffn_forward(inp).contiguous()


@torch.library.custom_op("adaperceiver::matryoshka_ffn", mutates_args=())
def _ffn_op(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor,
            fc2_weight: torch.Tensor, fc2_bias: torch.Tensor, hidden: list[int]) -> torch.Tensor:
    return _ffn_forward(FfnInputs.from_flat(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                            hidden))


@_ffn_op.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden):
    return x.new_empty(*x.shape[:-1], fc2_weight.shape[0])


@torch.library.custom_op("adaperceiver::matryoshka_ffn_backward", mutates_args=())
def _ffn_backward_op(grad_out: torch.Tensor, x: torch.Tensor, fc1_weight: torch.Tensor,
                     fc1_bias: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor,
                     hidden: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    inp = FfnInputs.from_flat(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden)
    return tuple(g.contiguous() for g in dispatch.select("ffn", inp).ffn_backward(inp, grad_out))


@_ffn_backward_op.register_fake
def _(grad_out, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden):
    return tuple(torch.empty_like(t) for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias))


def _ffn_setup(ctx, inputs, output):
    save_call(ctx, inputs, ())


def _ffn_grad(ctx, grad_out):
    flat, _ = saved_call(ctx)
    return (*_ffn_backward_op(grad_out, *flat), None)


_ffn_op.register_autograd(_ffn_grad, setup_context=_ffn_setup)


def matryoshka_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden) -> torch.Tensor:
    """fc2(GELU(fc1(x)[..., :h_b])) per sample b, fc2 reading its first h_b input columns.

    x (B, N, C); fc1_weight (Hmax, C); fc2_weight (C, Hmax); ``hidden`` an int or (B,) ints.
    """
    fc1_weight, fc1_bias, fc2_weight = _units_in_use(x, fc1_weight, fc1_bias, fc2_weight,
                                                     fc2_bias, hidden)
    inp = FfnInputs.build(*autocast_inputs(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias),
                          hidden)
    return call_op(_ffn_op, _ffn_forward, inp)


def _units_in_use(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden):
    """Under autocast, the weights' first max(hidden) hidden units only: autocast casts every
    weight on every call, and the units past the widest sample are never read, so casting them
    would make the cost follow the weights' size instead of the work. The results are those of
    the full weights (the op reads a sample's first h units either way); gradients reach the
    full weights through the slices (zero past the widest width, as without autocast).
    Without autocast, or for arguments whose shapes do not fit (FfnInputs.build then names the
    shapes the caller gave), the weights as given."""
    given = fc1_weight, fc1_bias, fc2_weight
    tensors = (x, *given, fc2_bias)
    if autocast_dtype(x) is None or not all(isinstance(t, torch.Tensor) for t in tensors):
        return given
    if x.dim() != 3 or fc1_weight.dim() != 2 or fc2_weight.dim() != 2:
        return given
    if not ffn_shapes_fit(*tensors):
        return given
    H = fc1_weight.shape[0]
    try:
        widest = max(_check_hidden(hidden, x.shape[0], H), default=0)
    except (TypeError, ValueError):
        return given
    if not 0 < widest < H:
        return given
    return fc1_weight[:widest], fc1_bias[:widest], fc2_weight[:, :widest]


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
