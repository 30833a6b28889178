"""``python -m adaperceiver.eval DATA``: top-1/top-5 of every (t, w, l) on real images, one pass
over the data per Matryoshka width (readouts at every token granularity and exit layer), and
the accuracy-FLOPs front.

    python -m adaperceiver.eval /data/imagenet/val --pretrained pjajal/adaperceiver-v1-in1k-ft
    torchrun --nproc_per_node 2 -m adaperceiver.eval /data/imagenet --split val --limit 1000

Writes ``--out`` (CSV: t, w, l, top1, top5, images, gflops; read as is by
``python -m adaperceiver.bench --accuracy-csv``), the plot beside it (.png), the policies'
CSV (``*_policies.csv``) when ``--policy`` is given, and prints the front. Every input is
checked before the evaluation starts (exit status 2 and a message naming what is wrong).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

if TYPE_CHECKING:
    import torch

__all__ = ["main", "run", "build_parser", "process_device"]


def build_parser() -> argparse.ArgumentParser:
    from ..bench.__main__ import _ParseKwargs
    p = argparse.ArgumentParser(
        prog="python -m adaperceiver.eval",
        description="Accuracy of an AdaPerceiver at every (t, w, l) on an image folder or a "
                    "timm dataset: one pass per width, readouts at every token count and "
                    "depth; the accuracy-FLOPs front as a table, a CSV and a plot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", metavar="DATA",
                   help="an image folder with one subfolder per class (ImageNet-style; a "
                        "--split subfolder is used when present), or a timm dataset name "
                        "(torch/cifar10, hfds/..., with --data-dir)")
    d = p.add_argument_group("data")
    d.add_argument("--split", default="validation",
                   help="split subfolder / timm split (validation also finds val/)")
    d.add_argument("--data-dir", default=None, help="root of a timm dataset name")
    d.add_argument("--class-map", default=None, metavar="FILE",
                   help="folder name -> class index: one folder name per line (line i = "
                        "class i) or 'name index' lines; needed when the folders are not the "
                        "model's classes in sorted order")
    d.add_argument("--img-size", type=int, default=None, help="input side (default: model's)")
    d.add_argument("--crop-pct", type=float, default=None, help="center crop ratio")
    d.add_argument("--crop-mode", default=None, help="center, squash or border")
    d.add_argument("--interpolation", default=None, help="resize interpolation (bicubic)")
    d.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean")
    d.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std")
    d.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate N images spread evenly over the set (a quick look)")
    d.add_argument("--no-check-images", action="store_true",
                   help="skip opening every image's header before the run")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="adaperceiver_v1_in1k",
                   help="adaperceiver model name (adaperceiver.list_models()); with "
                        "--pretrained the checkpoint's config.json decides the architecture")
    m.add_argument("--pretrained", default=None, metavar="PATH_OR_HUB_ID",
                   help="a checkpoint folder (config.json + model.safetensors) or a Hugging "
                        "Face id such as pjajal/adaperceiver-v1-in1k-ft; random init otherwise")
    m.add_argument("--model-kwargs", nargs="+", action=_ParseKwargs, default={},
                   metavar="KEY=VALUE", help="config.json overrides")
    m.add_argument("--configs", nargs="+", default=["all"], metavar="SPEC",
                   help="'all' (every granularity x width x depth), 'default', or axes such as "
                        "'t=32,256 w=all l=7,14,21' (the bench CLI's syntax)")
    m.add_argument("--policy", action="append", default=[], metavar="SPEC",
                   help="also evaluate a policy: 'tau=0.9[,t=T][,w=W]' (confidence exit), "
                        "'learned=PATH' (a saved LearnedPolicy) or 'budget=GFLOPS[,table=CSV]' "
                        "(the most accurate configuration within GFLOPS per image, chosen from "
                        "an eval CSV of a held-out split, or from this run's grid); repeatable")
    m.add_argument("--backend", default="auto",
                   help="ops backend: auto, reference, cpp, triton, cuda")
    r = p.add_argument_group("run")
    r.add_argument("-b", "--batch-size", type=int, default=32)
    r.add_argument("--precision", default="float32",
                   help="float32, float16, bfloat16, amp, amp_float16, amp_bfloat16")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if "
                                                   "available, else cpu; cuda:LOCAL_RANK "
                                                   "under torchrun)")
    r.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per process; 0 leaves torch's default")
    r.add_argument("--workers", type=int, default=2, help="data loading processes")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="results/eval.csv", help="the CSV (.csv)")
    o.add_argument("--plot", default=None,
                   help="the plot (.png; default: --out with .png; 'none' for no plot)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def process_device(device: Optional[str], env: Mapping[str, str], cuda_count: int
                   ) -> tuple[torch.device, Optional[str]]:
    """(this process's device, its process group backend) from ``--device`` and torchrun's
    environment (WORLD_SIZE, LOCAL_RANK), ``cuda_count`` CUDA devices being visible.

    Default device: cuda when there is one, else cpu. Under torchrun (WORLD_SIZE > 1) ``cuda``
    means cuda:LOCAL_RANK (one GPU per process); the backend is NCCL for CUDA devices and gloo
    for everything else (a GPU machine evaluating on its CPUs runs gloo: NCCL reduces CUDA
    tensors only); a single process has no process group (None)."""
    import torch
    world = int(env.get("WORLD_SIZE", "1"))
    local = int(env.get("LOCAL_RANK", "0"))
    name = device or ("cuda" if cuda_count else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; allowed: cpu, cuda, cuda:N") \
            from None
    if dev.type == "cuda":
        if not cuda_count:
            raise ValueError(f"--device {name!r}: CUDA is not available here; allowed: cpu")
        if dev.index is None:
            dev = torch.device("cuda", local if world > 1 else 0)
            if dev.index >= cuda_count:
                raise ValueError(f"--device cuda under torchrun: LOCAL_RANK={local} but "
                                 f"{cuda_count} CUDA device{'s' * (cuda_count > 1)} visible; "
                                 f"allowed: --nproc_per_node <= {cuda_count} per node (one GPU "
                                 "per process) or --device cpu")
        elif world > 1:
            raise ValueError(f"--device {name!r} under torchrun with {world} processes puts "
                             "them all on one GPU (NCCL refuses); allowed: --device cuda "
                             "(process i on cuda:LOCAL_RANK) or cpu")
        elif dev.index >= cuda_count:
            raise ValueError(f"--device {name!r}: {cuda_count} CUDA device"
                             f"{'s' * (cuda_count > 1)} visible; allowed: cuda:0.."
                             f"cuda:{cuda_count - 1}")
    backend = None if world == 1 else ("nccl" if dev.type == "cuda" else "gloo")
    return dev, backend


def init_distributed(device, backend: Optional[str]) -> tuple[int, int]:
    """Join torchrun's process group with ``backend`` (:func:`process_device`); NCCL binds
    this process to its GPU first. (rank, world size); (0, 1) for a single process."""
    import torch
    import torch.distributed as dist

    from ..train.trainer import world
    if backend is not None and not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(device)
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
    return world()


def _fail(parser, msg: str):
    """Exit 2 with the message; under torchrun rank 0 prints the usage, every other rank the
    message alone (a bad image may sit in one rank's share only)."""
    from ..train.trainer import world
    rank = world()[0] if world()[1] > 1 else int(os.environ.get("RANK", "0"))
    if rank == 0:
        parser.error(msg)
    print(f"{parser.prog} (rank {rank}): error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def load_model(name: str, pretrained: Optional[str], overrides: dict):
    """The model to evaluate: ``pretrained`` (a local checkpoint or a Hugging Face id, its
    config.json plus ``overrides``) or ``name`` at random init."""
    import adaperceiver
    from ..registry import MODEL_CONFIGS, list_models
    if name not in MODEL_CONFIGS:
        raise ValueError(f"--model {name!r} is not known; allowed: {', '.join(list_models())}")
    if not pretrained:
        return adaperceiver.create_model(name, **overrides)
    from ..hub import resolve_pretrained
    path = resolve_pretrained(pretrained)
    return adaperceiver.from_pretrained(path, **overrides)


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the evaluation; returns {"rows", "policies", "files", "table"} (rank 0; other ranks
    get the rows only)."""
    parser = build_parser()
    args = parser.parse_args(argv)

    import torch

    from ..bench.grid import GridError, parse_grid_for
    from ..bench.runner import parse_precision
    from ..ops.dispatch import BACKENDS
    from . import data as D
    from .engine import evaluate
    from .policies import parse_policy
    from .report import front_table, plot_front, write_csv, write_policy_csv

    def log(msg):
        if rank == 0:
            print(msg, file=sys.stderr, flush=True)

    # ---- flags that need nothing loaded
    for flag, v, lo in (("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                        ("--threads", args.threads, 0), ("--img-size", args.img_size, 1),
                        ("--limit", args.limit, 1)):
        if v is not None and v < lo:
            parser.error(f"{flag} {v} is not allowed; allowed: an int >= {lo}")
    if os.path.splitext(args.out)[1].lower() != ".csv":
        parser.error(f"--out {args.out!r}: allowed: a .csv path")
    plot = args.plot or os.path.splitext(args.out)[0] + ".png"
    if plot.lower() != "none" and os.path.splitext(plot)[1].lower() != ".png":
        parser.error(f"--plot {plot!r}: allowed: a .png path or 'none'")
    if args.backend != "auto" and args.backend not in BACKENDS:
        parser.error(f"--backend {args.backend!r} is not allowed; allowed: auto, "
                     f"{', '.join(BACKENDS)}")
    try:
        precision = parse_precision(args.precision)
    except ValueError as e:
        parser.error(str(e))

    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        device, backend = process_device(args.device, os.environ, cuda_count)
    except ValueError as e:
        _fail(parser, str(e))
    rank, size = init_distributed(device, backend)
    if args.threads:
        torch.set_num_threads(args.threads)

    # ---- the model, the grid, the policies, the data: every check before the long work
    try:
        model = load_model(args.model, args.pretrained, args.model_kwargs)
    except (ValueError, TypeError, FileNotFoundError, ConnectionError) as e:
        _fail(parser, f"model: {e}")
    model = model.eval().to(device=device, dtype=precision.dtype)
    cfg = model.config
    try:
        grid = parse_grid_for(args.configs, cfg, log)
        policies = [parse_policy(s, cfg) for s in args.policy]
    except (GridError, ValueError, FileNotFoundError) as e:
        _fail(parser, str(e))
    overrides = dict(img_size=args.img_size, crop_pct=args.crop_pct, crop_mode=args.crop_mode,
                     interpolation=args.interpolation, mean=args.mean, std=args.std)
    try:
        data_cfg = D.data_config(model, overrides)
        from timm.data import create_transform
        transform = create_transform(**data_cfg, is_training=False)
    except (AssertionError, ValueError, TypeError) as e:
        _fail(parser, f"data config {overrides}: {e.__class__.__name__}: {e} (the mean and "
                      f"std need 1 or {cfg.in_channels} values)")
    side = data_cfg["input_size"][1:]
    if side[0] % cfg.patch_size or side[1] % cfg.patch_size:
        _fail(parser, f"input size {side} is not allowed; allowed: multiples of the model's "
                      f"patch_size={cfg.patch_size} (--img-size)")
    if any(p.from_grid for p in policies):
        from ..flops import count_flops
        grid_gflops = {c: count_flops(cfg, c.t, c.w, c.l, img_size=tuple(side)).total / 1e9
                       for c in grid}
        try:
            for p in policies:
                p.check_budget(grid_gflops)
        except ValueError as e:
            _fail(parser, str(e))
    img_mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(cfg.in_channels)
    if img_mode is None:
        _fail(parser, f"the model reads {cfg.in_channels}-channel images; allowed: 1, 3, 4")
    try:
        opened = D.open_dataset(args.data, cfg.num_classes, transform, img_mode=img_mode,
                                split=args.split, class_map=args.class_map,
                                data_dir=args.data_dir)
        indices = D.limit_indices(len(opened.dataset), args.limit)
        if not args.no_check_images:
            # each rank checks its own images
            mine = [i for b in D.rank_batches(indices, args.batch_size, rank, size) for i in b]
            D.check_images(opened.dataset, mine, progress=not args.no_progress and rank == 0)
    except (FileNotFoundError, ValueError) as e:
        _fail(parser, str(e))
    widths = sorted({c.w for c in grid})
    log(f"adaperceiver.eval: {args.model}{' ' + args.pretrained if args.pretrained else ''} on "
        f"{opened.root} ({len(indices)} of {len(opened.dataset)} images, "
        f"{data_cfg['input_size'][1]}x{data_cfg['input_size'][2]}, "
        f"{data_cfg['interpolation']}, crop {data_cfg['crop_pct']}); {len(grid)} configs = "
        f"{len(widths)} forwards per batch (w={widths})"
        f"{f' + {len(policies)} policies' if policies else ''}; batch {args.batch_size}, "
        f"{precision.name}, {device}, {torch.get_num_threads()} threads, "
        f"{size} process{'es' if size > 1 else ''}{f' ({backend})' if backend else ''}")

    from ..ops import use_backend
    import contextlib
    ctx = contextlib.nullcontext() if args.backend == "auto" else use_backend(args.backend)
    start = time.perf_counter()
    with ctx:
        result = evaluate(model, opened.dataset, grid, batch_size=args.batch_size,
                          indices=indices, policies=policies, workers=args.workers,
                          dtype=precision.dtype, autocast=precision.amp_dtype,
                          img_size=tuple(side), progress=not args.no_progress)
    out = {"rows": result.rows, "policies": result.policies, "files": [], "result": result}
    if rank != 0:
        return out
    files = [write_csv(args.out, result.rows)]
    if result.policies:
        files.append(write_policy_csv(os.path.splitext(args.out)[0] + "_policies.csv",
                                      result.policies))
    if plot.lower() != "none":
        p = plot_front(result.rows, plot, result.policies,
                       title=f"{args.model}: {len(indices)} images of {opened.root}")
        if p:
            files.append(p)
    table = front_table(result.rows, result.policies)
    passes = ", ".join(f"{k} {v:.1f}s" for k, v in result.pass_seconds.items())
    print(table)
    print(f"\n{len(result.rows)} configurations, {result.images} images, "
          f"{time.perf_counter() - start:.1f}s ({passes}); wrote {', '.join(files)}")
    out.update(files=files, table=table)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
