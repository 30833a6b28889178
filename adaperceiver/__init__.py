"""adaperceiver: fast, exact AdaPerceiver (arXiv 2511.18105) with custom kernels.

    model = adaperceiver.create_model("adaperceiver_v1_in1k")          # or from_pretrained(dir)
    logits = model(images, num_tokens=128, mat_dim=624, depth=14).logits
"""
from __future__ import annotations

from .checkpoint import from_pretrained, save_pretrained
from .config import AdaPerceiverConfig
from .flops import FlopCount, count_flops
from .hub import ClassificationAdaPerceiver, DistillAdaPerceiver
from .model import AdaPerceiverClassifier, AdaPerceiverDistill, AdaPerceiverOutput
from .ops import use_backend
from .registry import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "from_pretrained", "save_pretrained", "count_flops",
           "FlopCount", "use_backend", "build_info", "AdaPerceiverClassifier", "AdaPerceiverDistill",
           "AdaPerceiverConfig", "AdaPerceiverOutput", "ClassificationAdaPerceiver",
           "DistillAdaPerceiver"]


def build_info() -> dict:
    """What the compiled extension holds (C++/CUDA, archs, compiler versions), or why it is
    not there."""
    try:
        from ._ext import build_info as _build_info
    except ImportError as e:
        return {"cpp_compiled": False, "cuda_compiled": False,
                "load_error": f"adaperceiver._ext missing: {e}"}
    return _build_info()
