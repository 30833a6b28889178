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


def why_not_attention(q, k, v, token_grans, seq_lens, q_rope, k_rope) -> list[str]:
    return _ext_reasons() + _tensor_reasons("q", q) + rope_reasons("cpp", q_rope, k_rope)


def why_not_attention_varlen(q, k, v, seq_lens, token_grans, q_rope, k_rope) -> list[str]:
    reasons = _ext_reasons()
    reasons += _tensor_reasons("q", q)
    return reasons + rope_reasons("cpp", q_rope, k_rope)


def why_not_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden) -> list[str]:
    return _ext_reasons() + _tensor_reasons("x", x)
