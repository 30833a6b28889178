"""Baselines built by timm with ``pretrained=False`` (nothing is downloaded), and their FLOPs.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a meta-device copy (no
memory, no time), multiply-add = 2, the same convention as :func:`adaperceiver.count_flops`.

A-ViT baselines (AVIT_BASELINES, not timm names; :mod:`adaperceiver.baselines.avit`): DeiT-T/S
with adaptive token halting, random init with the gate calibrated to the paper's compute, run with
compacted inference; their FLOPs depend on the input and are the mean per image over the
benchmark's inputs (batch 4, seed 0, as ``RunSettings.images()``), counted analytically.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch

__all__ = ["DEFAULT_BASELINES", "REFERENCE_BASELINE", "AVIT_BASELINES", "parse_baselines",
           "build_baseline", "baseline_flops", "meta_flops", "check_timm_name"]

DEFAULT_BASELINES = ("flexivit_small", "flexivit_base", "flexivit_large", "vit_base_patch16_224",
                     "vit_large_patch16_224", "vit_huge_patch14_224")
REFERENCE_BASELINE = "flexivit_large"
AVIT_BASELINES = ("avit_tiny_patch16_224", "avit_small_patch16_224")


def _timm():
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a bench dependency
        raise SystemExit("--baselines needs timm (pip install 'adaperceiver[bench]'), or pass "
                         f"--baselines none ({e})") from None
    return timm


@lru_cache(maxsize=1)
def _timm_names() -> frozenset:
    return frozenset(_timm().list_models())


def check_timm_name(name: str) -> str:
    if name in AVIT_BASELINES:
        return name
    if name not in _timm_names():
        import difflib
        close = difflib.get_close_matches(name, sorted(_timm_names()), n=4)
        hint = f"; close timm names: {', '.join(close)}" if close else ""
        raise ValueError(f"--baselines: {name!r} is not a timm model name; allowed: 'all' "
                         f"({', '.join(DEFAULT_BASELINES)}), 'none', an A-ViT name "
                         f"({', '.join(AVIT_BASELINES)}) or any name of timm.list_models(){hint}")
    return name


def parse_baselines(spec: Optional[Sequence[str]]) -> list[str]:
    """``all`` (the six of DEFAULT_BASELINES), ``none``, or timm model names (comma and/or
    space separated). Raises ValueError naming an unknown name."""
    if spec is None:
        return list(DEFAULT_BASELINES)
    if isinstance(spec, str):
        spec = [spec]
    names: list[str] = []
    for tok in spec:
        names.extend(p for p in str(tok).replace(",", " ").split() if p)
    if not names:
        raise ValueError("--baselines is empty; allowed: 'all', 'none', or timm model names")
    if names == ["none"]:
        return []
    out: list[str] = []
    for n in names:
        if n in ("none",):
            raise ValueError("--baselines: 'none' cannot be combined with other names")
        for m in (DEFAULT_BASELINES if n == "all" else [check_timm_name(n)]):
            if m not in out:
                out.append(m)
    return out


def _create(name: str, img_size: int):
    # FlexiViT defaults to 240 px: every baseline is built at the benchmark's image size when
    # its constructor takes ``img_size`` (ViTs do; convolutional nets take any size as is).
    # Every baseline gets a 1000-class head (vit_huge_patch14_224's default has none), so all
    # models of a run compute the same kind of output.
    timm = _timm()
    try:
        return timm.create_model(name, pretrained=False, img_size=img_size, num_classes=1000)
    except TypeError:
        return timm.create_model(name, pretrained=False, num_classes=1000)


def build_baseline(name: str, img_size: int = 224, device="cpu", dtype=torch.float32):
    """A timm model, random init (``pretrained=False``), eval mode, at ``img_size``."""
    check_timm_name(name)
    if name in AVIT_BASELINES:
        from adaperceiver.baselines.avit import build_avit_baseline
        return build_avit_baseline(name, img_size, device, dtype)
    model = _create(name, img_size)
    return model.eval().to(device=device, dtype=dtype)


@lru_cache(maxsize=64)
def baseline_flops(name: str, img_size: int = 224) -> tuple[float, int]:
    """(FLOPs per image, parameters) of a timm model at ``img_size``, counted on meta tensors
    (A-ViT: the mean per image over the benchmark's inputs, counted analytically)."""
    if name in AVIT_BASELINES:
        from adaperceiver.baselines.avit import avit_baseline_flops
        return avit_baseline_flops(name, img_size)
    return meta_flops(lambda: _create(name, img_size).eval(), img_size)


def meta_flops(build: Callable[[], torch.nn.Module], img_size: int) -> tuple[float, int]:
    """(FLOPs of one image's forward, parameters) of the model ``build()`` makes, built and
    run on meta tensors (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = build()
        x = torch.empty(1, 3, img_size, img_size)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(x)
    return float(fc.get_total_flops()), int(sum(p.numel() for p in model.parameters()))
