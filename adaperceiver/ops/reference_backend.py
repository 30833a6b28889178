"""The reference backend: plain PyTorch on any device and float dtype (see reference.py), run on
the op's inputs object (inputs.py)."""
from __future__ import annotations

from . import reference


def why_not_attention(inp) -> list[str]:
    return []


def why_not_ffn(inp) -> list[str]:
    return []


def attention_forward(inp):
    return reference.attention_forward(inp.q, inp.k, inp.v, inp.token_grans, inp.scale,
                                       inp.seq_lens, inp.q_rope, inp.k_rope)


def attention_backward(inp, grad_out, out, lse):
    return reference.attention_backward(grad_out, inp.q, inp.k, inp.v, out, lse,
                                        inp.token_grans, inp.scale, inp.seq_lens, inp.q_rope,
                                        inp.k_rope)


def ffn_forward(inp):
    return reference.matryoshka_ffn(*inp.flat())


def ffn_backward(inp, grad_out):
    return reference.ffn_backward(grad_out, *inp.flat())
