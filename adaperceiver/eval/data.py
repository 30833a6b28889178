"""Evaluation data: an image folder (class subfolders) or a timm dataset, the model's transform,
this process's share of the batches, and scikit-learn's digits written out as a folder of PNGs.

Everything that can be wrong with the input (a missing or empty folder, images outside class
subfolders, classes that do not match the model, a class map that does not cover the folder,
files that are not images) is found by :func:`open_dataset` / :func:`check_images` before the
evaluation starts, and the error names the path or class at fault. An image that fails later
(a truncated file whose header reads) raises naming the file: nothing is skipped or replaced,
each image is counted exactly once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = ["EvalDataset", "open_dataset", "data_config", "check_images", "rank_batches",
           "limit_indices", "write_digits_folder", "DIGITS_FOLDER_CONFIG", "load_class_map"]

_DATASET_PREFIXES = ("torch/", "tfds/", "wds/", "hfds/", "hfids/")


def data_config(model, overrides: Optional[dict] = None) -> dict:
    """timm's eval data config for ``model``: its ``pretrained_cfg`` (models built through timm)
    or the registry's ImageNet defaults with the model's input size (channels, img_size),
    then ``overrides`` (input_size / img_size, mean, std, crop_pct, crop_mode, interpolation)
    through ``timm.data.resolve_data_config``."""
    from timm.data import resolve_data_config
    cfg = model.config
    pretrained = dict(getattr(model, "pretrained_cfg", None) or {})
    if not pretrained:
        from ..timm import default_cfgs
        pretrained = default_cfgs["adaperceiver_v1_in1k"].default.to_dict()
    pretrained["input_size"] = (cfg.in_channels, cfg.img_size, cfg.img_size)
    args = {k: v for k, v in (overrides or {}).items() if v is not None}
    args.setdefault("in_chans", cfg.in_channels)
    return resolve_data_config(args, pretrained_cfg=pretrained)


def load_class_map(path: str) -> dict:
    """``--class-map``: a text file with one folder name per line (line i = class i), or
    ``name index`` / ``name,index`` pairs; {folder name: class index}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--class-map {path!r} does not exist")
    out = {}
    with open(path) as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    for i, ln in enumerate(lines):
        parts = ln.replace(",", " ").split()
        if len(parts) == 1:
            name, idx = parts[0], i
        elif len(parts) == 2 and parts[1].lstrip("-").isdigit():
            name, idx = parts[0], int(parts[1])
        else:
            raise ValueError(f"--class-map {path!r} line {i + 1}: {ln!r}; allowed: a folder "
                             "name, or 'name index'")
        if name in out:
            raise ValueError(f"--class-map {path!r}: class {name!r} is listed twice")
        out[name] = idx
    if not out:
        raise ValueError(f"--class-map {path!r} is empty")
    return out


class EvalDataset(torch.utils.data.Dataset):
    """(image tensor, label) of a timm reader's sample i: opened with PIL, converted to
    ``img_mode``, transformed. Unlike timm's ImageDataset, a sample that fails to load raises
    (naming the file) instead of being replaced by the next one, which would count an image
    twice."""

    def __init__(self, reader, transform: Callable, img_mode: str = "RGB"):
        self.reader, self.transform, self.img_mode = reader, transform, img_mode

    def __len__(self):
        return len(self.reader)

    def filename(self, i: int) -> str:
        try:
            return str(self.reader._filename(i, absolute=True))
        except Exception:      # readers without file names (tar members)
            return f"sample {i}"

    def __getitem__(self, i):
        from PIL import Image
        try:
            img, target = self.reader[i][:2]
            img = Image.open(img)
            img = img.convert(self.img_mode)       # decodes every pixel
        except Exception as e:
            raise RuntimeError(f"image {self.filename(i)!r} could not be read: "
                               f"{e.__class__.__name__}: {e}") from e
        return self.transform(img), int(target)


