"""Encoder FLOPs and throughput at the dense settings (group "dense-518"): AdaPerceiver's
distilled backbone (``adaperceiver_v1``, random init) at 518 px, patch 14, next to timm ViT-H/14,
ViT-L/14 and ViT-B/14 built at 518 px without their classification heads (pretrained=False).

* ``test_dense_flops_table``: the encoder-FLOPs table of ``adaperceiver.dense.flops`` (t in
  {256, 512} x w in {416, 624, 832} x l in {7, 14, 21}, the three ViTs, the ratio to ViT-H/14)
  and the (t, w, l) whose ratio is closest to the paper's 26x; no timing.
* ``test_dense_adaperceiver``: batch-1 forwards to the per-patch features at the smallest and
  largest configurations of the table, (256, 416, 7) and (512, 832, 21) (all 18 with --full);
  1 warm-up + 3 rounds (2 for the largest).
* ``test_dense_vit``: batch-1 forwards of each ViT; ViT-H/14 and ViT-L/14 take 10-40 s per
  image on a 2-core CPU: ViT-H/14 one timed round and no warm-up, ViT-L/14 1 warm-up + 1 round,
  ViT-B/14 1 warm-up + 2 rounds (--full: 1 + 3 for all).
* ``test_dense_summary``: prints the table again with the measured images/s.

About 2-3 minutes on a 2-core CPU: ``pytest benchmarks/test_bench_dense.py``.
"""
from __future__ import annotations

import functools
import gc

import pytest
import torch

from adaperceiver.dense.flops import (VITS, build_vit, closest_to_ratio, dense_configs,
                                      encoder_flops, flops_table, format_table,
                                      vit_encoder_flops)

IMG = 518
CONFIGS = dense_configs((256, 512), None, (7, 14, 21))
SMALLEST = min(CONFIGS, key=lambda c: encoder_flops(None, *c, img_size=IMG).total)
LARGEST = max(CONFIGS, key=lambda c: encoder_flops(None, *c, img_size=IMG).total)
_measured: dict = {}     # row key -> img/s, filled by the timing tests, printed by the summary


def _key(row):
    return row["model"] if row["model"] != "AdaPerceiver" else (row["t"], row["w"], row["l"])


def pytest_generate_tests(metafunc):
    if "dense_cfg" in metafunc.fixturenames:
        full = metafunc.config.getoption("--full")
        cfgs = CONFIGS if full else [SMALLEST, LARGEST]
        metafunc.parametrize("dense_cfg", cfgs, ids=[f"t{t}-w{w}-l{l}" for t, w, l in cfgs])


@pytest.fixture(scope="module")
def backbone(device):
    import adaperceiver
    torch.manual_seed(0)
    return adaperceiver.create_model("adaperceiver_v1").eval().to(device)


@pytest.fixture(scope="module")
def image(device):
    return torch.randn(1, 3, IMG, IMG, generator=torch.Generator().manual_seed(0)).to(device)


def _print(text: str, request) -> None:
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n" + text, flush=True)


def test_dense_flops_table(request):
    pytest.importorskip("timm")
    rows = flops_table(CONFIGS, IMG)
    best = closest_to_ratio(26.0)
    _print(format_table(rows, IMG) + f"\nclosest to 26x fewer encoder FLOPs than ViT-H/14: "
           f"t={best['t']} w={best['w']} l={best['l']} ({best['flops'] / 1e9:.1f} GFLOPs, "
           f"{best['ratio']:.1f}x)", request)
    ratios = [r["ratio"] for r in rows if r["model"] == "AdaPerceiver"]
    assert 5 < min(ratios) and max(ratios) < 50        # the paper's order of magnitude
    assert abs(best["ratio"] - 26.0) < 1.0
    vit = {r["model"]: r["flops"] for r in rows if r["model"] in VITS}
    assert vit["ViT-H/14"] > vit["ViT-L/14"] > vit["ViT-B/14"]


def test_dense_adaperceiver(benchmark, run_pedantic, full, backbone, image, dense_cfg):
    benchmark.group = "dense-518"
    t, w, l = dense_cfg
    e = encoder_flops(backbone, t, w, l, img_size=IMG)
    benchmark.extra_info.update({"model": f"adaperceiver_v1 t={t} w={w} l={l}", "img_size": IMG,
                                 "batch_size": 1, "encoder_gflops": e.total / 1e9,
                                 "threads": torch.get_num_threads()})
    rounds = 3 if full or dense_cfg != LARGEST else 2
    out = run_pedantic(lambda: backbone(image, num_tokens=t, mat_dim=w, depth=l).features,
                       rounds)
    assert out.shape == (1, (IMG // 14) ** 2, 1280) and torch.isfinite(out).all()
    ips = 1 / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = _measured[dense_cfg] = ips


@pytest.mark.parametrize("name", list(VITS))
def test_dense_vit(benchmark, run_pedantic, full, image, device, name):
    pytest.importorskip("timm")
    benchmark.group = "dense-518"
    flops, params = vit_encoder_flops(VITS[name], IMG)
    benchmark.extra_info.update({"model": f"{name} ({VITS[name]})", "img_size": IMG,
                                 "batch_size": 1, "encoder_gflops": flops / 1e9,
                                 "params": params, "threads": torch.get_num_threads()})
    step = functools.partial(build_vit(VITS[name], IMG, device), image)
    rounds, warmup = ((1, 0) if name == "ViT-H/14" else (1, 1) if name == "ViT-L/14"
                      else (2, 1))
    if full:
        rounds, warmup = 3, 1
    try:
        out = run_pedantic(step, rounds, warmup=warmup)
    finally:
        del step            # free the model (ViT-H/14 holds 2.5 GB) before the next one
        gc.collect()
    assert out.shape[0] == 1 and torch.isfinite(out).all()
    ips = 1 / benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = _measured[name] = ips


def test_dense_summary(request):
    pytest.importorskip("timm")
    if not _measured:
        pytest.skip("no timing test ran in this session")
    rows = flops_table(CONFIGS, IMG)
    for r in rows:
        if _key(r) in _measured:
            r["img_per_s"] = _measured[_key(r)]
    timed = [r for r in rows if "img_per_s" in r]
    _print(format_table(timed, IMG) + f"\n(batch 1, float32, {torch.get_num_threads()} "
           "threads; img/s of one forward to the per-patch features / the ViT's features)",
           request)
