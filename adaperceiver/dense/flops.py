"""Encoder FLOPs of AdaPerceiver at the dense settings next to ViT-H/14, ViT-L/14 and ViT-B/14.

Dense settings (the authors' segmentation protocol, pjjajal/adaperceiver-public
config/segmentation/vit_huge_soadaperciever_12k.yaml): 518 px images, patch 14 (a 37 x 37 grid,
P = 1369 patches), t in {256, 512} latents (512 with RoPE scaling), widths w in mat_dims and
depths l. Their depth protocol (config/depth/...) uses 448 x 602 images (32 x 43 patches) and
t <= 256: ``encoder_flops(..., img_size=(448, 602))``. Like the authors' ``measure_flops`` of
``model.backbone`` (adaperceiver_eval_seg.py / _depth.py), the count stops at the per-patch
features: the dense head is not included.

"Encoder" FLOPs of AdaPerceiver (``adaperceiver.count_flops`` of the distilled backbone, the
reference's dense count, multiply-add = 2) are everything from the image to the per-patch
features a dense head reads:

    patch_embed + read (proj + attention) + l blocks (proj + attention + FFN at width w)
    + per-patch write-out (feat_proj + feat_attention) + output_adapter_feat (feat_adapter)

and leave out the classification readout (write_proj, write_attention, head). The ViTs' count
is their full forward at 518 px minus the classification head (built with ``num_classes=0``):
patch embedding, every block, the final norm, counted by ``FlopCounterMode`` on the meta device
(no memory, no time), as ``adaperceiver.bench.baselines.baseline_flops`` does. The ratio column
is ViT-H/14 FLOPs / this model's FLOPs.

``python -m adaperceiver.dense.flops`` prints the table (``--throughput`` adds images/s of
batch-1 forwards on this machine; progress goes to stderr).
"""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional, Sequence

import torch

from ..bench.timing import time_step

__all__ = ["ENCODER_PARTS", "VITS", "REFERENCE_VIT", "EncoderFlops", "encoder_flops",
           "vit_encoder_flops", "dense_configs", "flops_table", "closest_to_ratio",
           "definitions", "format_table", "time_forward", "add_throughput", "main"]

ENCODER_PARTS = ("patch_embed", "read_proj", "read_attention", "blocks_proj", "blocks_attention",
                 "blocks_ffn", "feat_proj", "feat_attention", "feat_adapter")
# display name -> timm name (built with img_size=518, num_classes=0, pretrained=False)
VITS = {"ViT-H/14": "vit_huge_patch14_224", "ViT-L/14": "vit_large_patch14_dinov2",
        "ViT-B/14": "vit_base_patch14_dinov2"}
REFERENCE_VIT = "ViT-H/14"
DENSE_IMG_SIZE = 518


@dataclass(frozen=True)
class EncoderFlops:
    total: float                 # FLOPs per image, encoder parts only
    parts: dict = field(default_factory=dict)
    params: int = 0              # parameters used by the encoder at this (w, l)

    @property
    def blocks(self) -> float:
        return float(sum(v for k, v in self.parts.items() if k.startswith("blocks_")))

    @property
    def readout(self) -> float:
        """Per-patch write-out and feature adapter."""
        return float(sum(v for k, v in self.parts.items() if k.startswith("feat_")))

    @property
    def attention(self) -> float:
        return float(sum(v for k, v in self.parts.items() if k.endswith("_attention")))


def _distilled_config(model_or_config=None):
    from ..config import AdaPerceiverConfig
    from ..flops import _config
    from ..registry import MODEL_CONFIGS
    if model_or_config is None:
        return AdaPerceiverConfig(**MODEL_CONFIGS["adaperceiver_v1"])
    cfg = _config(model_or_config)
    if not cfg.distilled:
        raise ValueError("encoder FLOPs need the distilled backbone (output_feat_dim set); "
                         "got output_feat_dim=None")
    return cfg


