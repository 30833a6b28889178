"""Drop-in names for the authors' Hugging Face loading code.

The authors publish two checkpoints and load them with their ``hub/`` classes::

    from hub.networks.adaperceiver_classification import ClassificationAdaPerceiver
    from hub.networks.adaperceiver_distill import DistillAdaPerceiver

Here the same calls read::

    from adaperceiver import ClassificationAdaPerceiver, DistillAdaPerceiver
    model = ClassificationAdaPerceiver.from_pretrained("pjajal/adaperceiver-v1-in1k-ft")
    out = model(images, num_tokens=256, mat_dim=192, depth=12)      # out.logits
    backbone = DistillAdaPerceiver.from_pretrained("pjajal/adaperceiver-v1")
    out = backbone(images, num_tokens=256, mat_dim=128, depth=12)   # out.logits, out.features

``from_pretrained`` takes a Hugging Face repository id (fetched with
``huggingface_hub.snapshot_download``, which also reads the local cache), a local snapshot folder
(``config.json`` + ``model.safetensors``, the repositories' layout), or a single weights file with
a ``config.json`` beside it. Offline (``HF_HUB_OFFLINE=1`` in the environment at call time, or
``huggingface_hub.constants.HF_HUB_OFFLINE``, or ``local_files_only=True``) a repository id loads
only from the local cache, which is looked up at call time from ``cache_dir``, ``HF_HUB_CACHE``,
``HF_HOME`` (``$HF_HOME/hub``) or huggingface_hub's default. ``save_pretrained(path)`` writes the
same two files.

The two classes are thin subclasses of :class:`AdaPerceiverClassifier` and
:class:`AdaPerceiverDistill`: the one model implementation, with the authors' names and loader.
``ClassificationAdaPerceiver`` refuses a distilled checkpoint (its config.json has
``output_feat_dim``) and ``DistillAdaPerceiver`` refuses a classifier checkpoint; use
``adaperceiver.from_pretrained`` to build whichever class a checkpoint holds.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Union

from .checkpoint import WEIGHT_NAMES, load_weights, read_checkpoint
from .model import AdaPerceiverClassifier, AdaPerceiverDistill, model_class
from .registry import HUB_IDS

__all__ = ["ClassificationAdaPerceiver", "DistillAdaPerceiver", "resolve_pretrained",
           "hf_offline", "hf_cache_dir"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TRUE = {"1", "ON", "YES", "TRUE"}


def hf_offline() -> bool:
    """True when huggingface_hub must not touch the network: ``HF_HUB_OFFLINE`` in the environment
    now (read at call time, so setting it after import works) or huggingface_hub's constant."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hf_cache_dir(cache_dir: Optional[Union[str, os.PathLike]] = None) -> str:
    """The Hugging Face hub cache to use: ``cache_dir``, else ``HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else huggingface_hub's default (all read at call time)."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def resolve_pretrained(repo_id_or_path, *, revision: Optional[str] = None, cache_dir=None,
                       local_files_only: Optional[bool] = None, force_download: bool = False,
                       token=None) -> str:
    """A local folder or file for ``repo_id_or_path``: itself when it exists on disk, else the
    snapshot folder of the Hugging Face repository of that id (downloaded, or from the cache)."""
    if not isinstance(repo_id_or_path, (str, os.PathLike)):
        raise TypeError(f"repo_id_or_path={repo_id_or_path!r} is not allowed; allowed: a Hugging "
                        "Face repository id ('owner/name') or a local path")
    path = os.fspath(repo_id_or_path)
    if os.path.exists(path):
        return path
    if not _REPO_ID.match(path) or path.count("/") != 1:
        raise FileNotFoundError(
            f"repo_id_or_path={path!r} is neither an existing local path nor a Hugging Face "
            "repository id; allowed: 'owner/name' (e.g. 'pjajal/adaperceiver-v1-in1k-ft') or a "
            "local snapshot folder holding config.json + model.safetensors")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError as e:   # pragma: no cover - huggingface_hub is a dependency
        raise ImportError(f"loading repo {path!r} needs huggingface_hub (pip install "
                          f"huggingface_hub), or pass a local snapshot folder: {e}") from e
    offline = hf_offline()
    local_only = offline if local_files_only is None else bool(local_files_only)
    cache = hf_cache_dir(cache_dir)
    rev = revision or "main"
    where = f"repo {path!r} (revision {rev!r}; no local path of that name exists)"
    try:
        return snapshot_download(path, revision=revision, cache_dir=cache, token=token,
                                 local_files_only=local_only, force_download=force_download,
                                 allow_patterns=["config.json", *WEIGHT_NAMES])
    except LocalEntryNotFoundError as e:
        if local_only:
            why = ("HF_HUB_OFFLINE=1" if offline else "local_files_only=True")
            raise FileNotFoundError(
                f"{where} is not in the local Hugging Face cache {cache!r} and {why}, so nothing "
                "is downloaded; run once online (or `hf download "
                f"{path}`), set cache_dir= / HF_HUB_CACHE to the cache that holds it, or pass a "
                "local snapshot folder (config.json + model.safetensors)") from e
        raise ConnectionError(
            f"{where} could not be fetched from the Hugging Face Hub and is not in the local "
            f"cache {cache!r} (HF_HUB_OFFLINE is not set): {e.__class__.__name__}: "
            f"{str(e).splitlines()[0]}. Check the network, or pass a local snapshot folder "
            "(config.json + model.safetensors)") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"revision={rev!r} does not exist in repo {path!r} on the "
                                f"Hugging Face Hub: {e}") from e
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise FileNotFoundError(f"repo {path!r} is not on the Hugging Face Hub or needs a token "
                                f"(token=... / `huggingface-cli login`): "
                                f"{e.__class__.__name__}") from e
    except OSError as e:   # connection problems that huggingface_hub did not wrap
        raise ConnectionError(f"{where} could not be fetched from the Hugging Face Hub "
                              f"({e.__class__.__name__}: {e}); set HF_HUB_OFFLINE=1 to use the "
                              "local cache, or pass a local snapshot folder") from e


class _HubMixin:
    """``from_pretrained`` with the authors' (PyTorchModelHubMixin) call; ``save_pretrained``
    is the model's own (config.json + model.safetensors)."""

    REPO_ID: str = ""

    @classmethod
    def from_pretrained(cls, repo_id_or_path: Union[str, os.PathLike], *,
                        revision: Optional[str] = None, cache_dir=None, map_location="cpu",
                        local_files_only: Optional[bool] = None, force_download: bool = False,
                        token=None, **config_overrides):
        """Build the model from a Hugging Face repository id (``cls.REPO_ID`` is the authors'
        one) or a local snapshot folder / weights file. ``config_overrides`` are config.json
        keys (e.g. ``attn_layer="full"``); the weights must still fit (strict key and shape
        check). ``map_location`` moves the model after loading ("cpu", "cuda", a device)."""
        path = resolve_pretrained(repo_id_or_path, revision=revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only,
                                  force_download=force_download, token=token)
        config, weights = read_checkpoint(path)
        config = {**config, **config_overrides}
        distilled = model_class(config) is AdaPerceiverDistill
        if distilled != issubclass(cls, AdaPerceiverDistill):
            other = DistillAdaPerceiver if distilled else ClassificationAdaPerceiver
            what = ("a distilled backbone (config.json has output_feat_dim="
                    f"{config.get('output_feat_dim')!r})" if distilled else
                    "a classifier (config.json has no output_feat_dim)")
            raise ValueError(
                f"{cls.__name__}.from_pretrained({os.fspath(repo_id_or_path)!r}): the checkpoint "
                f"is {what}; load it with {other.__name__}.from_pretrained (repo "
                f"{other.REPO_ID!r}), or with adaperceiver.from_pretrained, which builds either")
        model = load_weights(cls(**config), weights)
        if map_location not in (None, "cpu"):
            model = model.to(map_location)
        return model.eval()


class ClassificationAdaPerceiver(_HubMixin, AdaPerceiverClassifier):
    """The ImageNet-1k classifier under the authors' name (``pjajal/adaperceiver-v1-in1k-ft``).
    Same model as :class:`AdaPerceiverClassifier`; ``forward`` returns ``.logits``
    (B, 1, num_classes)."""

    REPO_ID = HUB_IDS["adaperceiver_v1_in1k"]   # "pjajal/adaperceiver-v1-in1k-ft"


class DistillAdaPerceiver(_HubMixin, AdaPerceiverDistill):
    """The distilled ImageNet-12k backbone under the authors' name (``pjajal/adaperceiver-v1``).
    Same model as :class:`AdaPerceiverDistill`; ``forward`` returns ``.logits`` and
    ``.features`` (B, P, output_feat_dim)."""

    REPO_ID = HUB_IDS["adaperceiver_v1"]        # "pjajal/adaperceiver-v1"
