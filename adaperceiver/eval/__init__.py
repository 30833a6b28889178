"""Accuracy of every (t, w, l) on real images, one pass over the data per width.

``python -m adaperceiver.eval DATA`` (see ``__main__``), or from Python::

    from adaperceiver.eval import evaluate, grid_logits, write_csv, budget_policy
    result = evaluate(model, dataset, parse_grid("all", ModelAxes.from_config(model.config)))
    write_csv("results/eval.csv", result.rows)   # t, w, l, top1, top5, images, gflops
    budget_policy("results/eval.csv").best_under(10.0)   # most accurate config <= 10 GFLOPs

- :func:`grid_readouts` / :func:`grid_logits`: the logits of every (t, w, l) from one forward
  per width (the block mask's prefix property; the write head's one query folded into its key
  and value projections, so a readout costs no projection of the latents);
- :func:`evaluate`: top-1/top-5 counts over a dataset, split across processes under torchrun;
- :mod:`.data`: image folders / timm datasets with the model's timm transform, checked up front,
  and the digits recipe's data as a folder of PNGs (:func:`write_digits_folder`);
- :mod:`.policies`: per-sample policies (confidence exit, a saved learned policy);
- :mod:`.report`: the CSV, the front table and plot, :func:`budget_policy`.
"""
from .data import DIGITS_FOLDER_CONFIG, open_dataset, write_digits_folder
from .engine import EvalResult, evaluate, topk_hits
from .policies import load_learned_policy, parse_policy, save_learned_policy
from .readouts import grid_logits, grid_readouts, plan_forwards
from .report import budget_policy, front_table, read_eval_csv, write_csv

__all__ = ["grid_logits", "grid_readouts", "plan_forwards", "evaluate", "EvalResult", "topk_hits",
           "open_dataset", "write_digits_folder", "DIGITS_FOLDER_CONFIG", "parse_policy",
           "save_learned_policy", "load_learned_policy", "write_csv", "read_eval_csv",
           "budget_policy", "front_table"]
