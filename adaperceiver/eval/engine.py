"""The evaluation loop: top-1/top-5 counts of every (t, w, l), one forward per width.

Each batch is loaded once (one pass over the data, however many widths and policies): it runs
:func:`adaperceiver.eval.readouts.grid_readouts` (one forward per width, read out at every
requested (t, l); one top-k over all readouts), then each policy. Under ``torchrun`` each
process takes every world-th batch of the single-process batching
(:func:`adaperceiver.eval.data.rank_batches`), and the integer counts are summed over
processes: each image is counted once, and the result is the single-process one.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..bench.grid import Config
from ..flops import count_flops
from .data import rank_batches
from .policies import choose_under_budget
from ..ops.schedule import to_device
from .readouts import grid_readouts

__all__ = ["EvalResult", "evaluate", "topk_hits"]


@dataclass
class EvalResult:
    rows: list            # per (t, w, l): t, w, l, top1, top5 (percent), images, gflops
    policies: list = field(default_factory=list)  # name, top1, top5, images, gflops (mean)
    images: int = 0
    seconds: float = 0.0
    pass_seconds: dict = field(default_factory=dict)   # "grid" or policy -> wall seconds

    def accuracy(self) -> dict:
        return {(r["t"], r["w"], r["l"]): r["top1"] for r in self.rows}


def _hits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(R, 2) int64 on the logits' device: top-1 and top-5 hits (top-K when K < 5) of each of
    R stacked readouts (R, B, K); one top-k for all of them and no host sync, so a GPU run
    reads the counts back once, at the end."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices          # (R, B, 5)
    right = top == y[:, None]
    return torch.stack([right[..., 0].sum(-1), right.any(-1).sum(-1)], -1)


def topk_hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """(top-1 hits, top-5 hits) of logits (B, K) against labels (B,) (top-K when K < 5)."""
    h1, h5 = _hits(logits[None], y)[0].tolist()
    return h1, h5


def _world():
    from ..train.trainer import world
    return world()


def _all_reduce(t: torch.Tensor, device) -> torch.Tensor:
    import torch.distributed as dist
    if _world()[1] == 1:
        return t
    on = t.to(device) if dist.get_backend() == "nccl" else t
    dist.all_reduce(on)
    return on.cpu()


def _check_labels(y: torch.Tensor, num_classes: int):
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = y[(y < 0) | (y >= num_classes)][:5].tolist()
        raise ValueError(f"labels {bad} are outside the model's classes 0..{num_classes - 1} "
                         "(unlabelled samples are -1); pass --class-map to map folders")


def evaluate(model, dataset, configs: Sequence[Config], *, batch_size: int = 32,
             indices: Optional[Sequence[int]] = None, policies: Sequence = (), workers: int = 0,
             dtype: Optional[torch.dtype] = None, autocast: Optional[torch.dtype] = None,
             img_size=None, progress: bool = True) -> EvalResult:
    """Top-1/top-5 of ``model`` on ``dataset`` ((image, label) samples) at every config (one
    forward per width and batch) and of every policy (:mod:`adaperceiver.eval.policies`), one
    pass over the data. Call it on every rank under torchrun; every rank returns the summed
    result."""
    from tqdm import tqdm
    rank, size = _world()
    cfg = model.config
    dev = next(model.parameters()).device
    dtype = dtype or next(model.parameters()).dtype
    configs = sorted(set(configs))
    indices = list(range(len(dataset))) if indices is None else list(indices)
    batches = rank_batches(indices, batch_size, rank, size)
    mine = sum(len(b) for b in batches)
    row_of = {c: i for i, c in enumerate(configs)}
    widths = sorted({c.w for c in configs}, reverse=True)
    hits = torch.zeros(len(configs), 2, dtype=torch.int64, device=dev)
    seen = torch.zeros(1, dtype=torch.int64)
    pol_sums = torch.zeros(len(policies), 3, dtype=torch.int64)    # top1, top5, FLOPs
    pol_seen = torch.zeros(len(policies), dtype=torch.int64)
    amp = (torch.autocast(dev.type, dtype=autocast) if autocast is not None
           else contextlib.nullcontext())
    grid_size = None
    pass_seconds = {}
    start = time.perf_counter()

    def device_batches():
        """This rank's batches, labels checked, images on the device (one pass per call)."""
        nonlocal grid_size
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                             num_workers=workers, pin_memory=dev.type == "cuda",
                                             persistent_workers=False)
        for x, y in loader:
            _check_labels(y, cfg.num_classes)
            grid_size = tuple(x.shape[-2:])
            yield x.to(dev, dtype, non_blocking=True), y

    def bar(desc):
        return tqdm(total=mine, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True,
                    disable=not progress or rank != 0, smoothing=0.1)

    model.eval()
    groups = {}       # widths that share their token counts and exits: one call for them all
    for w in widths:
        mine_w = [c for c in configs if c.w == w]
        axes = (tuple(sorted({c.t for c in mine_w})), tuple(sorted({c.l for c in mine_w})))
        groups.setdefault(axes, []).append(w)
    with bar(f"{len(configs)} configs ({len(widths)} width{'s' * (len(widths) > 1)})"
             f"{f' + {len(policies)} policies' if policies else ''}") as pb, \
            torch.inference_mode():
        for x, y in device_batches():
            y = y.to(dev)
            t0 = time.perf_counter()
            for (ts, ls), ws in groups.items():
                with amp:
                    keys, logits = grid_readouts(model, x, ws, ts, ls)
                # a grid that is no product ('t=32 l=7' with 't=64 l=14' at one width) reads
                # out more (t, l) than asked: count the requested ones
                want = [i for i, k in enumerate(keys) if Config(*k) in row_of]
                at = to_device([row_of[Config(*keys[i])] for i in want], dev)
                hits.index_add_(0, at, _hits(logits if len(want) == len(keys) else
                                             logits[to_device(want, dev)], y))
            seen += len(y)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            pass_seconds["grid"] = pass_seconds.get("grid", 0.0) + time.perf_counter() - t0
            for pi, pol in enumerate(policies):
                if pol.from_grid:          # its row is the grid's best under its budget
                    continue
                t0 = time.perf_counter()
                with amp:
                    pl, flops = pol.run(model, x)
                pol_sums[pi] += torch.cat([_hits(pl[None], y)[0].cpu(), flops.sum()[None]])
                pol_seen[pi] += len(y)
                name = f"policy {pol.name}"
                pass_seconds[name] = pass_seconds.get(name, 0.0) + time.perf_counter() - t0
            pb.update(len(y))

    hits, seen = _all_reduce(hits.cpu(), dev), _all_reduce(seen, dev)
    pol_sums, pol_seen = _all_reduce(pol_sums, dev), _all_reduce(pol_seen, dev)
    n = len(indices)
    if seen.numel() and not bool((seen == n).all()):    # pragma: no cover - a sampler bug
        raise RuntimeError(f"counted {int(seen)} images, expected {n}")
    img = grid_size or img_size or cfg.img_size
    rows = []
    for c in configs:
        h1, h5 = hits[row_of[c]].tolist()
        f = count_flops(cfg, c.t, c.w, c.l, img_size=img)
        rows.append({"t": c.t, "w": c.w, "l": c.l, "top1": 100.0 * h1 / n,
                     "top5": 100.0 * h5 / n, "images": n, "gflops": f.total / 1e9})
    pol_rows = []
    for pi, pol in enumerate(policies):
        if pol.from_grid:
            pol_rows.append(choose_under_budget(pol, rows))
            continue
        h1, h5, fl = pol_sums[pi].tolist()
        pol_rows.append({"policy": pol.name, "top1": 100.0 * h1 / n, "top5": 100.0 * h5 / n,
                         "images": n, "gflops": fl / n / 1e9})
    return EvalResult(rows, pol_rows, n, time.perf_counter() - start, pass_seconds)
