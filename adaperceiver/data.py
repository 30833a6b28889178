"""Small real datasets for recipes and baselines that must run on a CPU in minutes.

``digits_split`` is the 8x8 handwritten digits set that ships inside scikit-learn (1797 images,
10 classes), split once, stratified, into train / val / test with a fixed seed: every recipe
(AdaPerceiver, A-ViT, the policy) sees the same images, so their points sit on one plot.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DigitsSplit", "digits_split", "DIGITS_MEAN", "DIGITS_STD"]

# pixel statistics of the whole set after scaling to [0, 1] (fixed, so no split leaks into them)
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3761


@dataclass
class DigitsSplit:
    x_train: torch.Tensor   # (N, 1, 8, 8) float32, normalised
    y_train: torch.Tensor   # (N,) int64
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def __repr__(self):
        return (f"DigitsSplit(train={len(self.y_train)}, val={len(self.y_val)}, "
                f"test={len(self.y_test)})")


def digits_split(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
                 ) -> DigitsSplit:
    """Stratified train/val/test split of scikit-learn's digits (no download: the data ships
    with scikit-learn). Images are scaled to [0, 1] and normalised with fixed statistics."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits recipe needs scikit-learn: pip install "
                          "'adaperceiver[train]'") from e
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction}, test_fraction={test_fraction}; allowed: "
                         "fractions in (0, 1) summing to less than 1")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - DIGITS_MEAN) / DIGITS_STD
    y = torch.tensor(d.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    parts = {"train": [], "val": [], "test": []}
    for c in range(10):                      # stratified: the same fractions in every class
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = round(len(idx) * test_fraction)
        n_val = round(len(idx) * val_fraction)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    out = {}
    for name, chunks in parts.items():
        idx = torch.cat(chunks)
        idx = idx[torch.randperm(len(idx), generator=g)]
        out[f"x_{name}"], out[f"y_{name}"] = x[idx].contiguous(), y[idx].contiguous()
    return DigitsSplit(**out)
