"""Dense prediction on the adaptive distilled backbone: semantic segmentation and depth.

A dense model is the distilled AdaPerceiver backbone (``adaperceiver_v1``) at any (t, w, l) plus
a light head on its per-patch features. The protocol follows the authors' public code
(pjjajal/adaperceiver-public: modules/segmentation/{seg_heads,segmenter}.py,
modules/depth/{depth_head,depther}.py, modules/networks/dense_pred.py and the configs
config/{segmentation,depth}/vit_huge_soadaperciever_12k.yaml); decisions, each checked there:

* Features: the backbone's ``features`` (B, P, output_feat_dim = 1280), i.e. one query per
  patch made from the patch embeddings (``output_latents_feat``), written out of the latents at
  each sample's exit layer (``write_head_feat``) and mapped by ``output_adapter_feat`` -- the
  authors' heads take ``output_feat_dim`` channels of the final write-out, not intermediate
  layers and not the C-wide tokens. ``feature="patch_tokens"`` (the C-wide readout before the
  adapter) is an extra of ours. The features are exactly
  ``AdaPerceiverDistill(...)(x, num_tokens, mat_dim, depth).features``: the dense model calls
  the backbone's own forward. The authors' ``cat_cls`` option (concatenating the mean-pooled
  feature) is off in their configs and not provided.
* ``AdaPerceiverSegmenter`` (their ``LinearSegHead``): features on the (B, D, h, w) patch grid
  -> LayerNorm over channels (eps 1e-6, timm's LayerNorm2d) -> Dropout2d(``head_drop``, their
  ``seg_head_drop`` 0.25, training only) -> 1x1 conv to ``num_classes`` -> bilinear upsampling
  (align_corners=False) to the input size: logits (B, num_classes, H, W).
* ``AdaPerceiverDepth`` (their ``LinearDepthHead``, AdaBins / DINOv2 "linear" bins): features
  on the grid -> bilinear upsampling x``upsample`` (4, align_corners=False) -> Dropout2d
  (``head_drop`` 0.0) -> 3x3 conv (padding 1) to ``n_bins`` (256) -> bin weights
  relu(score) + 0.1, normalised to sum 1 (not a softmax; no LayerNorm) -> expected depth
  sum_k p_k c_k with c_k = linspace(min_depth, max_depth, n_bins) (defaults 1e-3 and 10 m,
  NYUv2) -> bilinear upsampling to the input size: depth (B, 1, H, W), inside
  [min_depth, max_depth]. (The authors clamp in eval mode only; the expected depth is a convex
  combination of the bin centres, so the clamp never changes more than rounding.) Note the
  authors' ``AdaptiveDepth`` does not pass its min/max depth on to the head, which therefore
  always uses 1e-3..10; ours uses the values given. ``spacing="log"`` is an extra of ours.
  ``predict(..., flip=True)`` is the authors' test-time horizontal-flip averaging.
* Initialisation: LeCun-normal (truncated) conv weights, zero biases, LayerNorm 1 / 0 (theirs).
* Inputs: multiples of the patch (14): the authors use 518 x 518 for ADE20K and 448 x 602 for
  NYUv2. Token counts above ``max_latent_tokens`` (256; the authors train segmentation with up
  to 512 latents) run with the backbone's RoPE frequency scaling (frequencies divided by
  t / max_latent_tokens, the authors' ``precompute_freqs_cis(end=t, train_len=256)`` at
  evaluation); all samples must then share num_tokens. The backbone is called as theirs is:
  ``(x, num_tokens, mat_dim, depth)``, depth = exit layer (1-based).
* Training (``train.py``): the authors fine-tune the head AND the backbone's per-patch readout
  (output latents, write head, output adapter) with the trunk frozen;
  ``freeze_backbone(True, train_readout=True)`` does that, ``train_readout=False`` trains the
  head alone (the trunk then runs under no_grad).

By default the backbone is frozen: its parameters do not require grad and it stays in eval
mode whatever ``train()`` is called with. ``save_pretrained(dir)`` writes ``backbone/`` in the
released format (with any fine-tuned readout), ``head.safetensors`` and ``dense.json``;
:func:`load_dense` reads them back.
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
           "ChannelLayerNorm", "load_backbone", "load_dense", "FEATURE_SOURCES",
           "READOUT_MODULES", "lecun_normal_"]

FEATURE_SOURCES = ("features", "patch_tokens")
# the backbone's per-patch readout, fine-tuned with the head in the authors' protocol
READOUT_MODULES = ("output_latents_feat", "write_head_feat", "output_adapter_feat")


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


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """LeCun normal init (the authors' head init): a normal truncated at two standard
    deviations, std sqrt(1 / fan_in) corrected for the truncation (/ 0.8796...)."""
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


def _check_drop(head_drop) -> float:
    if isinstance(head_drop, bool) or not isinstance(head_drop, (int, float)) or \
            not 0.0 <= head_drop < 1.0:
        raise ValueError(f"head_drop={head_drop!r} is not allowed; allowed: a float in [0, 1)")
    return float(head_drop)


class SegmentationHead(nn.Module):
    """(B, D, h, w) features -> LayerNorm over channels -> Dropout2d(head_drop) -> 1x1 conv ->
    (B, K, h, w) logits."""

    def __init__(self, in_dim: int, num_classes: int, head_drop: float = 0.0):
        super().__init__()
        self.norm = ChannelLayerNorm(in_dim, eps=1e-6)
        head_drop = _check_drop(head_drop)
        self.dropout = nn.Dropout2d(head_drop) if head_drop > 0 else nn.Identity()
        self.conv = nn.Conv2d(in_dim, num_classes, kernel_size=1)
        lecun_normal_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, feats):
        return self.conv(self.dropout(self.norm(feats)))


def bin_centers(n_bins: int, min_depth: float, max_depth: float, spacing: str = "linear"):
    """float32 (n_bins,) bin centres from min_depth to max_depth (both included), uniform or
    log-uniform."""
    if spacing == "linear":
        return torch.linspace(min_depth, max_depth, n_bins, dtype=torch.float64).float()
    return torch.logspace(math.log10(min_depth), math.log10(max_depth), n_bins,
                          dtype=torch.float64).float()


BIN_SCORE_EPS = 0.1   # added to the ReLU'd bin scores before normalising (AdaBins / DINOv2)


class DepthBinsHead(nn.Module):
    """(B, D, h, w) features -> bilinear upsampling by ``upsample`` -> Dropout2d(head_drop) ->
    3x3 conv to n_bins -> bin weights relu(s) + 0.1 normalised to sum 1 -> expected depth
    sum_k p_k c_k: (B, 1, h * upsample, w * upsample). No normalisation layer."""

    def __init__(self, in_dim: int, n_bins: int, min_depth: float, max_depth: float,
                 spacing: str = "linear", upsample: int = 4, head_drop: float = 0.0):
        super().__init__()
        self.upsample = _positive_int("upsample", upsample)
        head_drop = _check_drop(head_drop)
        self.dropout = nn.Dropout2d(head_drop) if head_drop > 0 else nn.Identity()
        self.conv = nn.Conv2d(in_dim, n_bins, kernel_size=3, padding=1)
        lecun_normal_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("centers", bin_centers(n_bins, min_depth, max_depth, spacing),
                             persistent=False)

    def bin_probs(self, feats):
        """(B, n_bins, h * upsample, w * upsample) bin weights (float32, summing to 1)."""
        if self.upsample > 1:
            h, w = feats.shape[-2:]
            feats = F.interpolate(feats, size=(h * self.upsample, w * self.upsample),
                                  mode="bilinear", align_corners=False)
        scores = F.relu(self.conv(self.dropout(feats)).float()) + BIN_SCORE_EPS
        return scores / scores.sum(dim=1, keepdim=True)

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
        self.freeze_backbone(freeze_backbone)   # sets backbone_frozen, readout_trainable

    # ------------------------------------------------------------------ backbone handling
    def freeze_backbone(self, frozen: bool = True, train_readout: bool = False) -> "_DenseModel":
        """Freeze (requires_grad False, eval mode) or unfreeze the backbone. With
        ``frozen=True, train_readout=True`` the per-patch readout (``READOUT_MODULES``:
        output_latents_feat, write_head_feat, output_adapter_feat) stays trainable, as in the
        authors' protocol; the trunk (patch embed, read, blocks) is frozen, so autograd only
        records the readout. A fully frozen backbone runs under no_grad."""
        self.backbone_frozen = bool(frozen)
        self.readout_trainable = bool(frozen and train_readout)
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        if self.readout_trainable:
            for p in self.readout_parameters():
                p.requires_grad_(True)
        if frozen:
            self.backbone.eval()
        else:
            self.backbone.train(self.training)
        return self

    def readout_parameters(self):
        """Parameters of the backbone's per-patch readout (``READOUT_MODULES``)."""
        for name in READOUT_MODULES:
            yield from getattr(self.backbone, name).parameters()

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
        track = not self.backbone_frozen or self.readout_trainable
        with torch.set_grad_enabled(torch.is_grad_enabled() and track):
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

    ``AdaPerceiverSegmenter(num_classes, backbone=None, *, feature="features", head_drop=0.25,
    freeze_backbone=True, **backbone_overrides)``; ``backbone``: an AdaPerceiverDistill, a
    released checkpoint path, or None (random ``adaperceiver_v1``). ``head_drop``: Dropout2d
    before the 1x1 conv in training (the authors' ``seg_head_drop`` 0.25).
    ``forward(x, num_tokens=None, mat_dim=None, depth=None)`` -> logits (B, num_classes, H, W).
    """

    task = "segmentation"

    def __init__(self, num_classes: int, backbone=None, *, feature: str = "features",
                 head_drop: float = 0.25, freeze_backbone: bool = True, **backbone_overrides):
        num_classes = _positive_int("num_classes", num_classes)
        head_drop = _check_drop(head_drop)
        super().__init__(backbone, feature=feature, freeze_backbone=freeze_backbone,
                         **backbone_overrides)
        self.num_classes, self.head_drop = num_classes, head_drop
        self.head = SegmentationHead(self.feature_dim, num_classes, head_drop)

    def head_config(self) -> dict:
        return {**super().head_config(), "num_classes": self.num_classes,
                "head_drop": self.head_drop}

    def forward(self, x, num_tokens=None, mat_dim=None, depth=None) -> torch.Tensor:
        logits = self.head(self.feature_map(x, num_tokens, mat_dim, depth))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class AdaPerceiverDepth(_DenseModel):
    """Monocular depth on the distilled backbone: a 256-bin classification-regression head.

    ``AdaPerceiverDepth(backbone=None, *, min_depth=1e-3, max_depth=10.0, n_bins=256,
    spacing="linear", upsample=4, head_drop=0.0, feature="features", freeze_backbone=True,
    **backbone_overrides)`` (max_depth 10 m: NYU-Depth v2; use 80 for KITTI).
    ``forward(x, num_tokens=None, mat_dim=None, depth=None)`` -> depth (B, 1, H, W);
    ``predict(x, ..., flip=True)`` averages it with the prediction on the mirrored image (the
    authors' test-time augmentation).
    """

    task = "depth"

    def __init__(self, backbone=None, *, min_depth: float = 1e-3, max_depth: float = 10.0,
                 n_bins: int = 256, spacing: str = "linear", upsample: int = 4,
                 head_drop: float = 0.0, feature: str = "features",
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
        upsample = _positive_int("upsample", upsample)
        head_drop = _check_drop(head_drop)
        super().__init__(backbone, feature=feature, freeze_backbone=freeze_backbone,
                         **backbone_overrides)
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.n_bins, self.spacing = n_bins, spacing
        self.upsample, self.head_drop = upsample, head_drop
        self.head = DepthBinsHead(self.feature_dim, n_bins, self.min_depth, self.max_depth,
                                  spacing, upsample, head_drop)

    def head_config(self) -> dict:
        return {**super().head_config(), "min_depth": self.min_depth,
                "max_depth": self.max_depth, "n_bins": self.n_bins, "spacing": self.spacing,
                "upsample": self.upsample, "head_drop": self.head_drop}

    def forward(self, x, num_tokens=None, mat_dim=None, depth=None) -> torch.Tensor:
        d = self.head(self.feature_map(x, num_tokens, mat_dim, depth))
        d = F.interpolate(d, size=x.shape[-2:], mode="bilinear", align_corners=False)
        # bilinear weights are convex: the clamp only removes float rounding
        return d.clamp(self.min_depth, self.max_depth)

    def predict(self, x, num_tokens=None, mat_dim=None, depth=None,
                flip: bool = True) -> torch.Tensor:
        """Depth (B, 1, H, W); with ``flip`` the mean of the prediction on x and the mirrored
        prediction on x flipped left-right (one batched forward of 2B images)."""
        if not flip:
            return self(x, num_tokens, mat_dim, depth)
        B = x.shape[0]
        twice = lambda v: v + v if isinstance(v, (list, tuple)) else v  # noqa: E731
        d = self(torch.cat([x, x.flip(-1)]), twice(num_tokens), twice(mat_dim), twice(depth))
        return (d[:B] + d[B:].flip(-1)) / 2


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
