"""Baselines next to AdaPerceiver (group "baselines"): timm models built with pretrained=False at
224 px (FlexiViT at 224, not its default 240), batch 4, float32, and AdaPerceiver at its full
configuration (256, 832, 21) and at (128, 624, 14), all in one table.

Rounds: 1 warm-up + 3 timed (2 for steps past ~1 TFLOP, i.e. ViT-H/14); 5 with --full.
"""
from __future__ import annotations

import functools
import gc

import pytest
import torch

import adaperceiver
from adaperceiver.bench.baselines import DEFAULT_BASELINES, baseline_flops, build_baseline

BATCH = 4
ADA_CONFIGS = [(256, 832, 21), (128, 624, 14)]


@pytest.mark.parametrize("name", DEFAULT_BASELINES)
def test_baseline(benchmark, run_pedantic, rounds_for, images, device, name):
    pytest.importorskip("timm")
    benchmark.group = "baselines"
    flops, params = baseline_flops(name, 224)
    net = build_baseline(name, 224, device)
    benchmark.extra_info.update({"model": name, "gflops_per_img": flops / 1e9,
                                 "params": params, "batch_size": BATCH,
                                 "threads": torch.get_num_threads()})
    step = functools.partial(net, images)
    del net
    try:
        out = run_pedantic(step, rounds_for(flops / 1e9 * BATCH))
    finally:
        del step            # free the model (ViT-H/14 holds 2.5 GB) before the next one
        gc.collect()
    assert out.shape == (BATCH, 1000) and torch.isfinite(out).all()
    benchmark.extra_info["img_per_s"] = BATCH / benchmark.stats.stats.median


@pytest.mark.parametrize("cfg", ADA_CONFIGS, ids=[f"t{t}-w{w}-l{l}" for t, w, l in ADA_CONFIGS])
def test_adaperceiver_among_baselines(benchmark, run_pedantic, rounds_for, released_model,
                                      images, cfg):
    benchmark.group = "baselines"
    t, w, l = cfg
    f = adaperceiver.count_flops(released_model, t, w, l, img_size=224)
    benchmark.extra_info.update({"model": f"adaperceiver t={t} w={w} l={l}",
                                 "gflops_per_img": f.total / 1e9, "params": f.params,
                                 "batch_size": BATCH, "threads": torch.get_num_threads()})
    out = run_pedantic(lambda: released_model(images, num_tokens=t, mat_dim=w, depth=l).logits,
                       rounds_for(f.total / 1e9 * BATCH))
    assert out.shape == (BATCH, 1, 1000) and torch.isfinite(out).all()
    benchmark.extra_info["img_per_s"] = BATCH / benchmark.stats.stats.median
