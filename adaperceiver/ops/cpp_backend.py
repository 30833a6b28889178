"""The C++ CPU backend: ``torch.ops.adaperceiver.*_fwd / *_bwd`` of ``adaperceiver._C`` on CPU
tensors (csrc/cpu). Importing this module never raises; when the extension is missing,
``why_not_*`` say why."""
from __future__ import annotations

import math

import torch

from .. import _ext

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _ext_reasons() -> list[str]:
    err = _ext.load_error()
    return [f"C++ extension adaperceiver._C failed to load: {err}"] if err else []


def tensor_reasons(name: str, t: torch.Tensor, backend: str = "cpp", device: str = "cpu",
                   dtypes=_DTYPES) -> list[str]:
    """Why ``backend`` (running ``device`` tensors of ``dtypes``) cannot take tensor ``t``."""
    out = []
    if t.device.type != device:
        out.append(f"{name} is on {t.device}; the {backend} backend runs {device.upper()} "
                   "tensors only")
    if t.dtype not in dtypes:
        out.append(f"{name}.dtype={t.dtype} is not supported by the {backend} backend; "
                   f"supported: {', '.join(str(d).replace('torch.', '') for d in dtypes)}")
    return out


_tensor_reasons = tensor_reasons


def why_not_attention(q, k, v, token_grans, seq_lens, q_rope, k_rope) -> list[str]:
    reasons = _ext_reasons()
    reasons += _tensor_reasons("q", q)
    for name, rope in (("q_rope", q_rope), ("k_rope", k_rope)):
        if rope is not None and any(r.dtype != torch.float32 for r in rope):
            reasons.append(f"{name} tables must be float32 for the cpp backend, got "
                           f"{[r.dtype for r in rope]}")
    return reasons


def why_not_attention_varlen(q, k, v, seq_lens, token_grans, q_rope, k_rope) -> list[str]:
    reasons = _ext_reasons()
    reasons += _tensor_reasons("q", q)
    for name, rope in (("q_rope", q_rope), ("k_rope", k_rope)):
        if rope is not None and any(r.dtype != torch.float32 for r in rope):
            reasons.append(f"{name} tables must be float32 for the cpp backend, got "
                           f"{[r.dtype for r in rope]}")
    return reasons


def why_not_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden) -> list[str]:
    return _ext_reasons() + _tensor_reasons("x", x)


def _rope(rope):
    return (None, None) if rope is None else (rope[0], rope[1])


def attention_forward(q, k, v, token_grans=None, scale=None, seq_lens=None, q_rope=None,
                      k_rope=None):
    _ext.load()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    grans = None if token_grans is None else [int(g) for g in token_grans]
    return torch.ops.adaperceiver.block_masked_attention_fwd(
        q, k, v, grans, scale, seq_lens, *_rope(q_rope), *_rope(k_rope))


def attention_backward(grad_out, q, k, v, out, lse, token_grans=None, scale=None, seq_lens=None,
                       q_rope=None, k_rope=None):
    _ext.load()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    grans = None if token_grans is None else [int(g) for g in token_grans]
    return torch.ops.adaperceiver.block_masked_attention_bwd(
        grad_out, q, k, v, out, lse, grans, scale, seq_lens, *_rope(q_rope), *_rope(k_rope))


def attention_varlen_forward(q, k, v, seq_lens, token_grans=None, scale=None, q_rope=None,
                             k_rope=None):
    _ext.load()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    grans = None if token_grans is None else [int(g) for g in token_grans]
    return torch.ops.adaperceiver.block_masked_attention_varlen_fwd(
        q, k, v, [int(n) for n in seq_lens], grans, scale, *_rope(q_rope), *_rope(k_rope))


def ffn_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden):
    _ext.load()
    return torch.ops.adaperceiver.matryoshka_ffn_fwd(x, fc1_weight, fc1_bias, fc2_weight,
                                                     fc2_bias, [int(h) for h in hidden])


def ffn_backward(grad_out, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden):
    _ext.load()
    return torch.ops.adaperceiver.matryoshka_ffn_bwd(grad_out, x, fc1_weight, fc1_bias,
                                                     fc2_weight, fc2_bias,
                                                     [int(h) for h in hidden])
