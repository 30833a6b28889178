"""A roofline PROJECTION for GPUs. Not a measurement: nothing here ran on a GPU.

For every configuration the time of one batch of B images is bounded below by
``max(FLOPs / peak, bytes / bandwidth)``; the projected img/s is ``B / that bound``, an upper
bound on throughput that real kernels do not reach.

FLOPs: forward FLOPs per image (multiply-add = 2) x B. For AdaPerceiver the *needed* FLOPs
(the block-masked attention scores that our kernels skip are removed; ``count_flops().needed``);
for timm baselines everything FlopCounterMode counts.

Byte model (a minimum; everything else is assumed to stay on chip):
  * weights: the parameters used at the configuration (AdaPerceiver: blocks 1..l, FFN rows
    and columns up to int(w * ffn_ratio), patch embedding, read/write heads, head; a baseline:
    all its parameters), read once per batch at ``bytes_per_el`` bytes each (bf16: 2);
  * activations in: the images, B x 3 x H x W elements; activations out: the logits,
    B x num_classes elements, both at ``bytes_per_el``.
Intermediate activations (patches, latents, attention scores) are assumed never to leave the
chip, so the bound is optimistic for large batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .report import align_table

__all__ = ["GPU", "GPUS", "roofline_rows", "format_roofline", "BYTE_MODEL"]

BYTE_MODEL = ("bytes = params_used x bytes_per_el (weights read once per batch) + "
              "B x (3 x H x W + num_classes) x bytes_per_el (images in, logits out); "
              "intermediates assumed on chip")


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float   # dense bf16, FLOP/s
    bandwidth: float    # bytes/s

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/byte) where compute and memory bounds meet."""
        return self.peak_flops / self.bandwidth


GPUS = (GPU("H100", 989e12, 3.35e12), GPU("H200", 989e12, 4.8e12))


def roofline_rows(items: Sequence[dict], batch_sizes: Sequence[int], img_size: int,
                  num_classes: int = 1000, bytes_per_el: int = 2,
                  gpus: Sequence[GPU] = GPUS) -> list[dict]:
    """``items``: dicts with ``config``, ``kind``, ``flops`` (per image, needed), ``params``
    and optionally ``num_classes``. One output row per (item, batch size, GPU)."""
    out = []
    for it in items:
        k = it.get("num_classes", num_classes)
        for b in batch_sizes:
            flops = it["flops"] * b
            weight_bytes = it["params"] * bytes_per_el
            act_bytes = b * (3 * img_size * img_size + k) * bytes_per_el
            total_bytes = weight_bytes + act_bytes
            for g in gpus:
                t_c, t_m = flops / g.peak_flops, total_bytes / g.bandwidth
                t = max(t_c, t_m)
                out.append({
                    "kind": it["kind"], "config": it["config"], "batch_size": b, "gpu": g.name,
                    "gflops_per_batch": flops / 1e9, "weight_mb": weight_bytes / 1e6,
                    "act_mb": act_bytes / 1e6, "intensity_flop_per_byte": flops / total_bytes,
                    "bound": "compute" if t_c >= t_m else "memory",
                    "time_bound_ms": t * 1e3, "img_per_s_bound": b / t,
                })
    return out


def format_roofline(rows: Sequence[dict], bytes_per_el: int = 2,
                    gpus: Sequence[GPU] = GPUS) -> str:
    dt = {2: "bf16", 4: "fp32", 1: "fp8"}.get(bytes_per_el, f"{bytes_per_el}-byte")
    head = ["ROOFLINE PROJECTION (not a measurement: no GPU was used)",
            "  " + ", ".join(f"{g.name}: {g.peak_flops / 1e12:.0f} TFLOP/s dense bf16, "
                             f"{g.bandwidth / 1e12:.2f} TB/s (ridge {g.ridge:.0f} FLOP/B)"
                             for g in gpus),
            f"  weights and activations at {dt} ({bytes_per_el} B/element); {BYTE_MODEL}",
            "  AdaPerceiver FLOPs exclude the block-masked attention scores (what the kernels "
            "skip); time bound = max(FLOPs/peak, bytes/bandwidth); img/s bound = B / time bound",
            ""]
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r["kind"], r["config"], r["batch_size"]), {})[r["gpu"]] = r
    cols = ["model", "config", "B", "GFLOP/batch", "weights MB", "FLOP/B"]
    for g in gpus:
        cols += [f"{g.name} bound", f"{g.name} ms", f"{g.name} img/s"]
    lines = []
    for (kind, config, b), per in by_key.items():
        any_r = next(iter(per.values()))
        cells = ["AdaPerceiver" if kind == "adaperceiver" else "baseline", config, str(b),
                 f"{any_r['gflops_per_batch']:.1f}", f"{any_r['weight_mb']:.1f}",
                 f"{any_r['intensity_flop_per_byte']:.0f}"]
        for g in gpus:
            r = per.get(g.name)
            cells += ([r["bound"], f"{r['time_bound_ms']:.3f}", f"{r['img_per_s_bound']:.0f}"]
                      if r else ["-"] * 3)
        lines.append(cells)
    return "\n".join(head + [align_table(cols, lines, left={0, 1})])
