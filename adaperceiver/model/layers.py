"""Layers of AdaPerceiver, small and composable; all attention and block FFN work goes through
``adaperceiver.ops`` (which picks the backend). Parameter names follow the released checkpoint."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.linear import native_low_precision

__all__ = ["LayerScale", "Mlp", "MatryoshkaMlp", "Attention", "CrossAttentionHead", "Block",
           "PatchEmbed", "LearnedToken", "OutputAdapter", "PatchQueries", "FeatureAdapter",
           "resample_pos_embed"]


def _norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma

    def residual(self, x, branch):
        """x + gamma * branch in one pass (no intermediate for the scaled branch)."""
        return torch.addcmul(x, branch, self.gamma)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (full width)."""

    def __init__(self, dim: int, hidden: int, out_dim: Optional[int] = None, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)

    def forward(self, x):
        act = F.gelu(ops.linear(x, self.fc1.weight, self.fc1.bias))
        return ops.linear(act, self.fc2.weight, self.fc2.bias)


class MatryoshkaMlp(Mlp):
    """The block FFN: per-sample hidden widths through ``ops.matryoshka_ffn``."""

    def forward(self, x, hidden: Sequence[int]):
        return ops.matryoshka_ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                  self.fc2.bias, list(hidden))


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v projections (the released keys) and an output
    projection; the score work runs in ``ops.block_masked_attention`` (on packed rows of samples
    of their own lengths, ``ops.block_masked_attention_varlen``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _project(self, x: torch.Tensor, names: str) -> list[torch.Tensor]:
        """The projections ``names`` (a subset of "qkv") of x, one GEMM each on the layers' own
        weights. No concatenated weight is kept between calls: any such copy could go stale
        (an in-place edit through ``.data`` bumps no version counter) and the separate GEMMs
        are as large as the model's other projections."""
        return [ops.linear(x, lin.weight, lin.bias) for lin in (getattr(self, n) for n in names)]

    def _heads(self, t):
        B, N, _ = t.shape
        return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(self, q, k, v, token_grans, q_rope, k_rope, seq_lens):
        """(B, Nq, C), (B, Nk, C) x2 -> attention output (B, Nq, C) before the projection."""
        o = ops.block_masked_attention(self._heads(q), self._heads(k), self._heads(v),
                                       token_grans, seq_lens=seq_lens, q_rope=q_rope,
                                       k_rope=k_rope, heads_last=True)
        return o.flatten(2)

    def forward(self, x_q, x_kv, token_grans=None, q_rope=None, k_rope=None, seq_lens=None):
        k, v = self._project(x_kv, "kv")
        o = self._attend(ops.linear(x_q, self.q.weight, self.q.bias), k, v, token_grans, q_rope,
                         k_rope, seq_lens)
        return ops.linear(o, self.proj.weight, self.proj.bias)

    def self_attention(self, x: torch.Tensor, layout, token_grans=None, rope=None):
        """Self-attention of packed rows x (R, C) laid out by ``layout``. Samples of one length:
        the rows are the (B, N, C) batch (a view). Samples of their own lengths: attention runs
        on the packed rows (``block_masked_attention_varlen``), with no padded copy of q, k, v
        or the output."""
        q, k, v = self._project(x, "qkv")
        if not layout.ragged:
            B, N = layout.batch, layout.max_len
            o = self._attend(*(t.view(B, N, -1) for t in (q, k, v)), token_grans, rope, rope,
                             None)
            return ops.linear(o.reshape(x.shape), self.proj.weight, self.proj.bias)
        R, H, D = x.shape[0], self.num_heads, self.head_dim
        o = ops.block_masked_attention_varlen(*(t.view(R, H, D) for t in (q, k, v)),
                                              layout.tokens, token_grans, q_rope=rope,
                                              k_rope=rope)
        return ops.linear(o.view(R, -1), self.proj.weight, self.proj.bias)


class CrossAttentionHead(nn.Module):
    """Read / write: ``sink + CrossAttn(snk_norm(sink), src_norm(source))`` (no LayerScale, no
    FFN). RoPE goes on q for the read and on k for the write (docs/design.md, "RoPE")."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        self.src_norm = _norm(dim)
        self.snk_norm = _norm(dim)
        self.cattn = Attention(dim, num_heads, qkv_bias, proj_bias)

    def forward(self, sink, source, q_rope=None, k_rope=None, seq_lens=None):
        return sink + self.cattn(self.snk_norm(sink), self.src_norm(source), None, q_rope, k_rope,
                                 seq_lens)


class Block(nn.Module):
    """Pre-norm block: self-attention with RoPE and the block mask, then the Matryoshka FFN,
    each branch scaled by a LayerScale."""

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, qkv_bias=True, proj_bias=True,
                 ls_init_values=1e-6):
        super().__init__()
        self.norm1 = _norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias)
        self.ls1 = LayerScale(dim, ls_init_values)
        self.norm2 = _norm(dim)
        self.ffn = MatryoshkaMlp(dim, ffn_hidden)
        self.ls2 = LayerScale(dim, ls_init_values)

    def forward(self, x, layout, token_grans=None, rope=None):
        """x: packed latent rows (R, C) laid out by ``layout`` (model/ragged.py)."""
        x = self.ls1.residual(x, self.attn.self_attention(self.norm1(x), layout, token_grans,
                                                          rope))
        h, hidden = layout.ffn_input(self.norm2(x))
        return self.ls2.residual(x, self.ffn(h, hidden).reshape(x.shape))


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, P, C) absolute position embedding trained on a square grid, resampled bicubic with
    antialias to ``grid`` (as timm's ``resample_abs_pos_embed``, no prefix tokens)."""
    _, P, C = pos_embed.shape
    side = int(round(P ** 0.5))
    if (side, side) == tuple(grid):
        return pos_embed
    if side * side != P:
        raise ValueError(f"pos_embed has {P} positions, not a square grid")
    dtype = pos_embed.dtype
    pe = pos_embed.float().reshape(1, side, side, C).permute(0, 3, 1, 2)
    pe = F.interpolate(pe, size=grid, mode="bicubic", antialias=True, align_corners=False)
    return pe.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], C).to(dtype)


