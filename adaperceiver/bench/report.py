"""Result rows, the final table, and JSON / CSV result files.

One row per measured (model or baseline, configuration, backend). JSON holds
``{"environment": ..., "args": ..., "results": [rows], "roofline_projection": {...}}``;
CSV holds the rows, one per line, with the environment's key fields repeated as columns.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Iterable, Optional, Sequence

__all__ = ["ROW_FIELDS", "ENV_COLUMNS", "align_table", "format_table", "write_results", "add_speedups",
           "read_accuracy_csv"]

# every result row carries exactly these fields (None where a field does not apply)
ROW_FIELDS = (
    "kind",             # "adaperceiver" or "baseline"
    "name",             # model name (adaperceiver registry name or timm name)
    "config",           # "t=.. w=.. l=.." for adaperceiver, the timm name for a baseline
    "t", "w", "l",      # num_tokens, mat_dim, depth (None for baselines)
    "backend",          # ops backend that ran (adaperceiver), "timm" for baselines
    "batch_size", "img_size", "precision", "device", "threads", "torchcompile",
    "gflops",           # forward GFLOPs per image as computed (multiply-add = 2)
    "gflops_needed",    # GFLOPs per image once the masked attention is skipped
    "params",           # parameters used at this configuration
    "img_per_s",        # batch_size / median step time
    "ms_per_step",      # median step time (ms)
    "ms_min", "ms_max", "ms_stdev", "spread_pct",
    "rounds", "warmup", "timer",
    "speedup",          # img_per_s / img_per_s of the speedup baseline (same run)
    "speedup_baseline",
    "times_ms",         # every timed round
)
ENV_COLUMNS = ("torch", "timm", "cpu_model", "device_name")


def add_speedups(rows: list[dict], baseline: Optional[str]) -> Optional[float]:
    """Fill ``speedup`` of every row relative to ``baseline``'s img/s; returns that img/s."""
    ref = None
    if baseline:
        for r in rows:
            if r["kind"] == "baseline" and r["name"] == baseline:
                ref = r["img_per_s"]
    for r in rows:
        r["speedup_baseline"] = baseline if ref else None
        r["speedup"] = (r["img_per_s"] / ref) if ref else None
    return ref


def _fmt(v, spec: str, none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _gflops(v) -> str:
    if v is None:
        return "-"
    return format(v, ".2f") if v >= 1 else format(v, ".3g")


def align_table(head: Sequence[str], rows: Sequence[Sequence], left=()) -> str:
    """A plain-text table: header, a dashed rule, then the rows; every column as wide as its
    widest cell, columns two spaces apart. Columns whose index is in ``left`` are left-aligned,
    the others right-aligned."""
    head = [str(h) for h in head]
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, rows)])


def format_table(rows: Sequence[dict], baseline: Optional[str] = None,
                 title: Optional[str] = None) -> str:
    """The final table: config, GFLOPs, params, img/s, ms/step (median, min-max), speedup."""
    sp_head = f"x {baseline}" if baseline else "speedup"
    head = ("model", "config", "backend", "GFLOPs", "params (M)", "img/s", "ms/step",
            "min-max ms", "rounds", sp_head)
    lines = []
    for r in rows:
        model = "AdaPerceiver" if r["kind"] == "adaperceiver" else "baseline"
        lines.append((
            model, r["config"], r["backend"] or "-", _gflops(r["gflops"]),
            _fmt(r["params"] / 1e6 if r["params"] is not None else None,
                 ".1f" if (r["params"] or 0) >= 1e6 else ".3g"),
            _fmt(r["img_per_s"], ".2f"), _fmt(r["ms_per_step"], ".1f"),
            f"{_fmt(r['ms_min'], '.1f')}-{_fmt(r['ms_max'], '.1f')}",
            str(r["rounds"]), _fmt(r["speedup"], ".2f"),
        ))
    table = align_table(head, lines, left={0, 1, 2})
    return f"{title}\n{table}" if title else table


def _csv_value(v):
    if isinstance(v, (list, tuple)):
        return ";".join(format(x, ".4f") if isinstance(x, float) else str(x) for x in v)
    return "" if v is None else v


def write_results(path: str, rows: Iterable[dict], environment: dict, args: dict,
                  roofline: Optional[dict] = None, extra: Optional[dict] = None) -> str:
    """Write ``rows`` to ``path``: JSON for ``.json``, CSV for ``.csv`` (else ValueError).
    ``roofline`` and ``extra`` (more top-level keys) go to JSON only."""
    rows = list(rows)
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".csv"):
        raise ValueError(f"--results-file {path!r}: extension {ext or '(none)'!r} is not "
                         "allowed; allowed: .json or .csv")
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    if ext == ".json":
        doc = {"environment": environment, "args": args,
               "results": [{k: r.get(k) for k in ROW_FIELDS} for r in rows]}
        if roofline is not None:
            doc["roofline_projection"] = roofline
        doc.update(extra or {})
        with open(path, "w") as f:
            json.dump(doc, f, indent=2, default=str)
            f.write("\n")
    else:
        cols = list(ROW_FIELDS) + [c for c in ENV_COLUMNS]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in rows:
                line = {k: _csv_value(r.get(k)) for k in ROW_FIELDS}
                line.update({c: _csv_value(environment.get(c)) for c in ENV_COLUMNS})
                w.writerow(line)
    return path


def read_accuracy_csv(path: str) -> dict[tuple[int, int, int], float]:
    """``--accuracy-csv``: a CSV with a header holding t, w, l and top1 (percent or fraction)."""
    if not os.path.isfile(path):
        raise ValueError(f"--accuracy-csv {path!r} does not exist")
    out = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("t", "w", "l", "top1") if c not in cols]
        if missing:
            raise ValueError(f"--accuracy-csv {path!r} lacks columns {missing}; it has {cols}; "
                             "allowed: a header with t, w, l, top1")
        for i, rec in enumerate(reader, start=2):
            rec = {k.strip(): v for k, v in rec.items() if k}
            try:
                key = (int(rec["t"]), int(rec["w"]), int(rec["l"]))
                out[key] = float(rec["top1"])
            except (TypeError, ValueError):
                raise ValueError(f"--accuracy-csv {path!r} line {i}: {rec} is not "
                                 "(int t, int w, int l, float top1)") from None
    if not out:
        raise ValueError(f"--accuracy-csv {path!r} holds no rows")
    return out
