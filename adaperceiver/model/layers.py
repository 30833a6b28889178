"""Layers of AdaPerceiver, small and composable; all attention and block FFN work goes through
``adaperceiver.ops`` (which picks the backend). Parameter names follow the released checkpoint."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

__all__ = ["LayerNorm", "LayerScale", "Mlp", "MatryoshkaMlp", "Attention", "CrossAttentionHead", "Block",
           "PatchEmbed", "LearnedToken", "OutputAdapter", "PatchQueries", "FeatureAdapter",
           "resample_pos_embed"]


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dimension (same parameters and checkpoint names) through
    ``ops.layer_norm``: the extension's row kernel on the CPU when no gradient is recorded.
    ``out_dtype``: the result cast to it (a norm whose result only feeds matmuls passes
    ``ops.matmul_input_dtype(x)``: under autocast it is written once in the dtype the matmuls
    cast it to; ops/norm.py)."""

    def forward(self, x, out_dtype: Optional[torch.dtype] = None):
        if len(self.normalized_shape) != 1:   # ops.layer_norm normalizes the last dimension
            y = super().forward(x)
            return y if out_dtype is None else y.to(out_dtype)
        return ops.layer_norm(x, self.weight, self.bias, self.eps, out_dtype)


def _norm(dim: int) -> LayerNorm:
    return LayerNorm(dim, eps=1e-6)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-6):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma

    def residual(self, x, branch):
        """x + gamma * branch in one pass (no intermediate for the scaled branch)."""
        return ops.layer_scale_residual(x, branch, self.gamma)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2 (full width). On (B, N, C) input, with biases and C outputs (the
    patch embedding's), it is ``ops.matryoshka_ffn`` at full width, the block FFN's op (one
    call: its kernels take the GELU in fc1's epilogue, on the float32 sum before any rounding);
    otherwise (the distilled backbone's feature adapter, C -> F) two ``ops.linear``."""

    def __init__(self, dim: int, hidden: int, out_dim: Optional[int] = None, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out_dim or dim, bias=bias)

    def forward(self, x):
        if (x.dim() == 3 and self.fc2.out_features == self.fc1.in_features
                and self.fc1.bias is not None and self.fc2.bias is not None):
            return ops.matryoshka_ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                      self.fc2.bias, self.fc1.out_features)
        act = F.gelu(ops.linear(x, self.fc1.weight, self.fc1.bias))
        return ops.linear(act, self.fc2.weight, self.fc2.bias)


class MatryoshkaMlp(Mlp):
    """The block FFN: per-sample hidden widths through ``ops.matryoshka_ffn``."""

    def forward(self, x, hidden: Sequence[int]):
        return ops.matryoshka_ffn(x, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                                  self.fc2.bias, list(hidden))


class Attention(nn.Module):
    """Multi-head attention: q, k and v projected by one ``qkv`` Linear (3C x C, rows q | k | v,
    as timm's ViT) and an output projection; the score work runs in
    ``ops.block_masked_attention`` (on packed rows of samples of their own lengths,
    ``ops.block_masked_attention_varlen``).

    Why one Linear: self-attention projects q, k and v with one GEMM of 3C outputs, which runs
    at up to 1.4x the rate of three GEMMs of C outputs (benchmarks/README.md, "GEMMs in
    bf16"), with no concatenated copy of the weights kept between calls (a copy goes stale: an
    in-place edit through ``.data`` bumps no version counter). Cross-attention takes the
    contiguous row slices: q from the sink, k and v from the source.
    The state dict keeps the released names: ``state_dict()`` writes ``q.weight``, ``k.weight``,
    ``v.weight`` (and biases) as row views of ``qkv``, and ``load_state_dict`` reads them into
    ``qkv`` (a checkpoint with ``qkv.*`` itself loads too)."""

    _PARTS = ("q", "k", "v")

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dim = dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.register_state_dict_post_hook(_qkv_state_dict_as_released)
        self.register_load_state_dict_pre_hook(_qkv_load_released)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in Attention._PARTS:
                i = Attention._PARTS.index(name)
                raise AttributeError(
                    f"Attention has no {name!r} module: q, k and v are one Linear, ``qkv``, "
                    f"whose rows [{i}*dim, {i + 1}*dim) are {name}'s weight (and bias); the "
                    f"state dict names them {name}.weight / {name}.bias") from None
            raise

    def part(self, name: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias) of "q", "k" or "v": row views of ``qkv`` (bias None without one)."""
        i, C = Attention._PARTS.index(name), self.dim
        b = self.qkv.bias
        return (self.qkv.weight.narrow(0, i * C, C),
                None if b is None else b.narrow(0, i * C, C))

    def _project(self, x: torch.Tensor, names: str) -> list[torch.Tensor]:
        """The projections ``names`` ("q", "kv" or "qkv": consecutive parts) of x as one GEMM
        on the matching rows of ``qkv`` (a view: nothing kept between calls); returns one
        (..., C) column view of the product per name."""
        i = "qkv".index(names)
        C, n = self.dim, len(names)
        w = self.qkv.weight.narrow(0, i * C, n * C)
        b = None if self.qkv.bias is None else self.qkv.bias.narrow(0, i * C, n * C)
        y = ops.linear(x, w, b)
        return [y] if n == 1 else list(y.split(C, dim=-1))

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
        o = self._attend(self._project(x_q, "q")[0], k, v, token_grans, q_rope, k_rope,
                         seq_lens)
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


def _qkv_state_dict_as_released(module: "Attention", state: dict, prefix: str, _meta) -> None:
    """state_dict() post-hook: ``qkv.weight`` / ``qkv.bias`` written as the released
    ``q.*``, ``k.*``, ``v.*`` (row views of the parameter, as state_dict's tensors are), in the
    released order, ahead of ``proj.*``. A parametrized ``qkv`` is left as it is."""
    C = module.dim
    own = [k for k in state if k.startswith(prefix)]
    if prefix + "qkv.weight" not in state:
        return
    fused = {k: state.pop(prefix + "qkv." + k) for k in ("weight", "bias")
             if prefix + "qkv." + k in state}
    rest = {k: state.pop(k) for k in own if k in state}
    for i, part in enumerate(Attention._PARTS):
        for k, t in fused.items():
            state[f"{prefix}{part}.{k}"] = t.narrow(0, i * C, C)
    state.update(rest)


def _qkv_load_released(module: "Attention", state: dict, prefix: str, _meta, strict,
                       missing: list, unexpected: list, errors: list) -> None:
    """load_state_dict() pre-hook: the released ``q.*``, ``k.*``, ``v.*`` read into
    ``qkv.*``. A part the state lacks keeps its current value and is reported missing by its
    released name (so ``strict=False`` loads the parts given); a mis-shaped part is an error
    naming it."""
    C = module.dim
    for k in ("weight", "bias"):
        target = getattr(module.qkv, k, None)
        names = [f"{prefix}{p}.{k}" for p in Attention._PARTS]
        if target is None or prefix + "qkv." + k in state:
            continue
        if not any(n in state for n in names):
            missing.extend(names)
            state[prefix + "qkv." + k] = target.detach()
            continue
        parts, bad = [], False
        for i, n in enumerate(names):
            cur = target.detach().narrow(0, i * C, C)
            if n not in state:
                missing.append(n)
                parts.append(cur)
                continue
            t = state.pop(n)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(cur.shape):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                errors.append(f"size mismatch for {n}: copying a param with shape {shape} from "
                              f"checkpoint, the shape in current model is {tuple(cur.shape)}.")
                bad = True
                continue
            parts.append(t.to(device=cur.device, dtype=cur.dtype))
        state[prefix + "qkv." + k] = target.detach() if bad else torch.cat(parts)


class CrossAttentionHead(nn.Module):
    """Read / write: ``sink + CrossAttn(snk_norm(sink), src_norm(source))`` (no LayerScale, no
    FFN). RoPE goes on q for the read and on k for the write (docs/design.md, "RoPE")."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        self.src_norm = _norm(dim)
        self.snk_norm = _norm(dim)
        self.cattn = Attention(dim, num_heads, qkv_bias, proj_bias)

    def forward(self, sink, source, q_rope=None, k_rope=None, seq_lens=None):
        # the norms feed the projections only: under autocast, written in their input dtype
        q_in = self.snk_norm(sink, ops.matmul_input_dtype(sink))
        kv_in = self.src_norm(source, ops.matmul_input_dtype(source))
        return sink + self.cattn(q_in, kv_in, None, q_rope, k_rope, seq_lens)


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
        # both norms feed matmuls only (q/k/v, the FFN): under autocast, written in the dtype
        # those cast their input to (ops/norm.py)
        cast = ops.matmul_input_dtype(x)
        a = self.attn.self_attention(self.norm1(x, cast), layout, token_grans, rope)
        # x + ls1(a) and norm2 of it in one pass over the rows (ops/norm.py)
        x, h = ops.residual_layer_norm(x, a, self.ls1.gamma, self.norm2.weight, self.norm2.bias,
                                       self.norm2.eps, cast)
        h, hidden = layout.ffn_input(h)
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
    """Patchify convolution (kernel = stride = patch size, no padding). On the CPU it runs as
    what it is, one GEMM: each patch flattened channel-major (the kernel's layout) times the
    kernel as a (dim, channels * p * p) matrix, through ``ops.linear``, which takes oneDNN's
    GEMM (the tile GEMM at few rows, float32 copies rounded once where the CPU has no native
    GEMM for a 16-bit dtype, autocast's casts). Why: oneDNN's convolution runs this shape well
    below its GEMM (benchmarks/README.md, "What runs in bf16": Patchify). Other devices, and
    torch.compile, keep ``nn.Conv2d``."""

    def __init__(self, in_channels, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return self.proj(x).flatten(2).transpose(1, 2)
        w = self.proj.weight
        (ph, pw), (B, Cin, H, W) = self.proj.kernel_size, x.shape
        gh, gw = H // ph, W // pw    # rows / columns past the last whole patch: unread, as conv
        patches = (x[:, :, :gh * ph, :gw * pw].reshape(B, Cin, gh, ph, gw, pw)
                   .permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, Cin * ph * pw))
        return ops.linear(patches, w.reshape(w.shape[0], -1), self.proj.bias)


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
