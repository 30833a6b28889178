"""Model names, in timm's manner: ``create_model(name, pretrained=False, **overrides)``."""
from __future__ import annotations

import os

from .config import AdaPerceiverConfig

__all__ = ["create_model", "list_models", "MODEL_CONFIGS"]

MODEL_CONFIGS = {
    # ImageNet-1k fine-tuned classifier, patch 16 (SPEC.md)
    "adaperceiver_v1_in1k": dict(patch_size=16, num_classes=1000),
    # the distilled backbone (ImageNet-12k): patch 14, 11821 classes, 1280-wide patch features
    "adaperceiver_v1": dict(patch_size=14, num_classes=11821, output_feat_dim=1280),
}


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


def create_model(name: str = "adaperceiver_v1_in1k", pretrained=False, **overrides):
    """Build a model by name. ``pretrained`` is False (random init) or a local path to a
    released checkpoint (a directory with config.json + model.safetensors, or a file);
    nothing is downloaded. ``overrides`` are config.json keys."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"model name {name!r} is not known; allowed: {', '.join(list_models())}")
    config = {**AdaPerceiverConfig().to_dict(), **MODEL_CONFIGS[name], **overrides}
    if pretrained is True:
        raise ValueError("pretrained=True is not allowed: nothing is downloaded; pass "
                         "pretrained=<local path to the released checkpoint> or False")
    if pretrained:
        from .checkpoint import from_pretrained
        if not os.path.exists(pretrained):
            raise FileNotFoundError(f"pretrained={pretrained!r} does not exist")
        cfg = None if os.path.isdir(pretrained) else config
        return from_pretrained(pretrained, cfg, **(overrides if cfg is None else {}))
    from .model import model_class
    return model_class(config)(**config)