class _Conv(nn.Module):
    """Patchify convolution. bf16 / fp16 on a CPU without native GEMMs for the dtype: torch
    would take its slow reference convolution (oneDNN's low-precision convolution needs the
    dtype's hardware), many times slower than float32; it runs as a float32 convolution on
    float32 copies rounded once, as ``ops.linear`` does for the projections."""

    def __init__(self, in_channels, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        w, b = self.proj.weight, self.proj.bias
        if (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
                and w.dtype == x.dtype and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled("cpu") and not native_low_precision(x.dtype)):
            y = F.conv2d(x.float(), w.float(), None if b is None else b.float(),
                         stride=self.proj.stride).to(x.dtype)
        else:
            y = self.proj(x)
        return y.flatten(2).transpose(1, 2)


class PatchEmbed(nn.Module):
    """Conv patchify -> + absolute position embedding -> LayerNorm -> full-width Mlp (no
    residual); with use_embed_ffn=False neither the norm nor the Mlp (as the authors' adapter)."""

    def __init__(self, img_size, patch_size, in_channels, dim, ffn_hidden, use_ffn=True):
        super().__init__()
        self.embed = _Conv(in_channels, dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2, dim))
        # the authors' adapter has the norm only together with the FFN (use_embed_ffn)
        self.norm = _norm(dim) if use_ffn else nn.Identity()
        self.ffn = Mlp(dim, ffn_hidden) if use_ffn else nn.Identity()

    def forward(self, x, grid):
        x = self.embed(x) + resample_pos_embed(self.pos_embed, grid)
        return self.ffn(self.norm(x))


class LearnedToken(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(*shape))


class OutputAdapter(nn.Module):
    def __init__(self, dim, num_classes):
        super().__init__()
        self.ffn = nn.Linear(dim, num_classes)

    def forward(self, x):
        return ops.linear(x, self.ffn.weight, self.ffn.bias)


class PatchQueries(nn.Module):
    """Distilled backbone: one write query per patch, ``proj(patches)`` (``output_latents_feat``)."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, patches):
        return ops.linear(patches, self.proj.weight, self.proj.bias)


class FeatureAdapter(nn.Module):
    """Distilled backbone: LayerNorm -> Mlp(C -> hidden -> output_feat_dim)
    (``output_adapter_feat``), the per-patch features matched to the teacher's."""

    def __init__(self, dim, hidden, out_dim):
        super().__init__()
        self.norm = _norm(dim)
        self.ffn = Mlp(dim, hidden, out_dim)

    def forward(self, x):
        return self.ffn(self.norm(x))
