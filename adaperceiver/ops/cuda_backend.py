"""The CUDA backend: ``torch.ops.adaperceiver.*_fwd / *_bwd`` of ``adaperceiver._C`` on CUDA
tensors (csrc/cuda: attention forward and backward with D / 32 lanes per query row and scalar
loops over its keys, K's RoPE applied by a pre-pass once per key row, on padded or packed rows;
grouped Matryoshka FFN forward; the FFN backward is the width-banded ATen path of
csrc/ffn_banded.cpp, on cuBLAS, with its sample order on the device). Importing this module
never raises; when the extension or its CUDA part is missing, ``why_not_*`` say why."""
from __future__ import annotations

import torch

from .. import _ext
from .extension import (attention_backward, attention_forward,  # noqa: F401 - the op calls
                        attention_varlen_forward, ffn_backward, ffn_forward, rope_reasons,
                        tensor_reasons)

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
    return tensor_reasons(name, t, "cuda", "cuda", _DTYPES)


def why_not_attention(inp) -> list[str]:
    q, v = inp.q, inp.v
    reasons = _ext_reasons() + _tensor_reasons("q", q)
    if q.shape[-1] not in _HEAD_DIMS:
        reasons.append(f"head_dim={q.shape[-1]} is not supported by the cuda backend; "
                       f"supported: {', '.join(map(str, _HEAD_DIMS))}")
    if v.shape[-1] != q.shape[-1]:
        reasons.append(f"the cuda backend needs v's head_dim ({v.shape[-1]}) equal to q's "
                       f"({q.shape[-1]})")
    return reasons + rope_reasons("cuda", inp)


why_not_attention_varlen = why_not_attention   # the packed kernel takes what the padded one does


def why_not_ffn(inp) -> list[str]:
    return _ext_reasons() + _tensor_reasons("x", inp.x)