class _TimmDataset(torch.utils.data.Dataset):
    """A timm ``create_dataset`` dataset (torch/, hfds/, ...) with labels as ints."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i][:2]
        return x, int(y)


@dataclass
class OpenedData:
    dataset: torch.utils.data.Dataset
    classes: Optional[list]     # folder names in class-index order (None: a timm dataset)
    root: str


def _is_path(data: str) -> bool:
    return os.path.exists(data) or not data.startswith(_DATASET_PREFIXES)


def open_dataset(data: str, num_classes: int, transform: Callable, *, img_mode: str = "RGB",
                 split: str = "validation", class_map: Optional[str] = None,
                 data_dir: Optional[str] = None) -> OpenedData:
    """The evaluation set named by ``data``: an image folder with one subfolder per class
    (ImageNet-style; a ``split`` subfolder such as ``val`` is used when present) or a timm
    dataset name (``torch/cifar10``, ``hfds/...``; root ``data_dir``). Folder classes are
    sorted names (0..K-1) unless ``class_map`` maps them; both must fit ``num_classes``."""
    if _is_path(data):
        return _open_folder(data, num_classes, transform, img_mode, split, class_map)
    from timm.data import create_dataset
    if class_map:
        raise ValueError(f"--class-map is for image folders; DATA {data!r} is a timm dataset")
    try:
        ds = create_dataset(data, root=data_dir or "", split=split, is_training=False,
                            download=False, transform=transform)
    except Exception as e:
        raise ValueError(f"DATA {data!r}: timm's create_dataset could not open it (root "
                         f"{data_dir!r}, split {split!r}): {e.__class__.__name__}: {e}") from e
    if len(ds) == 0:
        raise ValueError(f"DATA {data!r} (split {split!r}) holds no samples")
    return OpenedData(_TimmDataset(ds), None, data_dir or "")


def _open_folder(path, num_classes, transform, img_mode, split, class_map) -> OpenedData:
    from timm.data.readers import create_reader
    from timm.data.readers.img_extensions import get_img_extensions
    if not os.path.exists(path):
        raise FileNotFoundError(f"DATA {path!r} does not exist; allowed: an image folder with "
                                "one subfolder per class, or a timm dataset name such as "
                                "torch/cifar10")
    if not os.path.isdir(path) and not path.endswith(".tar"):
        raise ValueError(f"DATA {path!r} is a file; allowed: an image folder (class "
                         "subfolders) or a .tar of one")
    mapping = load_class_map(class_map) if class_map else None
    # the reader keeps only classes in its map: read everything first, so that a folder the
    # map does not cover is an error rather than silently dropped
    exts = ", ".join(sorted(get_img_extensions()))
    try:
        reader = create_reader("", root=path, split=split)
    except RuntimeError as e:      # timm's folder reader: "Found 0 images in subfolders of"
        raise ValueError(f"DATA {path!r} holds no images (looked for {exts} in its class "
                         f"subfolders; split {split!r}): {e}") from None
    root = getattr(reader, "root", path)
    names = sorted(_class_index(reader))
    if len(reader) == 0:
        raise ValueError(f"DATA {root!r} holds no images (looked for {exts} in its class "
                         "subfolders)")
    if "" in names:
        raise ValueError(f"DATA {root!r} has images directly in it; allowed: one subfolder per "
                         "class holding that class's images")
    if mapping is None:
        if len(names) != num_classes:
            raise ValueError(
                f"DATA {root!r} has {len(names)} class folders ({_show(names)}) but the model "
                f"has num_classes={num_classes}; pass --class-map FILE (one folder name per "
                "line in the model's class order, or 'name index' lines) to map the folders to "
                "the model's classes")
    else:
        missing = [n for n in names if n not in mapping]
        if missing:
            raise ValueError(f"--class-map {class_map!r} does not map the folders "
                             f"{_show(missing)} of DATA {root!r}; every class folder must be "
                             "listed")
        bad = {n: mapping[n] for n in names if not 0 <= mapping[n] < num_classes}
        if bad:
            raise ValueError(f"--class-map {class_map!r} maps {_show(list(bad.items()))} "
                             f"outside the model's classes; allowed: indices 0..{num_classes - 1}")
        reader = create_reader("", root=path, split=split,
                               class_map={n: mapping[n] for n in names})
    classes = [None] * num_classes
    for n, i in _class_index(reader).items():
        classes[i] = n
    return OpenedData(EvalDataset(reader, transform, img_mode), classes, root)


def _class_index(reader) -> dict:
    """{class folder name: index} of a timm reader: ``class_to_idx`` of the folder reader,
    ``class_name_to_idx`` of the tar readers."""
    for attr in ("class_to_idx", "class_name_to_idx"):
        if isinstance(getattr(reader, attr, None), dict):
            return getattr(reader, attr)
    return {}


def _show(items, k: int = 6) -> str:
    items = list(items)
    s = ", ".join(repr(i) if isinstance(i, str) else str(i) for i in items[:k])
    return s + (f", ... ({len(items)} in all)" if len(items) > k else "")


def check_images(dataset, indices: Sequence[int], progress: bool = False, workers: int = 0
                 ) -> None:
    """Open the header of every image in ``indices`` (fast: no pixels are decoded) and raise
    naming the first files that are not readable images. Datasets without files pass."""
    if not isinstance(dataset, EvalDataset):
        return
    from PIL import Image
    from tqdm import tqdm
    bad = []
    for i in tqdm(indices, desc="checking images", unit="img", disable=not progress,
                  leave=False, dynamic_ncols=True):
        f = None
        try:
            f, _ = dataset.reader[i][:2]
            with Image.open(f) as img:
                img.size
        except Exception as e:
            bad.append(f"{dataset.filename(i)} ({e.__class__.__name__})")
            if len(bad) >= 5:
                break
        finally:
            if hasattr(f, "close"):
                f.close()
    if bad:
        raise ValueError(f"unreadable images in DATA: {'; '.join(bad)}" +
                         (" and maybe more" if len(bad) >= 5 else ""))


def limit_indices(n: int, limit: Optional[int]) -> list[int]:
    """All n samples, or ``limit`` of them spread evenly over the set (a class-sorted folder
    then still shows every class)."""
    if not limit or limit >= n:
        return list(range(n))
    return sorted({(i * n) // limit for i in range(limit)})


def rank_batches(indices: Sequence[int], batch_size: int, rank: int = 0, world: int = 1
                 ) -> list[list[int]]:
    """This process's batches: the single-process batches (consecutive ``batch_size`` chunks
    of ``indices``), batch j going to rank j % world. Every image is in exactly one batch of one
    rank (no padding), and each batch holds the same images as in a single-process run."""
    batches = [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    return batches[rank::world]


# scikit-learn's digits as 8-bit grayscale PNGs: pixel value v (0..16) is stored as 15 v (exact),
# which ToTensor reads as v / 17; the mean and std below are the digits recipe's (for v / 16)
# scaled by 16 / 17, so the normalised input is the recipe's up to float rounding.
def _digits_norm():
    from ..data import DIGITS_MEAN, DIGITS_STD
    return DIGITS_MEAN * 16 / 17, DIGITS_STD * 16 / 17


DIGITS_FOLDER_CONFIG = dict(input_size=(1, 8, 8), crop_pct=1.0, interpolation="bicubic",
                            mean=(_digits_norm()[0],), std=(_digits_norm()[1],))


def write_digits_folder(root: str, split: str = "test", seed: int = 0) -> dict:
    """Write one split of the digits recipe's data (``adaperceiver.data.digits_split(seed)``) as
    ``root/<digit>/<index>.png`` (8x8 grayscale). Returns the data config overrides that turn the
    PNGs back into the recipe's normalised tensors (:data:`DIGITS_FOLDER_CONFIG`)."""
    import numpy as np
    from PIL import Image

    from ..data import DIGITS_MEAN, DIGITS_STD, digits_split
    s = digits_split(seed)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r} is not allowed; allowed: train, val, test")
    x, y = getattr(s, f"x_{split}"), getattr(s, f"y_{split}")
    v = torch.round((x[:, 0] * DIGITS_STD + DIGITS_MEAN) * 16).clamp(0, 16)   # the raw 0..16
    for i, (img, label) in enumerate(zip(v, y.tolist())):
        d = os.path.join(root, str(label))
        os.makedirs(d, exist_ok=True)
        Image.fromarray((img.numpy() * 15).astype(np.uint8)).save(
            os.path.join(d, f"{i:05d}.png"))
    return dict(DIGITS_FOLDER_CONFIG)
