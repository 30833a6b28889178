"""The end-to-end inference figures, measured side by side in one run.

* the full configuration (t=256, w=832, l=21) against timm's flexivit_large at 224 px and
  against the GEMM bound: the model's needed FLOPs per image divided by the rate of a 2048^3
  matmul (``torch.mm``) in the run's precision, measured in the same run; when the model's
  float32 CPU projections run on another GEMM library (``ops.cpu_gemm_library()``: oneDNN), the
  same product through that library is timed too and the bound at its rate printed beside it
  (no target: the stricter reading);
* a mixed batch (every sample its own t, w, l) against the same configurations run as
  single-configuration batches (per-sample average), and against padding every sample to the
  batch's largest t, w and l (compared with the ratio of the FLOPs).

Precision: the model's own dtype (``model.to(torch.bfloat16)``: images, flexivit_large and the
matmul in bfloat16 too) or autocast (``amp_dtype``: float32 weights, every step under
``torch.autocast`` at that dtype, the matmul in it; the full configuration is then also timed
as a copy of the model cast to that dtype, in the same rounds, for the cost of autocast over
the cast model); the targets are per precision (TARGETS, LOW_PRECISION_TARGETS).

Every step is timed round-robin; each ratio is the median over rounds of that round's ratio
(paired), so machine load that drifts between rounds cancels; img/s are medians of times.

Used by ``benchmarks/test_bench_inference.py`` and ``python -m adaperceiver.bench --inference``.
"""
from __future__ import annotations

import copy
import random
import statistics
from typing import Optional, Sequence

import torch

from .. import ops
from ..flops import count_flops
from .report import align_table
from .timing import time_interleaved

__all__ = ["full_config_figures", "mixed_batch_figures", "format_figures",
           "TARGETS", "LOW_PRECISION_TARGETS", "targets_for", "FULL_MIN_ROUNDS",
           "MIXED_MIN_ROUNDS"]

TARGETS = {
    "full_vs_flexivit_large": 1.6,        # at least, img/s ratio
    "full_vs_gemm_bound": 0.9,            # at least
    "mixed_vs_single_config_avg": 1.2,    # at most, time ratio
    "padded_over_mixed_vs_flops_ratio": 0.2,  # |time ratio / FLOP ratio - 1| at most
    "autocast_vs_cast_model": 1.1,        # at most: autocast's time / the model cast's
}
# bfloat16 / float16 (cast or autocast): the matmul bound is ~5x higher there (AMX), the
# model's non-GEMM work weighs more against it
LOW_PRECISION_TARGETS = {**TARGETS, "full_vs_gemm_bound": 0.75}


def targets_for(dtype: torch.dtype) -> dict:
    return TARGETS if dtype in (torch.float32, torch.float64) else LOW_PRECISION_TARGETS


def _run_dtype(model, amp_dtype) -> torch.dtype:
    """The precision a run computes in: autocast's dtype, else the model's."""
    return amp_dtype or next(model.parameters()).dtype


def _in_precision(fn, device, amp_dtype):
    """fn run under autocast at amp_dtype (None: as it is)."""
    if amp_dtype is None:
        return fn
    dev = torch.device(device).type

    def step():
        with torch.autocast(dev, dtype=amp_dtype):
            return fn()
    return step


def _paired(num: Sequence[float], den: Sequence[float]) -> float:
    """The median over rounds of num[r] / den[r]: both were timed in the same round, so a load
    that changes between rounds (a shared machine) cancels in each ratio instead of landing on
    one side of a ratio of medians."""
    return statistics.median(a / b for a, b in zip(num, den))


# the full configuration's rounds spread by up to +-30% on a shared 2-core machine (a stall of
# one core stops both threads): callers time at least this many
FULL_MIN_ROUNDS = 5

# the mixed batch and its single-config batches take well under a second each, and their ratio
# moves by several percent between rounds on a shared machine: callers time at least this many
MIXED_MIN_ROUNDS = 7


def _gemm_step(device="cpu", n: int = 2048, dtype=torch.float32):
    """(step, FLOPs): an n^3 matmul in dtype on fresh random operands."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2 * n ** 3


def _library_gemm_step(device="cpu", n: int = 2048):
    """The same n^3 product through ``ops.linear`` (the model's projections' GEMM library), or
    None when that is torch.mm's own (not the CPU, or ``cpu_gemm_library() == "mkl"``)."""
    if torch.device(device).type != "cpu" or ops.cpu_gemm_library() == "mkl":
        return None
    a = torch.randn(n, n, device=device)
    w = torch.randn(n, n, device=device)
    return lambda: ops.linear(a, w)


