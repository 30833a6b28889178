"""timm integration: ``import adaperceiver.timm`` registers our models with timm's registry.

    import timm, adaperceiver.timm
    model = timm.create_model("adaperceiver_v1_in1k", pretrained=True,
                              num_tokens=128, mat_dim=624, exit_depth=14)
    cfg = timm.data.resolve_data_config({}, model=model)      # input size, mean/std, crop
    logits = model(timm.data.create_transform(**cfg)(image)[None])   # (1, 1000)

The (t, w, l) configuration is given as model kwargs (``num_tokens``, ``mat_dim``, ``exit_depth``;
each one int), the other kwargs are config.json keys or timm's generic ones (``num_classes``,
``in_chans``, ``global_pool``, ``drop_rate``, ``drop_path_rate``, ``features_only``,
``out_indices``). Every call also takes ``num_tokens=``, ``mat_dim=``, ``depth=`` (ints or one
per sample), overriding the constructor's.

The model speaks timm's API: ``forward`` returns logits (B, num_classes), or the pre-logits
features (B, num_features) with ``num_classes=0``, or the latents (B, N, C) with
``global_pool=''``; ``forward_features`` returns the latents (B, N, C) (timm's NLC layout);
``forward_head(x, pre_logits=False)``; ``reset_classifier``; ``forward_intermediates`` (NLC only:
the latents are learned tokens, not a patch grid); ``features_only=True`` (timm's
FeatureGetterNet over forward_intermediates, NLC); ``set_grad_checkpointing``, ``group_matcher``
and ``no_weight_decay`` (timm's optimizer factory and layer decay). TorchScript and torch.fx
symbolic tracing are refused with a message pointing to torch.compile and torch.export.

``pretrained=True`` loads the authors' released classifier (Hugging Face
``pjajal/adaperceiver-v1-in1k-ft``, the ``hf_hub_id`` of the pretrained cfg) through
:func:`adaperceiver.hub.resolve_pretrained`: downloaded when online, read from the Hugging Face
cache otherwise, and offline (``HF_HUB_OFFLINE=1``) with nothing cached it fails with the same
message as ``ClassificationAdaPerceiver.from_pretrained``. ``pretrained_cfg_overlay=dict(file=...)``
loads a local checkpoint (a directory with model.safetensors, or a weights file) instead. As in
timm, ``num_classes`` other than 1000 keeps a fresh classifier and ``in_chans`` other than 3
adapts the patch-embedding convolution, another ``img_size`` resamples the position embedding;
every other weight must fit exactly.
The mean/std/crop are timm's ImageNet defaults.
"""
from __future__ import annotations

import os

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg

from .checkpoint import read_checkpoint, strip_prefixes
from .config import AdaPerceiverConfig, resolve_call
from .hub import resolve_pretrained
from .model import AdaPerceiverClassifier
from .model.layers import resample_pos_embed
from .model.perceiver import take_indices
from .ops.schedule import to_device
from .registry import HUB_IDS, MODEL_CONFIGS

__all__ = ["AdaPerceiverTimm", "default_cfgs", "timm_kwargs_to_config"]

_CLASSIFIER = "output_adapter.ffn"
_FIRST_CONV = "patch_embed.embed.proj"
_POS_EMBED = "patch_embed.pos_embed"


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
            "crop_pct": 0.875, "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": _FIRST_CONV, "classifier": _CLASSIFIER,
            "license": "mit", "paper_ids": "arXiv:2511.18105", **kwargs}


default_cfgs = generate_default_cfgs({
    "adaperceiver_v1_in1k": _cfg(hf_hub_id=HUB_IDS["adaperceiver_v1_in1k"]),
})


def timm_kwargs_to_config(kwargs: dict) -> dict:
    """timm's generic create_model keywords (which timm's scripts pass to every model) ->
    our config keys: in_chans -> in_channels, drop_rate -> head_drop, drop_path_rate ->
    drop_path; global_pool is not a config key (AdaPerceiverTimm takes it itself) and is
    dropped."""
    out = dict(kwargs)
    out.pop("global_pool", None)
    if "in_chans" in out:
        out.setdefault("in_channels", out.pop("in_chans"))
    if "drop_rate" in out:
        out.setdefault("head_drop", out.pop("drop_rate"))
    if "drop_path_rate" in out:
        out.setdefault("drop_path", out.pop("drop_path_rate"))
    block = out.pop("drop_block_rate", None)
    if block:
        raise ValueError(f"drop_block_rate={block!r} is not allowed for AdaPerceiver (it has no "
                         "convolutions); allowed: None or 0")
    return out


