"""Configuration policies: which (t, w, l) to run.

- :class:`BudgetPolicy`: from a cost per configuration (counted FLOPs or measured latency) and a
  validation accuracy per configuration, the best configuration under a budget, the cheapest
  within an accuracy target, and the accuracy-cost front.
- :class:`LearnedPolicy`: a small network on the mean patch embedding of each image that picks
  one configuration per sample, trained with REINFORCE (paper, Sec. 3.3) on the reward
  ``correct - cost_weight * cost / max cost``; its per-sample (t, w, l) feed one heterogeneous
  batch (``model(x, num_tokens=t, mat_dim=w, depth=l)`` with (B,) tensors).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .bench.plot import pareto_front

__all__ = ["BudgetPolicy", "LearnedPolicy", "fit_learned_policy", "evaluate_choices",
           "patch_summary"]

Config = tuple  # (t, w, l)


class BudgetPolicy:
    """Pick configurations from measured tables: ``cost[c]`` and ``accuracy[c]`` per (t, w, l)."""

    def __init__(self, cost: dict, accuracy: dict):
        missing = sorted(set(cost) ^ set(accuracy))
        if missing:
            raise ValueError(f"cost and accuracy must cover the same configurations; these "
                             f"are in only one of them: {missing[:5]}")
        if not cost:
            raise ValueError("cost is empty; allowed: a dict (t, w, l) -> cost")
        self.cost, self.accuracy = dict(cost), dict(accuracy)

    def best_under(self, budget: float) -> Config:
        """The most accurate configuration costing at most ``budget`` (the cheaper on ties)."""
        ok = [c for c in self.cost if self.cost[c] <= budget]
        if not ok:
            raise ValueError(f"budget={budget:g} is below the cheapest configuration "
                             f"({min(self.cost.values()):g}); allowed: >= that")
        return max(ok, key=lambda c: (self.accuracy[c], -self.cost[c]))

    def cheapest_within(self, accuracy: float) -> Config:
        """The cheapest configuration whose accuracy reaches ``accuracy`` (the most accurate
        one when none does)."""
        ok = [c for c in self.cost if self.accuracy[c] >= accuracy]
        if not ok:
            return max(self.cost, key=lambda c: (self.accuracy[c], -self.cost[c]))
        return min(ok, key=lambda c: (self.cost[c], -self.accuracy[c]))

    def front(self) -> list[Config]:
        """Configurations no other beats on both cost and accuracy, by increasing cost."""
        points = [(-self.cost[c], self.accuracy[c], c) for c in self.cost]  # cheaper = faster
        return [c for _, _, c in pareto_front(points)]


@torch.no_grad()
def patch_summary(model, x: torch.Tensor) -> torch.Tensor:
    """The policy's input: the mean patch embedding (B, C) (the model's first stage, which
    every configuration computes anyway)."""
    p = model.config.patch_size
    return model.patch_embed(x, (x.shape[-2] // p, x.shape[-1] // p)).mean(1)


class LearnedPolicy(nn.Module):
    """Per-sample configuration choice: mean patch embedding -> MLP -> one of ``configs``."""

    def __init__(self, dim: int, configs: Sequence[Config], hidden: int = 64):
        super().__init__()
        self.configs = [tuple(int(v) for v in c) for c in configs]
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, len(self.configs)))

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        return self.net(summary)          # logits over configurations

    @torch.no_grad()
    def choose(self, model, x: torch.Tensor) -> dict:
        """Greedy per-sample choice: {"num_tokens", "mat_dim", "depth"} as (B,) int tensors."""
        self.eval()
        idx = self(patch_summary(model, x)).argmax(-1)
        table = torch.tensor(self.configs)
        t, w, l = table[idx].unbind(-1)
        return {"num_tokens": t, "mat_dim": w, "depth": l, "index": idx}


def fit_learned_policy(model, x: torch.Tensor, configs: Sequence[Config],
                       correct: dict, cost: dict, *, cost_weight: float = 0.5,
                       steps: int = 600, samples: int = 8, lr: float = 3e-3,
                       entropy: float = 0.01, seed: int = 0,
                       log: Optional[Callable] = None) -> LearnedPolicy:
    """REINFORCE on images x: ``correct[c]`` is the (N,) bool correctness of configuration c on
    x (from one pass over all configurations, see digits.evaluate_grid), ``cost[c]`` its cost.
    Reward of choosing c for sample i: correct[c][i] - cost_weight * cost[c] / max cost; the
    baseline is the mean reward of the other samples drawn for the same image."""
    if cost_weight < 0:
        raise ValueError(f"cost_weight={cost_weight} is not allowed; allowed: >= 0")
    torch.manual_seed(seed)
    configs = [tuple(c) for c in configs]
    policy = LearnedPolicy(model.config.embed_dim, configs)
    feats = patch_summary(model, x)
    right = torch.stack([correct[c].float() for c in configs], 1)          # (N, K)
    costs = torch.tensor([cost[c] for c in configs], dtype=torch.float32)
    reward = right - cost_weight * costs / costs.max()                      # (N, K)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    policy.train()
    for step in range(steps):
        logp = F.log_softmax(policy(feats), -1)                             # (N, K)
        probs = logp.exp().detach()
        a = torch.multinomial(probs, samples, replacement=True, generator=g)  # (N, S)
        r = reward.gather(1, a)
        adv = r - (r.sum(1, keepdim=True) - r) / max(1, samples - 1)        # leave-one-out
        loss = -(adv * logp.gather(1, a)).mean() + entropy * (probs * logp).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and (step + 1) % 200 == 0:
            log(f"policy step {step + 1}/{steps}: mean reward {float(r.mean()):.4f}")
    return policy.eval()


@torch.no_grad()
def evaluate_choices(model, x: torch.Tensor, y: torch.Tensor, choice: dict, cost: dict) -> dict:
    """Run ONE heterogeneous batch with the per-sample choice; accuracy and mean cost."""
    model.eval()
    out = model(x, num_tokens=choice["num_tokens"], mat_dim=choice["mat_dim"],
                depth=choice["depth"])
    acc = float((out.logits[:, 0].argmax(-1) == y).float().mean())
    per = [cost[(int(t), int(w), int(l))] for t, w, l in
           zip(choice["num_tokens"], choice["mat_dim"], choice["depth"])]
    return {"accuracy": acc, "flops": sum(per) / len(per), "logits": out.logits}
