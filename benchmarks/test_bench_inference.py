"""End-to-end inference (issue: fast inference and mixed batches), side by side in one run:
the full config against flexivit_large and the GEMM bound, and a mixed batch against
single-config batches and padding. Figures are printed (run with -s) and stored in
pytest-benchmark's extra_info; targets are reported, not asserted (this machine is shared)."""
import pytest
import torch

from adaperceiver.bench.inference import (FULL_MIN_ROUNDS, MIXED_MIN_ROUNDS, format_figures,
                                          full_config_figures, mixed_batch_figures)


@pytest.fixture(scope="module")
def figures(released_model, device):
    full = full_config_figures(released_model, batch=4, rounds=FULL_MIN_ROUNDS, device=device)
    mixed = mixed_batch_figures(released_model, batch=4, rounds=MIXED_MIN_ROUNDS, device=device)
    print("\n" + format_figures(full, mixed))
    return full, mixed


def test_full_config_vs_flexivit_large_and_gemm_bound(benchmark, figures, released_model,
                                                      images):
    full, _ = figures
    benchmark.group = "inference: full config (256, 832, 21)"
    benchmark.extra_info.update(full)
    with torch.inference_mode():
        benchmark.pedantic(lambda: released_model(images), rounds=1, iterations=1)
    assert full["model_img_s"] > 0 and full["gemm_bound_img_s"] > 0


def test_mixed_batch_vs_single_and_padded(benchmark, figures, released_model, images):
    _, mixed = figures
    benchmark.group = "inference: mixed batch"
    benchmark.extra_info.update({k: v for k, v in mixed.items() if k != "configs"})
    benchmark.extra_info["configs"] = [list(c) for c in mixed["configs"]]
    t, w, l = (list(c) for c in zip(*mixed["configs"]))
    with torch.inference_mode():
        benchmark.pedantic(lambda: released_model(images, num_tokens=t, mat_dim=w, depth=l),
                           rounds=1, iterations=1)
    assert mixed["mixed_ms"] > 0