def encoder_flops(model_or_config=None, num_tokens: Optional[int] = None,
                  mat_dim: Optional[int] = None, depth: Optional[int] = None,
                  img_size=DENSE_IMG_SIZE) -> EncoderFlops:
    """Encoder FLOPs per image (see the module docstring) of the distilled backbone (default:
    ``adaperceiver_v1``) at (num_tokens, mat_dim, depth) and ``img_size``."""
    from ..flops import count_flops
    cfg = _distilled_config(model_or_config)
    f = count_flops(cfg, num_tokens, mat_dim, depth, img_size=img_size)
    parts = {k: float(f.parts[k]) for k in ENCODER_PARTS}
    C, K = cfg.embed_dim, cfg.num_classes
    # less the classification readout: output token, write head (4 linears, 2 norms), head
    params = f.params - C - (4 * C * C + 4 * C + 4 * C) - (C * K + K)
    return EncoderFlops(total=float(sum(parts.values())), parts=parts, params=int(params))


def _timm():
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a bench dependency
        raise SystemExit(f"the ViT rows need timm (pip install 'adaperceiver[bench]'): {e}")
    return timm


def build_vit(timm_name: str, img_size: int = DENSE_IMG_SIZE, device="cpu"):
    """A timm ViT at ``img_size`` without its classification head, random init, eval."""
    return _timm().create_model(timm_name, pretrained=False, img_size=img_size,
                                num_classes=0).eval().to(device)


@lru_cache(maxsize=16)
def vit_encoder_flops(timm_name: str, img_size: int = DENSE_IMG_SIZE) -> tuple[float, int]:
    """(FLOPs per image, parameters) of a timm ViT's forward without its head, on meta."""
    from ..bench.baselines import meta_flops
    return meta_flops(lambda: build_vit(timm_name, img_size, device="meta"), img_size)


def dense_configs(tokens: Sequence[int] = (256, 512), widths: Optional[Sequence[int]] = None,
                  depths: Sequence[int] = (7, 14, 21), model_or_config=None) -> list[tuple]:
    """(t, w, l) triples; widths default to the backbone's mat_dims."""
    cfg = _distilled_config(model_or_config)
    widths = cfg.mat_dims if widths is None else widths
    return [(int(t), int(w), int(l)) for t in tokens for w in widths for l in depths]


def flops_table(configs: Sequence[tuple], img_size: int = DENSE_IMG_SIZE,
                vits: Optional[dict] = None, model_or_config=None) -> list[dict]:
    """One row per AdaPerceiver config and per ViT: model, t, w, l, gflops, blocks_gflops,
    readout_gflops, params, ratio (ViT-H/14 FLOPs / the row's)."""
    vits = VITS if vits is None else vits
    rows = []
    for t, w, l in configs:
        e = encoder_flops(model_or_config, t, w, l, img_size)
        rows.append({"model": "AdaPerceiver", "t": t, "w": w, "l": l, "flops": e.total,
                     "blocks": e.blocks, "readout": e.readout, "params": e.params})
    for name, timm_name in vits.items():
        f, p = vit_encoder_flops(timm_name, img_size)
        rows.append({"model": name, "timm": timm_name, "t": None, "w": None, "l": None,
                     "flops": f, "blocks": None, "readout": None, "params": p})
    ref = next((r["flops"] for r in rows if r["model"] == REFERENCE_VIT), None)
    if ref is None:
        ref = vit_encoder_flops(VITS[REFERENCE_VIT], img_size)[0]
    for r in rows:
        r["ratio"] = ref / r["flops"]
    return rows


def closest_to_ratio(target: float = 26.0, tokens=(256, 512), widths=None,
                     depths=None, img_size: int = DENSE_IMG_SIZE, model_or_config=None):
    """The AdaPerceiver (t, w, l) row whose ViT-H/14 ratio is closest to ``target``, over every
    depth 1..L by default."""
    cfg = _distilled_config(model_or_config)
    depths = range(1, cfg.depth + 1) if depths is None else depths
    rows = flops_table(dense_configs(tokens, widths, depths, cfg), img_size,
                       vits={REFERENCE_VIT: VITS[REFERENCE_VIT]}, model_or_config=cfg)
    return min((r for r in rows if r["model"] == "AdaPerceiver"),
               key=lambda r: abs(r["ratio"] - target))


