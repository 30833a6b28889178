"""A small, exact training loop: one optimizer step per global batch, on one process or many.

``Trainer(model, loss_fn)`` runs ``loss_fn(model, batch, step) -> (loss, logs)``. Under
``torchrun`` (``torch.distributed`` initialised with world size > 1) the model is wrapped in
DistributedDataParallel (gloo on CPUs, NCCL on GPUs) and every rank is handed the same *global*
batch, of which it takes its own contiguous slice: with per-sample randomness drawn for the
global batch before slicing (``prepare``), N processes compute the same step as one process
with the same global batch (DDP averages the ranks' gradients of their slice means).

Checkpoints are a directory in the released format (``config.json`` + ``model.safetensors``)
plus ``trainer_state.pt`` (optimizer, schedule, step, RNG states): ``Trainer.resume`` continues
exactly where ``save`` left off.
"""
from __future__ import annotations

import math
import os
import random
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Trainer", "world", "init_distributed", "unwrap"]

STATE_FILE = "trainer_state.pt"


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (WORLD_SIZE > 1): NCCL when
    CUDA is available, gloo otherwise. A no-op on a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return world()


def unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def _shard(batch, rank: int, size: int):
    """This rank's contiguous slice of every tensor of a (nested) global batch."""
    if size == 1:
        return batch
    if isinstance(batch, torch.Tensor):
        n = batch.shape[0]
        if n % size:
            raise ValueError(f"global batch of {n} samples does not split over {size} "
                             "processes; allowed: a multiple of the world size")
        k = n // size
        return batch[rank * k:(rank + 1) * k]
    if isinstance(batch, (list, tuple)):
        return type(batch)(_shard(b, rank, size) for b in batch)
    if isinstance(batch, dict):
        return {k: _shard(v, rank, size) for k, v in batch.items()}
    return batch


class _Dispatch(nn.Module):
    """What DDP wraps: forward(method, ...) calls any method of the model, so a loss that
    calls e.g. ``model.forward_readouts`` still goes through DDP's forward (which prepares the
    gradient all-reduce)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.model, method)(*args, **kwargs)


class _DDPModel:
    """Handed to ``loss_fn`` under DDP: calling the model or any of its methods runs through
    DDP (call the model once per step); other attributes read through."""

    def __init__(self, ddp):
        self._ddp = ddp

    def __call__(self, *args, **kwargs):
        return self._ddp("forward", *args, **kwargs)

    def __getattr__(self, name):
        attr = getattr(self._ddp.module.model, name)
        if callable(attr) and not isinstance(attr, nn.Module):
            return lambda *args, **kwargs: self._ddp(name, *args, **kwargs)
        return attr


class Trainer:
    """One optimizer step per call of :meth:`step` (AdamW, linear warm-up then cosine decay to
    ``min_lr`` over ``total_steps``; constant after warm-up when total_steps is None).

    ``prepare(batch, step)`` (optional) runs on the global batch before it is sliced: draw
    per-sample randomness there so that it does not depend on the number of processes.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizer=None, *, lr: float = 1e-3,
                 weight_decay: float = 0.05, warmup_steps: int = 0,
                 total_steps: Optional[int] = None, min_lr: float = 0.0,
                 grad_clip: Optional[float] = 1.0, prepare: Optional[Callable] = None,
                 seed: int = 0):
        self.model = model
        self.loss_fn = loss_fn
        self.prepare = prepare
        self.seed = seed
        self.rank, self.world_size = world()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no parameter with requires_grad=True")
        if optimizer is None:
            decay = [p for p in params if p.dim() >= 2]
            no_decay = [p for p in params if p.dim() < 2]   # norms, biases, tokens, LayerScale
            optimizer = torch.optim.AdamW([
                {"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}], lr=lr)
        self.optimizer = optimizer
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.warmup_steps, self.total_steps, self.min_lr = warmup_steps, total_steps, min_lr
        self.grad_clip = grad_clip
        self.step_count = 0
        self.ddp = None
        if self.world_size > 1:
            dev = next(model.parameters()).device
            self.ddp = _DDPModel(nn.parallel.DistributedDataParallel(
                _Dispatch(model), device_ids=[dev.index] if dev.type == "cuda" else None,
                find_unused_parameters=True))  # readouts and sampled exits leave some unused

    # --------------------------------------------------------------------------- schedule
    def lr_factor(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps is None:
            return 1.0
        t = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * t))

    def _set_lr(self):
        f = self.lr_factor(self.step_count)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = self.min_lr + (base - self.min_lr) * f

    # --------------------------------------------------------------------------- step
    def step(self, batch) -> dict:
        """One optimizer step on the global ``batch``; returns the logs averaged over ranks."""
        if self.prepare is not None:
            batch = self.prepare(batch, self.step_count)
        local = _shard(batch, self.rank, self.world_size)
        model = self.ddp if self.ddp is not None else self.model
        self.model.train()
        self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        loss, logs = self.loss_fn(model, local, self.step_count)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step_count}")
        loss.backward()
        if self.grad_clip:
            # parameters without a gradient (unused this step) are skipped by clip_grad_norm_
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.step_count += 1
        logs = {"loss": float(loss.detach()), **logs}
        if self.world_size > 1:
            vals = torch.tensor(list(logs.values()), dtype=torch.float64)
            dist.all_reduce(vals)
            logs = dict(zip(logs, (vals / self.world_size).tolist()))
        logs["lr"] = self.optimizer.param_groups[0]["lr"]
        return logs

    # --------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "step": self.step_count,
                "base_lrs": self.base_lrs, "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(), "seed": self.seed}

    def save(self, path) -> None:
        """Write the model in the released format plus ``trainer_state.pt`` (rank 0 only)."""
        if self.rank == 0:
            from ..checkpoint import save_pretrained
            save_pretrained(unwrap(self.model), path)
            torch.save(self.state_dict(), os.path.join(path, STATE_FILE))
        if self.world_size > 1:
            dist.barrier()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.base_lrs = list(state["base_lrs"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    @classmethod
    def resume(cls, path, model: nn.Module, loss_fn: Callable, **kwargs) -> "Trainer":
        """Load the weights saved in ``path`` into ``model`` and continue training from the
        saved step with the saved optimizer state (``kwargs`` as for the constructor)."""
        from ..checkpoint import load_weights
        load_weights(unwrap(model), os.path.join(path, "model.safetensors"))
        trainer = cls(model, loss_fn, **kwargs)
        file = os.path.join(path, STATE_FILE)
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file!r} is missing: {path!r} holds weights but no "
                                    "trainer state to resume from")
        trainer.load_state_dict(torch.load(file, weights_only=False))
        return trainer
