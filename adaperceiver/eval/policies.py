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
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..flops import count_flops

__all__ = ["PolicySpec", "parse_policy", "save_learned_policy", "load_learned_policy"]


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
    kind: str                       # "tau" or "learned"
    tau: Optional[float] = None
    t: Optional[int] = None
    w: Optional[int] = None
    policy: object = None           # LearnedPolicy
    _flops: dict = field(default_factory=dict)

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
        else:
            pick = self.policy.to(x.device).choose(model, x)
            chosen = list(zip(pick["num_tokens"].tolist(), pick["mat_dim"].tolist(),
                              pick["depth"].tolist()))
            out = model(x, num_tokens=[c[0] for c in chosen], mat_dim=[c[1] for c in chosen],
                        depth=[c[2] for c in chosen])
        flops = torch.tensor([self.flops(cfg, *c, img_size=img) for c in chosen],
                             dtype=torch.int64)
        return out.logits[:, 0], flops


def parse_policy(spec: str, cfg) -> PolicySpec:
    """A ``--policy`` SPEC (module doc) checked against the model config."""
    allowed = "'tau=0.9[,t=T][,w=W]' or 'learned=PATH'"
    fields = {}
    for part in spec.split(","):
        key, eq, val = part.strip().partition("=")
        if not eq or not key or not val:
            raise ValueError(f"--policy {spec!r}: {part!r} is not key=value; allowed: {allowed}")
        fields[key.strip().lower()] = val.strip()
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