def definitions(num_tokens: int = 256, mat_dim: Optional[int] = None,
                depth: Optional[int] = None, img_size: int = DENSE_IMG_SIZE,
                model_or_config=None) -> dict:
    """FLOPs of one config under narrower readings of "encoder", to place a quoted ratio:
    the default (to the per-patch features), without the feature adapter (to the C-wide
    per-patch tokens), without the per-patch write-out (patch embed + read + blocks), and the
    last without attention matmuls (what FlopCounterMode sees of a flex_attention model)."""
    e = encoder_flops(model_or_config, num_tokens, mat_dim, depth, img_size)
    p = e.parts
    no_adapter = e.total - p["feat_adapter"]
    no_readout = no_adapter - p["feat_proj"] - p["feat_attention"]
    return {"encoder (to per-patch features)": e.total,
            "without feat_adapter (to per-patch tokens)": no_adapter,
            "patch embed + read + blocks": no_readout,
            "patch embed + read + blocks, no attention matmuls":
                no_readout - p["read_attention"] - p["blocks_attention"]}


def format_table(rows: Sequence[dict], img_size: int = DENSE_IMG_SIZE) -> str:
    """A plain-text table of ``flops_table`` rows (img/s when present)."""
    timed = any("img_per_s" in r for r in rows)
    head = (f"{'model':<14}{'t':>5}{'w':>5}{'l':>4}{'encoder GFLOPs':>16}{'blocks':>9}"
            f"{'readout':>9}{'params M':>10}{'ViT-H/14 / x':>14}" + (f"{'img/s':>9}" if timed
                                                                    else ""))
    lines = [f"encoder FLOPs per image at {img_size} px, patch 14 "
             f"({(img_size // 14) ** 2} patches); multiply-add = 2", head, "-" * len(head)]
    for r in rows:
        def opt(v, fmt):
            return format(v, fmt) if v is not None else "-"
        line = (f"{r['model']:<14}{opt(r['t'], 'd'):>5}{opt(r['w'], 'd'):>5}"
                f"{opt(r['l'], 'd'):>4}{r['flops'] / 1e9:>16.1f}"
                f"{opt(r['blocks'] and r['blocks'] / 1e9, '.1f'):>9}"
                f"{opt(r['readout'] and r['readout'] / 1e9, '.1f'):>9}"
                f"{r['params'] / 1e6:>10.1f}{r['ratio']:>13.1f}x")
        if timed:
            line += f"{opt(r.get('img_per_s'), '.3f'):>9}"
        lines.append(line)
    return "\n".join(lines)


