"""The released checkpoint format: a directory with ``config.json`` (the constructor keywords)
and ``model.safetensors``; or a single ``.safetensors`` / ``.pt`` / ``.pth`` file with a config
given. Training prefixes ``module.`` and ``_orig_mod.`` are stripped. Loading is strict: a
missing, unexpected or mis-shaped key is an error naming it."""
from __future__ import annotations

import json
import os
import warnings
from typing import Optional, Union

import torch

__all__ = ["save_pretrained", "load_state_dict", "from_pretrained", "strip_prefixes",
           "check_state_dict", "check_config", "read_checkpoint", "load_weights", "WEIGHT_NAMES"]

# weight file names a checkpoint directory may hold, in order of preference
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")

_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        k = key
        while k.startswith(_PREFIXES):
            k = k[len("module."):] if k.startswith("module.") else k[len("_orig_mod."):]
        if k in out:
            raise KeyError(f"checkpoint key {key!r} collides with another key after stripping "
                           f"prefixes {_PREFIXES}")
        out[k] = value
    return out


def save_pretrained(model, path: Union[str, os.PathLike]) -> None:
    """Write ``config.json`` + ``model.safetensors`` into the directory ``path``."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2, sort_keys=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "model.safetensors"))


def load_state_dict(path: Union[str, os.PathLike]) -> dict:
    """Read a state dict from a ``.safetensors``, ``.pt`` or ``.pth`` file (prefixes stripped)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            state = load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors' errors do not name the file
            raise ValueError(f"weights file {path!r} could not be read (truncated or not a "
                             f"safetensors file?): {type(e).__name__}: {e}") from e
    elif path.endswith((".pt", ".pth", ".bin")):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - name the file
            raise ValueError(f"weights file {path!r} could not be read: {type(e).__name__}: "
                             f"{e}") from e
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    else:
        raise ValueError(f"checkpoint file {path!r} is not allowed; allowed: .safetensors, "
                         ".pt, .pth, .bin")
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path!r} holds {type(state).__name__}, not a state dict")
    return strip_prefixes(state)


def check_state_dict(model, state: dict) -> None:
    """Raise naming every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
    problems = []
    if missing:
        problems.append(f"missing keys: {missing}")
    if unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if shapes:
        problems.append(f"mis-shaped keys: {shapes}")
    if problems:
        raise KeyError("checkpoint does not fit the model; " + "; ".join(problems))


def read_checkpoint(path, config: Optional[dict] = None) -> tuple[dict, str]:
    """(config, weights file) of a checkpoint: a directory with config.json and one of
    WEIGHT_NAMES, or a weights file with ``config`` given or a config.json beside it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        weights = [os.path.join(path, n) for n in WEIGHT_NAMES
                   if os.path.exists(os.path.join(path, n))]
        cfg_file = os.path.join(path, "config.json")
        if config is None and not os.path.exists(cfg_file):
            raise FileNotFoundError(f"no config.json in {path!r}; a checkpoint directory holds "
                                    "config.json + model.safetensors")
        if not weights:
            raise FileNotFoundError(f"no model.safetensors (or .bin/.pt/.pth) in {path!r}")
        weights = weights[0]
    else:
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        cfg_file = os.path.join(os.path.dirname(path), "config.json")
        if config is None and not os.path.exists(cfg_file):
            raise ValueError(f"checkpoint file {path!r} needs config=... (no config.json "
                             "beside it)")
        weights = path
    if config is None:
        with open(cfg_file) as f:
            try:
                config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cfg_file!r} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_file!r} holds {type(config).__name__}, not a dict of "
                             "constructor keywords")
        check_config(config, cfg_file)
    return config, weights


def check_config(config: dict, source: str) -> None:
    """Raise naming ``source`` (the config.json file) when a key is unknown, of the wrong type
    or out of range."""
    from .config import AdaPerceiverConfig
    try:
        with warnings.catch_warnings():   # the model built from it warns, once
            warnings.simplefilter("ignore")
            AdaPerceiverConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{source}: {e}") from None


def load_weights(model, weights) -> "torch.nn.Module":
    """Load a weights file into ``model`` strictly (every key, every shape), prefixes stripped."""
    state = load_state_dict(weights)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)
    return model


def from_pretrained(path, config: Optional[dict] = None, *, map_location="cpu", model_cls=None,
                    **overrides):
    """Build the model from a released checkpoint (a directory, or a file plus ``config``);
    ``model_cls`` defaults to the class the config describes (distilled or classifier)."""
    from .model import model_class
    config, weights = read_checkpoint(path, config)
    config = {**config, **overrides}
    model = load_weights((model_cls or model_class(config))(**config), weights)
    return model.to(map_location) if map_location not in (None, "cpu") else model
