"""Per-sample policies evaluated by ``python -m adaperceiver.eval --policy SPEC``: each image runs
the configuration the policy picks for it (one heterogeneous batch), and the policy is reported
by its accuracy and the mean FLOPs per image of what each image ran.

SPEC (``--policy`` may be given several times):

    tau=0.9[,t=256][,w=832]   confidence exit (the model's ``depth_tau`` with exit="sample"):
                              each image leaves at the first layer whose max softmax reaches
                              tau, at t tokens and width w (default: the largest); its FLOPs are
                              count_flops(t, w, its depth) plus the write-outs of the layers it
                              passed (the confidence is read at every layer)
    learned=PATH              a :class:`adaperceiver.policy.LearnedPolicy` saved with
                              :func:`save_learned_policy`; each image runs the (t, w, l) it
                              picks (the policy's own MLP is not counted)
    budget=G[,table=CSV]      :class:`adaperceiver.policy.BudgetPolicy`: every image runs the
                              most accurate configuration of at most G GFLOPs per image. It is
                              chosen from ``table`` (an eval CSV of a held-out split: an honest
                              test figure), or without ``table`` from this run's own grid (the
                              best row under the budget: chosen on the evaluated images, so an
                              optimistic figure)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..flops import count_flops

__all__ = ["PolicySpec", "parse_policy", "choose_under_budget", "save_learned_policy",
           "load_learned_policy"]


def save_learned_policy(policy, path: str) -> None:
    """Write a fitted :class:`adaperceiver.policy.LearnedPolicy` (its configurations, sizes and
    weights) for ``--policy learned=PATH``."""
    net = policy.net
    torch.save({"configs": [list(c) for c in policy.configs], "dim": net[1].in_features,
                "hidden": net[1].out_features, "state_dict": policy.state_dict()}, path)


def load_learned_policy(path: str):
    from ..policy import LearnedPolicy
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--policy learned={path!r}: the file does not exist")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        policy = LearnedPolicy(saved["dim"], [tuple(c) for c in saved["configs"]],
                               hidden=saved["hidden"])
        policy.load_state_dict(saved["state_dict"])
    except Exception as e:
        raise ValueError(f"--policy learned={path!r} is not a policy written by "
                         f"adaperceiver.eval.save_learned_policy: {e.__class__.__name__}: "
                         f"{e}") from e
    return policy.eval()


@dataclass
class PolicySpec:
    name: str
    kind: str                       # "tau", "learned" or "budget"
    tau: Optional[float] = None
    t: Optional[int] = None
    w: Optional[int] = None
    policy: object = None           # LearnedPolicy
    budget: Optional[float] = None  # GFLOPs per image
    table: Optional[str] = None     # the eval CSV a budget policy chooses from (None: the grid)
    config: Optional[tuple] = None  # a budget policy's (t, w, l) chosen from its table
    _flops: dict = field(default_factory=dict)

    @property
    def from_grid(self) -> bool:
        """A budget policy that chooses from this run's grid: no forward of its own; its row
        is the grid's best row under the budget (:func:`choose_under_budget`)."""
        return self.kind == "budget" and self.table is None

    def check_budget(self, grid_gflops: dict) -> None:
        """Before the run: a budget policy that chooses from the grid needs a grid
        configuration within its budget (``grid_gflops``: (t, w, l) -> GFLOPs per image)."""
        if self.from_grid:
            cheapest = min(grid_gflops.values())
            if self.budget < cheapest:
                raise ValueError(f"--policy {self.name!r}: budget={self.budget:g} GFLOPs is "
                                 f"below the cheapest configuration of --configs "
                                 f"({cheapest:.6g} GFLOPs per image); allowed: >= {cheapest:.6g}"
                                 ", or a larger --configs grid")

    def flops(self, cfg, t: int, w: int, l: int, img_size) -> int:
        """FLOPs per image (an integer count) of one (t, w, l) under this policy."""
        key = (t, w, l)
        if key not in self._flops:
            f = count_flops(cfg, t, w, l, img_size=img_size)
            total = f.total
            if self.kind == "tau":     # a write-out at every layer before the exit too
                total += (l - 1) * sum(f.parts[k] for k in ("write_proj", "write_attention",
                                                            "head"))
            self._flops[key] = int(round(total))
        return self._flops[key]

    @torch.no_grad()
    def run(self, model, x: torch.Tensor):
        """(logits (B, K), FLOPs per image (B,) int64) of the batch under this policy."""
        cfg = model.config
        img = tuple(x.shape[-2:])
        if self.kind == "tau":
            out = model(x, num_tokens=self.t, mat_dim=self.w, depth_tau=self.tau, exit="sample")
            chosen = [(self.t, self.w, int(d)) for d in out.depths.tolist()]
        elif self.kind == "budget":
            if self.config is None:
                raise RuntimeError(f"{self.name}: chooses from the grid's results, it has no "
                                   "forward of its own (choose_under_budget)")
            t, w, l = self.config
            out = model(x, num_tokens=t, mat_dim=w, depth=l)
            chosen = [self.config] * x.shape[0]
        else:
            pick = self.policy.to(x.device).choose(model, x)
            chosen = list(zip(pick["num_tokens"].tolist(), pick["mat_dim"].tolist(),
                              pick["depth"].tolist()))
            out = model(x, num_tokens=[c[0] for c in chosen], mat_dim=[c[1] for c in chosen],
                        depth=[c[2] for c in chosen])
        flops = torch.tensor([self.flops(cfg, *c, img_size=img) for c in chosen],
                             dtype=torch.int64)
        return out.logits[:, 0], flops


