"""``python -m adaperceiver.bench`` / ``adaperceiver-bench``: throughput of AdaPerceiver over a
grid of (t, w, l) configurations next to timm baselines, with timm-like flags.

With no flags (``make bench``): the default CPU sweep, batch 4, 224 px, float32, 2 threads,
t in {32, 128, 256} x w in {416, 832} x l in {7, 14, 21} (18 configs) on the fastest available
ops backend, and the six baselines (flexivit_small/base/large, vit_base_patch16_224,
vit_large_patch16_224, vit_huge_patch14_224), timed interleaved (every item once per round):
1 warm-up pass and up to 5 timed rounds (cut to fit 15 s per item, never below 3).
See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
import warnings
from typing import Optional, Sequence

__all__ = ["main", "run", "build_parser"]


class _ParseKwargs(argparse.Action):
    """``--model-kwargs key=value ...``; values are Python literals (strings otherwise)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kw = getattr(namespace, self.dest) or {}
        for v in values:
            key, eq, val = v.partition("=")
            if not eq or not key:
                parser.error(f"{option_string} {v!r}: expected key=value (e.g. embed_dim=64)")
            try:
                kw[key] = ast.literal_eval(val)
            except (ValueError, SyntaxError):
                kw[key] = val
        setattr(namespace, self.dest, kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adaperceiver-bench",
        description="Benchmark AdaPerceiver over (t, w, l) configurations next to timm "
                    "baselines (inference throughput).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="adaperceiver_v1_in1k",
                   help="adaperceiver model name (adaperceiver.list_models())")
    m.add_argument("--model-kwargs", nargs="+", action=_ParseKwargs, default={},
                   metavar="KEY=VALUE",
                   help="config.json overrides for the model, e.g. embed_dim=64 depth=3")
    m.add_argument("--pretrained", default=None, metavar="PATH",
                   help="a local released checkpoint (config.json + model.safetensors); "
                        "random init otherwise (throughput does not depend on weights)")
    m.add_argument("--configs", nargs="+", default=["default"], metavar="SPEC",
                   help="'default', 'all', or axes such as 't=32,256 w=all l=7,14,21' "
                        "(values: ints, ranges a-b, 'all', 'default'; a missing axis takes "
                        "its default subset)")
    m.add_argument("--backend", default="auto",
                   help="ops backend(s), comma separated: auto (fastest available), "
                        "reference, cpp, triton, cuda; e.g. 'reference,auto' times both")
    m.add_argument("--baselines", nargs="+", default=["all"], metavar="NAME",
                   help="timm baselines: 'all' (the six), 'none', or timm model names")
    m.add_argument("--speedup-baseline", default="flexivit_large", metavar="NAME",
                   help="the baseline the speedup column divides by (when it is measured)")
    r = p.add_argument_group("run")
    r.add_argument("-b", "--batch-size", type=int, default=4)
    r.add_argument("--img-size", type=int, default=224)
    r.add_argument("--precision", default="float32",
                   help="float32, float16, bfloat16, amp, amp_float16, amp_bfloat16 "
                        "(fp32/fp16/bf16 aliases)")
    r.add_argument("--amp", action="store_true",
                   help="autocast mixed precision at --amp-dtype (overrides --precision)")
    r.add_argument("--amp-dtype", default="bfloat16", help="float16 or bfloat16")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if "
                                                   "available, else cpu)")
    r.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (torch.set_num_threads); 0 leaves torch's default")
    r.add_argument("--torchcompile", nargs="?", const="inductor", default=None,
                   metavar="BACKEND", help="torch.compile the models (backend, default "
                                           "inductor); compile time falls in the warm-up")
    r.add_argument("--schedule", choices=("interleaved", "sequential"), default="interleaved",
                   help="interleaved: build everything, then time round-robin (each round "
                        "runs every config and baseline once), so all share the machine's "
                        "load alike and ratios are fair; sequential: one item at a time, "
                        "built and freed in turn (less memory)")
    r.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    r.add_argument("--rounds", type=int, default=5, help="timed steps per configuration (most)")
    r.add_argument("--min-rounds", type=int, default=3,
                   help="timed steps per configuration (least, whatever --budget says)")
    r.add_argument("--budget", type=float, default=15.0,
                   help="seconds of timed steps per configuration: rounds are cut to fit "
                        "(estimated from the warm-up), never below --min-rounds; 0 = no cut")
    o = p.add_argument_group("output")
    o.add_argument("--results-file", default=None, help="write results (.json or .csv)")
    o.add_argument("--plot", default=None, help="write the Pareto plot (.png)")
    o.add_argument("--accuracy-csv", default=None,
                   help="CSV with columns t,w,l,top1: adds an accuracy panel to the plot")
    o.add_argument("--out-dir", default=None, metavar="DIR",
                   help="write DIR/bench.json, DIR/bench.txt, DIR/pareto.png, "
                        "DIR/roofline.txt")
    o.add_argument("--roofline-batch", type=int, nargs="+", default=None, metavar="B",
                   help="batch sizes of the GPU roofline projection (default: --batch-size "
                        "and 256)")
    o.add_argument("--inference", action="store_true",
                   help="also measure the end-to-end inference figures (full config vs "
                        "flexivit_large and the GEMM bound; a mixed batch vs single-config "
                        "batches and padding; adaperceiver.bench.inference)")
    o.add_argument("--dry-run", action="store_true",
                   help="list configurations, FLOPs and baselines; time nothing")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_positive(parser, name: str, value, lo=1):
    if value is None or value < lo:
        parser.error(f"{name} {value} is not allowed; allowed: an int >= {lo}")


