"""What the two backends of the compiled extension (cpp: csrc/cpu, cuda: csrc/cuda) share: the
calls into ``torch.ops.adaperceiver.*_fwd / *_bwd`` (one op schema; the dispatcher runs the CPU
or CUDA kernel by the tensors' device), the reasons a tensor cannot be taken, and the RoPE
table check. The op layer resolves scale, grans and lengths before it calls these; called directly (tests,
kernel authors), they take the op's defaults (no mask, scale 1/sqrt(head_dim))."""
from __future__ import annotations

import math

import torch

from .. import _ext

__all__ = ["tensor_reasons", "rope_reasons", "attention_forward", "attention_backward",
           "attention_varlen_forward", "ffn_forward", "ffn_backward"]


def tensor_reasons(name: str, t: torch.Tensor, backend: str, device: str, dtypes) -> list[str]:
    """Why ``backend`` (running ``device`` tensors of ``dtypes``) cannot take tensor ``t``."""
    out = []
    if t.device.type != device:
        out.append(f"{name} is on {t.device}; the {backend} backend runs {device.upper()} "
                   "tensors only")
    if t.dtype not in dtypes:
        out.append(f"{name}.dtype={t.dtype} is not supported by the {backend} backend; "
                   f"supported: {', '.join(str(d).replace('torch.', '') for d in dtypes)}")
    return out


def rope_reasons(backend: str, q_rope, k_rope) -> list[str]:
    """The kernels read RoPE tables as float32."""
    return [f"{name} tables must be float32 for the {backend} backend, got "
            f"{[r.dtype for r in rope]}"
            for name, rope in (("q_rope", q_rope), ("k_rope", k_rope))
            if rope is not None and any(r.dtype != torch.float32 for r in rope)]


def _rope(rope):
    return (None, None) if rope is None else (rope[0], rope[1])


def _grans(token_grans):
    return None if token_grans is None else [int(g) for g in token_grans]


def _scale(scale, q) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def attention_forward(q, k, v, token_grans=None, scale=None, seq_lens=None, q_rope=None,
                      k_rope=None):
    _ext.load()
    return torch.ops.adaperceiver.block_masked_attention_fwd(
        q, k, v, _grans(token_grans), _scale(scale, q), seq_lens, *_rope(q_rope),
        *_rope(k_rope))


def attention_backward(grad_out, q, k, v, out, lse, token_grans=None, scale=None, seq_lens=None,
                       q_rope=None, k_rope=None):
    _ext.load()
    return torch.ops.adaperceiver.block_masked_attention_bwd(
        grad_out, q, k, v, out, lse, _grans(token_grans), _scale(scale, q), seq_lens,
        *_rope(q_rope), *_rope(k_rope))


def attention_varlen_forward(q, k, v, seq_lens, token_grans=None, scale=None, q_rope=None,
                             k_rope=None):
    _ext.load()
    return torch.ops.adaperceiver.block_masked_attention_varlen_fwd(
        q, k, v, [int(n) for n in seq_lens], _grans(token_grans), _scale(scale, q),
        *_rope(q_rope), *_rope(k_rope))


def ffn_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden):
    _ext.load()
    return torch.ops.adaperceiver.matryoshka_ffn_fwd(x, fc1_weight, fc1_bias, fc2_weight,
                                                     fc2_bias, [int(h) for h in hidden])


def ffn_backward(grad_out, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden):
    _ext.load()
    return torch.ops.adaperceiver.matryoshka_ffn_bwd(grad_out, x, fc1_weight, fc1_bias,
                                                     fc2_weight, fc2_bias,
                                                     [int(h) for h in hidden])
