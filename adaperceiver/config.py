"""The model configuration (config.json keys) and the per-call configuration.

``AdaPerceiverConfig`` holds the constructor keywords of the reference implementation, with the
released classifier's values as defaults. ``resolve_call`` validates one call's (t, w, l, grans)
once, at the top of ``forward``, into a ``CallConfig`` that travels down the model: layers never
re-derive it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch

from .ops.schedule import check_grans

__all__ = ["AdaPerceiverConfig", "CallConfig", "resolve_call", "MAX_NUM_TOKENS", "hidden_size"]

MAX_NUM_TOKENS = 4096


@dataclass
class AdaPerceiverConfig:
    act_layer: str = "gelu"
    attn_drop: float = 0.0
    attn_layer: str = "flex"
    block_mask: str = "block"
    depth: int = 21
    drop_path: float = 0.0
    embed_dim: int = 832
    ffn_layer: str = "mlp"
    ffn_ratio: float = 2.57
    head_drop: float = 0.0
    img_size: int = 224
    in_channels: int = 3
    ls_init_values: float = 1e-6
    mask_token_grans: list = field(default_factory=lambda: [32, 64, 96, 128, 192, 256])
    mat_dims: list = field(default_factory=lambda: [416, 624, 832])
    max_latent_tokens: int = 256
    norm_layer: str = "layernorm"
    num_classes: int = 1000
    num_heads: int = 13
    patch_size: int = 16
    process_token_init: str = "learned"
    proj_bias: bool = True
    proj_drop: float = 0.0
    qkv_bias: bool = True
    rope_theta: float = 10000
    use_embed_ffn: bool = True
    use_output_ffn: bool = False
    # the distilled backbone only: width of the per-patch features (1280 for adaperceiver-v1);
    # None (the classifier) leaves the key out of config.json, as the reference writes it
    output_feat_dim: Optional[int] = None

    def __post_init__(self):
        self._check_types()
        self.mask_token_grans = check_grans(self.mask_token_grans, "mask_token_grans")
        checks = [
            ("act_layer", self.act_layer, ("gelu",)),
            ("norm_layer", self.norm_layer, ("layernorm",)),
            ("ffn_layer", self.ffn_layer, ("mlp",)),
            ("attn_layer", self.attn_layer, ("flex", "full")),
            ("block_mask", self.block_mask, ("block", "causal", "none")),
            ("process_token_init", self.process_token_init, ("learned",)),
            ("use_output_ffn", self.use_output_ffn, (False,)),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; allowed: "
                                 f"{', '.join(map(repr, allowed))}")
        for name in ("attn_drop", "drop_path", "head_drop", "proj_drop"):
            if float(getattr(self, name)) != 0.0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported (dropout and "
                                 "stochastic depth are not implemented; the released configs "
                                 "use 0.0); allowed: 0.0")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not a multiple of "
                             f"num_heads={self.num_heads}")
        for w in self.mat_dims:
            if not 1 <= w <= self.embed_dim:
                raise ValueError(f"mat_dims holds {w}; allowed: widths in 1..{self.embed_dim}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        if self.attn_layer == "full" and self.block_mask != "none":
            warnings.warn("attn_layer='full': self-attention runs with no mask whatever "
                          f"block_mask={self.block_mask!r} says (as the reference does); the "
                          "prefix property (num_tokens=g equals the first g latents of a "
                          "longer run) no longer holds", stacklevel=3)

    # (key, lowest allowed value) of the int keys, and of the real-number keys
    _INTS = (("depth", 1), ("embed_dim", 1), ("img_size", 1), ("in_channels", 1),
             ("max_latent_tokens", 1), ("num_classes", 0), ("num_heads", 1), ("patch_size", 1))
    _REALS = ("ffn_ratio", "ls_init_values", "rope_theta", "attn_drop", "drop_path", "head_drop",
              "proj_drop")
    _BOOLS = ("proj_bias", "qkv_bias", "use_embed_ffn", "use_output_ffn")

    def _check_types(self) -> None:
        """Every key of its type and in range (a config.json value such as "21", 832.0,
        "false" or -13 is an error naming the key, not a silently different model)."""
        for name, lo in self._INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
                raise ValueError(f"{name}={value!r} is not allowed; allowed: an int >= {lo}")
            setattr(self, name, int(value))
        if self.max_latent_tokens > MAX_NUM_TOKENS:
            raise ValueError(f"max_latent_tokens={self.max_latent_tokens} is not allowed; "
                             f"allowed: 1..{MAX_NUM_TOKENS}")
        for name in self._REALS:
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not math.isfinite(value)):
                raise ValueError(f"{name}={value!r} is not allowed; allowed: a finite number")
            setattr(self, name, float(value))
        for name in ("ffn_ratio", "rope_theta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; allowed: a "
                                 "number > 0")
        for name in self._BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; allowed: true "
                                 "or false (a JSON boolean, not a string)")
        for name in ("act_layer", "attn_layer", "block_mask", "ffn_layer", "norm_layer",
                     "process_token_init"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; allowed: a "
                                 "string")
        if not isinstance(self.mat_dims, (list, tuple)) or not self.mat_dims or any(
                isinstance(w, bool) or not isinstance(w, numbers.Integral)
                for w in self.mat_dims):
            raise ValueError(f"mat_dims={self.mat_dims!r} is not allowed; allowed: a non-empty "
                             "list of ints in 1..embed_dim")
        self.mat_dims = [int(w) for w in self.mat_dims]
        if self.output_feat_dim is not None and (
                isinstance(self.output_feat_dim, bool)
                or not isinstance(self.output_feat_dim, numbers.Integral)
                or self.output_feat_dim < 1):
            raise ValueError(f"output_feat_dim={self.output_feat_dim!r} is not allowed; "
                             "allowed: a positive int (distilled backbone) or None")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return hidden_size(self.embed_dim, self.ffn_ratio)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["output_feat_dim"] is None:
            del d["output_feat_dim"]
        return {k: d[k] for k in sorted(d)}

    @property
    def distilled(self) -> bool:
        """True for the distilled backbone (per-patch feature heads)."""
        return self.output_feat_dim is not None

    @classmethod
    def from_dict(cls, d: dict) -> "AdaPerceiverConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TypeError(f"unknown config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


def hidden_size(width: int, ffn_ratio: float) -> int:
    """FFN hidden units used at Matryoshka width ``width``: int(width * ffn_ratio) (docs/design.md,
    "Matryoshka width")."""
    return int(width * ffn_ratio)


@dataclass(frozen=True)
class CallConfig:
    """One forward call's configuration, validated; every per-sample field has B entries."""
    batch: int
    tokens: tuple[int, ...]          # latent tokens t_b per sample
    widths: tuple[int, ...]          # Matryoshka width w_b per sample
    hidden: tuple[int, ...]          # FFN hidden units int(w_b * ffn_ratio) per sample
    depths: tuple[int, ...]          # blocks l_b per sample
    depth_tau: Optional[float]
    exit: str                        # "batch" (the reference's batch-mean rule) or "sample"
    grans: Optional[tuple[int, ...]]  # the self-attention mask; None = no mask
    grid: tuple[int, int]            # patch grid (h, w)

    @property
    def num_tokens(self) -> int:
        return max(self.tokens)

    @property
    def depth(self) -> int:
        return max(self.depths)