def choose_under_budget(spec: PolicySpec, rows) -> dict:
    """The row of a budget policy that chooses from the grid: the most accurate of ``rows``
    (the eval's per-(t, w, l) rows) within its budget, cheaper on ties, named for it."""
    from ..policy import BudgetPolicy
    by = {(r["t"], r["w"], r["l"]): r for r in rows}
    pick = BudgetPolicy({c: r["gflops"] for c, r in by.items()},
                        {c: r["top1"] for c, r in by.items()}).best_under(spec.budget)
    r = by[pick]
    return {"policy": f"{spec.name} -> t={pick[0]} w={pick[1]} l={pick[2]}", "top1": r["top1"],
            "top5": r["top5"], "images": r["images"], "gflops": r["gflops"]}


def _parse_budget(spec: str, fields: dict, cfg, allowed: str) -> PolicySpec:
    import math
    if set(fields) - {"budget", "table"}:
        raise ValueError(f"--policy {spec!r}: budget= takes only table=; allowed: {allowed}")
    try:
        budget = float(fields["budget"])
    except ValueError:
        budget = None
    if budget is None or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"--policy {spec!r}: budget={fields['budget']!r} is not allowed; "
                         "allowed: a finite number of GFLOPs per image > 0 (the cost column "
                         "of an eval CSV)")
    table = fields.get("table")
    if table is None:
        return PolicySpec(f"budget {budget:g} GFLOPs (from this grid)", "budget",
                          budget=budget)
    from ..policy import BudgetPolicy
    from .report import read_eval_csv
    if not os.path.isfile(table):
        raise FileNotFoundError(f"--policy {spec!r}: table={table!r} does not exist; allowed: "
                                "an eval CSV (t, w, l, top1, ..., gflops)")
    try:
        cost, accuracy = read_eval_csv(table)
    except ValueError as e:
        raise ValueError(f"--policy {spec!r}: table={table!r}: {e}") from None
    try:
        t, w, l = BudgetPolicy(cost, accuracy).best_under(budget)
    except ValueError as e:
        raise ValueError(f"--policy {spec!r}: {e} in {table!r}") from None
    if not (1 <= w <= cfg.embed_dim and 1 <= l <= cfg.depth and t >= 1):
        raise ValueError(f"--policy {spec!r}: {table!r} chooses (t={t}, w={w}, l={l}), which "
                         f"does not fit the model (w in 1..{cfg.embed_dim}, l in "
                         f"1..{cfg.depth}); allowed: an eval CSV of this model")
    return PolicySpec(f"budget {budget:g} GFLOPs ({os.path.basename(table)}: t={t} w={w} l={l})",
                      "budget", budget=budget, table=table, config=(t, w, l))


def parse_policy(spec: str, cfg) -> PolicySpec:
    """A ``--policy`` SPEC (module doc) checked against the model config."""
    allowed = "'tau=0.9[,t=T][,w=W]', 'learned=PATH' or 'budget=GFLOPS[,table=CSV]'"
    fields = {}
    for part in spec.split(","):
        key, eq, val = part.strip().partition("=")
        if not eq or not key or not val:
            raise ValueError(f"--policy {spec!r}: {part!r} is not key=value; allowed: {allowed}")
        fields[key.strip().lower()] = val.strip()
    if "budget" in fields:
        return _parse_budget(spec, fields, cfg, allowed)
    if "learned" in fields:
        if len(fields) > 1:
            raise ValueError(f"--policy {spec!r}: learned= takes no other keys; allowed: "
                             f"{allowed}")
        policy = load_learned_policy(fields["learned"])
        for c in policy.configs:
            if not (1 <= c[1] <= cfg.embed_dim and 1 <= c[2] <= cfg.depth and c[0] >= 1):
                raise ValueError(f"--policy {spec!r}: configuration {c} does not fit the model "
                                 f"(w in 1..{cfg.embed_dim}, l in 1..{cfg.depth})")
        if policy.net[1].in_features != cfg.embed_dim:
            raise ValueError(f"--policy {spec!r}: the policy reads {policy.net[1].in_features}"
                             f"-wide patch embeddings; the model's are {cfg.embed_dim}")
        return PolicySpec(f"learned {os.path.basename(fields['learned'])}", "learned",
                          policy=policy)
    if "tau" not in fields or set(fields) - {"tau", "t", "w"}:
        raise ValueError(f"--policy {spec!r} is not understood; allowed: {allowed}")
    try:
        tau = float(fields["tau"])
        t = int(fields.get("t", cfg.max_latent_tokens))
        w = int(fields.get("w", cfg.embed_dim))
    except ValueError:
        raise ValueError(f"--policy {spec!r}: tau must be a float, t and w ints; allowed: "
                         f"{allowed}") from None
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"--policy {spec!r}: tau={tau} is not allowed; allowed: 0..1 (a max "
                         "softmax confidence)")
    if not 1 <= w <= cfg.embed_dim or t < 1:
        raise ValueError(f"--policy {spec!r}: t={t}, w={w}; allowed: t >= 1, w in "
                         f"1..{cfg.embed_dim}")
    return PolicySpec(f"tau={tau:g} t={t} w={w}", "tau", tau=tau, t=t, w=w)
