"""Lazy loader of the compiled extension ``adaperceiver._C`` and its build facts.

Importing this module never fails: when ``adaperceiver._C`` is missing or cannot be loaded the
import error is kept and reported by :func:`load_error` and :func:`build_info`, and the backends
that need it say so in their ``why_not_*`` reasons. Loading ``_C`` registers the
``torch.ops.adaperceiver.*_fwd / *_bwd`` ops (C++ ``TORCH_LIBRARY``; it coexists with the Python
custom ops of the same namespace in either import order).
"""
from __future__ import annotations

import importlib
import threading
from typing import Any, Optional

__all__ = ["load", "load_error", "available", "cuda_available", "build_info"]

_lock = threading.Lock()
_module: Any = None
_error: Optional[str] = None
_tried = False


def load():
    """The ``adaperceiver._C`` module, or None when it cannot be loaded (see load_error)."""
    global _module, _error, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                import torch  # noqa: F401 - libtorch must be loaded before _C
                _module = importlib.import_module("adaperceiver._C")
            except Exception as e:  # noqa: BLE001 - kept as the reason
                _error = (f"{type(e).__name__}: {e} (build it with `pip install -e . "
                          "--no-build-isolation`)")
            _tried = True
    return _module


def load_error() -> Optional[str]:
    """Why ``adaperceiver._C`` could not be loaded, or None when it is loaded."""
    load()
    return _error


def available() -> bool:
    return load() is not None


def _facts() -> dict:
    mod = load()
    return dict(mod.build_info()) if mod is not None else {}


def cuda_available() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _facts().get("cuda") == "1"


def build_info() -> dict:
    """What was compiled into ``adaperceiver._C``, with which tools.

    Keys: ``cpp_compiled``, ``cuda_compiled`` (bools), ``cuda_archs`` (list like ["8.0", "9.0"]),
    ``nvcc_version``, ``cxx_compiler``, ``torch_version_built`` (torch the extension was compiled
    against), ``torch_version`` (running), ``openmp`` (the _OPENMP date, or None),
    ``load_error`` (None when the extension loaded), ``path`` of the loaded library; and what
    the CPU kernels run on this machine: ``cpu_isa`` ("avx512", "avx2" or "portable": the
    attention's microkernel; ``ADAPERCEIVER_CPU_ISA`` picks a lower one), ``cpu_native_bf16`` /
    ``cpu_native_fp16`` (True: that dtype's FFN GEMMs run natively through oneDNN, AVX512-BF16
    / AMX or AVX512-FP16 / AMX-FP16; False: computed in float32), ``cpu_attention_bf16`` /
    ``cpu_attention_fp16`` (the attention forward's path for that dtype: "amx", products on AMX
    tiles; "avx512-bf16", bfloat16 products on AVX512-BF16 dot products, on CPUs that have them
    but no AMX; or "float32"; ``ADAPERCEIVER_CPU_ISA=avx512`` turns both 16-bit paths off;
    where it says "amx", a small FFN batch of several widths runs as one oneDNN GEMM pair at
    its widest width, csrc/ffn_banded.cpp),
    ``cpu_attention_bwd_bf16`` / ``cpu_attention_bwd_fp16`` (the attention backward's path:
    "amx" or "avx512-bf16", its five products in the dtype, or "float32"),
    ``cpu_attention_bf16_why_not`` / ``cpu_attention_fp16_why_not`` (why that dtype's attention
    computes in float32 here, e.g. "this CPU has neither AMX-BF16 tiles nor AVX512-BF16 dot
    products"; None where it runs in the dtype),
    ``cpu_tile_linear_bf16`` ("amx": bf16 GEMMs of at most 256 rows, the projections and fc2,
    run on the extension's AMX tile GEMM with the weight read as it is; "onednn": on oneDNN's
    matmul; csrc/cpu/tile_linear.cpp),
    ``cpu_tile_linear_fp16`` ("amx-bf16-pairs": fp16 GEMMs, the projections and the FFN, run
    on the same tile GEMM as exact pairs of bf16 products, on CPUs with AMX-BF16 but no
    AMX-FP16, where oneDNN's fp16 GEMM runs at about float32 speed; "onednn": on oneDNN),
    ``cpu_isa_error`` (why an ``ADAPERCEIVER_CPU_ISA`` value was refused, else None).
    """
    import torch
    facts = _facts()
    mod = load()
    archs = [a for a in facts.get("cuda_archs", "").split(";") if a]
    return {
        "cpp_compiled": facts.get("cpp") == "1",
        "cuda_compiled": facts.get("cuda") == "1",
        "cuda_archs": archs,
        "nvcc_version": facts.get("nvcc_version") or None,
        "cxx_compiler": facts.get("cxx_compiler") or None,
        "torch_version_built": facts.get("torch_version") or None,
        "torch_version": torch.__version__,
        "openmp": facts.get("openmp") or None,
        "load_error": _error,
        "path": getattr(mod, "__file__", None),
        "cpu_isa": facts.get("cpu_isa") or None,
        "cpu_native_bf16": facts.get("cpu_native_bf16") == "1",
        "cpu_native_fp16": facts.get("cpu_native_fp16") == "1",
        "cpu_attention_bf16": facts.get("cpu_attention_bf16") or None,
        "cpu_attention_fp16": facts.get("cpu_attention_fp16") or None,
        "cpu_attention_bwd_bf16": facts.get("cpu_attention_bwd_bf16") or None,
        "cpu_attention_bwd_fp16": facts.get("cpu_attention_bwd_fp16") or None,
        "cpu_attention_bf16_why_not": facts.get("cpu_attention_bf16_why_not") or None,
        "cpu_attention_fp16_why_not": facts.get("cpu_attention_fp16_why_not") or None,
        "cpu_tile_linear_bf16": facts.get("cpu_tile_linear_bf16") or None,
        "cpu_tile_linear_fp16": facts.get("cpu_tile_linear_fp16") or None,
        "cpu_isa_error": facts.get("cpu_isa_error") or None,
    }
