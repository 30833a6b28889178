"""The CUDA backend: ``torch.ops.adaperceiver.*_fwd / *_bwd`` of ``adaperceiver._C`` on CUDA
tensors (csrc/cuda: flash-style attention forward, on padded or packed rows, and backward;
grouped Matryoshka FFN forward; the FFN backward is the width-banded ATen path of
csrc/ffn_banded.cpp, on cuBLAS). Importing this module never raises; when the extension or its
CUDA part is missing, ``why_not_*`` say why."""
from __future__ import annotations

import torch

from .. import _ext
from . import cpp_backend as _common

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HEAD_DIMS = (32, 64, 128)


def _ext_reasons() -> list[str]:
    err = _ext.load_error()
    if err:
        return [f"C++/CUDA extension adaperceiver._C failed to load: {err}"]
    if not _ext.cuda_available():
        return ["adaperceiver._C was compiled without its CUDA part (build with CUDA_HOME set "
                "and ADAPERCEIVER_BUILD_CUDA=1)"]
    return []


def _tensor_reasons(name: str, t: torch.Tensor) -> list[str]:
    return _common.tensor_reasons(name, t, "cuda", "cuda", _DTYPES)


def why_not_attention(q, k, v, token_grans, seq_lens, q_rope, k_rope) -> list[str]:
    reasons = _ext_reasons() + _tensor_reasons("q", q)
    if q.shape[-1] not in _HEAD_DIMS:
        reasons.append(f"head_dim={q.shape[-1]} is not supported by the cuda backend; "
                       f"supported: {', '.join(map(str, _HEAD_DIMS))}")
    if v.shape[-1] != q.shape[-1]:
        reasons.append(f"the cuda backend needs v's head_dim ({v.shape[-1]}) equal to q's "
                       f"({q.shape[-1]})")
    for name, rope in (("q_rope", q_rope), ("k_rope", k_rope)):
        if rope is not None and any(r.dtype != torch.float32 for r in rope):
            reasons.append(f"{name} tables must be float32 for the cuda backend")
    return reasons


def why_not_attention_varlen(q, k, v, seq_lens, token_grans, q_rope, k_rope) -> list[str]:
    return why_not_attention(q, k, v, token_grans, None, q_rope, k_rope)


def why_not_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden) -> list[str]:
    return _ext_reasons() + _tensor_reasons("x", x)


# the op calls are the same as the cpp backend's: the dispatcher picks the CUDA kernels by device
attention_forward = _common.attention_forward
attention_backward = _common.attention_backward
attention_varlen_forward = _common.attention_varlen_forward
ffn_forward = _common.ffn_forward
ffn_backward = _common.ffn_backward
