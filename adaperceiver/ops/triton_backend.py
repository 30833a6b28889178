"""The Triton backend: adaperceiver.kernels (attention.py, matryoshka.py) behind the dispatcher.

Each op's kernel module is imported when that op first asks, so that one failing to import
(no Triton, say) leaves the other usable and is reported as a reason, not an exception. The
kernels take flat arguments (they import nothing from adaperceiver.ops); this module passes
them the inputs object's fields. The kernel's ``why_not`` runs once per call, in ``why_not_*``:
the launches skip their own check (``check=False``).
"""
from __future__ import annotations

import importlib
import os


def _module(name: str):
    try:
        return importlib.import_module(f"adaperceiver.kernels.{name}")
    except Exception as e:  # noqa: BLE001 - reported by why_not_*
        return f"adaperceiver.kernels.{name} could not be imported: {type(e).__name__}: {e}"


def _why_not(name: str, t, check: str, *args) -> list[str]:
    mod = _module(name)
    if isinstance(mod, str):
        return [mod]
    device = ([] if t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else
              [f"tensors are on {t.device.type}; Triton needs CUDA tensors or TRITON_INTERPRET=1"])
    return device + list(getattr(mod, check)(*args))


def why_not_attention(inp) -> list[str]:
    return _why_not("attention", inp.q, "why_not", inp.q, inp.k, inp.v, inp.token_grans,
                    inp.seq_lens, inp.q_rope, inp.k_rope)


def why_not_attention_varlen(inp) -> list[str]:
    return _why_not("attention", inp.q, "why_not_varlen", inp.q, inp.k, inp.v, inp.seq_lens,
                    inp.token_grans, inp.q_rope, inp.k_rope)


def why_not_ffn(inp) -> list[str]:
    return _why_not("matryoshka", inp.x, "why_not", *inp.flat())


def attention_forward(inp):
    return _module("attention").attention_forward(
        inp.q, inp.k, inp.v, inp.token_grans, inp.scale, inp.seq_lens, inp.q_rope, inp.k_rope,
        check=False)


def attention_backward(inp, grad_out, out, lse):
    return _module("attention").attention_backward(
        grad_out, inp.q, inp.k, inp.v, out, lse, inp.token_grans, inp.scale, inp.seq_lens,
        inp.q_rope, inp.k_rope, check=False)


def attention_varlen_forward(inp):
    return _module("attention").attention_varlen_forward(
        inp.q, inp.k, inp.v, inp.seq_lens, inp.token_grans, inp.scale, inp.q_rope, inp.k_rope,
        check=False)


def ffn_forward(inp):
    return _module("matryoshka").ffn_forward(*inp.flat(), check=False)


def ffn_backward(inp, grad_out):
    return _module("matryoshka").ffn_backward(grad_out, *inp.flat(), check=False)
