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
import dataclasses
import ast
import json
import os
import sys
import time
from typing import Callable, Optional, Sequence

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


@dataclasses.dataclass
class _Plan:
    """Every flag checked and resolved: what the run will build and time."""
    args: argparse.Namespace
    cfg: object                 # the model's Config
    grid: list                  # the (t, w, l) configurations
    backends: list[str]
    base_names: list[str]
    accuracy: Optional[dict]
    settings: object            # runner.RunSettings
    flops: dict                 # configuration -> adaperceiver.count_flops(...)
    base_flops: dict            # baseline name -> (FLOPs, params)


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the benchmark; returns ``{"rows", "environment", "roofline", "table", "files"}``."""
    t_start = time.perf_counter()
    parser = build_parser()
    plan = _validate(parser, parser.parse_args(argv))
    from .runner import log
    from .timing import environment
    args, settings = plan.args, plan.settings
    env = environment(settings.device)
    import torch
    log(f"adaperceiver-bench: {args.model}, {len(plan.grid)} configs x {len(plan.backends)} "
        f"backend(s), {len(plan.base_names)} baselines; batch {args.batch_size}, "
        f"{args.img_size} px, {settings.precision.name}, {settings.device}, "
        f"{torch.get_num_threads()} threads")
    if args.dry_run:
        _print_dry_run(plan)
        return {"rows": [], "environment": env, "grid": plan.grid, "baselines": plan.base_names}
    rows, failures, inference = _build_and_time(plan)
    env["wall_s"] = time.perf_counter() - t_start
    table = _format_report(plan, rows, failures, inference, env)
    print(table)
    roof, roof_doc, roof_text = _roofline(plan)
    print("\n" + roof_text)
    extra = {"failures": failures}
    if inference is not None:
        extra["inference"] = inference
    files = _write_outputs(plan, rows, env, table, roof_doc, roof_text, extra)
    if files:
        print("\nwrote: " + ", ".join(files))
    return {"rows": rows, "environment": env, "roofline": roof, "table": table, "files": files,
            "failures": failures}


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> _Plan:
    """Check every flag before any expensive work (parser.error names the flag, the value
    and what is allowed), set the thread count, and resolve what the run will time."""
    import torch

    import adaperceiver
    from adaperceiver.ops.dispatch import BACKENDS

    from . import baselines as bl
    from .grid import GridError, parse_grid_for
    from .report import read_accuracy_csv
    from .runner import RunSettings, log, model_config, parse_precision, resolved_backend

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
    try:
        grid = parse_grid_for(args.configs, cfg, log)
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
    flops = {c: adaperceiver.count_flops(cfg, c.t, c.w, c.l, img_size=args.img_size)
             for c in grid}
    base_flops = {n: bl.baseline_flops(n, args.img_size) for n in base_names}
    return _Plan(args, cfg, grid, backends, base_names, accuracy, settings, flops, base_flops)


def _print_dry_run(plan: _Plan) -> None:
    for c in plan.grid:
        f = plan.flops[c]
        print(f"{c.label:24s} {f.total / 1e9:8.2f} GFLOPs  {f.params / 1e6:7.1f} M params")
    for n in plan.base_names:
        gf, params = plan.base_flops[n]
        print(f"{n:24s} {gf / 1e9:8.2f} GFLOPs  {params / 1e6:7.1f} M params")


def _items(plan: _Plan, model, runnable, x, bar) -> list[tuple[dict, Callable]]:
    """(row fields, step factory) per timed item: every (configuration, backend) of the model,
    then every baseline (built by its factory, so a sequential run holds one at a time)."""
    from . import baselines as bl
    from .runner import adaperceiver_step, baseline_step, compile_model, log, resolved_backend
    args, settings = plan.args, plan.settings
    items: list[tuple[dict, Callable]] = []
    done = set()
    for be in plan.backends:
        for c in plan.grid:
            be_name = resolved_backend(model, be, settings, c)
            if (c, be_name) in done:
                # e.g. 'auto' resolves to 'reference' when no faster backend is built
                log(f"note: --backend {be} runs {be_name} at {c.label}, already measured;"
                    " skipped")
                bar.total -= 1
                continue
            done.add((c, be_name))
            f = plan.flops[c]
            meta = dict(kind="adaperceiver", name=args.model, config=c.label,
                        gflops=f.total / 1e9, gflops_needed=f.needed / 1e9,
                        params=f.params, cfg=c, backend=be_name)
            items.append((meta, (lambda c=c, be=be, m=runnable:
                                 adaperceiver_step(m, c, x, settings, be))))
    for n in plan.base_names:
        gf, params = plan.base_flops[n]
        meta = dict(kind="baseline", name=n, config=n, gflops=gf / 1e9, params=params,
                    backend="timm")

        def factory(n=n):
            net = compile_model(bl.build_baseline(n, args.img_size, settings.device,
                                                  settings.precision.dtype),
                                args.torchcompile, 1)
            return baseline_step(net, x, settings)
        items.append((meta, factory))
    return items


def _row(meta: dict, timing, settings) -> dict:
    from .runner import make_row
    meta = dict(meta)
    kind, name, config = meta.pop("kind"), meta.pop("name"), meta.pop("config")
    return make_row(kind, name, config, timing, settings, **meta)


def _time_sequential(items, settings, opts, bar, report_error) -> list[dict]:
    """One item at a time: build, warm up, time, free (least memory)."""
    from .runner import release_memory
    from .timing import time_step
    rows: list[dict] = []
    bar.set_description("timing")
    for meta, factory in items:
        bar.set_postfix_str(f"{meta['config']} [{meta['backend']}]")
        step = None
        try:
            step = factory()
            timing = time_step(step, settings.device, **opts)
        except Exception as e:  # noqa: BLE001 - reported; the sweep goes on
            report_error(meta, e)
            bar.update(1)
            continue
        finally:
            step = None
            release_memory()
        rows.append(_row(meta, timing, settings))
        bar.update(1)
        bar.set_postfix_str(f"{meta['config']}: {rows[-1]['img_per_s']:.2f} img/s")
    return rows


def _time_interleaved(items, settings, opts, bar, report_error) -> list[dict]:
    """Everything built first, then round-robin rounds: every item samples the same load."""
    from .timing import time_interleaved
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

    timings = time_interleaved(steps, settings.device, on_step=on_step,
                               on_error=lambda i, e: report_error(items[i][0], e), **opts)
    return [_row(meta, timing, settings) for (meta, _), timing in zip(items, timings)
            if timing is not None]


def _inference_figures(plan: _Plan, model) -> dict:
    """The end-to-end figures of adaperceiver.bench.inference, measured on the same model."""
    from .inference import (FULL_MIN_ROUNDS, MIXED_MIN_ROUNDS, full_config_figures,
                            mixed_batch_figures)
    args, settings = plan.args, plan.settings
    opts = dict(batch=args.batch_size, img_size=args.img_size, device=settings.device)
    if settings.precision.amp_dtype is not None:  # else: the model's dtype (cast or float32)
        opts["amp_dtype"] = settings.precision.amp_dtype
    # both ratios are noisy on a shared machine: at least 5 / 7 rounds
    return {"full": full_config_figures(model, **opts,
                                        rounds=max(settings.rounds, FULL_MIN_ROUNDS)),
            "mixed": mixed_batch_figures(model, **opts,
                                         rounds=max(settings.rounds, MIXED_MIN_ROUNDS))}


def _build_and_time(plan: _Plan) -> tuple[list[dict], list[str], Optional[dict]]:
    """Build the model (and the baselines), time every item, and the inference figures when
    asked. Returns (rows, failures, inference figures or None); a failing item is reported
    and the sweep goes on."""
    from tqdm import tqdm

    from .runner import build_model, compile_model, log, release_memory
    args, settings = plan.args, plan.settings
    x = settings.images()
    failures: list[str] = []

    def report_error(meta, e):
        msg = (f"{meta['config']} [{meta['backend']}] failed: {type(e).__name__}: "
               f"{' '.join(str(e).split())[:300]}")
        failures.append(msg)
        log("error: " + msg)

    n_items = len(plan.grid) * len(plan.backends) + len(plan.base_names)
    bar = tqdm(total=n_items, desc="building", unit="item", file=sys.stderr,
               disable=args.no_progress, dynamic_ncols=True)
    try:
        bar.set_postfix_str(f"building {args.model}")
        model = build_model(args.model, args.model_kwargs, settings, args.pretrained)
        runnable = compile_model(model, args.torchcompile, len(plan.grid) * len(plan.backends))
        items = _items(plan, model, runnable, x, bar)
        opts = dict(warmup=settings.warmup, rounds=settings.rounds,
                    min_rounds=settings.min_rounds, budget_s=settings.budget_s)
        time_items = _time_sequential if args.schedule == "sequential" else _time_interleaved
        rows = time_items(items, settings, opts, bar, report_error)
        inference = None
        if args.inference:
            bar.set_postfix_str("inference figures (full config, mixed batch)")
            inference = _inference_figures(plan, model)
        del model, runnable, items
        release_memory()
    finally:
        bar.close()
    return rows, failures, inference


def _format_report(plan: _Plan, rows, failures, inference, env) -> str:
    """The printed table: title (device, precision, threads, CPU kernels), rows with the
    speedup column, failures, wall time, and the inference figures when measured."""
    import torch

    from .report import add_speedups, format_table
    args, settings = plan.args, plan.settings
    sp = args.speedup_baseline if args.speedup_baseline in plan.base_names else None
    add_speedups(rows, sp)
    title = (f"AdaPerceiver benchmark ({args.model}) - measured on {env['device_name']} "
             f"({settings.device}), batch {args.batch_size}, {args.img_size} px, "
             f"{settings.precision.name}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}; median of the timed rounds after {args.warmup} warm-up "
             "step(s)")
    if settings.device.type == "cpu" and env.get("cpu_kernels"):
        title += f"\nCPU kernels: {env['cpu_kernels']}"
    table = format_table(rows, sp, title)
    if not sp:
        table += (f"\n(speedup column empty: --speedup-baseline {args.speedup_baseline} was "
                  "not measured)")
    if failures:
        table += "\nFAILED (not timed):\n  " + "\n  ".join(failures)
    table += f"\nwall time {env['wall_s']:.0f} s"
    if inference is not None:
        from .inference import format_figures
        table += "\n\n" + format_figures(inference["full"], inference["mixed"])
    return table


def _roofline(plan: _Plan) -> tuple[list, dict, str]:
    """The GPU roofline projection of every item: (rows, JSON document, text)."""
    from .roofline import format_roofline, roofline_rows
    args = plan.args
    items = [{"kind": "adaperceiver", "config": c.label, "flops": plan.flops[c].needed,
              "params": plan.flops[c].params, "num_classes": plan.cfg.num_classes}
             for c in plan.grid]
    items += [{"kind": "baseline", "config": n, "flops": plan.base_flops[n][0],
               "params": plan.base_flops[n][1], "num_classes": 1000} for n in plan.base_names]
    rb = args.roofline_batch or sorted({args.batch_size, 256})
    roof = roofline_rows(items, rb, args.img_size, bytes_per_el=2)
    roof_text = format_roofline(roof, bytes_per_el=2)
    roof_doc = {"note": "PROJECTION, not a measurement", "byte_model": roof_text.splitlines()[2],
                "rows": roof}
    return roof, roof_doc, roof_text


def _write_outputs(plan: _Plan, rows, env, table, roof_doc, roof_text, extra) -> list[str]:
    """--results-file, --plot and --out-dir's four files; returns the paths written."""
    from .plot import pareto_plot
    from .report import write_results
    args = plan.args
    arg_doc = dict(vars(args))
    files = []
    if args.results_file:
        files.append(write_results(args.results_file, rows, env, arg_doc, roof_doc, extra))
    if args.plot:
        files.append(pareto_plot(rows, args.plot, plan.accuracy))
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        d = args.out_dir
        files.append(write_results(os.path.join(d, "bench.json"), rows, env, arg_doc,
                                   roof_doc, extra))
        with open(os.path.join(d, "bench.txt"), "w") as f:
            f.write(table + "\n\nenvironment:\n" + json.dumps(env, indent=2, default=str)
                    + "\n")
        files.append(os.path.join(d, "bench.txt"))
        files.append(pareto_plot(rows, os.path.join(d, "pareto.png"), plan.accuracy))
        with open(os.path.join(d, "roofline.txt"), "w") as f:
            f.write(roof_text + "\n")
        files.append(os.path.join(d, "roofline.txt"))
    return files


if __name__ == "__main__":
    sys.exit(main())