def _check_global_pool(global_pool):
    # 'fast' is what timm's benchmark.py passes to every model when --gp is not given
    if global_pool not in (None, "map", "fast", ""):
        raise ValueError(f"global_pool={global_pool!r} is not allowed for AdaPerceiver; "
                         "allowed: None, 'map' or 'fast' (all three: the write head, a learned "
                         "query attending to the latents, this model's pooling) or '' (no "
                         "readout: forward returns the latents)")
    return "" if global_pool == "" else "map"


class AdaPerceiverTimm(AdaPerceiverClassifier):
    """The classifier with timm's calling convention: ``forward(x)`` returns (B, num_classes)
    logits at the (t, w, l) given at construction. The model itself is the one implementation
    (AdaPerceiverClassifier); only the call differs."""

    def __init__(self, num_tokens=None, mat_dim=None, exit_depth=None, global_pool=None,
                 **kwargs):
        config = {**AdaPerceiverConfig().to_dict(), **MODEL_CONFIGS["adaperceiver_v1_in1k"],
                  **timm_kwargs_to_config(kwargs)}
        super().__init__(**config)
        self.global_pool = _check_global_pool(global_pool)
        self.run_config = dict(num_tokens=num_tokens, mat_dim=mat_dim, depth=exit_depth)
        self._check_run_config()

    def _check_run_config(self):
        """The constructor's (t, w, l): each None or one int in range (errors name the kwarg)."""
        cfg = self.config
        one = torch.empty(1, cfg.in_channels, cfg.img_size, cfg.img_size, device="meta")
        for name, key in (("num_tokens", "num_tokens"), ("mat_dim", "mat_dim"),
                          ("exit_depth", "depth")):
            value = self.run_config[key]
            if isinstance(value, (list, tuple)) or isinstance(value, torch.Tensor) and value.dim():
                raise ValueError(f"{name}={value!r} is not allowed as a model kwarg; allowed: "
                                 f"None or one int (pass per-sample values to the call: "
                                 f"model(x, {key}=[...]))")
            try:
                resolve_call(cfg, one, **{key: value})
            except (TypeError, ValueError) as e:
                raise type(e)(f"model kwarg {name}: {e}") from None

    @property
    def in_chans(self) -> int:
        return self.config.in_channels

    def _call(self, num_tokens, mat_dim, depth) -> dict:
        """The call's (t, w, l), the constructor's where the call gives None."""
        given = dict(num_tokens=num_tokens, mat_dim=mat_dim, depth=depth)
        return {k: self.run_config[k] if v is None else v for k, v in given.items()}

    def forward_features(self, x, num_tokens=None, mat_dim=None, depth=None, depth_tau=None,
                         token_grans=None, exit: str = "batch"):
        """The latents (B, N, C) after each sample's last block (zero past its t)."""
        return super().forward_features(x, **self._call(num_tokens, mat_dim, depth),
                                        depth_tau=depth_tau, token_grans=token_grans, exit=exit)

    def forward_head(self, x, pre_logits: bool = False, num_tokens=None):
        """timm's head: logits (B, num_classes), or the pre-logits features (B, num_features)
        with ``pre_logits`` (the written-out token), from forward_features' latents (B, N, C).
        ``num_tokens``: the token count of each sample when they differ (default: the
        constructor's), so sample b reads only its first t_b latents; latents whose last row is
        all zero (forward_features' padding of a shorter sample) without ``num_tokens`` are an
        error, not a readout of the padding. With global_pool='' no readout: the latents
        themselves, through the classifier unless ``pre_logits``."""
        if self.global_pool == "":
            return x if pre_logits or self.num_classes == 0 else self.output_adapter(x)
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.num_features:
            raise ValueError(f"forward_head takes the latents (B, N, {self.num_features}) of "
                             f"forward_features; got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
        tokens = self.run_config["num_tokens"] if num_tokens is None else num_tokens
        seq_lens = None
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        if isinstance(tokens, (list, tuple)):
            B, N = x.shape[:2]
            if len(tokens) != B or any(not 1 <= int(t) <= N for t in tokens):
                raise ValueError(f"num_tokens={list(tokens)} is not allowed for latents of shape "
                                 f"{tuple(x.shape)}; allowed: {B} token counts in 1..{N}")
            if any(int(t) != N for t in tokens):
                seq_lens = to_device([int(t) for t in tokens], x.device, torch.int32)
        elif x.shape[0] and x.shape[1] and not torch.compiler.is_compiling():
            padded = (x[:, -1].abs().amax(-1) == 0).nonzero().flatten().tolist()
            if padded:
                raise ValueError(f"latents of samples {padded} end in all-zero rows, the padding "
                                 "forward_features gives a sample with fewer tokens than the "
                                 "batch's most; pass each sample's token count: "
                                 "forward_head(x, num_tokens=[t_0, t_1, ...])")
        return self.readout(x, None, seq_lens, pre_logits)[:, 0]

    def forward(self, x, num_tokens=None, mat_dim=None, depth=None, depth_tau=None,
                token_grans=None, exit: str = "batch"):
        """Logits (B, num_classes); with num_classes=0 the pre-logits features (B, C); with
        global_pool='' the latents (B, N, C) (through the classifier if it has one)."""
        call = dict(depth_tau=depth_tau, token_grans=token_grans, exit=exit)
        if self.global_pool == "":
            return self.forward_head(self.forward_features(x, num_tokens, mat_dim, depth,
                                                           **call))
        out = AdaPerceiverClassifier.forward(self, x, **self._call(num_tokens, mat_dim, depth),
                                             **call).logits
        return out[:, 0]

    def forward_intermediates(self, x, indices=None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NLC",
                              intermediates_only: bool = False, output_dict: bool = False,
                              num_tokens=None, mat_dim=None, depth=None, token_grans=None):
        return super().forward_intermediates(x, indices, norm, stop_early, output_fmt,
                                             intermediates_only, output_dict,
                                             **self._call(num_tokens, mat_dim, depth),
                                             token_grans=token_grans)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """The model's resize, with the data config (``pretrained_cfg['input_size']``) and timm's
        recorded input traits following it."""
        super().set_input_size(img_size, patch_size)
        if img_size is not None:
            from timm.models._input import update_model_input_size
            update_model_input_size(self, self.config.img_size)
            cfg = getattr(self, "pretrained_cfg", None)
            if cfg is not None:
                self.pretrained_cfg = self.default_cfg = dict(
                    cfg, input_size=(self.config.in_channels, self.config.img_size,
                                     self.config.img_size))

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        """A new classifier of ``num_classes`` (0: none); ``global_pool`` None keeps the
        readout, 'map' is the write head, '' drops the readout (forward returns the latents)."""
        pool = None if global_pool is None else _check_global_pool(global_pool)
        super().reset_classifier(num_classes)
        if pool is not None:
            self.global_pool = pool

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's pruning, with ``indices`` counted among the blocks this model runs
        (``exit_depth`` when given)."""
        run = self.run_config["depth"] or len(self.blocks)
        take, last = take_indices(run, indices)
        super().prune_intermediate_layers(take, prune_norm, prune_head)
        if self.run_config["depth"] is not None:
            self.run_config["depth"] = min(self.run_config["depth"], last + 1)
        if prune_head:
            self.global_pool = ""
        return take


def _pretrained_source(variant: str, cfg: dict, cache_dir=None) -> dict:
    """Where ``pretrained=True`` loads from, as pretrained-cfg entries: ``file``, the local weights
    file (the cfg's ``file``, a checkpoint directory or a weights file, else the ``hf_hub_id``
    snapshot, downloaded or cached, with adaperceiver.hub's offline rules and messages); and,
    when the checkpoint has a config.json (in it, or beside the file), its ``num_classes`` and
    input channels, which timm's loader compares with the model's to drop the classifier /
    adapt the first convolution."""
    path = cfg.get("file")
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"pretrained_cfg file={path!r} for {variant!r} does not "
                                    "exist; allowed: a checkpoint directory (model.safetensors) "
                                    "or a .safetensors/.pt/.pth/.bin file")
    elif cfg.get("hf_hub_id"):
        path = resolve_pretrained(cfg["hf_hub_id"], cache_dir=cache_dir,
                                  revision=cfg.get("hf_hub_revision"))
    else:
        raise ValueError(f"pretrained=True for {variant!r} has no weights to load: its "
                         "pretrained cfg has neither file nor hf_hub_id")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    has_config = os.path.exists(os.path.join(folder, "config.json"))
    config, weights = read_checkpoint(path, None if has_config else {})
    out = dict(file=weights)
    if has_config:   # the source's own metadata (the model kwargs are the model's config)
        src = {**AdaPerceiverConfig().to_dict(), **config}
        out["num_classes"] = src["num_classes"]
        out["input_size"] = (src["in_channels"], *cfg["input_size"][1:])
    return out


def _checkpoint_filter(state: dict, model) -> dict:
    """Prefixes stripped, the position embedding resampled to the model's img_size, then every
    key checked: only the classifier (num_classes changed) and the patch-embedding convolution
    (in_chans changed, which timm adapts) may differ; anything else missing, unexpected or
    mis-shaped is an error naming it (timm would load non-strictly once the classifier is
    dropped)."""
    state = strip_prefixes(state)
    # another img_size: the position embedding resampled to the model's grid as the source
    # model resamples it for an input of that size, so there both give the same outputs
    pos, own_pos = state.get(_POS_EMBED), model.patch_embed.pos_embed
    if pos is not None and pos.dim() == 3 and pos.shape[-1] == own_pos.shape[-1] and (
            pos.shape[1] != own_pos.shape[1]):
        side = int(round(own_pos.shape[1] ** 0.5))
        state[_POS_EMBED] = resample_pos_embed(pos, (side, side))
    cfg = model.pretrained_cfg
    free = set()
    if model.num_classes != cfg["num_classes"]:
        free |= {f"{_CLASSIFIER}.weight", f"{_CLASSIFIER}.bias"}
    if model.in_chans != cfg["input_size"][0]:
        free.add(f"{_FIRST_CONV}.weight")
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - free)
    unexpected = sorted(set(state) - set(own) - free)
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in (set(own) & set(state)) - free
                    if tuple(state[k].shape) != tuple(own[k].shape))
    problems = [f"{what}: {keys}" for what, keys in (("missing keys", missing),
                                                     ("unexpected keys", unexpected),
                                                     ("mis-shaped keys", shapes)) if keys]
    if problems:
        raise KeyError(f"pretrained weights do not fit {cfg.get('architecture')!r} built with "
                       "these kwargs; " + "; ".join(problems))
    return state


def _create(variant: str, pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None,
            cache_dir=None, **kwargs):
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    features = bool(kwargs.get("features_only", False))
    feature_cls = kwargs.pop("feature_cls", "getter")
    if features and feature_cls != "getter":
        raise ValueError(f"feature_cls={feature_cls!r} is not allowed for AdaPerceiver; "
                         "allowed: 'getter' (features from forward_intermediates)")
    feature_cfg = dict(out_indices=kwargs.pop("out_indices", 3), feature_cls="getter",
                       output_fmt=kwargs.pop("output_fmt", "NLC"))
    overlay = dict(pretrained_cfg_overlay or {})
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg,
                                     pretrained_cfg_overlay=overlay).to_dict()
        overlay.update(_pretrained_source(variant, cfg, cache_dir))
    model = build_model_with_cfg(AdaPerceiverTimm, variant, pretrained,
                                 pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay,
                                 feature_cfg=feature_cfg, pretrained_filter_fn=_checkpoint_filter,
                                 **kwargs)
    if not features:
        # the data config follows the model built (timm's resolve_data_config reads it)
        cfg = dict(model.pretrained_cfg)
        cfg["num_classes"] = model.num_classes
        cfg["input_size"] = (model.config.in_channels, model.config.img_size,
                             model.config.img_size)
        model.pretrained_cfg = model.default_cfg = cfg
    return model.to(device=device, dtype=dtype) if device or dtype else model


@register_model
def adaperceiver_v1_in1k(pretrained=False, **kwargs):
    """AdaPerceiver v1, ImageNet-1k fine-tuned classifier (patch 16, 1000 classes)."""
    return _create("adaperceiver_v1_in1k", pretrained=pretrained, **kwargs)
