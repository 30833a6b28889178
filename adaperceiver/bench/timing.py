"""Honest timing: warm-up, several rounds, median and spread; the environment of a run.

On CUDA each round is bracketed by CUDA events after a ``synchronize``; on CPU by
``time.perf_counter``. Every round runs one full step (one forward of one batch); the figures
are per step. Nothing here asserts on time: tests never check speed.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = ["Timing", "time_step", "time_interleaved", "environment", "cpu_model", "sync"]


@dataclass
class Timing:
    """Per-step times of one benchmark, in milliseconds."""
    times_ms: list[float]
    warmup: int
    timer: str

    @property
    def rounds(self) -> int:
        return len(self.times_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    @property
    def max_ms(self) -> float:
        return max(self.times_ms)

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent: the whole range of the rounds."""
        return 100.0 * (self.max_ms - self.min_ms) / self.median_ms if self.median_ms else 0.0

    @property
    def stdev_ms(self) -> float:
        return statistics.stdev(self.times_ms) if len(self.times_ms) > 1 else 0.0

    def summary(self) -> dict:
        return {"ms_median": self.median_ms, "ms_min": self.min_ms, "ms_max": self.max_ms,
                "ms_stdev": self.stdev_ms, "spread_pct": self.spread_pct,
                "rounds": self.rounds, "warmup": self.warmup, "timer": self.timer,
                "times_ms": list(self.times_ms)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], object], device, *, warmup: int = 1, rounds: int = 3,
              min_rounds: int = 2, budget_s: Optional[float] = None) -> Timing:
    """Run ``step`` ``warmup`` times untimed, then time it for ``rounds`` rounds.

    With ``budget_s``, the rounds are cut so that (rounds x the last warm-up step) fits the
    budget, but never below ``min_rounds``: expensive models get fewer rounds, never fewer
    than enough for a median and a spread.
    """
    device = torch.device(device)
    if rounds < 1 or min_rounds < 1 or warmup < 0:
        raise ValueError(f"rounds={rounds}, min_rounds={min_rounds}, warmup={warmup}: need "
                         "rounds >= 1, min_rounds >= 1, warmup >= 0")
    est = None
    for _ in range(warmup):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        est = time.perf_counter() - t0
    n = rounds
    if budget_s is not None and est is not None and est > 0:
        n = max(min(rounds, min_rounds), min(rounds, int(budget_s // est)))
    times = [_timed(step, device) for _ in range(n)]
    timer = "cuda.Event" if device.type == "cuda" else "time.perf_counter"
    return Timing(times, warmup, timer)


def _timed(step, device: torch.device) -> float:
    """One step, in milliseconds (CUDA events on a GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        torch.cuda.synchronize(device)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(steps: Sequence[Callable[[], object]], device, *, warmup: int = 1,
                     rounds: int = 3, min_rounds: int = 2, budget_s: Optional[float] = None,
                     on_step: Optional[Callable[[int, str, int], None]] = None,
                     on_error: Optional[Callable[[int, BaseException], None]] = None
                     ) -> list[Optional[Timing]]:
    """Time several steps round-robin: warm-up passes over all of them, then each round runs
    every step once, in order. On a shared machine every step then samples the same load
    over the same span of time, so ratios between them are fair.

    With ``budget_s`` (seconds per step, as in :func:`time_step`), the rounds are cut so that
    rounds x (the last warm-up pass) fits ``budget_s x len(steps)``, never below
    ``min_rounds``. ``on_step(i, phase, rounds)`` is called after each step (phase "warmup" or
    "timed"; ``rounds``: the number of timed rounds, once decided, else the most). With
    ``on_error``, a step that raises during the warm-up is reported there and dropped (its
    Timing is None); without it, the error propagates.
    """
    device = torch.device(device)
    if rounds < 1 or min_rounds < 1 or warmup < 0:
        raise ValueError(f"rounds={rounds}, min_rounds={min_rounds}, warmup={warmup}: need "
                         "rounds >= 1, min_rounds >= 1, warmup >= 0")
    est = None
    alive = list(range(len(steps)))
    for _ in range(warmup):
        est = 0.0
        for i in list(alive):
            try:
                est += _timed(steps[i], device) / 1e3
            except Exception as e:  # noqa: BLE001 - handed to on_error
                if on_error is None:
                    raise
                on_error(i, e)
                alive.remove(i)
            if on_step:
                on_step(i, "warmup", rounds)
    n = rounds
    if budget_s is not None and est:
        n = max(min(rounds, min_rounds), min(rounds, int(budget_s * len(alive) // est)))
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(n):
        for i in alive:
            times[i].append(_timed(steps[i], device))
            if on_step:
                on_step(i, "timed", n)
    timer = "cuda.Event" if device.type == "cuda" else "time.perf_counter"
    return [Timing(times[i], warmup, timer + " (interleaved)") if i in alive else None
            for i in range(len(steps))]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:  # noqa: BLE001 - not installed
        return None


def cpu_kernels_summary() -> str:
    """Which paths the C++ CPU kernels take on this machine, in words (bench headers)."""
    from adaperceiver import _ext
    info = _ext.build_info()
    if not info["cpp_compiled"]:
        return "C++ extension not loaded"
    if info["cpu_isa_error"]:
        return info["cpu_isa_error"]

    def low(name, native, hw):
        return (f"{name} native ({hw} via oneDNN)" if native
                else f"{name} computed in float32 (no {hw} on this CPU or path)")
    tiles = ("; bf16 GEMMs of <= 256 rows (FFNs of several widths: <= 448) on the AMX tile GEMM"
             if info["cpu_tile_linear_bf16"] == "amx" else "")
    tiles += ("; fp16 GEMMs on the AMX tile GEMM as exact bf16 pairs"
              if info["cpu_tile_linear_fp16"] == "amx-bf16-pairs" else "")
    products = {"amx": "on AMX tiles", "avx512-bf16": "on AVX512-BF16 dot products",
                "float32": "in float32"}
    attention = (f"; bf16 attention {products[info['cpu_attention_bf16']]}, "
                 f"fp16 attention {products[info['cpu_attention_fp16']]}")
    return (f"attention microkernel {info['cpu_isa']}{attention}; "
            f"{low('bf16', info['cpu_native_bf16'], 'AVX512-BF16/AMX-BF16')}; "
            f"{low('fp16', info['cpu_native_fp16'], 'AVX512-FP16/AMX-FP16')}{tiles}")


def environment(device) -> dict:
    """Versions, device, threads and CPU model: stored with every result file."""
    device = torch.device(device)
    env = {
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_model()),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "timm": _version("timm"),
        "adaperceiver": _version("adaperceiver"),
        "numpy": _version("numpy"),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cpu":
        env["cpu_kernels"] = cpu_kernels_summary()
    try:
        from adaperceiver import build_info  # type: ignore[attr-defined]
        env["adaperceiver_build"] = build_info() if callable(build_info) else build_info
    except Exception:  # noqa: BLE001 - optional
        pass
    return env

