"""Model names, in timm's manner: ``create_model(name, pretrained=False, **overrides)``."""
from __future__ import annotations

import os

from .config import AdaPerceiverConfig

__all__ = ["create_model", "list_models", "MODEL_CONFIGS", "HUB_IDS"]

MODEL_CONFIGS = {
    # ImageNet-1k fine-tuned classifier, patch 16 (docs/design.md, "Released configurations")
    "adaperceiver_v1_in1k": dict(patch_size=16, num_classes=1000),
    # the distilled backbone (ImageNet-12k): patch 14, 11821 classes, 1280-wide patch features
    "adaperceiver_v1": dict(patch_size=14, num_classes=11821, output_feat_dim=1280),
}


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


# the authors' released checkpoint of each name on the Hugging Face Hub (pretrained=True)
HUB_IDS = {
    "adaperceiver_v1_in1k": "pjajal/adaperceiver-v1-in1k-ft",
    "adaperceiver_v1": "pjajal/adaperceiver-v1",
}


def create_model(name: str = "adaperceiver_v1_in1k", pretrained=False, **overrides):
    """Build a model by name. ``pretrained``: False (random init), True (the authors' released
    checkpoint of that name, ``HUB_IDS``: downloaded, or read from the Hugging Face cache; offline
    rules and errors of :func:`adaperceiver.hub.resolve_pretrained`), a local path to a checkpoint
    (a directory with config.json + model.safetensors, or a weights file) or a Hugging Face
    repository id. ``overrides`` are config.json keys."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"model name {name!r} is not known; allowed: {', '.join(list_models())}")
    config = {**AdaPerceiverConfig().to_dict(), **MODEL_CONFIGS[name], **overrides}
    if not (pretrained is None or isinstance(pretrained, (bool, str, os.PathLike))):
        raise TypeError(f"pretrained={pretrained!r} is not allowed; allowed: False, True (the "
                        f"authors' {HUB_IDS[name]!r}), a local checkpoint path or a Hugging "
                        "Face repository id")
    if pretrained:
        from .checkpoint import from_pretrained
        from .hub import resolve_pretrained
        pretrained = resolve_pretrained(HUB_IDS[name] if pretrained is True else pretrained)
        cfg = None if os.path.isdir(pretrained) else config
        return from_pretrained(pretrained, cfg, **(overrides if cfg is None else {}))
    from .model import model_class
    return model_class(config)(**config)
