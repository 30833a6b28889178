"""The Pareto plot (matplotlib, Agg backend): measured img/s against GFLOPs per image.

Panel 1: every measured AdaPerceiver configuration (colour = t, marker = w, lines join the
depths of one (t, w)), baselines as labelled black points. Panel 2 (only with an accuracy CSV):
top-1 against measured img/s for the configurations that have an accuracy, with the Pareto
frontier (no other point both faster and more accurate) drawn.
"""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["pareto_plot", "pareto_front"]

_MARKERS = "os^Dv<>ph*"


def pareto_front(points: Sequence[tuple]) -> list[tuple]:
    """Points (speed, quality, ...) not dominated by another (faster and at least as good),
    fastest first; anything after the first two fields (a label, a key) rides along."""
    front, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (-p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return front


def pareto_plot(rows: Sequence[dict], path: str, accuracy: Optional[dict] = None,
                title: Optional[str] = None) -> str:
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    model_rows = [r for r in rows if r["kind"] == "adaperceiver"]
    base_rows = [r for r in rows if r["kind"] == "baseline"]
    acc_rows = ([r for r in model_rows if (r["t"], r["w"], r["l"]) in accuracy]
                if accuracy else [])
    ncols = 2 if accuracy else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7.5 * ncols, 5.5), squeeze=False)
    ax = axes[0][0]
    ts = sorted({r["t"] for r in model_rows})
    ws = sorted({r["w"] for r in model_rows})
    backends = sorted({r["backend"] for r in model_rows})
    cmap = plt.get_cmap("viridis")
    colour = {t: cmap(i / max(1, len(ts) - 1)) for i, t in enumerate(ts)}
    marker = {w: _MARKERS[i % len(_MARKERS)] for i, w in enumerate(ws)}
    for be in backends:
        style = "-" if be == backends[-1] else ":"
        for t in ts:
            for w in ws:
                pts = sorted((r["gflops"], r["img_per_s"]) for r in model_rows
                             if r["t"] == t and r["w"] == w and r["backend"] == be)
                if not pts:
                    continue
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style, color=colour[t], marker=marker[w], ms=6, lw=1,
                        label=f"t={t} w={w}" + (f" [{be}]" if len(backends) > 1 else ""))
    for i, r in enumerate(sorted(base_rows, key=lambda r: (r["gflops"], r["img_per_s"]))):
        ax.scatter([r["gflops"]], [r["img_per_s"]], color="black", marker="*", s=90, zorder=5)
        # alternate label sides so baselines of equal FLOPs (ViT-B/16, FlexiViT-B) stay legible
        ax.annotate(r["name"], (r["gflops"], r["img_per_s"]), textcoords="offset points",
                    xytext=(5, 4) if i % 2 == 0 else (5, -11), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("GFLOPs per image (forward, multiply-add = 2)")
    ax.set_ylabel("measured throughput (img/s)")
    if rows:
        r0 = rows[0]
        ax.set_title(title or f"{r0['device']}, batch {r0['batch_size']}, {r0['img_size']} px, "
                     f"{r0['precision']}, {r0['threads']} threads")
    ax.grid(True, which="both", alpha=0.3)
    if model_rows:
        ax.legend(fontsize=6, ncol=2, loc="best")
    if accuracy:
        ax2 = axes[0][1]
        for r in acc_rows:
            ax2.scatter([r["img_per_s"]], [accuracy[(r["t"], r["w"], r["l"])]],
                        color=colour[r["t"]], marker=marker[r["w"]], s=30)
        front = pareto_front([(r["img_per_s"], accuracy[(r["t"], r["w"], r["l"])])
                              for r in acc_rows])
        if front:
            xs, ys = zip(*sorted(front))
            ax2.plot(xs, ys, "r--", lw=1, label="Pareto frontier")
            ax2.legend(fontsize=7)
        ax2.set_xscale("log")
        ax2.set_xlabel("measured throughput (img/s)")
        ax2.set_ylabel("top-1 (from --accuracy-csv)")
        ax2.set_title(f"accuracy: {len(acc_rows)} of {len(model_rows)} measured configs")
        ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return path
