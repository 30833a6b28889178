"""``linear(x, weight, bias)``: the model's projections, with the CPU GEMM library chosen for speed.

On the CPU in float32, when no gradient is recorded, a projection runs as oneDNN's matmul
(``mkldnn::_linear_pointwise`` on the plain weight: no pre-packed copy, nothing cached) instead
of ``F.linear``'s MKL sgemm. Why: MKL takes a generic code path on AMD CPUs, where oneDNN runs
the model's projection shapes faster (``pytest benchmarks/test_bench_ops_cpu.py -k projection
-s`` prints the ratio; figures in benchmarks/README.md).
Everything else (gradients, other dtypes and devices, autocast but for the case below,
torch.compile, a torch without oneDNN) takes ``F.linear``, and so does a non-contiguous weight
(a Matryoshka column slice): oneDNN runs those on its reference kernel, three orders of
magnitude slower.
bfloat16 / float16 on a CPU without native GEMMs for the dtype (no AVX512-BF16 / AMX-BF16,
AVX512-FP16 / AMX-FP16; ``adaperceiver._ext.build_info()["cpu_native_bf16"]``): torch would run
the projection on its emulated low-precision GEMM, several times slower than float32; it runs
as a float32 GEMM on float32 copies of the operands instead (float32 accumulation and one
rounding of the result, as the native GEMM does), on the GEMM float32 would take (oneDNN in
inference), so a bf16 model is never much slower than the float32 one there. The C++ FFN makes
the same choice (csrc/ffn_banded.cpp).
``ADAPERCEIVER_CPU_GEMM=mkl`` in the environment (read once at import; the C++ FFN reads it the
same way) keeps every projection on ``F.linear``. The two libraries agree to float32 rounding
(they sum in different orders); a given input and library always give the same output.
In bfloat16 on CPUs with AMX-BF16, a GEMM of at most 256 rows (a batch of one at t = 256, a
mixed batch's deeper layers) runs on the extension's tile GEMM instead (``tile_linear_why_not``;
csrc/cpu/tile_linear.cpp), which reads the weight as it is where oneDNN reorders it on every
call: a row's result then depends on whether its batch has more than 256 rows (another
summation order, within the same accuracy), never on what ran before. In float16 on CPUs with
AMX-BF16 but no AMX-FP16 (where oneDNN's float16 GEMM runs at float32 speed) every projection
runs on that tile GEMM, each float16 value split exactly into two bfloat16 (csrc/cpu/
tile_linear.cpp says how); the outputs of a row of x or of the weight with inf or NaN in it
run on oneDNN.
Under CPU autocast (bfloat16 / float16 with native GEMMs, no gradient recorded) a projection
casts its operands as autocast would (weight, bias and a float32 x to the autocast dtype;
float32 -> bfloat16 through the extension's parallel conversion, bit for bit Tensor.to's) and
takes the same oneDNN path as the model cast to that dtype, so autocast and ``model.to(dtype)``
give the same projections. Nothing is cached: every call casts the weight it is given (a memo
of casts could not be kept fresh: an in-place edit through ``.data`` bumps no version counter).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["linear", "cpu_gemm_library", "native_low_precision", "row_chunks", "row_block",
           "tile_linear_why_not", "to_dtype"]

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


# GEMMs oneDNN's AMX matmul runs on ONE of 2 threads: the extension states the rule
# (gemm_row_chunks in csrc/cpu/onednn.h says why and where; the C++ FFN's backward applies it).
# Such a product, and on AMX a projection whose rows keep the next op's rows in each core's
# cache (gemm_thread_rows, the same header), runs here as one block of rows per thread, one
# oneDNN GEMM each (row_block; csrc/cpu/gemm_lowp.cpp). Without the extension one GEMM runs.
def row_chunks(rows: int, outputs: int, dtype: torch.dtype) -> int:
    """How many consecutive row blocks the C++ FFN's backward runs a CPU GEMM of ``rows`` x
    ``outputs`` in ``dtype`` as (1: one GEMM, also without the extension)."""
    op = _extension_op("gemm_row_chunks")
    return 1 if op is None or dtype != torch.bfloat16 else op(rows, outputs, dtype)


def row_block(rows: int, outputs: int, dtype: torch.dtype) -> int:
    """Rows per block (a multiple of 32, about half of them) of the per-thread row blocks
    ``ops.linear`` runs a CPU GEMM of ``rows`` x ``outputs`` in ``dtype`` as, one oneDNN GEMM
    per thread; 0: one GEMM (also when the extension is not loaded)."""
    op = _extension_op("gemm_thread_rows")
    if op is None or _row_blocks_op() is None or dtype != torch.bfloat16:
        return 0
    return op(rows, outputs, dtype)


@functools.lru_cache(maxsize=None)
def _extension_op(name: str):
    """torch.ops.adaperceiver.<name> of the compiled extension, None without it (a fact of the
    install, so the memo cannot go stale)."""
    from .. import _ext
    if not _ext.available():
        return None
    return getattr(torch.ops.adaperceiver, name, None)


def _row_blocks_op():
    return _extension_op("linear_row_blocks")


def to_dtype(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t.to(dtype)`` (None stays None), bit for bit; float32 -> bfloat16 on the CPU, when no
    gradient is recorded, through the extension's parallel conversion (csrc/cpu/gemm_lowp.cpp),
    which autocast makes of every float32 weight on every call."""
    if t is None or t.dtype == dtype:
        return t
    op = _extension_op("to_bfloat16")
    if (op is not None and dtype == torch.bfloat16 and t.dtype == torch.float32
            and t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and t.requires_grad)):
        return op(t)
    return t.to(dtype)


