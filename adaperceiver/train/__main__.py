"""``python -m adaperceiver.train --recipe digits`` (one process) or
``torchrun --nproc_per_node 2 -m adaperceiver.train --recipe digits`` (DDP, gloo on CPUs)."""
from __future__ import annotations

import argparse
import sys

RECIPES = ("digits",)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adaperceiver.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help=f"one of: {', '.join(RECIPES)}")
    ap.add_argument("--out-dir", default="results/digits")
    ap.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch size")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process")
    ap.add_argument("--backend", default=None,
                    help="force an op backend (reference, cpp, triton); default: dispatch")
    ap.add_argument("--no-avit", action="store_true", help="skip the A-ViT comparison points")
    args = ap.parse_args(argv)
    if args.recipe not in RECIPES:
        ap.error(f"--recipe {args.recipe!r} is not known; allowed: {', '.join(RECIPES)}")
    for name in ("epochs", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            ap.error(f"--{name.replace('_', '-')}={v} is not allowed; allowed: >= 1")
    from ..ops.dispatch import BACKENDS
    if args.backend is not None and args.backend not in BACKENDS:
        ap.error(f"--backend {args.backend!r} is not known; allowed: {', '.join(BACKENDS)}")
    import contextlib

    import torch

    from ..ops import use_backend
    from .digits import DigitsRecipe, run_digits
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                            ("lr", args.lr)) if v is not None}
    recipe = DigitsRecipe(seed=args.seed, **kw)
    ctx = use_backend(args.backend) if args.backend else contextlib.nullcontext()
    with ctx:
        run_digits(recipe, out_dir=args.out_dir, avit=not args.no_avit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
