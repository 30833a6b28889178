"""The C++ CPU backend: ``torch.ops.adaperceiver.*_fwd / *_bwd`` of ``adaperceiver._C`` on CPU
tensors (csrc/cpu). Importing this module never raises; when the extension is missing,
``why_not_*`` say why."""
from __future__ import annotations

import torch

from .. import _ext
from .extension import (attention_backward, attention_forward,  # noqa: F401 - the op calls
                        attention_varlen_forward, ffn_backward, ffn_forward, rope_reasons,
                        tensor_reasons)

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _ext_reasons() -> list[str]:
    err = _ext.load_error()
    return [f"C++ extension adaperceiver._C failed to load: {err}"] if err else []


def _tensor_reasons(name: str, t: torch.Tensor, dtypes=_DTYPES) -> list[str]:
    return tensor_reasons(name, t, "cpp", "cpu", dtypes)


def why_not_attention(inp) -> list[str]:
    return _ext_reasons() + _tensor_reasons("q", inp.q) + rope_reasons("cpp", inp)


why_not_attention_varlen = why_not_attention   # the packed kernel takes what the padded one does


def why_not_ffn(inp) -> list[str]:
    return _ext_reasons() + _tensor_reasons("x", inp.x)
