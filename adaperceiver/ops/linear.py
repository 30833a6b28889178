"""``linear(x, weight, bias)``: the model's projections, with the CPU GEMM library chosen for speed.

On the CPU in float32, when no gradient is recorded, a projection runs as oneDNN's matmul
(``mkldnn::_linear_pointwise`` on the plain weight: no pre-packed copy, nothing cached) instead
of ``F.linear``'s MKL sgemm. Why: MKL takes a generic code path on AMD CPUs; on an AMD EPYC
(AVX2) oneDNN ran the model's projection shapes (1024 rows, K = 832 / 3328) 1.18-1.33x faster
than MKL (``pytest benchmarks/test_bench_ops_cpu.py -k projection -s`` prints the ratios).
Everything else (gradients, other dtypes and devices, autocast, torch.compile, a torch without
oneDNN) takes ``F.linear``, and so does a non-contiguous weight (a Matryoshka column slice): oneDNN
runs those on its reference kernel, three orders of magnitude slower.
bfloat16 / float16 on a CPU without native GEMMs for the dtype (no AVX512-BF16 / AMX-BF16,
AVX512-FP16 / AMX-FP16; ``adaperceiver._ext.build_info()["cpu_native_bf16"]``): torch would run
the projection on its emulated low-precision GEMM, several times slower than float32; it runs
as a float32 GEMM on float32 copies of the operands instead (float32 accumulation and one
rounding of the result, as the native GEMM does), so a bf16 model is never much slower than the
float32 one there. The C++ FFN makes the same choice (csrc/ffn_banded.cpp).
``ADAPERCEIVER_CPU_GEMM=mkl`` in the environment (read once at import; the C++ FFN reads it the
same way) keeps every projection on ``F.linear``. The two libraries agree to float32 rounding
(they sum in different orders); a given input and library always give the same output.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["linear", "cpu_gemm_library", "native_low_precision"]

_CHOICES = ("onednn", "mkl")


def _library_from_env() -> str:
    name = os.environ.get("ADAPERCEIVER_CPU_GEMM", "onednn").strip().lower() or "onednn"
    if name not in _CHOICES:
        raise ValueError(f"ADAPERCEIVER_CPU_GEMM={name!r} is not one of {', '.join(_CHOICES)}")
    has_onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                   "_linear_pointwise")
    return name if has_onednn else "mkl"


_LIBRARY = _library_from_env()
_onednn_linear = torch.ops.mkldnn._linear_pointwise if _LIBRARY == "onednn" else None


def cpu_gemm_library() -> str:
    """Which library runs float32 CPU projections without gradients: "onednn" or "mkl"."""
    return _LIBRARY


def _onednn_takes(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    if _LIBRARY != "onednn" or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or x.dim() < 2:
        return False
    if not weight.is_contiguous():
        return False   # a column slice of a weight takes oneDNN's reference GEMM (1000x slower)
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False   # inductor lowers F.linear itself; autocast casts F.linear's inputs
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return False   # the oneDNN op has no autograd formula
    return bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu")


@functools.lru_cache(maxsize=None)
def native_low_precision(dtype: torch.dtype) -> bool:
    """Whether this CPU runs GEMMs in dtype (bfloat16 / float16) natively; True for other
    dtypes and when the extension is missing (nothing to route then). A fact of the machine
    (and of ADAPERCEIVER_CPU_ISA, read once), so the memo cannot go stale."""
    from .. import _ext
    info = _ext.build_info()
    if not info["cpp_compiled"] or dtype not in (torch.bfloat16, torch.float16):
        return True
    return info["cpu_native_bf16"] if dtype == torch.bfloat16 else info["cpu_native_fp16"]


def _float32_takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bf16 / fp16 on a CPU without native GEMMs for it (see above); not under autocast
    (autocast picks the GEMM's dtype itself) or torch.compile."""
    return (x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu"
            and weight.dtype == x.dtype and not torch.compiler.is_compiling()
            and not torch.is_autocast_enabled("cpu") and not native_low_precision(x.dtype))


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; float32 CPU inference runs through oneDNN, bf16 / fp16
    without native GEMMs as float32 (see above)."""
    if _onednn_takes(x, weight, bias):
        return _onednn_linear(x, weight, bias, "none", [], "")
    if _float32_takes(x, weight):
        return F.linear(x.float(), weight.float(),
                        None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


# FlopCounterMode (and so count_flops' cross-check) sees the oneDNN op as what it is: a GEMM
from torch.utils.flop_counter import flop_registry, register_flop_formula  # noqa: E402

# (the registry is keyed by overload: leave a formula torch may one day ship itself in place)
if (hasattr(torch.ops.mkldnn, "_linear_pointwise") and
        torch.ops.mkldnn._linear_pointwise.default not in flop_registry):
    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def _(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        rows = 1
        for s in x_shape[:-1]:
            rows *= s
        return 2 * rows * w_shape[0] * w_shape[1]
