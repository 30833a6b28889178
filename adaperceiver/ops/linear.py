"""``linear(x, weight, bias)``: the model's projections, with the CPU GEMM library chosen for speed.

On the CPU in float32, when no gradient is recorded, a projection runs as oneDNN's matmul
(``mkldnn::_linear_pointwise`` on the plain weight: no pre-packed copy, nothing cached) instead
of ``F.linear``'s MKL sgemm. Why: MKL takes a generic code path on AMD CPUs, where oneDNN runs
the model's projection shapes faster (``pytest benchmarks/test_bench_ops_cpu.py -k projection
-s`` prints the ratio; figures in benchmarks/README.md).
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

__all__ = ["linear", "cpu_gemm_library", "native_low_precision", "row_chunks"]

_CHOICES = ("onednn", "mkl")


def _library_from_env() -> str:
    name = os.environ.get("ADAPERCEIVER_CPU_GEMM", "onednn").strip().lower() or "onednn"
    if name not in _CHOICES:
        raise ValueError(f"ADAPERCEIVER_CPU_GEMM={name!r} is not one of {', '.join(_CHOICES)}")
    has_onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                   "_linear_pointwise")
    return name if has_onednn else "mkl"


_LIBRARY = _library_from_env()
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_onednn_linear = torch.ops.mkldnn._linear_pointwise if _LIBRARY == "onednn" else None


def cpu_gemm_library() -> str:
    """Which library runs float32 CPU projections without gradients: "onednn" or "mkl"."""
    return _LIBRARY


def _onednn_takes(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    dtype = x.dtype
    if _LIBRARY != "onednn" or x.device.type != "cpu" or dtype not in _ONEDNN_DTYPES:
        return False
    if weight.dtype != dtype or weight.device.type != "cpu" or x.dim() < 2:
        return False
    if dtype != torch.float32 and not native_low_precision(dtype):
        return False   # no native GEMM for the dtype: _float32_takes
    if not weight.is_contiguous():
        return False   # a column slice of a weight takes oneDNN's reference GEMM (1000x slower)
    if torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu"):
        return False   # inductor lowers F.linear itself; autocast casts F.linear's inputs
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return False   # the oneDNN op has no autograd formula
    return bias is None or (bias.dtype == dtype and bias.device.type == "cpu")


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


# Row chunks for bfloat16 / float16 GEMMs on AMX. With 2 threads, oneDNN's AMX matmul runs a
# product of 768 < n <= 1100 outputs on ONE thread when its rows fall in a band (n = 832: rows
# 800..1600; n = 1069: 1280..1792; it depends on (rows, n) and on the thread count, not on the
# values): at 1.0-1.5 TFLOP/s where the same GEMM on 768 rows or fewer uses both threads at
# 1.9-2.5 (benchmarks/README.md, "GEMMs in bf16"). The model's output projection and fc2
# (n = 832) at batch 4 x 256 latents (1024 rows) sit in that band. Such a product runs as
# ceil(rows / 768) GEMMs on consecutive row blocks written in place. The transposed product
# (out^T = W x^T, both threads there) was measured too: its transposition back costs more
# than it saves. A rule of the shape and the thread count only, never of timings: the same
# inputs give the same outputs whatever ran before. Measured on AMX-BF16 with 2 threads and
# applied there: bfloat16 on a CPU with native bf16 GEMMs (build_info "cpu_native_bf16", the
# machine fact the project has; it does not tell AMX from AVX512-BF16 alone, whose oneDNN
# kernels, on AMD Zen 4, were not measured) and 2 threads; elsewhere one GEMM.
_CHUNK_ROWS = 768
_CHUNK_BAND = (800, 1664)          # rows
_CHUNK_OUTPUTS = (768, 1100)       # (lo, hi]: output features


def row_chunks(rows: int, outputs: int, dtype: torch.dtype) -> int:
    """How many consecutive row blocks a CPU GEMM of ``rows`` x ``outputs`` in ``dtype`` runs
    as (1: one GEMM); the C++ FFN applies the same rule (csrc/ffn_banded.cpp)."""
    if dtype != torch.bfloat16 or torch.get_num_threads() != 2:
        return 1
    if not (_CHUNK_OUTPUTS[0] < outputs <= _CHUNK_OUTPUTS[1]
            and _CHUNK_BAND[0] <= rows < _CHUNK_BAND[1]) or not native_low_precision(dtype):
        return 1
    return -(-rows // _CHUNK_ROWS)


def _onednn_linear_chunked(x: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor], chunks: int) -> torch.Tensor:
    """oneDNN's GEMM (bias fused) on ``chunks`` consecutive row blocks of x (rows a multiple of
    32 but the last), copied into one output. (Not ``addmm(..., out=block)``: its copy of the
    expanded bias into the block takes an element-wise path for bfloat16 that cost as much as
    the GEMM.)"""
    x2 = x.reshape(-1, x.shape[-1])
    rows, n = x2.shape[0], weight.shape[0]
    step = -(-rows // chunks // 32) * 32
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        out[r0:r1].copy_(_onednn_linear(x2[r0:r1], weight, bias, "none", [], ""))
    return out.view(*x.shape[:-1], n)


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; CPU inference runs through oneDNN (float32, and bf16 /
    fp16 where the CPU has native GEMMs for them), bf16 / fp16 without native GEMMs as float32
    (see above)."""
    if _onednn_takes(x, weight, bias):
        chunks = row_chunks(x.numel() // max(x.shape[-1], 1), weight.shape[0], x.dtype)
        if chunks > 1:
            return _onednn_linear_chunked(x, weight, bias, chunks)
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
