"""Dense prediction on the adaptive distilled backbone: semantic segmentation and depth.

A dense model is the distilled AdaPerceiver backbone (``adaperceiver_v1``) at any (t, w, l) plus
a light head on its per-patch features:

* per-patch features: the backbone's ``features`` (B, P, output_feat_dim), i.e. one query per
  patch made from the patch embeddings by ``output_latents_feat``, written out of the latents at
  each sample's exit layer by ``write_head_feat`` and mapped by ``output_adapter_feat`` (the
  1280-wide features distilled from the teacher, which the authors' dense heads take).
  ``feature="patch_tokens"`` takes the C-wide readout before the adapter instead. The features
  are exactly ``AdaPerceiverDistill(...)(x, num_tokens, mat_dim, depth).features``: the dense
  model calls the backbone's own forward, it does not re-implement it.
* ``AdaPerceiverSegmenter``: features on the (B, D, h, w) patch grid -> LayerNorm over channels
  -> 1x1 convolution to ``num_classes`` -> bilinear upsampling to the input size: logits
  (B, num_classes, H, W).
* ``AdaPerceiverDepth``: features on the grid -> LayerNorm over channels -> 1x1 convolution to
  ``n_bins`` (256) -> softmax over bins -> expected depth sum_k p_k c_k with bin centres c_k
  spread uniformly (or log-uniformly) over [min_depth, max_depth] (AdaBins / DINOv2 "linear"
  depth head with a softmax) -> bilinear upsampling of the depth map to the input size:
  depth (B, 1, H, W), always inside [min_depth, max_depth].

Token counts above ``max_latent_tokens`` (256; the authors use 512 for segmentation at 518 px)
run with the backbone's RoPE frequency scaling (all samples must then share num_tokens).

By default the backbone is frozen (the authors' protocol): its parameters do not require grad,
it stays in eval mode whatever ``train()`` is called with, and it runs under ``no_grad``.
``save_pretrained(dir)`` writes ``backbone/`` in the released format, ``head.safetensors`` and
``dense.json``; :func:`load_dense` reads them back.
"""
from __future__ import annotations

import json
import math
import os
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdaPerceiverSegmenter", "AdaPerceiverDepth", "SegmentationHead", "DepthBinsHead",
           "ChannelLayerNorm", "load_backbone", "load_dense", "FEATURE_SOURCES"]

FEATURE_SOURCES = ("features", "patch_tokens")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: an int >= 1")
    return int(value)