def _as_int(name: str, value, lo: int, hi: int, what: str) -> int:
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
            isinstance(value, float) and value.is_integer()):
        raise TypeError(f"{name}={value!r} is not allowed; allowed: {what}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is out of range; allowed: {what}")
    return value


def _per_sample(name: str, value, batch: int, lo: int, hi: int, default: int) -> tuple[int, ...]:
    """An int, or a length-B sequence/tensor of ints, each in lo..hi, as B ints."""
    what = f"an int in {lo}..{hi} or a length-{batch} sequence/tensor of them"
    if value is None:
        return (default,) * batch
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.dim() != 1:
            raise TypeError(f"{name} tensor of dtype {value.dtype} and shape "
                            f"{tuple(value.shape)} is not allowed; allowed: {what}")
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(f"{name} has {len(value)} entries but the batch has {batch} "
                             f"samples; allowed: {what}")
        return tuple(_as_int(name, v, lo, hi, what) for v in value)
    return (_as_int(name, value, lo, hi, what),) * batch


def resolve_call(cfg: AdaPerceiverConfig, x: torch.Tensor, num_tokens=None, mat_dim=None,
                 depth=None, depth_tau=None, token_grans=None, exit: str = "batch"
                 ) -> CallConfig:
    """Validate one call's arguments against the model config (errors name parameter, value and
    what is allowed). ``num_tokens``, ``mat_dim`` and ``depth`` are each an int or one per
    sample."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor (B, {cfg.in_channels}, H, W), got {type(x)}")
    if not x.is_floating_point():
        raise TypeError(f"x.dtype={x.dtype} is not allowed; allowed: a float dtype")
    if x.dim() != 4 or x.shape[1] != cfg.in_channels:
        raise ValueError(f"x has shape {tuple(x.shape)}; allowed: (B, {cfg.in_channels}, H, W)")
    B, _, H, W = x.shape
    p = cfg.patch_size
    if H % p or W % p or H == 0 or W == 0:
        raise ValueError(f"image size {H}x{W} is not allowed; allowed: positive sides that are "
                         f"multiples of patch_size={p}")
    tokens = _per_sample("num_tokens", num_tokens, B, 1, MAX_NUM_TOKENS, cfg.max_latent_tokens)
    if len(set(tokens)) > 1 and max(tokens) > cfg.max_latent_tokens:
        # RoPE frequencies are scaled by t / max_latent_tokens above it: one table per batch
        raise ValueError(f"num_tokens={list(tokens)} is not allowed: per-sample token counts "
                         f"must be <= max_latent_tokens={cfg.max_latent_tokens} (or all equal)")
    widths = _per_sample("mat_dim", mat_dim, B, 1, cfg.embed_dim, cfg.embed_dim)
    depths = _per_sample("depth", depth, B, 1, cfg.depth, cfg.depth)
    if depth_tau is not None:
        if isinstance(depth_tau, bool) or not isinstance(depth_tau, (int, float)) or not (
                0.0 <= float(depth_tau) <= 1.0) or math.isnan(float(depth_tau)):
            raise ValueError(f"depth_tau={depth_tau!r} is not allowed; allowed: a float in "
                             "[0, 1] (a max-softmax confidence)")
        depth_tau = float(depth_tau)
    if exit not in ("batch", "sample"):
        raise ValueError(f"exit={exit!r} is not allowed; allowed: 'batch' (the reference's "
                         "batch-mean rule) or 'sample'")
    grans = check_grans(cfg.mask_token_grans if token_grans is None else token_grans,
                        "token_grans")
    n = max(tokens)
    if cfg.attn_layer == "full" or cfg.block_mask == "none":
        mask = None
    elif cfg.block_mask == "causal":
        mask = tuple(range(1, n + 1))
    else:
        mask = tuple(grans)
    return CallConfig(batch=B, tokens=tokens, widths=widths,
                      hidden=tuple(hidden_size(w, cfg.ffn_ratio) for w in widths),
                      depths=depths, depth_tau=depth_tau, exit=exit, grans=mask,
                      grid=(H // p, W // p))
