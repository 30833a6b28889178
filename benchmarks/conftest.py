"""pytest-benchmark suites of adaperceiver (see benchmarks/README.md).

Options:
  --full            every configuration: the 378 (t, w, l) of the released model (instead of the
                    default CPU subset), more rounds, more kernel shapes. Hours on a CPU.
  --bench-threads N torch CPU threads for the whole session (default 2; 0 = torch's default).

Fixtures shared by the suites: ``full``, ``device``, ``released_model`` (built once per session,
random init), ``images`` (batch 4, 224 px), ``rounds_for`` (timed rounds for a given cost) and
``run_pedantic`` (warm-up + fixed rounds, one step per round, through pytest-benchmark).
"""
from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("adaperceiver benchmarks")
    group.addoption("--full", action="store_true", default=False,
                    help="adaperceiver: benchmark every configuration (378 model configs, all "
                         "kernel shapes, more rounds) instead of the default CPU subset")
    group.addoption("--bench-threads", type=int, default=2,
                    help="adaperceiver: torch CPU threads (0 = torch's default)")


def pytest_configure(config):
    config.addinivalue_line("markers", "full_only: runs only with --full")


@pytest.fixture(scope="session", autouse=True)
def _bench_threads(request):
    n = request.config.getoption("--bench-threads")
    if n is not None and n < 0:
        raise pytest.UsageError(f"--bench-threads {n} is not allowed; allowed: an int >= 0")
    if n:
        torch.set_num_threads(n)
    yield


@pytest.fixture(scope="session")
def full(request) -> bool:
    return bool(request.config.getoption("--full"))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def released_model(device):
    """The released classifier configuration (adaperceiver_v1_in1k), random init, eval."""
    import adaperceiver
    torch.manual_seed(0)
    return adaperceiver.create_model("adaperceiver_v1_in1k", pretrained=False).eval().to(device)


@pytest.fixture(scope="session")
def images(device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 224, 224, generator=g).to(device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@pytest.fixture
def run_pedantic(benchmark, device):
    """``run_pedantic(fn, rounds, warmup=1)``: one call per round, synchronised on CUDA, under
    ``torch.inference_mode``; returns fn's last result."""
    def _run(fn, rounds: int, warmup: int = 1):
        def step():
            with torch.inference_mode():
                out = fn()
            sync(device)
            return out
        return benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup, iterations=1)
    return _run


@pytest.fixture(scope="session")
def rounds_for(full):
    """``rounds_for(gflops_per_step)``: timed rounds for a step of this cost: 3 by default (2
    past ~1 TFLOP per step), 5 with --full. Median and spread are in pytest-benchmark's table."""
    def _rounds(gflops_per_step: float) -> int:
        if full:
            return 5
        return 2 if gflops_per_step > 1000 else 3
    return _rounds
