"""The model's time in bfloat16 and float16 against float32 on the CPU, one process per precision.

The issue's rule for CPUs without hardware for a 16-bit type (no AVX512-BF16 / AMX-BF16, no
AVX512-FP16 / AMX-FP16): that type may be no faster than float32, but never slower by more than
10%. Each precision runs the full configuration (256, 832, 21) at batch 4, 224 px in a process
of its own (a warm-up, then the median of ``forwards`` timed forwards), and the processes
alternate round by round so that drifting machine load hits every precision alike; the ratio
to float32 is the median over rounds of that round's ratio.
Why one process per precision: with two models in one process, glibc hands the buffers of the
float32 copies that a 16-bit type without hardware makes of its weights back to the system
between forwards and faults them in again (about 120,000 page faults per float16 forward on a
CPU without float16 GEMMs, against a few hundred alone), which a process running one model
never sees.

``python -m adaperceiver.bench.precision`` prints the table (``--emulate-avx2`` runs every
process as on an AVX2-only CPU: ``ADAPERCEIVER_CPU_ISA=avx2``, ``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``);
``benchmarks/test_bench_inference.py`` runs it on this CPU and emulated.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from typing import Callable, Optional, Sequence

__all__ = ["compare", "format_table", "EMULATE_AVX2", "MAX_SLOWDOWN", "PRECISIONS"]

PRECISIONS = ("float32", "bfloat16", "float16")
MAX_SLOWDOWN = 1.1   # a 16-bit type without hardware: at most 10% slower than float32
EMULATE_AVX2 = {"ADAPERCEIVER_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
                "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def _forward_ms(precision: str, forwards: int, threads: int) -> float:
    """In this process: the median time (ms) of `forwards` forwards of the full configuration in
    `precision`, after one warm-up."""
    import time

    import torch

    import adaperceiver
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not allowed; allowed: {PRECISIONS}")
    if threads > 0:
        torch.set_num_threads(threads)
    dtype = getattr(torch, precision)
    torch.manual_seed(0)
    model = adaperceiver.create_model("adaperceiver_v1_in1k", pretrained=False).eval().to(dtype)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(dtype)
    kw = dict(num_tokens=256, mat_dim=832, depth=21)
    times = []
    with torch.inference_mode():
        model(x, **kw)
        for _ in range(forwards):
            t0 = time.perf_counter()
            model(x, **kw)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _native(env: dict) -> dict:
    """Which 16-bit types run natively in a process with `env` (build_info, in a child)."""
    code = ("from adaperceiver import _ext; i = _ext.build_info(); "
            "print(int(i['cpu_native_bf16']), int(i['cpu_native_fp16']))")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"build_info failed in a child process:\n{res.stderr[-2000:]}")
    bf16, fp16 = res.stdout.split()[-2:]
    return {"float32": True, "bfloat16": bf16 == "1", "float16": fp16 == "1"}


def compare(precisions: Sequence[str] = PRECISIONS, rounds: int = 3, forwards: int = 3,
            threads: int = 2, env: Optional[dict] = None,
            progress: Optional[Callable[[str], None]] = None) -> dict:
    """Time each precision in its own process, alternating, `rounds` rounds (see the module's
    docstring). Returns {"ms": {precision: [ms per round]}, "ratio": {precision: median of the
    per-round ratios to float32}, "native": {precision: bool}, "env": the extra variables}."""
    if "float32" not in precisions:
        raise ValueError(f"precisions={tuple(precisions)} must include 'float32' (the reference)")
    if rounds < 1 or forwards < 1:
        raise ValueError(f"rounds={rounds}, forwards={forwards}: both must be >= 1")
    child_env = dict(os.environ, **(env or {}))
    ms: dict = {p: [] for p in precisions}
    for r in range(rounds):
        for p in precisions:
            if progress:
                progress(f"round {r + 1}/{rounds}: {p}")
            cmd = [sys.executable, "-m", "adaperceiver.bench.precision", "--one", p,
                   "--forwards", str(forwards), "--threads", str(threads)]
            res = subprocess.run(cmd, env=child_env, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
            ms[p].append(float(res.stdout.split()[-1]))
    ratio = {p: statistics.median(a / b for a, b in zip(ms[p], ms["float32"]))
             for p in precisions}
    return {"ms": ms, "ratio": ratio, "native": _native(child_env), "env": dict(env or {})}


def format_table(result: dict, title: str) -> str:
    """The comparison as a table: median ms, the ratio to float32, the path and the target."""
    from .report import align_table
    rows = []
    for p, times in result["ms"].items():
        native = result["native"][p]
        path = "float32" if p == "float32" else ("native" if native else "computed in float32")
        target = "" if p == "float32" or native else f"<= {MAX_SLOWDOWN}x"
        met = "" if not target else ("yes" if result["ratio"][p] <= MAX_SLOWDOWN else "NO")
        rows.append([p, path, f"{statistics.median(times):.0f}",
                     f"{min(times):.0f}-{max(times):.0f}", f"{result['ratio'][p]:.3f}x",
                     target, met])
    head = ["precision", "GEMMs", "median ms", "range ms", "time vs float32", "target", "met"]
    return title + "\n" + align_table(head, rows, left=(0, 1))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adaperceiver.bench.precision",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--one", choices=PRECISIONS, help=argparse.SUPPRESS)  # a child's precision
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forwards", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--emulate-avx2", action="store_true",
                    help="run every process as on an AVX2-only CPU (" +
                         " ".join(f"{k}={v}" for k, v in EMULATE_AVX2.items()) + ")")
    args = ap.parse_args(argv)
    if args.one:
        print(f"{_forward_ms(args.one, args.forwards, args.threads):.3f}")
        return 0
    env = EMULATE_AVX2 if args.emulate_avx2 else None
    res = compare(rounds=args.rounds, forwards=args.forwards, threads=args.threads, env=env,
                  progress=lambda s: print(s, file=sys.stderr, flush=True))
    where = "AVX2 only (emulated)" if args.emulate_avx2 else "this CPU"
    print(format_table(res, f"full configuration (256, 832, 21), batch 4, 224 px, "
                            f"{args.threads} threads, {where}; one process per precision, "
                            f"{args.rounds} alternating rounds"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
