"""The once-for-all training objective (paper, Sec. 3): one forward pass trains every (t, w, l).

Per step, on one forward (``AdaPerceiverClassifier.forward_readouts``):
- token loss: a readout at every token granularity g from latents[:, :g] (the block mask makes
  that prefix the g-token model), the granularities weighted equally;
- depth loss: readouts at ``num_exits`` exit layers sampled uniformly per step (plus the last
  layer), layer l (1-based) weighted l / L, the weights normalised to sum to 1;
- width: one Matryoshka width per sample, drawn uniformly from ``mat_dims`` (a mixed-width
  batch through the grouped FFN kernels);
- distillation (with a teacher): KL(teacher || student) on the logits at temperature 1 and,
  on the distilled backbone, a feature loss 0.9 * (1 - cosine) + 0.1 * SmoothL1 between the
  per-patch features and the teacher's patch tokens; plus cross entropy when labels are given.

Per-sample and per-step randomness comes from generators seeded by (seed, step), drawn for the
global batch in ``prepare``: the step is the same on any number of processes and on resume.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OnceForAll", "kd_loss", "feature_loss", "teacher_targets", "freeze_backbone",
           "depth_weights"]


def depth_weights(exits: Sequence[int], depth: int) -> dict[int, float]:
    """Layer l (1-based) weighted l / L, normalised to sum to 1."""
    raw = {int(l): int(l) / depth for l in exits}
    total = sum(raw.values())
    return {l: w / total for l, w in raw.items()}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, mean over samples, times T^2."""
    dt = torch.promote_types(student_logits.dtype, torch.float32)
    s = F.log_softmax(student_logits.to(dt) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.to(dt) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """0.9 * (1 - cosine) + 0.1 * SmoothL1 between per-patch features (B, P, F)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student features {tuple(student.shape)} and teacher patch tokens "
                         f"{tuple(teacher.shape)} differ; allowed: equal shapes (set "
                         "output_feat_dim to the teacher's width)")
    dt = torch.promote_types(student.dtype, torch.float32)
    s, t = student.to(dt), teacher.to(dt)
    cos = F.cosine_similarity(s, t, dim=-1).mean()
    return 0.9 * (1 - cos) + 0.1 * F.smooth_l1_loss(s, t)


def _to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Teacher patch tokens (B, P', F) on a square grid, resampled bilinearly to ``grid``."""
    B, P, Fd = tokens.shape
    side = int(round(P ** 0.5))
    if (side, side) == tuple(grid):
        return tokens
    if side * side != P:
        raise ValueError(f"teacher has {P} patch tokens, not a square grid; allowed: a square "
                         f"grid or exactly {grid[0] * grid[1]} tokens")
    t = tokens.transpose(1, 2).reshape(B, Fd, side, side)
    t = F.interpolate(t.float(), size=grid, mode="bilinear", align_corners=False)
    return t.flatten(2).transpose(1, 2).to(tokens.dtype)


@torch.no_grad()
def teacher_targets(teacher: nn.Module, x: torch.Tensor, grid: tuple[int, int],
                    transform: Optional[Callable] = None):
    """(logits (B, K), patch tokens (B, P, F) on the student's patch grid) of any timm model
    (``forward_features`` / ``forward_head`` / ``num_prefix_tokens``), or of a callable that
    returns that pair."""
    teacher.eval()
    xt = transform(x) if transform is not None else x
    if hasattr(teacher, "forward_features") and hasattr(teacher, "forward_head"):
        feats = teacher.forward_features(xt)
        logits = teacher.forward_head(feats)
        prefix = getattr(teacher, "num_prefix_tokens", 0)
        tokens = feats[:, prefix:] if feats.dim() == 3 else feats.flatten(2).transpose(1, 2)
    else:
        logits, tokens = teacher(xt)
    return logits, _to_grid(tokens, grid)


def freeze_backbone(model: nn.Module) -> list[str]:
    """Fine-tune mode: freeze everything but the classification readout (``output_latents``,
    ``write_head``, ``output_adapter``): the backbone's latents stay those it was trained to
    produce at every (t, w, l). Returns the names left trainable."""
    trainable = ("output_latents.", "write_head.", "output_adapter.")
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(trainable))
        if p.requires_grad:
            names.append(name)
    return names


