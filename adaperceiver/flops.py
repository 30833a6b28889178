"""Analytic FLOP, parameter and byte counts per configuration (multiply-add = 2 FLOPs).

Counts what torch's FlopCounterMode counts on the reference forward (convolution, linear layers
and the two attention matmuls, masked scores counted as computed), so the two agree, and reports
separately the attention work the block mask makes unnecessary (what our kernels skip).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .config import MAX_NUM_TOKENS, AdaPerceiverConfig, _as_int, hidden_size
from .ops.schedule import check_grans, row_end

__all__ = ["FlopCount", "count_flops"]


@dataclass(frozen=True)
class FlopCount:
    total: float                  # FLOPs per image as the reference computes them
    masked_attention: float       # of which: scores/values the block mask throws away
    params: int                   # parameters used at this (w, l)
    parts: dict = field(default_factory=dict)

    @property
    def needed(self) -> float:
        """FLOPs per image once masked attention tiles are skipped."""
        return self.total - self.masked_attention

    @property
    def attention(self) -> float:
        """The score and value matmuls of read, blocks and write (dense)."""
        return float(sum(v for k, v in self.parts.items() if k.endswith("_attention")))

    @property
    def without_attention(self) -> float:
        """Total less attention matmuls: what FlopCounterMode reports on the authors' model,
        whose flex_attention it cannot see into (the authors' 71.63 G for (256, 832, 21) at patch
        16: docs/design.md, "FLOP accounting")."""
        return self.total - self.attention

    @property
    def gflops(self) -> float:
        return self.total / 1e9


def _config(model_or_config) -> AdaPerceiverConfig:
    if isinstance(model_or_config, AdaPerceiverConfig):
        return model_or_config
    if isinstance(model_or_config, dict):
        return AdaPerceiverConfig.from_dict(model_or_config)
    return model_or_config.config


def count_flops(model_or_config, num_tokens: Optional[int] = None,
                mat_dim: Union[None, int, Sequence[int]] = None, depth: Optional[int] = None,
                img_size: Union[int, tuple] = 224, token_grans=None) -> FlopCount:
    """FLOPs per image of one forward at (num_tokens, mat_dim, depth) and ``img_size``.

    ``mat_dim`` may be a list of per-sample widths: the count is then the mean per image of what
    each sample needs (the reference itself pays full width for mixed widths).
    """
    cfg = _config(model_or_config)
    # the same rules as forward's arguments (config.resolve_call)
    n = _as_int("num_tokens", cfg.max_latent_tokens if num_tokens is None else num_tokens, 1,
                MAX_NUM_TOKENS, f"an int in 1..{MAX_NUM_TOKENS}")
    l = _as_int("depth", cfg.depth if depth is None else depth, 1, cfg.depth,
                f"an int in 1..{cfg.depth}")
    w_what = f"an int in 1..{cfg.embed_dim} or a non-empty list of them (one per sample)"
    if mat_dim is None:
        widths = [cfg.embed_dim]
    elif isinstance(mat_dim, (list, tuple)) and mat_dim:
        widths = [_as_int("mat_dim", w, 1, cfg.embed_dim, w_what) for w in mat_dim]
    else:
        widths = [_as_int("mat_dim", mat_dim, 1, cfg.embed_dim, w_what)]
    hh, ww = (img_size, img_size) if not isinstance(img_size, (tuple, list)) else img_size
    p = cfg.patch_size
    for side in (hh, ww):
        _as_int("img_size", side, p, 1 << 20, f"positive multiples of patch_size={p}")
        if side % p:
            raise ValueError(f"img_size={img_size!r} is not allowed; allowed: positive "
                             f"multiples of patch_size={p}")
    if token_grans is not None:
        token_grans = check_grans(token_grans)
    C, K, p = cfg.embed_dim, cfg.num_classes, cfg.patch_size
    P = (hh // p) * (ww // p)
    hmax = cfg.ffn_hidden
    hid = sum(hidden_size(w, cfg.ffn_ratio) for w in widths) / len(widths)

    parts = {
        "patch_embed": 2 * P * C * cfg.in_channels * p * p
        + (4 * P * C * hmax if cfg.use_embed_ffn else 0),
        "read_proj": 2 * n * C * C * 2 + 2 * 2 * P * C * C,
        "read_attention": 4 * n * P * C,
        "blocks_proj": l * 8 * n * C * C,
        "blocks_attention": l * 4 * n * n * C,
        "blocks_ffn": l * 4 * n * C * hid,
        "write_proj": 2 * C * C * 2 + 2 * 2 * n * C * C,
        "write_attention": 4 * n * C,
        "head": 2 * C * K,
    }
    if cfg.distilled:   # per-patch readout: queries, write_head_feat, output_adapter_feat
        F_ = cfg.output_feat_dim
        parts.update({
            "feat_proj": 2 * P * C * C * 3 + 2 * 2 * n * C * C,
            "feat_attention": 4 * P * n * C,
            "feat_adapter": 2 * P * C * hmax + 2 * P * hmax * F_,
        })
    grans = None
    if cfg.attn_layer != "full" and cfg.block_mask != "none":
        grans = (list(range(1, n + 1)) if cfg.block_mask == "causal"
                 else (token_grans or cfg.mask_token_grans))
    allowed = int(row_end(n, grans).long().sum()) if grans is not None else n * n
    masked = l * 4 * (n * n - allowed) * C

    per_block_fixed = 4 * C * C + 4 * C + 4 * C + 2 * C   # q,k,v,proj (+bias), 2 norms, 2 ls
    ffn_params = 2 * hid * C + hid + C
    params = (cfg.in_channels * p * p * C + C + cfg.num_patches * C
              + (2 * C + 2 * C * hmax + hmax + C if cfg.use_embed_ffn else 0)
              + C + C                                   # process / output tokens
              + 2 * (4 * C * C + 4 * C + 4 * C)          # read and write heads
              + l * (per_block_fixed + ffn_params)
              + C * K + K)
    if cfg.distilled:
        params += (C * C + C + (4 * C * C + 4 * C + 4 * C) + 2 * C
                   + C * hmax + hmax + hmax * cfg.output_feat_dim + cfg.output_feat_dim)
    return FlopCount(total=float(sum(parts.values())), masked_attention=float(masked),
                     params=int(round(params)), parts=parts)