def _output_ext(parser, flag: str, path: Optional[str], allowed: Sequence[str]):
    if path is None:
        return
    ext = os.path.splitext(path)[1].lower()
    if ext not in allowed:
        parser.error(f"{flag} {path!r}: extension {ext or '(none)'!r} is not allowed; "
                     f"allowed: {', '.join(allowed)}")


def _check_writable_dir(parser, flag: str, path: Optional[str]) -> None:
    """Fail before any timing when ``path`` cannot be created or written (not after the run)."""
    if not path:
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        parser.error(f"{flag}: cannot create directory {path!r}: {e.strerror}")
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        parser.error(f"{flag}: directory {path!r} is not writable")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console entry point: run the benchmark. Exit status 0; 1 when some configuration
    or baseline failed (the others are still timed and written); 2 for bad flags."""
    return 1 if run(argv).get("failures") else 0


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; returns ``{"rows", "environment", "roofline", "table", "files"}``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    t_start = time.perf_counter()

    import torch

    import adaperceiver
    from . import baselines as bl
    from .grid import GridError, ModelAxes, parse_grid
    from .plot import pareto_plot
    from .report import add_speedups, format_table, read_accuracy_csv, write_results
    from .roofline import format_roofline, roofline_rows
    from .runner import (RunSettings, build_model, log, make_row, model_config,
                         parse_precision, release_memory, resolved_backend)
    from .timing import environment

    # ---- validate every flag before any expensive work
    _check_positive(parser, "--batch-size", args.batch_size)
    _check_positive(parser, "--img-size", args.img_size)
    _check_positive(parser, "--rounds", args.rounds)
    _check_positive(parser, "--min-rounds", args.min_rounds)
    _check_positive(parser, "--warmup", args.warmup, lo=0)
    _check_positive(parser, "--threads", args.threads, lo=0)
    if args.min_rounds > args.rounds:
        parser.error(f"--min-rounds {args.min_rounds} is not allowed with --rounds "
                     f"{args.rounds}; allowed: --min-rounds <= --rounds")
    if args.budget < 0:
        parser.error(f"--budget {args.budget} is not allowed; allowed: seconds >= 0")
    for b in args.roofline_batch or []:
        _check_positive(parser, "--roofline-batch", b)
    _output_ext(parser, "--results-file", args.results_file, (".json", ".csv"))
    _output_ext(parser, "--plot", args.plot, (".png",))
    for flag, path in (("--out-dir", args.out_dir),
                       ("--results-file", args.results_file and os.path.dirname(
                           os.path.abspath(args.results_file))),
                       ("--plot", args.plot and os.path.dirname(os.path.abspath(args.plot)))):
        _check_writable_dir(parser, flag, path)
    try:
        precision = parse_precision(args.precision, args.amp, args.amp_dtype)
    except ValueError as e:
        parser.error(str(e))
    dev_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(dev_name)
    except RuntimeError:
        parser.error(f"--device {dev_name!r} is not a device; allowed: cpu, cuda, cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {dev_name!r}: CUDA is not available here; allowed: cpu")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {dev_name!r} is not supported; allowed: cpu, cuda, cuda:N")
    from adaperceiver.ops.dispatch import BACKENDS
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    if not backends or any(b not in ("auto",) + BACKENDS for b in backends):
        parser.error(f"--backend {args.backend!r} is not allowed; allowed: comma-separated "
                     f"names from auto, {', '.join(BACKENDS)}")
    try:
        cfg = model_config(args.model, args.model_kwargs)
    except ValueError as e:
        parser.error(str(e))
    if args.img_size % cfg.patch_size:
        parser.error(f"--img-size {args.img_size} is not allowed; allowed: a multiple of the "
                     f"model's patch_size={cfg.patch_size}")
    axes = ModelAxes.from_config(cfg)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grid = parse_grid(args.configs, axes)
        for w in caught:
            log(f"warning: {w.message}")
    except GridError as e:
        parser.error(str(e))
    try:
        base_names = bl.parse_baselines(args.baselines)
    except ValueError as e:
        parser.error(str(e))
    accuracy = None
    if args.accuracy_csv:
        try:
            accuracy = read_accuracy_csv(args.accuracy_csv)
        except ValueError as e:
            parser.error(str(e))

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = RunSettings(batch_size=args.batch_size, img_size=args.img_size,
                           precision=precision, device=device, warmup=args.warmup,
                           rounds=args.rounds, min_rounds=min(args.min_rounds, args.rounds),
                           budget_s=args.budget or None, torchcompile=args.torchcompile)
    for be in backends:
        for c in (grid[0], grid[-1]):
            name = resolved_backend(cfg, be, settings, c)
            if "none (" in name:
                parser.error(f"--backend {be!r} cannot run {c.label} on {device} in "
                             f"{precision.name}: {name}")
    env = environment(device)
    log(f"adaperceiver-bench: {args.model}, {len(grid)} configs x {len(backends)} backend(s), "
        f"{len(base_names)} baselines; batch {args.batch_size}, {args.img_size} px, "
        f"{precision.name}, {device}, {torch.get_num_threads()} threads")

    flops = {c: adaperceiver.count_flops(cfg, c.t, c.w, c.l, img_size=args.img_size)
             for c in grid}
    base_flops = {n: bl.baseline_flops(n, args.img_size) for n in base_names}
    if args.dry_run:
        for c in grid:
            f = flops[c]
            print(f"{c.label:24s} {f.total / 1e9:8.2f} GFLOPs  {f.params / 1e6:7.1f} M params")
        for n in base_names:
            print(f"{n:24s} {base_flops[n][0] / 1e9:8.2f} GFLOPs  "
                  f"{base_flops[n][1] / 1e6:7.1f} M params")
        return {"rows": [], "environment": env, "grid": grid, "baselines": base_names}

    from tqdm import tqdm

    from .runner import _compile, adaperceiver_step, baseline_step
    from .timing import time_interleaved, time_step

    x = settings.images()
    failures: list[str] = []

    def report_error(meta, e):
        msg = (f"{meta['config']} [{meta['backend']}] failed: {type(e).__name__}: "
               f"{' '.join(str(e).split())[:300]}")
        failures.append(msg)
        log("error: " + msg)

    bar = tqdm(total=len(grid) * len(backends) + len(base_names), desc="building", unit="item",
               file=sys.stderr, disable=args.no_progress, dynamic_ncols=True)
    # items: (row fields, step-closure factory); models are built lazily when sequential
    items: list[tuple[dict, object]] = []
    try:
        bar.set_postfix_str(f"building {args.model}")
        model = build_model(args.model, args.model_kwargs, settings, args.pretrained)
        runnable = _compile(model, args.torchcompile, len(grid) * len(backends))
        done = set()
        for be in backends:
            for c in grid:
                be_name = resolved_backend(model, be, settings, c)
                if (c, be_name) in done:
                    # e.g. 'auto' resolves to 'reference' when no faster backend is built
                    log(f"note: --backend {be} runs {be_name} at {c.label}, already measured;"
                        " skipped")
                    bar.total -= 1
                    continue
                done.add((c, be_name))
                f = flops[c]
                meta = dict(kind="adaperceiver", name=args.model, config=c.label,
                            gflops=f.total / 1e9, gflops_needed=f.needed / 1e9,
                            params=f.params, cfg=c, backend=be_name)
                items.append((meta, (lambda c=c, be=be, m=runnable:
                                     adaperceiver_step(m, c, x, settings, be))))
        for n in base_names:
            gf, params = base_flops[n]
            meta = dict(kind="baseline", name=n, config=n, gflops=gf / 1e9, params=params,
                        backend="timm")

            def factory(n=n):
                net = _compile(bl.build_baseline(n, args.img_size, device, precision.dtype),
                               args.torchcompile, 1)
                return baseline_step(net, x, settings)
            items.append((meta, factory))

        rows: list[dict] = []
        opts = dict(warmup=settings.warmup, rounds=settings.rounds,
                    min_rounds=settings.min_rounds, budget_s=settings.budget_s)
        if args.schedule == "sequential":
            bar.set_description("timing")
            for meta, factory in items:
                bar.set_postfix_str(f"{meta['config']} [{meta['backend']}]")
                try:
                    step = factory()
                    timing = time_step(step, device, **opts)
                except Exception as e:  # noqa: BLE001 - reported; the sweep goes on
                    report_error(meta, e)
                    bar.update(1)
                    continue
                finally:
                    step = None
                    release_memory()
                meta = dict(meta)
                kind, name, config = meta.pop("kind"), meta.pop("name"), meta.pop("config")
                rows.append(make_row(kind, name, config, timing, settings, **meta))
                bar.update(1)
                bar.set_postfix_str(f"{config}: {rows[-1]['img_per_s']:.2f} img/s")
        else:
            steps = []
            for meta, factory in items:
                bar.set_postfix_str(f"building {meta['config']}")
                steps.append(factory())
                bar.update(1)
            n_steps = len(steps)
            bar.reset(total=n_steps * (settings.warmup + settings.rounds))
            bar.set_description("timing (interleaved)")

            def on_step(i, phase, rounds):
                bar.total = n_steps * (settings.warmup + rounds)
                bar.set_postfix_str(f"{phase}: {items[i][0]['config']}")
                bar.update(1)

            timings = time_interleaved(steps, device, on_step=on_step,
                                       on_error=lambda i, e: report_error(items[i][0], e),
                                       **opts)
            for (meta, _), timing in zip(items, timings):
                if timing is None:
                    continue
                meta = dict(meta)
                kind, name, config = meta.pop("kind"), meta.pop("name"), meta.pop("config")
                rows.append(make_row(kind, name, config, timing, settings, **meta))
            del steps
        inference = None
        if args.inference:
            # end-to-end figures of adaperceiver.bench.inference, measured on the same model
            from .inference import (FULL_MIN_ROUNDS, MIXED_MIN_ROUNDS, full_config_figures,
                                    mixed_batch_figures)
            bar.set_postfix_str("inference figures (full config, mixed batch)")
            opts = dict(batch=args.batch_size, img_size=args.img_size, device=device)
            if precision.amp_dtype is not None:  # else: the model's dtype (cast or float32)
                opts["amp_dtype"] = precision.amp_dtype
            # both ratios are noisy on a shared machine: at least 5 / 7 rounds
            inference = {"full": full_config_figures(model, **opts, rounds=max(
                             settings.rounds, FULL_MIN_ROUNDS)),
                         "mixed": mixed_batch_figures(model, **opts, rounds=max(
                             settings.rounds, MIXED_MIN_ROUNDS))}
        del model, runnable
        release_memory()
    finally:
        bar.close()

    sp = args.speedup_baseline if args.speedup_baseline in base_names else None
    add_speedups(rows, sp)
    wall = time.perf_counter() - t_start
    env["wall_s"] = wall
    title = (f"AdaPerceiver benchmark ({args.model}) - measured on {env['device_name']} "
             f"({device}), batch {args.batch_size}, {args.img_size} px, {precision.name}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; median of the "
             f"timed rounds after {args.warmup} warm-up step(s)")
    if device.type == "cpu" and env.get("cpu_kernels"):
        title += f"\nCPU kernels: {env['cpu_kernels']}"
    table = format_table(rows, sp, title)
    if not sp:
        table += (f"\n(speedup column empty: --speedup-baseline {args.speedup_baseline} was "
                  "not measured)")
    if failures:
        table += "\nFAILED (not timed):\n  " + "\n  ".join(failures)
    table += f"\nwall time {wall:.0f} s"
    if inference is not None:
        from .inference import format_figures
        table += "\n\n" + format_figures(inference["full"], inference["mixed"])
    print(table)

    # ---- roofline projection, printed and saved apart from the measurements
    items = [{"kind": "adaperceiver", "config": c.label, "flops": flops[c].needed,
              "params": flops[c].params, "num_classes": cfg.num_classes} for c in grid]
    items += [{"kind": "baseline", "config": n, "flops": base_flops[n][0],
               "params": base_flops[n][1], "num_classes": 1000} for n in base_names]
    rb = args.roofline_batch or sorted({args.batch_size, 256})
    roof = roofline_rows(items, rb, args.img_size, bytes_per_el=2)
    roof_text = format_roofline(roof, bytes_per_el=2)
    print("\n" + roof_text)
    roof_doc = {"note": "PROJECTION, not a measurement", "byte_model": roof_text.splitlines()[2],
                "rows": roof}
    extra = {"failures": failures}
    if inference is not None:
        extra["inference"] = inference

    arg_doc = {k: v for k, v in vars(args).items()}
    files = []
    if args.results_file:
        files.append(write_results(args.results_file, rows, env, arg_doc, roof_doc, extra))
    if args.plot:
        files.append(pareto_plot(rows, args.plot, accuracy))
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        d = args.out_dir
        files.append(write_results(os.path.join(d, "bench.json"), rows, env, arg_doc,
                                   roof_doc, extra))
        with open(os.path.join(d, "bench.txt"), "w") as f:
            f.write(table + "\n\nenvironment:\n" + json.dumps(env, indent=2, default=str)
                    + "\n")
        files.append(os.path.join(d, "bench.txt"))
        files.append(pareto_plot(rows, os.path.join(d, "pareto.png"), accuracy))
        with open(os.path.join(d, "roofline.txt"), "w") as f:
            f.write(roof_text + "\n")
        files.append(os.path.join(d, "roofline.txt"))
    if files:
        print("\nwrote: " + ", ".join(files))
    return {"rows": rows, "environment": env, "roofline": roof, "table": table, "files": files,
            "failures": failures}


if __name__ == "__main__":
    sys.exit(main())