@torch.inference_mode()
def full_config_figures(model, batch: int = 4, img_size: int = 224, rounds: int = FULL_MIN_ROUNDS,
                        baseline: Optional[torch.nn.Module] = None, device="cpu",
                        amp_dtype: Optional[torch.dtype] = None) -> dict:
    """img/s of the full configuration, flexivit_large and the GEMM bound, in one run: the
    2048^3 matmul, the model and flexivit_large are timed round-robin, so the three sample the
    same machine load over the same span of time. In the model's dtype, or under autocast at
    amp_dtype (see the module's docstring)."""
    dtype = _run_dtype(model, amp_dtype)
    model_dtype = next(model.parameters()).dtype
    if baseline is None:
        import timm
        baseline = timm.create_model("flexivit_large", pretrained=False, img_size=img_size)
    baseline = baseline.eval().to(device=device, dtype=model_dtype)
    x = torch.randn(batch, 3, img_size, img_size, device=device, dtype=model_dtype)
    cfg = model.config
    needed = count_flops(model, cfg.max_latent_tokens, cfg.embed_dim, cfg.depth,
                         img_size).needed
    gemm, gemm_flops = _gemm_step(device, dtype=dtype)
    # (ops.linear picks a library for float32 only: other dtypes take torch.mm's)
    lib_gemm = _library_gemm_step(device) if dtype == torch.float32 else None
    steps = [gemm, _in_precision(lambda: model(x), device, amp_dtype),
             _in_precision(lambda: baseline(x), device, amp_dtype)]
    steps += [lib_gemm] if lib_gemm else []
    # autocast's cost: the same model cast to the autocast dtype, timed in the same rounds
    with_cast = amp_dtype is not None and amp_dtype != model_dtype
    if with_cast:
        cast_model, x_cast = copy.deepcopy(model).to(amp_dtype), x.to(amp_dtype)
        steps.append(lambda: cast_model(x_cast))
    timings = time_interleaved(steps, device, warmup=1, rounds=rounds)
    t_gemm, t_model, t_base = timings[:3]
    t_lib = timings[3:4] if lib_gemm else []
    cast = {}
    if with_cast:
        cast = {"cast_model_precision": _precision_name(amp_dtype, None),
                "autocast_vs_cast_model": _paired(t_model.times_ms, timings[-1].times_ms)}
    rate = gemm_flops / (t_gemm.median_ms / 1e3)
    model_ips = batch / (t_model.median_ms / 1e3)
    base_ips = batch / (t_base.median_ms / 1e3)
    bound = rate / needed
    # the ratios: per round (paired), then the median; model img/s over the bound's img/s is
    # (GEMM time x model FLOPs) / (model time x GEMM FLOPs)
    per_img = needed * batch / gemm_flops
    lib = {}
    if t_lib:
        lib_rate = gemm_flops / (t_lib[0].median_ms / 1e3)
        lib = {"library": ops.cpu_gemm_library(), "library_gemm_gflops": lib_rate / 1e9,
               "full_vs_library_gemm_bound": per_img * _paired(t_lib[0].times_ms,
                                                               t_model.times_ms)}
    return {"precision": _precision_name(dtype, amp_dtype),
            "low_precision": dtype in (torch.bfloat16, torch.float16),
            "gemm_gflops": rate / 1e9, **lib, "model_img_s": model_ips,
            "model_spread_pct": t_model.spread_pct,
            "flexivit_large_img_s": base_ips, "flexivit_large_spread_pct": t_base.spread_pct,
            "gemm_bound_img_s": bound, "model_gflops": needed / 1e9,
            "full_vs_flexivit_large": _paired(t_base.times_ms, t_model.times_ms),
            "full_vs_gemm_bound": per_img * _paired(t_gemm.times_ms, t_model.times_ms),
            **cast}


def _precision_name(dtype, amp_dtype) -> str:
    name = str(dtype).replace("torch.", "")
    return f"autocast {name}" if amp_dtype is not None else name


def random_mixed_configs(model, batch: int, seed: int = 0) -> list[tuple[int, int, int]]:
    cfg = model.config
    rng = random.Random(seed)
    return [(rng.choice(cfg.mask_token_grans), rng.choice(cfg.mat_dims),
             rng.randint(1, cfg.depth)) for _ in range(batch)]