def load_backbone(backbone=None, **overrides):
    """The distilled backbone: an ``AdaPerceiverDistill`` (used as is), a path to a released
    checkpoint (a directory with config.json + model.safetensors, or a weights file with a
    config.json beside it), or None (``create_model('adaperceiver_v1', **overrides)``, random
    init). Raises if the model has no per-patch readout (output_feat_dim unset)."""
    from ..model import AdaPerceiverClassifier
    from ..registry import create_model
    if backbone is None:
        backbone = create_model("adaperceiver_v1", **overrides)
    elif isinstance(backbone, (str, os.PathLike)):
        from ..checkpoint import from_pretrained
        if not os.path.exists(backbone):
            raise FileNotFoundError(f"backbone={os.fspath(backbone)!r} does not exist; allowed: "
                                    "a released checkpoint directory or file")
        backbone = from_pretrained(backbone, **overrides)
    elif overrides:
        raise TypeError(f"backbone config overrides {sorted(overrides)} are only allowed when "
                        "the backbone is built here (backbone=None or a checkpoint path)")
    if not isinstance(backbone, AdaPerceiverClassifier):
        raise TypeError(f"backbone={type(backbone).__name__} is not allowed; allowed: an "
                        "AdaPerceiverDistill, a checkpoint path, or None")
    if not backbone.config.distilled:
        raise ValueError("backbone has output_feat_dim=None (the classifier); dense heads need "
                         "the distilled backbone's per-patch readout, e.g. "
                         "create_model('adaperceiver_v1') or its released checkpoint")
    return backbone


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, h, w) map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SegmentationHead(nn.Module):
    """(B, D, h, w) features -> LayerNorm over channels -> 1x1 conv -> (B, K, h, w) logits."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.norm = ChannelLayerNorm(in_dim, eps=1e-6)
        self.conv = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats):
        return self.conv(self.norm(feats))


def bin_centers(n_bins: int, min_depth: float, max_depth: float, spacing: str = "linear"):
    """float32 (n_bins,) bin centres from min_depth to max_depth (both included), uniform or
    log-uniform."""
    if spacing == "linear":
        return torch.linspace(min_depth, max_depth, n_bins, dtype=torch.float64).float()
    return torch.logspace(math.log10(min_depth), math.log10(max_depth), n_bins,
                          dtype=torch.float64).float()


class DepthBinsHead(nn.Module):
    """(B, D, h, w) features -> LayerNorm over channels -> 1x1 conv to n_bins -> softmax over
    bins -> expected depth (B, 1, h, w)."""

    def __init__(self, in_dim: int, n_bins: int, min_depth: float, max_depth: float,
                 spacing: str = "linear"):
        super().__init__()
        self.norm = ChannelLayerNorm(in_dim, eps=1e-6)
        self.conv = nn.Conv2d(in_dim, n_bins, kernel_size=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("centers", bin_centers(n_bins, min_depth, max_depth, spacing),
                             persistent=False)

    def bin_probs(self, feats):
        """(B, n_bins, h, w) softmax over bins (float32)."""
        return self.conv(self.norm(feats)).float().softmax(dim=1)

    def forward(self, feats):
        probs = self.bin_probs(feats)
        return torch.einsum("bkhw,k->bhw", probs, self.centers).unsqueeze(1).to(feats.dtype)


class _DenseModel(nn.Module):
    """Backbone + head; subclasses set ``task`` and build ``self.head``."""

    task = ""

    def __init__(self, backbone=None, *, feature: str = "features", freeze_backbone: bool = True,
                 **backbone_overrides):
        super().__init__()
        if feature not in FEATURE_SOURCES:
            raise ValueError(f"feature={feature!r} is not allowed; allowed: "
                             f"{', '.join(map(repr, FEATURE_SOURCES))}")
        self.backbone = load_backbone(backbone, **backbone_overrides)
        self.feature = feature
        cfg = self.backbone.config
        self.feature_dim = cfg.output_feat_dim if feature == "features" else cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.backbone_frozen = False
        self.freeze_backbone(freeze_backbone)

    # ------------------------------------------------------------------ backbone handling
    def freeze_backbone(self, frozen: bool = True) -> "_DenseModel":
        """Freeze (requires_grad False, eval mode, run under no_grad) or unfreeze the backbone."""
        self.backbone_frozen = bool(frozen)
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            self.backbone.eval()
        else:
            self.backbone.train(self.training)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def head_parameters(self):
        return self.head.parameters()

    def _check_image(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x has shape {tuple(getattr(x, 'shape', ()))}; allowed: a tensor "
                             "(B, 3, H, W)")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p or H == 0 or W == 0:
            raise ValueError(f"image size {H}x{W} is not allowed; allowed: positive sides that "
                             f"are multiples of patch_size={p} (e.g. 518 = 37 * 14)")

    # ------------------------------------------------------------------ features
    def backbone_output(self, x, num_tokens=None, mat_dim=None, depth=None):
        """The backbone's ``AdaPerceiverOutput`` for this call (under no_grad when frozen)."""
        self._check_image(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            return self.backbone(x, num_tokens=num_tokens, mat_dim=mat_dim, depth=depth)

    def patch_features(self, x, num_tokens=None, mat_dim=None, depth=None) -> torch.Tensor:
        """Per-patch features (B, P, D) the head reads: the backbone's ``features`` (or
        ``patch_tokens``) at (num_tokens, mat_dim, depth)."""
        return getattr(self.backbone_output(x, num_tokens, mat_dim, depth), self.feature)

    def feature_map(self, x, num_tokens=None, mat_dim=None, depth=None) -> torch.Tensor:
        """Per-patch features on the patch grid: (B, D, H / patch, W / patch)."""
        f = self.patch_features(x, num_tokens, mat_dim, depth)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return f.transpose(1, 2).reshape(f.shape[0], f.shape[2], h, w)

    def head_config(self) -> dict:
        return {"feature": self.feature}

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path) -> None:
        """``path/backbone`` (released format), ``path/head.safetensors``, ``path/dense.json``."""
        from safetensors.torch import save_file
        os.makedirs(path, exist_ok=True)
        self.backbone.save_pretrained(os.path.join(path, "backbone"))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                  os.path.join(path, "head.safetensors"))
        with open(os.path.join(path, "dense.json"), "w") as f:
            json.dump({"task": self.task, **self.head_config()}, f, indent=2, sort_keys=True)