def _autocast_dtype(x: torch.Tensor, weight: torch.Tensor,
                    bias: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype CPU autocast runs this projection in when ops.linear does the casts itself
    (see above), else None (F.linear under autocast, which casts on its own)."""
    if (_LIBRARY != "onednn" or x.device.type != "cpu" or weight.device.type != "cpu"
            or torch.compiler.is_compiling() or not torch.is_autocast_enabled("cpu")):
        return None
    dtype = torch.get_autocast_dtype("cpu")
    if dtype not in (torch.bfloat16, torch.float16) or not native_low_precision(dtype):
        return None
    ts = (x, weight) if bias is None else (x, weight, bias)
    if any(t.dtype not in (torch.float32, dtype) or t.device.type != "cpu" for t in ts):
        return None   # float64 and the like: autocast's own rules
    if x.dim() < 2 or not weight.is_contiguous():
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return None   # the oneDNN op has no autograd formula
    return dtype


def tile_linear_why_not(rows: int, dtype: torch.dtype) -> str:
    """Why a CPU GEMM of ``rows`` rows in ``dtype`` does not run on the extension's AMX tile
    GEMM (csrc/cpu/tile_linear.cpp: bfloat16 at 1..256 rows, or float16 as bfloat16 pairs at
    any row count on a CPU without AMX-FP16; a CPU with AMX-BF16), which reads the weight as it
    is where oneDNN reorders it on every call; "" when it does."""
    op = _extension_op("tile_linear_why_not")
    return "the extension is not loaded" if op is None else op(rows, dtype)


def _cpu_gemm(x: torch.Tensor, weight: torch.Tensor,
              bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The extension's tile GEMM where tile_linear_why_not says nothing (bf16 at few rows, fp16
    as bf16 pairs, on AMX), else oneDNN's GEMM (bias fused): one call, or one block of rows per
    thread in parallel (row_block). x, weight and bias share a dtype (_onednn_takes, or
    autocast's casts)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if not tile_linear_why_not(rows, x.dtype):
        return _extension_op("tile_linear")(x, weight, bias)
    block = row_block(rows, weight.shape[0], x.dtype)
    if block:
        return _row_blocks_op()(x, weight, bias, block)
    return _onednn_linear(x, weight, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; CPU inference runs through oneDNN (float32, and bf16 /
    fp16 where the CPU has native GEMMs for them, autocast included), bf16 / fp16 without
    native GEMMs as float32 (see above)."""
    if _onednn_takes(x, weight, bias):
        return _cpu_gemm(x, weight, bias)
    dtype = _autocast_dtype(x, weight, bias)
    if dtype is not None:
        return _cpu_gemm(*(to_dtype(t, dtype) for t in (x, weight, bias)))
    if _float32_takes(x, weight):   # the float32 GEMM on oneDNN where float32 takes it
        return linear(x.float(), weight.float(),
                      None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


# FlopCounterMode (and so count_flops' cross-check) sees the oneDNN op as what it is: a GEMM
from torch.utils.flop_counter import flop_registry, register_flop_formula  # noqa: E402


def _gemm_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


def _register_flops(op) -> None:
    """The GEMM formula for op (the registry is keyed by overload: a formula torch may one day
    ship itself is left in place)."""
    if op is not None and op.default not in flop_registry:
        register_flop_formula(op)(_gemm_flops)


# oneDNN's op, the row-block op (it calls oneDNN from C++, where the counter cannot see) and
# the tile GEMM
_register_flops(getattr(torch.ops.mkldnn, "_linear_pointwise", None))
_register_flops(_row_blocks_op())
_register_flops(_extension_op("tile_linear"))
