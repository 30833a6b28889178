"""timm integration: ``import adaperceiver.timm`` registers our models with timm's registry.

    import timm, adaperceiver.timm
    model = timm.create_model("adaperceiver_v1_in1k", num_tokens=128, mat_dim=624, exit_depth=14)
    cfg = timm.data.resolve_data_config({}, model=model)      # input size, mean/std, crop
    logits = model(timm.data.create_transform(**cfg)(image)[None])   # (1, 1000)

The (t, w, l) configuration is passed as model kwargs (``num_tokens``, ``mat_dim``,
``exit_depth``), the other kwargs are config.json keys. Pretrained weights come only from local
files: ``pretrained=True`` needs ``pretrained_cfg_overlay=dict(file=<checkpoint dir or file>)``.
The mean/std/crop below are timm's ImageNet defaults (SPEC.md does not state the authors'
preprocessing).
"""
from __future__ import annotations

import os

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs, register_model

from .config import AdaPerceiverConfig
from .model import AdaPerceiverClassifier
from .registry import MODEL_CONFIGS

__all__ = ["AdaPerceiverTimm", "default_cfgs", "timm_kwargs_to_config"]


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
            "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.embed.proj",
            "classifier": "output_adapter.ffn", "license": "mit", **kwargs}


default_cfgs = generate_default_cfgs({"adaperceiver_v1_in1k": _cfg()})


class AdaPerceiverTimm(AdaPerceiverClassifier):
    """The classifier with timm's calling convention: ``forward(x)`` returns (B, num_classes)
    logits at the (t, w, l) given at construction. The model itself is the one implementation
    (AdaPerceiverClassifier); only the call differs."""

    def __init__(self, num_tokens=None, mat_dim=None, exit_depth=None, **config):
        super().__init__(**config)
        self.run_config = dict(num_tokens=num_tokens, mat_dim=mat_dim, depth=exit_depth)
        self.num_classes = self.config.num_classes

    def forward_features(self, x, **call):
        return super().forward_features(x, **{**self.run_config, **call})

    def forward(self, x, **call):
        return super().forward(x, **{**self.run_config, **call}).logits[:, 0]

    def get_classifier(self):
        return self.output_adapter.ffn


def timm_kwargs_to_config(kwargs: dict) -> dict:
    """timm's generic create_model keywords (which timm's scripts pass to every model) ->
    our config keys: in_chans -> in_channels, drop_rate -> head_drop, drop_path_rate ->
    drop_path; global_pool is dropped (a latent token reads the class out, nothing pools)."""
    out = dict(kwargs)
    if "in_chans" in out:
        out.setdefault("in_channels", out.pop("in_chans"))
    out.pop("global_pool", None)
    if "drop_rate" in out:
        out.setdefault("head_drop", out.pop("drop_rate"))
    if "drop_path_rate" in out:
        out.setdefault("drop_path", out.pop("drop_path_rate"))
    block = out.pop("drop_block_rate", None)
    if block:
        raise ValueError(f"drop_block_rate={block!r} is not allowed for AdaPerceiver (it has no "
                         "convolutions); allowed: None or 0")
    return out


def _create(name: str, pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None,
            **kwargs):
    kwargs.pop("cache_dir", None)
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    kwargs = timm_kwargs_to_config(kwargs)
    cfg = default_cfgs[name].default.to_dict()
    if isinstance(pretrained_cfg, dict):
        cfg.update(pretrained_cfg)
    cfg.update(pretrained_cfg_overlay or {})
    run = {k: kwargs.pop(k) for k in ("num_tokens", "mat_dim", "exit_depth") if k in kwargs}
    config = {**AdaPerceiverConfig().to_dict(), **MODEL_CONFIGS[name], **kwargs}
    model = AdaPerceiverTimm(**run, **config)
    if pretrained:
        path = cfg.get("file")
        if not path or not os.path.exists(path):
            raise ValueError(f"pretrained=True for {name!r} needs a local checkpoint: pass "
                             "pretrained_cfg_overlay=dict(file=<dir with config.json + "
                             f"model.safetensors, or a .safetensors/.pt file>); got file={path!r}")
        from .checkpoint import load_weights, read_checkpoint
        # the config comes from the timm kwargs; only the weights file is taken from ``path``
        load_weights(model, read_checkpoint(path, model.config.to_dict())[1])
    cfg["num_classes"] = model.config.num_classes
    cfg["input_size"] = (model.config.in_channels, model.config.img_size, model.config.img_size)
    model.pretrained_cfg = model.default_cfg = cfg
    return model.to(device=device, dtype=dtype) if device or dtype else model


@register_model
def adaperceiver_v1_in1k(pretrained=False, **kwargs):
    """AdaPerceiver v1, ImageNet-1k fine-tuned classifier (patch 16, 1000 classes)."""
    return _create("adaperceiver_v1_in1k", pretrained=pretrained, **kwargs)
