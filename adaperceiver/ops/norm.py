"""The block's residuals with LayerScale and its LayerNorms.

``layer_scale_residual(x, branch, gamma)`` is ``torch.addcmul(x, branch, gamma)``;
``layer_norm(x, weight, bias, eps)`` is ``F.layer_norm`` over the last dimension;
``residual_layer_norm(...)`` is both, the norm of the new residual stream, as a pre-norm block
computes them one after the other (``x = x + ls1(attn(...)); h = norm2(x)``).

On the CPU, when no gradient is recorded (inference, ``torch.no_grad``), they run as the
extension's one-pass row kernel (csrc/cpu/norm.cpp; on CPUs with AVX-512, and AVX512-BF16 for
a bfloat16 x or norm, else the op runs torch's addcmul and layer_norm itself) in three cases:
* bfloat16 or float16 throughout (``model.to(dtype)``), not under autocast (what autocast
  does with a 16-bit layer_norm is autocast's policy to apply, so torch's op runs there);
* a float32 residual stream with a bfloat16 / float16 branch (autocast's blocks: the stream
  stays float32, the branches come out of the projections in the autocast dtype), for the
  residual and the residual with its norm; the results are float32, as torch's;
* a float32 x whose norm is asked for in bfloat16 / float16 (``out_dtype``, below), with or
  without a branch.
The residual is bit for bit ``addcmul``'s (one fused multiply-add, one rounding to x's dtype),
the norm in float32 from the rounded residual, rounded once. Why: torch runs the two as
separate passes over the activations, its 16-bit kernels of both run well below memory speed,
and a 16-bit branch costs its float32 addcmul a conversion pass first; the block calls them
twice per layer. Everything else (gradients, float32 throughout, whose torch kernels already
run at memory speed, other devices, torch.compile, a missing extension, shapes the kernel does
not take) is torch's own ops, so the model has one implementation and autograd stays torch's.

``out_dtype`` (``layer_norm`` and ``residual_layer_norm``) gives the norm cast to that dtype.
Under autocast a norm whose result only feeds matmuls (the block's two, the read and write
heads') asks for ``matmul_input_dtype(x)``, the dtype those matmuls cast their input to: the
row kernel then rounds the float32 norm once to bfloat16 / float16 as it writes it, the cast's
value bit for bit, instead of writing float32 for each matmul to cast again (torch's ops, where
the kernel does not run, cast their float32 result).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._common import FLOATS, autocast_dtype
from .linear import _extension_op

__all__ = ["layer_scale_residual", "layer_norm", "residual_layer_norm", "matmul_input_dtype"]

_DTYPES = (torch.bfloat16, torch.float16)


def _kernel():
    """torch.ops.adaperceiver.residual_layer_norm, None without the extension."""
    return _extension_op("residual_layer_norm")


def matmul_input_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype a matmul under autocast casts x to: autocast's bfloat16 / float16 for a
    float32 x on a device where autocast is on; None otherwise (x as it is)."""
    dtype = autocast_dtype(x)
    return dtype if x.dtype == torch.float32 and dtype in _DTYPES else None


def _kernel_takes(x: torch.Tensor, branch: Optional[torch.Tensor],
                  *vectors: Optional[torch.Tensor], out_dtype=None) -> bool:
    """Whether the row kernel runs this call (see the module's docstring)."""
    if x.device.type != "cpu" or x.dim() < 1 or torch.compiler.is_compiling():
        return False
    if x.dtype in _DTYPES:
        if torch.is_autocast_enabled("cpu") or (branch is not None and branch.dtype != x.dtype):
            return False
        if out_dtype not in (None, x.dtype):
            return False
    elif x.dtype != torch.float32 or out_dtype not in (None, torch.float32, *_DTYPES):
        return False
    elif (branch is None or branch.dtype not in _DTYPES) and out_dtype not in _DTYPES:
        return False   # float32 throughout: torch's kernels run at memory speed
    ts = [t for t in (branch, *vectors) if t is not None]
    if branch is not None and branch.shape != x.shape:
        return False   # broadcasting: torch's
    if any(t.device != x.device for t in ts) or any(t.dtype != x.dtype for t in vectors
                                                     if t is not None):
        return False
    if any(t.shape != (x.shape[-1],) for t in vectors if t is not None):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *ts)):
        return False   # the kernel has no autograd formula
    return _kernel() is not None


def layer_scale_residual(x: torch.Tensor, branch: torch.Tensor,
                         gamma: torch.Tensor) -> torch.Tensor:
    """``x + gamma * branch`` (``torch.addcmul``), gamma over the last dimension."""
    if _kernel_takes(x, branch, gamma):
        return _kernel()(x, branch, gamma, None, None, 0.0, False)[0]
    return torch.addcmul(x, branch, gamma)


def _check_out_dtype(out_dtype) -> None:
    if out_dtype is not None and out_dtype not in FLOATS:
        raise TypeError(f"out_dtype={out_dtype} is not allowed; allowed: None (x's dtype), "
                        "torch.float16, torch.bfloat16, torch.float32, torch.float64")


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t if dtype is None else t.to(dtype)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` over the last dimension C (cast to
    ``out_dtype`` when given)."""
    _check_out_dtype(out_dtype)
    if ((weight is None) == (bias is None)
            and _kernel_takes(x, None, weight, bias, out_dtype=out_dtype)):
        return _kernel()(x, None, None, weight, bias, eps, True, out_dtype)[1]
    return _cast(F.layer_norm(x, (x.shape[-1],), weight, bias, eps), out_dtype)


def residual_layer_norm(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor,
                        weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        eps: float, out_dtype: Optional[torch.dtype] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, layer_norm(r))`` with ``r = x + gamma * branch`` (the norm cast to ``out_dtype``
    when given)."""
    _check_out_dtype(out_dtype)
    if ((weight is None) == (bias is None)
            and _kernel_takes(x, branch, gamma, weight, bias, out_dtype=out_dtype)):
        return _kernel()(x, branch, gamma, weight, bias, eps, True, out_dtype)
    r = torch.addcmul(x, branch, gamma)
    return r, _cast(F.layer_norm(r, (r.shape[-1],), weight, bias, eps), out_dtype)
