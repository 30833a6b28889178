"""The Triton backend: adaperceiver.kernels (attention.py, matryoshka.py) behind the dispatcher."""
from __future__ import annotations

import os

from adaperceiver.kernels import attention as _attn
from adaperceiver.kernels import matryoshka as _ffn

attention_forward = _attn.attention_forward
attention_backward = _attn.attention_backward
ffn_forward = _ffn.ffn_forward
ffn_backward = _ffn.ffn_backward


def _device_reasons(t) -> list[str]:
    if t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return []
    return [f"tensors are on {t.device.type}; Triton needs CUDA tensors or TRITON_INTERPRET=1"]


def why_not_attention(q, k, v, token_grans, seq_lens, q_rope, k_rope) -> list[str]:
    return _device_reasons(q) + list(_attn.why_not(q, k, v, token_grans, seq_lens, q_rope,
                                                   k_rope))


def why_not_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden) -> list[str]:
    return _device_reasons(x) + list(_ffn.why_not(x, fc1_weight, fc1_bias, fc2_weight,
                                                  fc2_bias, hidden))
