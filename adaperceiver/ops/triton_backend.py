"""The Triton backend: adaperceiver.kernels (attention.py, matryoshka.py) behind the dispatcher.

Each op's kernel module is imported when that op first asks, so that one failing to import
(no Triton, say) leaves the other usable and is reported as a reason, not an exception.
"""
from __future__ import annotations

import importlib
import os


def _module(name: str):
    try:
        return importlib.import_module(f"adaperceiver.kernels.{name}")
    except Exception as e:  # noqa: BLE001 - reported by why_not_*
        return f"adaperceiver.kernels.{name} could not be imported: {type(e).__name__}: {e}"


def _device_reasons(t) -> list[str]:
    if t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return []
    return [f"tensors are on {t.device.type}; Triton needs CUDA tensors or TRITON_INTERPRET=1"]


def _why_not(name: str, t, args) -> list[str]:
    mod = _module(name)
    if isinstance(mod, str):
        return [mod]
    return _device_reasons(t) + list(mod.why_not(*args))


def why_not_attention(q, k, v, token_grans, seq_lens, q_rope, k_rope) -> list[str]:
    return _why_not("attention", q, (q, k, v, token_grans, seq_lens, q_rope, k_rope))


def why_not_attention_varlen(q, k, v, seq_lens, token_grans, q_rope, k_rope) -> list[str]:
    mod = _module("attention")
    if isinstance(mod, str):
        return [mod]
    return _device_reasons(q) + list(mod.why_not_varlen(q, k, v, seq_lens, token_grans, q_rope,
                                                         k_rope))


def why_not_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden) -> list[str]:
    return _why_not("matryoshka", x, (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden))


def attention_forward(*args):
    return _module("attention").attention_forward(*args)


def attention_backward(*args):
    return _module("attention").attention_backward(*args)


def attention_varlen_forward(*args):
    return _module("attention").attention_varlen_forward(*args)


def ffn_forward(*args):
    return _module("matryoshka").ffn_forward(*args)


def ffn_backward(*args):
    return _module("matryoshka").ffn_backward(*args)