@dataclass
class OnceForAll:
    """``loss_fn`` (and ``prepare``) for :class:`adaperceiver.train.Trainer`.

    Batches are ``(x, y)`` (y may be None when distilling without labels); ``prepare`` appends
    the per-sample widths drawn for the global batch.
    """
    config: object                                 # the model's AdaPerceiverConfig
    token_counts: Optional[Sequence[int]] = None    # default: every mask granularity
    mat_dims: Optional[Sequence[int]] = None        # default: config.mat_dims
    num_exits: int = 2                              # sampled exit layers besides the last
    teacher: Optional[nn.Module] = None
    teacher_transform: Optional[Callable] = None
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    feat_weight: float = 1.0
    label_smoothing: float = 0.0
    seed: int = 0

    def __post_init__(self):
        cfg = self.config
        self.mat_dims = [int(w) for w in (self.mat_dims or cfg.mat_dims)]
        for w in self.mat_dims:
            if not 1 <= w <= cfg.embed_dim:
                raise ValueError(f"mat_dims holds {w}; allowed: widths in 1..{cfg.embed_dim}")
        self.token_counts = sorted({int(g) for g in (self.token_counts or cfg.mask_token_grans)})
        if not 0 <= self.num_exits < cfg.depth:
            raise ValueError(f"num_exits={self.num_exits} is out of range; allowed: "
                             f"0..{cfg.depth - 1} (layers sampled besides the last)")

    def _generator(self, step: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 8 + stream)

    def prepare(self, batch, step: int):
        """Append one width per sample of the global batch (uniform over mat_dims)."""
        x, y = batch[0], batch[1]
        idx = torch.randint(len(self.mat_dims), (x.shape[0],), generator=self._generator(step, 0))
        return x, y, torch.tensor(self.mat_dims)[idx]

    def exits(self, step: int) -> list[int]:
        """The last layer plus ``num_exits`` distinct earlier layers, drawn for this step."""
        L = self.config.depth
        perm = torch.randperm(L - 1, generator=self._generator(step, 1))[:self.num_exits]
        return sorted({L, *(int(i) + 1 for i in perm)})

    def __call__(self, model, batch, step: int):
        if len(batch) != 3:      # not prepared by the Trainer: draw the widths here
            batch = self.prepare(batch, step)
        x, y, widths = batch
        exits = self.exits(step)
        distilled = bool(getattr(self.config, "distilled", False))
        use_feat = self.teacher is not None and distilled and self.feat_weight > 0
        p = self.config.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        t_logits = t_tokens = None
        if self.teacher is not None:
            t_logits, t_tokens = teacher_targets(self.teacher, x, grid, self.teacher_transform)
        outs = model.forward_readouts(x, exits, self.token_counts, mat_dim=widths,
                                      features=use_feat)
        weights = depth_weights(exits, self.config.depth)
        total = x.new_zeros((), dtype=torch.promote_types(x.dtype, torch.float32))
        parts = {"ce": [], "kd": [], "feat": []}    # weighted terms, read back once
        for l, wl in weights.items():
            per_token = []
            for g in self.token_counts:
                logits, feats = outs[(l, g)]
                logits = logits[:, 0].to(total.dtype)   # losses in fp32 (fp64 stays fp64)
                loss = logits.new_zeros(())
                if y is not None and self.ce_weight:
                    ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
                    loss = loss + self.ce_weight * ce
                    parts["ce"].append(wl * ce.detach())
                if t_logits is not None and self.kd_weight:
                    kd = kd_loss(logits, t_logits)
                    loss = loss + self.kd_weight * kd
                    parts["kd"].append(wl * kd.detach())
                if use_feat:
                    fl = feature_loss(feats, t_tokens)
                    loss = loss + self.feat_weight * fl
                    parts["feat"].append(wl * fl.detach())
                per_token.append(loss)
            total = total + wl * torch.stack(per_token).mean()
        n = len(self.token_counts)
        logs = {k: float(torch.stack(v).sum()) / n if v else 0.0 for k, v in parts.items()}
        return total, logs
