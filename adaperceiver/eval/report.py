"""Evaluation results: the CSV (read as is by ``python -m adaperceiver.bench --accuracy-csv`` and
by :func:`budget_policy`), the accuracy-FLOPs front as a table, and the plot."""
from __future__ import annotations

import csv
import os
from typing import Optional, Sequence

from ..bench.report import align_table, read_accuracy_csv
from ..policy import BudgetPolicy

__all__ = ["CSV_COLUMNS", "write_csv", "write_policy_csv", "read_eval_csv", "budget_policy",
           "front_rows", "front_table", "plot_front"]

CSV_COLUMNS = ("t", "w", "l", "top1", "top5", "images", "gflops")


def _cell(key, v):
    if key in ("top1", "top5"):
        return f"{v:.4f}"
    if key == "gflops":
        return f"{v:.6g}"
    return str(v)


def _write_rows(path: str, columns: Sequence[str], rows: Sequence[dict]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_cell(k, r[k]) for k in columns])
    return path


def write_csv(path: str, rows: Sequence[dict]) -> str:
    """One line per (t, w, l): top1/top5 in percent, images evaluated, GFLOPs per image."""
    return _write_rows(path, CSV_COLUMNS, rows)


def write_policy_csv(path: str, rows: Sequence[dict]) -> str:
    """One line per policy: top1/top5 in percent, images evaluated, mean GFLOPs per image."""
    return _write_rows(path, ("policy", "top1", "top5", "images", "gflops"), rows)


def read_eval_csv(path: str) -> tuple[dict, dict]:
    """(GFLOPs per image, top-1 %) per (t, w, l) of an eval CSV: the ``cost`` and ``accuracy``
    of :class:`adaperceiver.policy.BudgetPolicy`."""
    accuracy = read_accuracy_csv(path)
    cost = {}
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            if "gflops" not in rec:
                raise ValueError(f"{path!r} has no gflops column; it has {list(rec)}")
            cost[(int(rec["t"]), int(rec["w"]), int(rec["l"]))] = float(rec["gflops"])
    return cost, accuracy


def budget_policy(path: str) -> BudgetPolicy:
    """``BudgetPolicy`` from an eval CSV: ``best_under(gflops)``, ``cheapest_within(top1)``."""
    return BudgetPolicy(*read_eval_csv(path))


def front_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows no other row beats on both GFLOPs and top-1, by increasing GFLOPs."""
    by = {(r["t"], r["w"], r["l"]): r for r in rows}
    pol = BudgetPolicy({c: r["gflops"] for c, r in by.items()},
                       {c: r["top1"] for c, r in by.items()})
    return [by[c] for c in pol.front()]


def front_table(rows: Sequence[dict], policies: Sequence[dict] = ()) -> str:
    front = front_rows(rows)
    table = align_table(["t", "w", "l", "GFLOPs", "top-1 %", "top-5 %"],
                        [(r["t"], r["w"], r["l"], f"{r['gflops']:.3g}", f"{r['top1']:.2f}",
                          f"{r['top5']:.2f}") for r in front])
    out = (f"accuracy-FLOPs front: {len(front)} of {len(rows)} configurations "
           f"({rows[0]['images'] if rows else 0} images)\n{table}")
    if policies:
        out += "\n\n" + align_table(
            ["policy", "GFLOPs (mean)", "top-1 %", "top-5 %"],
            [(p["policy"], f"{p['gflops']:.3g}", f"{p['top1']:.2f}", f"{p['top5']:.2f}")
             for p in policies], left=(0,))
    return out


def plot_front(rows: Sequence[dict], path: str, policies: Sequence[dict] = (),
               title: Optional[str] = None) -> Optional[str]:
    """Top-1 against GFLOPs per image: every configuration (colour = width, size = depth), the
    front as a line, policies as stars. Returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:   # pragma: no cover - matplotlib is optional
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    widths = sorted({r["w"] for r in rows})
    cmap = plt.get_cmap("viridis", max(2, len(widths)))
    depth = max(r["l"] for r in rows)
    for i, w in enumerate(widths):
        rs = [r for r in rows if r["w"] == w]
        ax.scatter([r["gflops"] for r in rs], [r["top1"] for r in rs], color=cmap(i),
                   s=[8 + 30 * r["l"] / depth for r in rs], alpha=0.7, label=f"w={w}")
    front = front_rows(rows)
    ax.plot([r["gflops"] for r in front], [r["top1"] for r in front], "k-", lw=1,
            label="front")
    for p, m in zip(policies, ("r*", "m*", "c*", "y*", "k*")):
        ax.plot(p["gflops"], p["top1"], m, ms=12, label=p["policy"][:40])
    ax.set_xscale("log")
    ax.set_xlabel("GFLOPs / image (log scale)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title or "accuracy vs FLOPs, every (t, w, l)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