@torch.inference_mode()
def mixed_batch_figures(model, configs: Optional[Sequence[tuple[int, int, int]]] = None,
                        batch: int = 4, img_size: int = 224, rounds: int = MIXED_MIN_ROUNDS,
                        device="cpu", seed: int = 0,
                        amp_dtype: Optional[torch.dtype] = None) -> dict:
    """A batch whose samples have their own (t, w, l), against the same configurations run as
    single-configuration batches of the same size, and against padding to the largest."""
    configs = list(configs or random_mixed_configs(model, batch, seed))
    B = len(configs)
    x = torch.randn(B, 3, img_size, img_size, device=device,
                    dtype=next(model.parameters()).dtype)
    t, w, l = (list(c) for c in zip(*configs))
    big = (max(t), max(w), max(l))
    # interleaved round-robin: the mixed batch, each single-config batch and the padded batch
    # sample the same machine load over the same span of time
    steps = [lambda: model(x, num_tokens=t, mat_dim=w, depth=l)]
    steps += [lambda c=c: model(x, num_tokens=c[0], mat_dim=c[1], depth=c[2]) for c in configs]
    steps.append(lambda: model(x, num_tokens=big[0], mat_dim=big[1], depth=big[2]))
    steps = [_in_precision(s, device, amp_dtype) for s in steps]
    timings = time_interleaved(steps, device, warmup=1, rounds=rounds)
    mixed, padded = timings[0].median_ms, timings[-1].median_ms
    singles = [tm.median_ms / B for tm in timings[1:-1]]
    flops_mixed = sum(count_flops(model, *c, img_size=img_size).needed for c in configs)
    flops_padded = B * count_flops(model, *big, img_size=img_size).needed
    single_avg = sum(singles) / B
    # ratios per round (paired), then the median: a round's single-config batches sum to the
    # per-sample average x B of that round
    rounds_singles = [sum(r) / B for r in zip(*(tm.times_ms for tm in timings[1:-1]))]
    padded_over_mixed = _paired(timings[-1].times_ms, timings[0].times_ms)
    return {"configs": configs, "mixed_ms": mixed, "single_config_avg_ms_per_sample": single_avg,
            "padded_ms": padded,
            "mixed_vs_single_config_avg": _paired(timings[0].times_ms, rounds_singles),
            "padded_over_mixed": padded_over_mixed, "flops_ratio": flops_padded / flops_mixed,
            "padded_over_mixed_vs_flops_ratio": abs(padded_over_mixed /
                                                    (flops_padded / flops_mixed) - 1)}


def format_figures(full: Optional[dict], mixed: Optional[dict]) -> str:
    """A readable table of the figures and their targets."""
    rows = []
    tg = LOW_PRECISION_TARGETS if full and full.get("low_precision") else TARGETS

    def row(name, value, target, ok):
        rows.append((name, value, target, "-" if ok is None else "yes" if ok else "NO"))

    if full:
        row(f"GEMM rate (2048^3 {full.get('precision', 'float32')})",
            f"{full['gemm_gflops']:.0f} GFLOP/s", "", True)
        if "library_gemm_gflops" in full:
            row(f"GEMM rate, {full['library']} (2048^3)",
                f"{full['library_gemm_gflops']:.0f} GFLOP/s", "the model's projections", None)
        row("full config img/s", f"{full['model_img_s']:.2f} (+-{full['model_spread_pct']:.0f}%)",
            "", True)
        row("flexivit_large img/s", f"{full['flexivit_large_img_s']:.2f}", "", True)
        row("full / flexivit_large", f"{full['full_vs_flexivit_large']:.2f}x",
            f">= {tg['full_vs_flexivit_large']}x",
            full["full_vs_flexivit_large"] >= tg["full_vs_flexivit_large"])
        row("full / GEMM bound", f"{full['full_vs_gemm_bound']:.2f}x",
            f">= {tg['full_vs_gemm_bound']}x",
            full["full_vs_gemm_bound"] >= tg["full_vs_gemm_bound"])
        if "full_vs_library_gemm_bound" in full:
            row(f"full / GEMM bound at {full['library']}'s rate",
                f"{full['full_vs_library_gemm_bound']:.2f}x", "(stricter reading)", None)
        if "autocast_vs_cast_model" in full:
            row(f"autocast / model cast to {full['cast_model_precision']}",
                f"{full['autocast_vs_cast_model']:.2f}x",
                f"<= {TARGETS['autocast_vs_cast_model']}x",
                full["autocast_vs_cast_model"] <= TARGETS["autocast_vs_cast_model"])
    if mixed:
        row("mixed configs (t, w, l)", " ".join(f"{c}" for c in mixed["configs"]), "", True)
        row("mixed / single-config avg", f"{mixed['mixed_vs_single_config_avg']:.2f}x",
            f"<= {TARGETS['mixed_vs_single_config_avg']}x",
            mixed["mixed_vs_single_config_avg"] <= TARGETS["mixed_vs_single_config_avg"])
        row("padded / mixed (time)", f"{mixed['padded_over_mixed']:.2f}x",
            f"FLOP ratio {mixed['flops_ratio']:.2f}x +-20%",
            mixed["padded_over_mixed_vs_flops_ratio"] <= TARGETS[
                "padded_over_mixed_vs_flops_ratio"])
    return align_table(("figure", "value", "target", "met"), rows, left=range(4))
