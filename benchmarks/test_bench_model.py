"""AdaPerceiver forward throughput over (t, w, l) configurations (batch 4, 224 px, float32).

Groups:
  model                  the fastest available ops backend (automatic choice) at each config
                         of the grid: by default t in {32, 256} x w in {416, 832} x l in {7, 21}
                         (8 configs); with --full all 378.
  backends t=.. w=.. l=..  the reference backend next to the fastest available backend, side by
                         side at one config: by default (32, 416, 7), (128, 624, 14),
                         (256, 832, 21); with --full all 378. When the automatic choice IS the
                         reference (no C++/CUDA/Triton backend built), the second is skipped.
Each config is timed on its own (no depth is read off a longer pass), 1 warm-up + 3 rounds.
"""
from __future__ import annotations

import pytest
import torch

import adaperceiver
from adaperceiver.bench import RELEASED, parse_grid
from adaperceiver.bench.runner import RunSettings, resolved_backend

MODEL_GRID = "t=32,256 w=416,832 l=7,21"
BACKEND_GRID = [(32, 416, 7), (128, 624, 14), (256, 832, 21)]
BATCH = 4

_reference_logits: dict = {}


def _grid(full: bool):
    return parse_grid("all" if full else MODEL_GRID, RELEASED)


def pytest_generate_tests(metafunc):
    full = metafunc.config.getoption("--full")
    if "model_cfg" in metafunc.fixturenames:
        cfgs = [(c.t, c.w, c.l) for c in _grid(full)]
        metafunc.parametrize("model_cfg", cfgs, ids=[f"t{t}-w{w}-l{l}" for t, w, l in cfgs])
    if "backend_cfg" in metafunc.fixturenames:
        cfgs = ([(c.t, c.w, c.l) for c in parse_grid("all", RELEASED)] if full
                else BACKEND_GRID)
        metafunc.parametrize("backend_cfg", cfgs, ids=[f"t{t}-w{w}-l{l}" for t, w, l in cfgs])


def _forward(model, x, cfg):
    t, w, l = cfg
    return lambda: model(x, num_tokens=t, mat_dim=w, depth=l).logits


def _info(benchmark, model, cfg, backend):
    t, w, l = cfg
    f = adaperceiver.count_flops(model, t, w, l, img_size=224)
    benchmark.extra_info.update({"t": t, "w": w, "l": l, "backend": backend,
                                 "batch_size": BATCH, "gflops_per_img": f.total / 1e9,
                                 "params_used": f.params, "threads": torch.get_num_threads()})
    return f.total / 1e9 * BATCH


def _img_per_s(benchmark):
    med = benchmark.stats.stats.median
    benchmark.extra_info["img_per_s"] = BATCH / med
    return BATCH / med


def _auto_name(model, cfg, device):
    from adaperceiver.bench.grid import Config
    return resolved_backend(model, "auto", RunSettings(device=device), Config(*cfg))


def test_model(benchmark, run_pedantic, rounds_for, released_model, images, device, model_cfg):
    backend = _auto_name(released_model, model_cfg, device)
    benchmark.group = "model (fastest available backend)"
    gflops_step = _info(benchmark, released_model, model_cfg, backend)
    logits = run_pedantic(_forward(released_model, images, model_cfg), rounds_for(gflops_step))
    assert logits.shape == (BATCH, 1, 1000) and torch.isfinite(logits).all()
    assert _img_per_s(benchmark) > 0


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_backends(benchmark, run_pedantic, rounds_for, released_model, images, device,
                  backend_cfg, backend):
    auto = _auto_name(released_model, backend_cfg, device)
    if backend == "auto" and auto == "reference":
        pytest.skip("the automatic choice is the reference backend: no faster backend is built"
                    " for this device (build the C++ extension: pip install -e .)")
    t, w, l = backend_cfg
    benchmark.group = f"backends t={t} w={w} l={l}"
    name = "reference" if backend == "reference" else auto
    gflops_step = _info(benchmark, released_model, backend_cfg, name)
    fn = _forward(released_model, images, backend_cfg)
    ctx = adaperceiver.use_backend(backend)     # "auto" undoes any outer choice
    with ctx:
        logits = run_pedantic(fn, rounds_for(gflops_step))
    assert logits.shape == (BATCH, 1, 1000) and torch.isfinite(logits).all()
    _img_per_s(benchmark)
    if backend == "reference":
        _reference_logits[backend_cfg] = logits
    else:
        ref = _reference_logits.get(backend_cfg)
        if ref is None:
            with adaperceiver.use_backend("reference"), torch.inference_mode():
                ref = fn()
        # the fast backend computes the same model (float32, different summation order)
        torch.testing.assert_close(logits, ref, rtol=1e-3, atol=1e-3)
