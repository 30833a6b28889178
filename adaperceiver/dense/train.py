"""Training the dense heads (and the backbone's per-patch readout) through ``Trainer``.

Compared with the authors' public code (pjjajal/adaperceiver-public: adaperceiver_segmentation.py,
adaperceiver_depth.py, modules/depth/losses.py, config/{segmentation,depth}/
vit_huge_soadaperciever_12k.yaml):

* What is trained: the authors optimise the head plus the backbone's per-patch readout (output
  latents, write head, output adapter); the trunk is not in the optimizer. ``train_dense_head``
  does the same by default (``train_readout=True``); ``train_readout=False`` trains the head
  alone on a fully frozen backbone.
* Configs: the authors run one forward at the largest token count (512 for ADE20K, 256 for
  NYUv2) at full width and average the loss over the write-outs of every token granularity
  (their "token loss"). Here each step runs one (num_tokens, mat_dim, depth): ``configs``
  cycles through a list of (t, w, l) triples (None = the backbone's full configuration); pass
  e.g. ``[(g, None, None) for g in (32, 64, 96, 128, 192, 256, 512)]`` to cover the same
  granularities over consecutive steps. (Their training table for every prefix is the
  512-token RoPE table; each of our steps uses the table of its own t, as their evaluation
  does.)

Losses follow ``adaperceiver.train.Trainer``'s interface ``loss_fn(model, batch, step) ->
(loss, logs)``; a batch is ``(images, targets)`` or a dict with ``"image"`` and ``"label"``
(segmentation) / ``"depth"`` (depth; optional ``"valid"`` mask):

* :class:`SegmentationLoss`: per-pixel cross entropy over the upsampled logits, pixels equal to
  ``ignore_index`` (255, ADE20K with reduced labels, as theirs) left out (a batch with no
  labelled pixel gives loss 0).
* :class:`DepthLoss`: the scale-invariant log loss of DINOv2 / AdaBins (their ``SigLoss``) on
  valid pixels (finite target > 0, target <= ``max_depth`` -- the model's max_depth with
  :func:`default_loss` -- and the batch's ``valid`` mask):
  ``weight * sqrt(mean(g^2) - lambd * mean(g)^2)``, ``g = log(pred + 1e-3) - log(target +
  1e-3)``, lambd 0.85, i.e. ``sqrt(Var(g) + 0.15 mean(g)^2)`` (their Var is Bessel-corrected,
  a factor n / (n - 1) on the variance over a whole image of pixels; ours is not). No x10
  scaling. The authors use ``weight`` 2 (``sig_loss_weight``; AdamW is invariant to a constant
  factor up to eps and gradient clipping) and a warm-up, ``sqrt(0.15 mean(g)^2)``, for the
  first 100 loss calls (their config's 500 lands on the on/off flag, the count stays at the
  default 100): ``warmup_steps``, default 0. Their extra ``GradientLoss`` (weight 0.5) is not
  reproduced: applied to (B, 1, H, W) tensors it slices the batch and channel axes instead of
  the image axes, so it is not the multi-scale gradient-matching loss it is named after.
  ``loss="l1"``: mean |pred - target|.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..train.trainer import STATE_FILE as HEAD_STATE_FILE   # the Trainer's state file
from ..train.trainer import Trainer, unwrap, world
from .heads import READOUT_MODULES, AdaPerceiverDepth, AdaPerceiverSegmenter, _DenseModel

__all__ = ["SegmentationLoss", "DepthLoss", "silog_loss", "train_dense_head", "default_loss",
           "HEAD_STATE_FILE"]

def _check_configs(configs) -> Optional[list]:
    if configs is None:
        return None
    out = []
    for c in configs:
        if not isinstance(c, (tuple, list)) or len(c) != 3:
            raise ValueError(f"configs holds {c!r}; allowed: (num_tokens, mat_dim, depth) "
                             "triples (entries may be None for the backbone default)")
        out.append(tuple(c))
    if not out:
        raise ValueError("configs is empty; allowed: None or a non-empty list of (t, w, l)")
    return out


def _unpack(batch, key: str):
    if isinstance(batch, dict):
        missing = [k for k in ("image", key) if k not in batch]
        if missing:
            raise KeyError(f"batch has no {missing}; allowed: a dict with 'image' and {key!r}, "
                           "or (images, targets)")
        return batch["image"], batch[key], batch.get("valid")
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], batch[1], batch[2] if len(batch) == 3 else None
    raise TypeError(f"batch of type {type(batch).__name__} is not allowed; allowed: "
                    f"(images, targets) or a dict with 'image' and {key!r}")


class _ConfigCycle:
    def __init__(self, configs):
        self.configs = _check_configs(configs)

    def at(self, step: int) -> tuple:
        if self.configs is None:
            return (None, None, None)
        return self.configs[step % len(self.configs)]


class SegmentationLoss(_ConfigCycle):
    """Cross entropy with ``ignore_index`` on (B, K, H, W) logits; logs ``pixel_acc``."""

    def __init__(self, ignore_index: int = 255, configs: Optional[Sequence] = None):
        super().__init__(configs)
        self.ignore_index = ignore_index

    def __call__(self, model, batch, step: int):
        x, y, _ = _unpack(batch, "label")
        if y.shape != (x.shape[0],) + tuple(x.shape[-2:]):
            raise ValueError(f"labels have shape {tuple(y.shape)}; allowed: (B, H, W) = "
                             f"{(x.shape[0],) + tuple(x.shape[-2:])}, the images' size")
        t, w, l = self.at(step)
        logits = model(x, num_tokens=t, mat_dim=w, depth=l).float()
        y = y.long()
        keep = y != self.ignore_index
        if not bool(keep.any()):
            return logits.sum() * 0.0, {"pixel_acc": float("nan")}
        loss = F.cross_entropy(logits, y, ignore_index=self.ignore_index)
        with torch.no_grad():
            acc = (logits.argmax(1) == y)[keep].double().mean()
        return loss, {"pixel_acc": float(acc)}


def silog_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor,
               lambd: float = 0.85, eps: float = 1e-6, log_eps: float = 1e-3,
               warmup: bool = False) -> torch.Tensor:
    """Scale-invariant log loss over ``valid`` pixels: sqrt(mean(g^2) - lambd mean(g)^2 + eps),
    g = log(pred + log_eps) - log(target + log_eps); with ``warmup`` only the mean term,
    sqrt((1 - lambd) mean(g)^2 + eps)."""
    g = torch.log(pred[valid].float() + log_eps) - torch.log(target[valid].float() + log_eps)
    m2 = g.mean() ** 2
    d = (1.0 - lambd) * m2 if warmup else (g * g).mean() - lambd * m2
    return torch.sqrt(d.clamp_min(0) + eps)


class DepthLoss(_ConfigCycle):
    """SiLog (default) or L1 on valid pixels of (B, 1, H, W) depth; logs ``abs_rel``.

    ``DepthLoss(loss="silog", lambd=0.85, configs=None, *, weight=1.0, max_depth=None,
    warmup_steps=0, log_eps=1e-3)``: targets above ``max_depth`` are left out; steps below
    ``warmup_steps`` use the warm-up form (see the module docstring)."""

    def __init__(self, loss: str = "silog", lambd: float = 0.85,
                 configs: Optional[Sequence] = None, *, weight: float = 1.0,
                 max_depth: Optional[float] = None, warmup_steps: int = 0,
                 log_eps: float = 1e-3):
        super().__init__(configs)
        if loss not in ("silog", "l1"):
            raise ValueError(f"loss={loss!r} is not allowed; allowed: 'silog', 'l1'")
        if not 0.0 <= lambd <= 1.0:
            raise ValueError(f"lambd={lambd} is not allowed; allowed: a float in [0, 1]")
        if not (isinstance(weight, (int, float)) and weight > 0):
            raise ValueError(f"weight={weight!r} is not allowed; allowed: a number > 0")
        if max_depth is not None and not max_depth > 0:
            raise ValueError(f"max_depth={max_depth!r} is not allowed; allowed: None or > 0")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or \
                warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps!r} is not allowed; allowed: an int "
                             ">= 0")
        if not log_eps >= 0:
            raise ValueError(f"log_eps={log_eps!r} is not allowed; allowed: a number >= 0")
        self.loss, self.lambd, self.weight = loss, lambd, float(weight)
        self.max_depth, self.warmup_steps, self.log_eps = max_depth, warmup_steps, log_eps

    def __call__(self, model, batch, step: int):
        x, gt, valid = _unpack(batch, "depth")
        if gt.dim() == 3:
            gt = gt.unsqueeze(1)
        if gt.shape != (x.shape[0], 1) + tuple(x.shape[-2:]):
            raise ValueError(f"depth targets have shape {tuple(gt.shape)}; allowed: (B, 1, H, "
                             f"W) or (B, H, W) at the images' size {tuple(x.shape[-2:])}")
        t, w, l = self.at(step)
        pred = model(x, num_tokens=t, mat_dim=w, depth=l).float()
        ok = torch.isfinite(gt) & (gt > 0)
        if self.max_depth is not None:
            ok &= gt <= self.max_depth
        if valid is not None:
            ok &= valid.reshape(ok.shape).bool()
        if not bool(ok.any()):
            return pred.sum() * 0.0, {"abs_rel": float("nan")}
        if self.loss == "silog":
            loss = silog_loss(pred, gt, ok, self.lambd, log_eps=self.log_eps,
                              warmup=step < self.warmup_steps)
        else:
            loss = (pred[ok] - gt[ok].float()).abs().mean()
        loss = self.weight * loss
        with torch.no_grad():
            abs_rel = ((pred[ok] - gt[ok]).abs() / gt[ok]).mean()
        return loss, {"abs_rel": float(abs_rel)}


def default_loss(model, configs=None) -> Callable:
    """The task's loss for a dense model: SegmentationLoss or DepthLoss (SiLog, targets above
    the model's max_depth left out)."""
    if isinstance(model, AdaPerceiverSegmenter):
        return SegmentationLoss(configs=configs)
    if isinstance(model, AdaPerceiverDepth):
        return DepthLoss(configs=configs, max_depth=model.max_depth)
    raise TypeError(f"model={type(model).__name__} is not allowed; allowed: "
                    "AdaPerceiverSegmenter or AdaPerceiverDepth (or pass loss_fn)")


