"""The digits recipe: a small AdaPerceiver trained once-for-all on scikit-learn's 8x8 digits.

``python -m adaperceiver.train --recipe digits`` trains the model below (C=128, 4 heads,
6 layers, latents up to 64 tokens over 2x2 patches, grans 8/16/32/64, widths 32/64/128) with the
once-for-all objective on the train split, then measures held-out accuracy at every (t, w, l),
fits the configuration policies (adaperceiver.policy) on the validation split and reports them on
the test split, and writes under ``--out-dir``: ``digits.txt`` (the table), ``digits.json``,
``front.png`` (accuracy vs FLOPs) and ``checkpoint/`` (released format + trainer state).
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..bench.report import align_table
from ..data import digits_split
from ..flops import count_flops
from .objective import OnceForAll
from .trainer import Trainer, init_distributed, unwrap

__all__ = ["DIGITS_MODEL", "DigitsRecipe", "build_digits_model", "lecun_init_", "augment",
           "evaluate_grid",
           "train_digits", "run_digits"]

DIGITS_MODEL = dict(img_size=8, patch_size=2, in_channels=1, embed_dim=128, num_heads=4,
                    depth=6, max_latent_tokens=64, mask_token_grans=[8, 16, 32, 64],
                    mat_dims=[32, 64, 128], num_classes=10,
                    # LayerScale starts at 0.1, not the released 1e-6: a few minutes of
                    # training from scratch leave no time for residual branches to wake up
                    ls_init_values=0.1)


@dataclass
class DigitsRecipe:
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    num_exits: int = 2
    label_smoothing: float = 0.1
    augment: bool = False         # random +-1 pixel translations (slower to fit; off)
    policy_steps: int = 600       # REINFORCE steps of the learned policy
    policy_cost_weight: float = 0.5
    seed: int = 0
    model: dict = field(default_factory=lambda: dict(DIGITS_MODEL))


def build_digits_model(recipe: DigitsRecipe):
    from ..registry import create_model
    torch.manual_seed(recipe.seed)
    model = create_model("adaperceiver_v1_in1k", **{**DIGITS_MODEL, **recipe.model})
    return lecun_init_(model)


@torch.no_grad()
def lecun_init_(model):
    """Scale-preserving init for training from scratch in minutes: linear weights N(0, 1/fan_in),
    position embedding and latent token N(0, 1). The released init (std 0.02 everywhere) starts
    every latent as the same tiny vector, so the read attends uniformly and the latents carry
    only the mean patch for the first few hundred steps (far lower test accuracy after 200
    steps than with this init)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    for p in (model.patch_embed.pos_embed, model.process_latents.token):
        p.normal_(0.0, 1.0)
    return model


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel each way (pad with the background, crop)."""
    B, _, H, W = x.shape
    bg = float(x.min())
    padded = F.pad(x, (1, 1, 1, 1), value=bg)
    dy = torch.randint(0, 3, (B,), generator=generator)
    dx = torch.randint(0, 3, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(H)[None])[:, :, None].expand(B, H, W)
    cols = (dx[:, None] + torch.arange(W)[None])[:, None, :].expand(B, H, W)
    b = torch.arange(B)[:, None, None].expand(B, H, W)
    return padded[b, 0, rows, cols][:, None]


def _batches(x, y, batch_size: int, epoch: int, seed: int, shift: bool = True):
    """The global batches of one epoch, in an order fixed by (seed, epoch); the last partial
    batch is dropped (every step has the same global batch size)."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    perm = torch.randperm(len(y), generator=g)
    for i in range(len(y) // batch_size):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        yield (augment(x[idx], g) if shift else x[idx]), y[idx]


@torch.no_grad()
def evaluate_grid(model, x, y, batch_size: int = 512) -> dict:
    """Correctness of every (t, w, l): {(t, w, l): (N,) bool}, from one forward per width
    (readouts at every layer and granularity)."""
    model.eval()
    cfg = model.config
    out = {}
    for w in cfg.mat_dims:
        parts = {}
        for i in range(0, len(y), batch_size):
            r = model.forward_readouts(x[i:i + batch_size], range(1, cfg.depth + 1),
                                       cfg.mask_token_grans, mat_dim=w)
            for (l, t), (logits, _) in r.items():
                parts.setdefault((t, w, l), []).append(logits[:, 0].argmax(-1) ==
                                                       y[i:i + batch_size])
        out.update({k: torch.cat(v) for k, v in parts.items()})
    return out


def configurations(cfg) -> list[tuple[int, int, int]]:
    return list(itertools.product(cfg.mask_token_grans, cfg.mat_dims, range(1, cfg.depth + 1)))


def train_digits(recipe: DigitsRecipe = DigitsRecipe(), *, split=None, out_dir=None,
                 log: Callable = print, trainer: Optional[Trainer] = None, max_steps=None):
    """Train the digits model once-for-all; returns (model, trainer). Under torchrun every
    rank runs the same global batches (each computes its slice)."""
    split = split or digits_split(recipe.seed)
    model = trainer.model if trainer is not None else build_digits_model(recipe)
    steps_per_epoch = len(split.y_train) // recipe.batch_size
    total = recipe.epochs * steps_per_epoch
    stop = total if max_steps is None else min(total, max_steps)
    if trainer is None:   # a trainer handed in (resume) brings its own objective
        objective = OnceForAll(unwrap(model).config, num_exits=recipe.num_exits,
                               label_smoothing=recipe.label_smoothing, seed=recipe.seed)
        trainer = Trainer(model, objective, prepare=objective.prepare, lr=recipe.lr,
                          weight_decay=recipe.weight_decay,
                          warmup_steps=recipe.warmup_epochs * steps_per_epoch, total_steps=total,
                          seed=recipe.seed)
    start = time.time()
    while trainer.step_count < stop:
        epoch = trainer.step_count // steps_per_epoch
        skip = trainer.step_count % steps_per_epoch       # resume mid-epoch exactly
        losses = []
        for i, batch in enumerate(_batches(split.x_train, split.y_train, recipe.batch_size,
                                           epoch, recipe.seed, recipe.augment)):
            if i < skip:
                continue
            if trainer.step_count >= stop:
                break
            losses.append(trainer.step(batch)["loss"])
        if losses and trainer.rank == 0:
            log(f"epoch {epoch + 1}/{recipe.epochs}  loss {sum(losses) / len(losses):.4f}  "
                f"{time.time() - start:.0f}s")
    if out_dir is not None:
        trainer.save(os.path.join(out_dir, "checkpoint"))
    return model, trainer


def run_digits(recipe: DigitsRecipe = DigitsRecipe(), out_dir: str = "results/digits",
               avit: bool = True, log: Callable = None) -> dict:
    """Train, evaluate every configuration, fit the policies, write table, JSON and plot."""
    from .. import policy as pol
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    rank, _ = init_distributed()
    t0 = time.time()
    split = digits_split(recipe.seed)
    log(f"digits: {split}; model {DIGITS_MODEL}")
    model, trainer = train_digits(recipe, split=split, out_dir=out_dir, log=log)
    if rank != 0:
        return {}
    model = unwrap(model).eval()
    cfg = model.config
    train_time = time.time() - t0
    log("evaluating every (t, w, l) on val and test ...")
    val = evaluate_grid(model, split.x_val, split.y_val)
    test = evaluate_grid(model, split.x_test, split.y_test)
    confs = configurations(cfg)
    flops = {c: count_flops(cfg, c[0], c[1], c[2], img_size=cfg.img_size).total for c in confs}
    acc_val = {c: float(val[c].float().mean()) for c in confs}
    acc_test = {c: float(test[c].float().mean()) for c in confs}
    largest = (max(cfg.mask_token_grans), max(cfg.mat_dims), cfg.depth)

    log(f"evaluated {len(confs)} configurations in {time.time() - t0 - train_time:.0f}s; "
        "fitting the configuration policies ...")
    budget = pol.BudgetPolicy(flops, acc_val)
    pick = budget.cheapest_within(acc_val[largest] - 0.005)
    learned = pol.fit_learned_policy(model, split.x_val, confs, val, flops,
                                     cost_weight=recipe.policy_cost_weight,
                                     steps=recipe.policy_steps, seed=recipe.seed, log=log)
    chosen = learned.choose(model, split.x_test)
    lp = pol.evaluate_choices(model, split.x_test, split.y_test, chosen, flops)
    policies = [
        {"name": f"budget (val acc within 0.5 pt of largest): t={pick[0]} w={pick[1]} "
                 f"l={pick[2]}", "flops": flops[pick], "accuracy": acc_test[pick]},
        {"name": "learned per-sample (REINFORCE)", "flops": lp["flops"],
         "accuracy": lp["accuracy"]},
    ]
    avit_points = []
    if avit:
        try:
            from ..baselines.avit import train_avit_digits
            # at least AdaPerceiver's epochs, and A-ViT's own default (30) when that is more:
            # its plain ViT (std-0.02 init) is still far from converged after 12 epochs
            avit_epochs = max(recipe.epochs, 30)
            log(f"training A-ViT on the same split ({avit_epochs} epochs) ...")
            avit_points = train_avit_digits(split, epochs=avit_epochs, seed=recipe.seed, log=log)
            for p in avit_points:
                p["name"] = f"A-ViT {p['name'].replace('avit ', '')} ({avit_epochs} ep)"
        except ImportError as e:
            log(f"A-ViT skipped: {e}")

    rows = [(t, w, l, f"{flops[(t, w, l)] / 1e6:.2f}", f"{100 * acc_val[(t, w, l)]:.1f}",
             f"{100 * acc_test[(t, w, l)]:.1f}") for (t, w, l) in confs]
    table = align_table(["t", "w", "l", "MFLOPs", "val %", "test %"], rows)
    big = flops[largest]
    extra = [(p["name"], f"{p['flops'] / 1e6:.2f}", f"{100 * p['flops'] / big:.0f}%",
              f"{100 * p['accuracy']:.1f}") for p in policies + list(avit_points)]
    table2 = align_table(["policy / baseline", "MFLOPs", "of largest", "test %"], extra)
    l2 = [acc_test[c] for c in confs if c[2] >= 2]
    summary = {
        "largest": {"config": largest, "flops": big, "test_accuracy": acc_test[largest]},
        "min_test_accuracy_l_ge_2": min(l2),
        "train_seconds": train_time, "total_seconds": time.time() - t0,
        "configs": [{"t": c[0], "w": c[1], "l": c[2], "flops": flops[c], "val": acc_val[c],
                     "test": acc_test[c]} for c in confs],
        "policies": policies, "avit": list(avit_points), "recipe": recipe.__dict__,
    }
    text = (f"{table}\n\n{table2}\n\nlargest (t={largest[0]}, w={largest[1]}, l={largest[2]}): "
            f"test {100 * acc_test[largest]:.1f}%; lowest test accuracy over l >= 2: "
            f"{100 * min(l2):.1f}%; trained in {train_time:.0f}s, total "
            f"{time.time() - t0:.0f}s\n")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "digits.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "digits.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    _plot(os.path.join(out_dir, "front.png"), confs, flops, acc_test, policies, avit_points)
    print(text)
    return summary


def _plot(path, confs, flops, acc, policies, avit_points):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [flops[c] / 1e6 for c in confs]
    ys = [100 * acc[c] for c in confs]
    ax.scatter(xs, ys, s=12, c=[c[2] for c in confs], cmap="viridis", label="AdaPerceiver (t,w,l)")
    from ..policy import BudgetPolicy
    front = [(flops[c] / 1e6, 100 * acc[c]) for c in BudgetPolicy(flops, acc).front()]
    ax.plot(*zip(*front), "k-", lw=1, label="accuracy-FLOPs front")
    for p, m in zip(policies, ("r*", "m^")):
        ax.plot(p["flops"] / 1e6, 100 * p["accuracy"], m, ms=11, label=p["name"][:40])
    if avit_points:
        ax.plot([p["flops"] / 1e6 for p in avit_points],
                [100 * p["accuracy"] for p in avit_points], "bs--", label="A-ViT")
    ax.set_xlabel("MFLOPs / image (log scale)")
    ax.set_ylabel("test accuracy (%)")
    every = ys + [100 * p["accuracy"] for p in list(policies) + list(avit_points)]
    ax.set_ylim(max(0, min(every) - 2), 100.5)
    ax.set_xscale("log")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("digits: every (t, w, l) of one once-for-all model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
