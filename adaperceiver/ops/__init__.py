"""The two ops of AdaPerceiver and the means to choose their backend.

``block_masked_attention`` / ``block_masked_attention_varlen`` (attention.py) and
``matryoshka_ffn`` (ffn.py) are torch.library custom ops with fake implementations and
autograd; ``linear`` (linear.py) runs the model's projections; norm.py the block's residuals
with LayerScale and its LayerNorms; inputs.py holds one call's inputs, validated once at the
public entry; dispatch.py picks a backend per call
(``use_backend`` forces one); schedule.py re-exports the mask's tile schedule
(adaperceiver.kernels.schedule) that every backend and test reads; reference.py is the
plain-PyTorch truth.
"""
from __future__ import annotations

from .attention import block_masked_attention, block_masked_attention_varlen
from .dispatch import NoBackendError, available_backends, forced_backend, use_backend
from .ffn import matryoshka_ffn
from .linear import cpu_gemm_library, linear
from .norm import layer_norm, layer_scale_residual, matmul_input_dtype, residual_layer_norm
from .schedule import block_mask, tile_schedule

# schedule internals, importable as before (benchmarks read row_end) but not public API
from .schedule import group_ends, row_end  # noqa: E402,F401

__all__ = ["block_masked_attention", "block_masked_attention_varlen", "matryoshka_ffn",
           "use_backend", "forced_backend", "available_backends", "NoBackendError", "block_mask",
           "tile_schedule", "linear", "cpu_gemm_library", "layer_norm", "layer_scale_residual",
           "residual_layer_norm", "matmul_input_dtype"]