class AdaPerceiverSegmenter(_DenseModel):
    """Semantic segmentation on the distilled backbone.

    ``AdaPerceiverSegmenter(num_classes, backbone=None, *, feature="features",
    freeze_backbone=True, **backbone_overrides)``; ``backbone``: an AdaPerceiverDistill, a
    released checkpoint path, or None (random ``adaperceiver_v1``).
    ``forward(x, num_tokens=None, mat_dim=None, depth=None)`` -> logits (B, num_classes, H, W).
    """

    task = "segmentation"

    def __init__(self, num_classes: int, backbone=None, *, feature: str = "features",
                 freeze_backbone: bool = True, **backbone_overrides):
        num_classes = _positive_int("num_classes", num_classes)
        super().__init__(backbone, feature=feature, freeze_backbone=freeze_backbone,
                         **backbone_overrides)
        self.num_classes = num_classes
        self.head = SegmentationHead(self.feature_dim, num_classes)

    def head_config(self) -> dict:
        return {**super().head_config(), "num_classes": self.num_classes}

    def forward(self, x, num_tokens=None, mat_dim=None, depth=None) -> torch.Tensor:
        logits = self.head(self.feature_map(x, num_tokens, mat_dim, depth))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class AdaPerceiverDepth(_DenseModel):
    """Monocular depth on the distilled backbone: a 256-bin classification-regression head.

    ``AdaPerceiverDepth(backbone=None, *, min_depth=1e-3, max_depth=10.0, n_bins=256,
    spacing="linear", feature="features", freeze_backbone=True, **backbone_overrides)``
    (max_depth 10 m: NYU-Depth v2; use 80 for KITTI).
    ``forward(x, num_tokens=None, mat_dim=None, depth=None)`` -> depth (B, 1, H, W).
    """

    task = "depth"

    def __init__(self, backbone=None, *, min_depth: float = 1e-3, max_depth: float = 10.0,
                 n_bins: int = 256, spacing: str = "linear", feature: str = "features",
                 freeze_backbone: bool = True, **backbone_overrides):
        for name, v in (("min_depth", min_depth), ("max_depth", max_depth)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}={v!r} is not allowed; allowed: a finite number")
        if not 0 < min_depth < max_depth:
            raise ValueError(f"min_depth={min_depth}, max_depth={max_depth} is not allowed; "
                             "allowed: 0 < min_depth < max_depth")
        n_bins = _positive_int("n_bins", n_bins)
        if n_bins < 2:
            raise ValueError(f"n_bins={n_bins} is not allowed; allowed: an int >= 2")
        if spacing not in ("linear", "log"):
            raise ValueError(f"spacing={spacing!r} is not allowed; allowed: 'linear', 'log'")
        super().__init__(backbone, feature=feature, freeze_backbone=freeze_backbone,
                         **backbone_overrides)
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.n_bins, self.spacing = n_bins, spacing
        self.head = DepthBinsHead(self.feature_dim, n_bins, self.min_depth, self.max_depth,
                                  spacing)

    def head_config(self) -> dict:
        return {**super().head_config(), "min_depth": self.min_depth,
                "max_depth": self.max_depth, "n_bins": self.n_bins, "spacing": self.spacing}

    def forward(self, x, num_tokens=None, mat_dim=None, depth=None) -> torch.Tensor:
        d = self.head(self.feature_map(x, num_tokens, mat_dim, depth))
        d = F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)
        # bilinear weights are convex: the clamp only removes float rounding
        return d.clamp(self.min_depth, self.max_depth)


_TASKS = {"segmentation": AdaPerceiverSegmenter, "depth": AdaPerceiverDepth}


def load_dense(path, freeze_backbone: bool = True) -> Union[AdaPerceiverSegmenter,
                                                           AdaPerceiverDepth]:
    """A dense model written by ``save_pretrained(path)``."""
    from safetensors.torch import load_file
    cfg_file = os.path.join(path, "dense.json")
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"no dense.json in {os.fspath(path)!r}")
    with open(cfg_file) as f:
        cfg = json.load(f)
    task = cfg.pop("task", None)
    if task not in _TASKS:
        raise ValueError(f"dense.json task={task!r} is not allowed; allowed: "
                         f"{', '.join(map(repr, _TASKS))}")
    cls = _TASKS[task]
    model = cls(backbone=os.path.join(path, "backbone"), freeze_backbone=freeze_backbone, **cfg)
    state = load_file(os.path.join(path, "head.safetensors"))
    model.head.load_state_dict(state, strict=True)
    return model
