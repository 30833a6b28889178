"""Training the dense heads on a frozen backbone (the authors' protocol), through ``Trainer``.

Losses follow ``adaperceiver.train.Trainer``'s interface ``loss_fn(model, batch, step) ->
(loss, logs)``; a batch is ``(images, targets)`` or a dict with ``"image"`` and ``"label"``
(segmentation) / ``"depth"`` (depth; optional ``"valid"`` mask):

* :class:`SegmentationLoss`: per-pixel cross entropy over the upsampled logits, pixels equal to
  ``ignore_index`` (255) left out (a batch with no labelled pixel gives loss 0).
* :class:`DepthLoss`: scale-invariant log loss (SiLog, Eigen et al.; DINOv2's ``SigLoss``) on
  valid pixels (finite target > 0, and the batch's ``valid`` mask):
  ``sqrt(mean(g^2) - lambd * mean(g)^2 + eps)``, ``g = log(pred) - log(target)``, lambd 0.85;
  or ``loss="l1"``: mean |pred - target|.

Both run the model at one (num_tokens, mat_dim, depth) per step: ``configs`` cycles through a
list of (t, w, l) triples (None = the backbone's full configuration). :func:`train_dense_head`
freezes the backbone (requires_grad False on every backbone parameter, eval mode, run under
no_grad) and takes ``steps`` optimizer steps of the head with ``Trainer`` (AdamW; DDP over gloo /
NCCL under torchrun, each rank taking its slice of the global batch).
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from .heads import AdaPerceiverDepth, AdaPerceiverSegmenter, _DenseModel

__all__ = ["SegmentationLoss", "DepthLoss", "silog_loss", "train_dense_head", "default_loss",
           "HEAD_STATE_FILE"]

HEAD_STATE_FILE = "trainer_state.pt"


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
               lambd: float = 0.85, eps: float = 1e-6) -> torch.Tensor:
    """Scale-invariant log loss over ``valid`` pixels: sqrt(mean(g^2) - lambd mean(g)^2 + eps),
    g = log(pred) - log(target)."""
    g = torch.log(pred[valid].float()) - torch.log(target[valid].float())
    d = (g * g).mean() - lambd * g.mean() ** 2
    return torch.sqrt(d.clamp_min(0) + eps)


class DepthLoss(_ConfigCycle):
    """SiLog (default) or L1 on valid pixels of (B, 1, H, W) depth; logs ``abs_rel``."""

    def __init__(self, loss: str = "silog", lambd: float = 0.85,
                 configs: Optional[Sequence] = None):
        super().__init__(configs)
        if loss not in ("silog", "l1"):
            raise ValueError(f"loss={loss!r} is not allowed; allowed: 'silog', 'l1'")
        if not 0.0 <= lambd <= 1.0:
            raise ValueError(f"lambd={lambd} is not allowed; allowed: a float in [0, 1]")
        self.loss, self.lambd = loss, lambd

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
        if valid is not None:
            ok &= valid.reshape(ok.shape).bool()
        if not bool(ok.any()):
            return pred.sum() * 0.0, {"abs_rel": float("nan")}
        if self.loss == "silog":
            loss = silog_loss(pred, gt, ok, self.lambd)
        else:
            loss = (pred[ok] - gt[ok].float()).abs().mean()
        with torch.no_grad():
            abs_rel = ((pred[ok] - gt[ok]).abs() / gt[ok]).mean()
        return loss, {"abs_rel": float(abs_rel)}


def default_loss(model, configs=None) -> Callable:
    """The task's loss for a dense model: SegmentationLoss or DepthLoss (SiLog)."""
    if isinstance(model, AdaPerceiverSegmenter):
        return SegmentationLoss(configs=configs)
    if isinstance(model, AdaPerceiverDepth):
        return DepthLoss(configs=configs)
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
                     **trainer_kwargs) -> list[dict]:
    """Train the head of ``model`` for ``steps`` optimizer steps with the backbone frozen.

    ``loss_fn`` defaults to the task's loss over ``configs`` (see the module docstring);
    ``trainer_kwargs`` go to ``Trainer`` (warmup_steps, total_steps, min_lr, grad_clip, seed).
    With ``out_dir`` the model is written there at the end (``model.save_pretrained``: backbone
    in the released format, head, dense.json) with the trainer state; ``resume=True`` first
    loads the head and trainer state from ``out_dir`` and counts ``steps`` on from there.
    Returns the logs of every step (loss, lr and the loss's own logs).
    """
    from ..train.trainer import Trainer, unwrap, world
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} is not allowed; allowed: an int >= 0")
    dense = unwrap(model)
    if not isinstance(dense, _DenseModel):
        raise TypeError(f"model={type(dense).__name__} is not allowed; allowed: "
                        "AdaPerceiverSegmenter or AdaPerceiverDepth")
    dense.freeze_backbone(True)
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
