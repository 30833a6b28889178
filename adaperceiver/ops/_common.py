"""What both ops' public entries share: the float dtypes they take, autocast, and the tensor
check whose message names the argument."""
from __future__ import annotations

import torch

__all__ = ["FLOATS", "autocast_inputs", "check_float_tensor"]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# device types autocast knows (torch.is_autocast_enabled raises on others, "meta" among them)
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def autocast_inputs(*tensors):
    """Under autocast, run the op in the autocast dtype (as autocast does for matmuls); RoPE
    tables stay float32."""
    dev = tensors[0].device.type
    if dev not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(dev):
        return tensors
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def check_float_tensor(name: str, t, layout: str) -> None:
    """``t`` must be a float tensor with as many dims as ``layout`` names."""
    dims = layout.count(",") + 1
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-d tensor {layout}, got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
    if t.dtype not in FLOATS:
        raise TypeError(f"{name}.dtype={t.dtype} is not allowed; allowed: float16, bfloat16, "
                        "float32, float64")
