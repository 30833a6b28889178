"""What both ops share: the float dtypes they take, autocast, the tensor check whose message
names the argument, how a custom op's autograd keeps its flat arguments for the backward, and
when a call needs the custom op at all (``needs_dispatcher``, ``call_op``)."""
from __future__ import annotations

import torch

__all__ = ["FLOATS", "autocast_dtype", "autocast_inputs", "call_op", "check_float_tensor",
           "needs_dispatcher", "save_call", "saved_call"]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# device types autocast knows (torch.is_autocast_enabled raises on others, "meta" among them)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def autocast_dtype(t):
    """The autocast dtype of t's device when autocast is on there, else None (also when t is not
    a tensor: the inputs' check names it)."""
    if not isinstance(t, torch.Tensor):
        return None
    dev = t.device.type
    if dev not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def autocast_inputs(*tensors):
    """Under autocast, run the op in the autocast dtype (as autocast does for matmuls); RoPE
    tables stay float32."""
    dtype = autocast_dtype(tensors[0])
    if dtype is None:
        return tensors
    from .linear import to_dtype   # float32 -> bfloat16 weights: the parallel conversion
    return tuple(to_dtype(t, dtype) if t.is_floating_point() else t for t in tensors)


def check_float_tensor(name: str, t, layout: str) -> None:
    """``t`` must be a float tensor with as many dims as ``layout`` names."""
    dims = layout.count(",") + 1
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-d tensor {layout}, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name}.dtype={t.dtype} is not allowed; allowed: float16, bfloat16, "
                        "float32, float64")


def save_call(ctx, flat: tuple, outputs: tuple) -> None:
    """Keep a custom op's flat arguments and its outputs for the backward: tensors (and the
    None of an absent optional tensor) through ``save_for_backward``, other values on ctx."""
    ctx.tensor_slots = [i for i, a in enumerate(flat) if a is None or isinstance(a, torch.Tensor)]
    ctx.other_args = {i: a for i, a in enumerate(flat) if i not in ctx.tensor_slots}
    ctx.save_for_backward(*(flat[i] for i in ctx.tensor_slots), *outputs)


def saved_call(ctx) -> tuple[tuple, tuple]:
    """(flat arguments, outputs) as ``save_call`` kept them."""
    saved = ctx.saved_tensors
    args = {**ctx.other_args, **dict(zip(ctx.tensor_slots, saved))}
    return tuple(args[i] for i in range(len(args))), tuple(saved[len(ctx.tensor_slots):])


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def needs_dispatcher(flat: tuple) -> bool:
    """Whether a call of one of the ops with these flat arguments must go through its
    ``torch.library`` custom op: a gradient is recorded for one of its tensors, torch.compile or
    torch.export traces it, a Python dispatch or function mode is active (FlopCounterMode,
    FakeTensorMode, ``torch.device`` as a context, ...), a functorch transform runs, or a
    tensor is a subclass. Otherwise the public entry runs the op's body itself, the same
    backend call the custom op makes: the dispatcher's round trip back into Python costs tens
    of microseconds a call, a few percent of a small configuration's forward."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._len_torch_function_stack()
            or torch._C._are_functorch_transforms_active()):
        return True
    grad = torch.is_grad_enabled()
    return any(isinstance(a, torch.Tensor) and (type(a) not in _PLAIN_TENSORS
                                                or (grad and a.requires_grad)) for a in flat)


def call_op(op, body, inp):
    """The custom op ``op`` on the inputs object's flat arguments when the call needs the
    dispatcher (``needs_dispatcher``), else ``body(inp)``: the op's own body on the object the
    public entry built."""
    flat = inp.flat()
    return op(*flat) if needs_dispatcher(flat) else body(inp)