def time_forward(fn, iters: int = 2, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``iters`` timed calls after ``warmup`` untimed ones,
    under inference_mode (the harness's timer, adaperceiver.bench.timing)."""
    with torch.inference_mode():
        return time_step(fn, "cpu", warmup=warmup, rounds=iters).median_ms / 1e3


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_throughput(rows: list[dict], which: Sequence[tuple], img_size: int = DENSE_IMG_SIZE,
                   iters: int = 2, warmup: int = 1, vit_iters: int = 1, vit_warmup: int = 1,
                   batch: int = 1, backbone=None) -> list[dict]:
    """Time batch-``batch`` forwards of the AdaPerceiver rows whose (t, w, l) is in ``which``
    (the distilled backbone's forward to its per-patch features) and of every ViT row; sets
    ``img_per_s`` and ``sec_per_iter`` on those rows. Progress goes to stderr."""
    import gc
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    which = {tuple(c) for c in which}
    ada = [r for r in rows if r["model"] == "AdaPerceiver" and (r["t"], r["w"], r["l"]) in which]
    if ada:
        if backbone is None:
            from ..registry import create_model
            _log("building adaperceiver_v1 (random init) ...")
            torch.manual_seed(0)
            backbone = create_model("adaperceiver_v1").eval()
        for r in ada:
            _log(f"timing AdaPerceiver t={r['t']} w={r['w']} l={r['l']} at {img_size} px ...")
            s = time_forward(lambda: backbone(x, num_tokens=r["t"], mat_dim=r["w"],
                                              depth=r["l"]).features, iters, warmup)
            r["sec_per_iter"], r["img_per_s"] = s, batch / s
        del backbone
    for r in rows:
        if r["model"] == "AdaPerceiver":
            continue
        _log(f"building and timing {r['model']} ({r['timm']}) at {img_size} px "
             f"({vit_warmup} + {vit_iters} iterations) ...")
        step = functools.partial(build_vit(r["timm"], img_size), x)
        s = time_forward(step, vit_iters, vit_warmup)
        r["sec_per_iter"], r["img_per_s"] = s, batch / s
        del step            # free the model (ViT-H/14 holds 2.5 GB) before the next one
        gc.collect()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m adaperceiver.dense.flops",
                                description="Encoder FLOPs of AdaPerceiver at the dense "
                                            "settings next to ViT-H/L/B-14 (see the module "
                                            "docstring for what is counted)")
    p.add_argument("--img-size", type=int, default=DENSE_IMG_SIZE)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 512])
    p.add_argument("--widths", type=int, nargs="+", default=None,
                   help="default: the backbone's mat_dims (416 624 832)")
    p.add_argument("--depths", type=int, nargs="+", default=[7, 14, 21])
    p.add_argument("--target-ratio", type=float, default=26.0,
                   help="report the (t, w, l) over every depth whose ViT-H/14 ratio is closest")
    p.add_argument("--throughput", action="store_true",
                   help="also time batch-1 forwards on this machine: the smallest and largest "
                        "AdaPerceiver configs of the table and the three ViTs (minutes on a "
                        "CPU: ViT-H/14 at 518 px takes tens of seconds per image)")
    p.add_argument("--iters", type=int, default=2, help="timed AdaPerceiver iterations")
    p.add_argument("--vit-iters", type=int, default=1, help="timed ViT iterations")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    a = p.parse_args(argv)
    if a.img_size % 14 or a.img_size < 14:
        p.error(f"--img-size {a.img_size} is not allowed; allowed: a positive multiple of 14")
    if a.threads < 0:
        p.error(f"--threads {a.threads} is not allowed; allowed: an int >= 0")
    if a.threads:
        torch.set_num_threads(a.threads)
    configs = dense_configs(a.tokens, a.widths, a.depths)
    rows = flops_table(configs, a.img_size)
    if a.throughput:
        ada = sorted(configs, key=lambda c: encoder_flops(None, *c, img_size=a.img_size).total)
        add_throughput(rows, [ada[0], ada[-1]], a.img_size, iters=a.iters,
                       vit_iters=a.vit_iters)
    print(format_table(rows, a.img_size))
    best = closest_to_ratio(a.target_ratio, a.tokens, a.widths, None, a.img_size)
    print(f"\nclosest to {a.target_ratio:g}x fewer encoder FLOPs than {REFERENCE_VIT} (over "
          f"t in {a.tokens}, every width and depth): t={best['t']} w={best['w']} "
          f"l={best['l']}: {best['flops'] / 1e9:.1f} GFLOPs, {best['ratio']:.1f}x")
    ref = vit_encoder_flops(VITS[REFERENCE_VIT], a.img_size)[0]
    for t in a.tokens:
        print(f"t={t}, w=832, l=21 (full width and depth) under narrower definitions:")
        for name, f in definitions(t, None, None, a.img_size).items():
            print(f"  {name:<52}{f / 1e9:>8.1f} GFLOPs  {ref / f:>5.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
