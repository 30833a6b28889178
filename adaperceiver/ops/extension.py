"""What the two backends of the compiled extension (cpp: csrc/cpu, cuda: csrc/cuda) share: the
calls into ``torch.ops.adaperceiver.*_fwd / *_bwd`` (one op schema, the custom ops' own; the
dispatcher runs the CPU or CUDA kernel by the tensors' device), the reasons a tensor cannot be
taken, and the RoPE table check. Each call takes the op's inputs object (inputs.py), checked and
with its defaults resolved; a kernel author calling one directly builds it with
``AttentionInputs.build(q, k, v, ...)`` and the like."""
from __future__ import annotations

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


def rope_reasons(backend: str, inp) -> list[str]:
    """The kernels read RoPE tables as float32."""
    return [f"{name} tables must be float32 for the {backend} backend, got "
            f"{[r.dtype for r in rope]}"
            for name, rope in (("q_rope", inp.q_rope), ("k_rope", inp.k_rope))
            if rope is not None and any(r.dtype != torch.float32 for r in rope)]


def attention_forward(inp):
    _ext.load()
    return torch.ops.adaperceiver.block_masked_attention_fwd(*inp.flat())


def attention_backward(inp, grad_out, out, lse):
    _ext.load()
    return torch.ops.adaperceiver.block_masked_attention_bwd(*inp.backward_flat(grad_out, out,
                                                                                lse))


def attention_varlen_forward(inp):
    _ext.load()
    return torch.ops.adaperceiver.block_masked_attention_varlen_fwd(*inp.flat())


def ffn_forward(inp):
    _ext.load()
    return torch.ops.adaperceiver.matryoshka_ffn_fwd(*inp.flat())


def ffn_backward(inp, grad_out):
    _ext.load()
    return torch.ops.adaperceiver.matryoshka_ffn_bwd(grad_out, *inp.flat())