def _batches(batches: Iterable):
    """Yield batches forever, re-iterating ``batches`` when it runs out (a list, a DataLoader);
    a one-shot iterator that runs dry is an error."""
    while True:
        n = 0
        for b in batches:
            n += 1
            yield b
        if n == 0 or iter(batches) is batches:
            raise ValueError("batches ran out; allowed: a re-iterable (list, DataLoader) or an "
                             "iterator with at least `steps` batches")


def train_dense_head(model: _DenseModel, batches: Iterable, steps: int,
                     loss_fn: Optional[Callable] = None, *, lr: float = 1e-3,
                     weight_decay: float = 0.05, configs: Optional[Sequence] = None,
                     out_dir=None, resume: bool = False, log_every: int = 0,
                     train_readout: bool = True, **trainer_kwargs) -> list[dict]:
    """Train the head of ``model`` for ``steps`` optimizer steps with the backbone's trunk
    frozen; with ``train_readout`` (default, the authors' protocol) the backbone's per-patch
    readout (``READOUT_MODULES``) is trained too, otherwise the whole backbone is frozen.

    ``loss_fn`` defaults to the task's loss over ``configs`` (see the module docstring);
    ``trainer_kwargs`` go to ``Trainer`` (warmup_steps, total_steps, min_lr, grad_clip, seed).
    With ``out_dir`` the model is written there at the end (``model.save_pretrained``: backbone
    in the released format, head, dense.json) with the trainer state; ``resume=True`` first
    loads the head (and the readout, when trained) and the trainer state from ``out_dir`` and
    counts ``steps`` on from there.
    Returns the logs of every step (loss, lr and the loss's own logs).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} is not allowed; allowed: an int >= 0")
    dense = unwrap(model)
    if not isinstance(dense, _DenseModel):
        raise TypeError(f"model={type(dense).__name__} is not allowed; allowed: "
                        "AdaPerceiverSegmenter or AdaPerceiverDepth")
    dense.freeze_backbone(True, train_readout=train_readout)
    if loss_fn is None:
        loss_fn = default_loss(dense, configs)
    elif configs is not None:
        raise ValueError("configs is only used by the default loss; pass it to your loss_fn")
    trainer = Trainer(model, loss_fn, lr=lr, weight_decay=weight_decay, **trainer_kwargs)
    if resume:
        if out_dir is None:
            raise ValueError("resume=True needs out_dir (where a previous run saved)")
        from safetensors.torch import load_file
        dense.head.load_state_dict(load_file(os.path.join(out_dir, "head.safetensors")))
        if train_readout:
            saved = load_file(os.path.join(out_dir, "backbone", "model.safetensors"))
            prefixes = tuple(f"{name}." for name in READOUT_MODULES)
            readout = {k: v for k, v in saved.items() if k.startswith(prefixes)}
            own = {k for k in dense.backbone.state_dict() if k.startswith(prefixes)}
            if set(readout) != own:
                raise ValueError(f"{out_dir}/backbone holds readout weights {sorted(readout)}; "
                                 f"expected {sorted(own)}")
            dense.backbone.load_state_dict(readout, strict=False)
        trainer.load_state_dict(torch.load(os.path.join(out_dir, HEAD_STATE_FILE),
                                           weights_only=False))
    logs = []
    it = _batches(batches)
    for i in range(steps):
        logs.append(trainer.step(next(it)))
        if log_every and (i + 1) % log_every == 0 and world()[0] == 0:
            line = " ".join(f"{k}={v:.4g}" for k, v in logs[-1].items()
                            if isinstance(v, float) and math.isfinite(v))
            print(f"step {trainer.step_count}: {line}", flush=True)
    if out_dir is not None:
        rank, size = world()
        if rank == 0:
            dense.save_pretrained(out_dir)
            torch.save(trainer.state_dict(), os.path.join(out_dir, HEAD_STATE_FILE))
            with open(os.path.join(out_dir, "train_log.json"), "w") as f:
                json.dump(logs, f)
        if size > 1:
            torch.distributed.barrier()
    return logs
