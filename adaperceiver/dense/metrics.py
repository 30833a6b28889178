"""Dense prediction metrics in torch ops: segmentation mIoU and depth RMSE / AbsRel / delta.

Checked against the authors' evaluation (pjjajal/adaperceiver-public: adaperceiver_eval_seg.py,
adaperceiver_eval_depth.py, dataset/{scene_parsing_ade20k,nyu_depth}.py).

Segmentation (rows of the confusion matrix are the true class, columns the predicted one;
pixels whose target is ``ignore_index`` are left out):

    IoU_k = C[k, k] / (sum_j C[k, j] + sum_i C[i, k] - C[k, k])
    mIoU  = mean of IoU_k over the classes with a non-empty union (present in the target or the
            prediction); a class in neither is NaN in the per-class IoU and does not count.

Over a data set the confusion matrix is summed first (:class:`MeanIoU`). This is what the
authors report: HF ``evaluate``'s ``mean_iou`` with ``num_labels=150, ignore_index=255,
reduce_labels=False`` on labels already reduced by the image processor (ADE20K "other" -> 255),
which sums intersections and unions over the data set and takes a nan-mean; its
``mean_accuracy`` (nan-mean over classes of per-class recall) and ``overall_accuracy`` are our
``mean_acc`` and ``pixel_acc``.

Depth, over valid pixels (finite target > 0, and min_depth < target < max_depth when given):

    RMSE   = sqrt(mean((pred - gt)^2))
    AbsRel = mean(|pred - gt| / gt)
    delta_i = fraction of pixels with max(pred / gt, gt / pred) < 1.25^i   (i = 1, 2, 3)

``reduction="pixel"`` (default) pools every valid pixel of the data set: the authors report
NYUv2 RMSE from torchmetrics' ``MeanSquaredError(squared=False)``, i.e. the root of the mean
squared error over all pixels of all images (on the full 448 x 602 resized image, with no Eigen
or Garg crop and no depth cap; NYUv2's depth maps are dense, so dropping target <= 0 changes
nothing there), on the mean of the prediction and the flipped prediction of the mirrored image
(``AdaPerceiverDepth.predict(flip=True)``). They report RMSE only. ``reduction="image"``
computes each metric per image and averages over images with a valid pixel (the AdaBins /
DINOv2 NYU and KITTI protocol). No evaluation crop is provided since the authors use none.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["confusion_matrix", "iou_from_confusion", "mean_iou", "MeanIoU", "depth_metrics",
           "DepthMetrics", "DEPTH_METRICS"]

DEPTH_METRICS = ("rmse", "abs_rel", "delta1", "delta2", "delta3")


def _labels(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """pred as labels of target's shape: labels pass through, logits (B, K, ...) are argmaxed."""
    if pred.dim() == target.dim() + 1:
        if pred.shape[1] != num_classes or pred.shape[:1] + pred.shape[2:] != target.shape:
            raise ValueError(f"pred logits have shape {tuple(pred.shape)} for target "
                             f"{tuple(target.shape)}; allowed: (B, {num_classes}, ...) with "
                             "target's other dimensions")
        return pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)}, target {tuple(target.shape)}; "
                         "allowed: labels of target's shape or logits (B, num_classes, ...)")
    if pred.is_floating_point():
        raise TypeError(f"pred labels have dtype {pred.dtype}; allowed: an integer dtype (or "
                        "logits with a class dimension)")
    return pred


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: Optional[int] = 255) -> torch.Tensor:
    """int64 (num_classes, num_classes): C[i, j] = pixels of true class i predicted as j."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} is not allowed; allowed: an int >= 1")
    if target.is_floating_point():
        raise TypeError(f"target has dtype {target.dtype}; allowed: an integer dtype")
    pred = _labels(pred, target, num_classes)
    keep = target != ignore_index if ignore_index is not None else torch.ones_like(
        target, dtype=torch.bool)
    t, p = target[keep].long(), pred[keep].long()
    if t.numel():
        bad_t = (t < 0) | (t >= num_classes)
        if bool(bad_t.any()):
            raise ValueError(f"target holds label {int(t[bad_t][0])}; allowed: 0.."
                             f"{num_classes - 1} or ignore_index={ignore_index}")
        bad_p = (p < 0) | (p >= num_classes)
        if bool(bad_p.any()):
            raise ValueError(f"pred holds label {int(p[bad_p][0])}; allowed: 0.."
                             f"{num_classes - 1}")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def iou_from_confusion(conf: torch.Tensor) -> torch.Tensor:
    """float64 (K,) per-class IoU; NaN for a class absent from both target and prediction."""
    conf = conf.double()
    inter = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))


def _nanmean(x: torch.Tensor) -> torch.Tensor:
    ok = ~torch.isnan(x)
    return x[ok].mean() if bool(ok.any()) else x.new_tensor(float("nan"))


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
             ignore_index: Optional[int] = 255) -> tuple[torch.Tensor, torch.Tensor]:
    """(mIoU, per-class IoU (K,)) of one batch; pred are labels or (B, K, ...) logits."""
    iou = iou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))
    return _nanmean(iou), iou


class MeanIoU:
    """Accumulates the confusion matrix over batches; ``compute()`` -> dict with ``miou``,
    ``iou`` (K,), ``pixel_acc``, ``mean_acc`` (all-reduced across ranks when
    torch.distributed is up)."""

    def __init__(self, num_classes: int, ignore_index: Optional[int] = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.conf += confusion_matrix(pred, target, self.num_classes,
                                      self.ignore_index).cpu()

    def compute(self, sync: bool = True) -> dict:
        conf = self.conf
        if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            conf = conf.clone()
            torch.distributed.all_reduce(conf)
        iou = iou_from_confusion(conf)
        total = conf.sum()
        acc = conf.diagonal().sum().double() / total if total else torch.tensor(float("nan"))
        per_class = conf.sum(1).double()
        recall = torch.where(per_class > 0, conf.diagonal().double() / per_class.clamp_min(1),
                             torch.full_like(per_class, float("nan")))
        return {"miou": _nanmean(iou), "iou": iou, "pixel_acc": acc,
                "mean_acc": _nanmean(recall)}


def _depth_valid(pred, target, valid, min_depth, max_depth):
    if pred.shape != target.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)}, target {tuple(target.shape)}; "
                         "allowed: the same shape, (B, 1, H, W) or (B, H, W)")
    if not (pred.is_floating_point() and target.is_floating_point()):
        raise TypeError("pred and target must be float tensors")
    if target.dim() < 2:
        raise ValueError(f"target has shape {tuple(target.shape)}; allowed: (B, ...) maps")
    if min_depth is not None and max_depth is not None and not min_depth < max_depth:
        raise ValueError(f"min_depth={min_depth} >= max_depth={max_depth}; allowed: "
                         "min_depth < max_depth")
    ok = torch.isfinite(target) & (target > 0)
    if min_depth is not None:
        ok &= target > min_depth
    if max_depth is not None:
        ok &= target < max_depth
    if valid is not None:
        if valid.shape != target.shape:
            raise ValueError(f"valid has shape {tuple(valid.shape)}; allowed: target's "
                             f"{tuple(target.shape)}")
        ok &= valid.bool()
    return ok


def _depth_sums(pred, target, ok):
    """Per image (B,): valid count, sum sq err, sum abs rel, delta counts (float64)."""
    B = target.shape[0]
    p, g, m = pred.double().reshape(B, -1), target.double().reshape(B, -1), ok.reshape(B, -1)
    g_safe = torch.where(m, g, torch.ones_like(g))
    p_safe = torch.where(m, p, torch.ones_like(p))
    ratio = torch.maximum(p_safe / g_safe, g_safe / p_safe)
    ratio = torch.where(p_safe > 0, ratio, torch.full_like(ratio, float("inf")))
    mf = m.double()
    out = {"count": mf.sum(1),
           "sq": (((p - g) ** 2) * mf).nan_to_num(0.0).sum(1),
           "abs_rel": ((p_safe - g_safe).abs() / g_safe * mf).sum(1)}
    for i in (1, 2, 3):
        out[f"delta{i}"] = ((ratio < 1.25 ** i).double() * mf).sum(1)
    return out


# the sums of _depth_sums in the order DepthMetrics keeps them (pooled pixels)
_SUM_KEYS = ("sq", "abs_rel", "delta1", "delta2", "delta3", "count")


def _check_reduction(reduction: str) -> None:
    if reduction not in ("image", "pixel"):
        raise ValueError(f"reduction={reduction!r} is not allowed; allowed: 'image', 'pixel'")


def _finish(s: dict) -> dict:
    c = s["count"]
    return {"rmse": (s["sq"] / c).sqrt(), "abs_rel": s["abs_rel"] / c,
            **{f"delta{i}": s[f"delta{i}"] / c for i in (1, 2, 3)}}


def depth_metrics(pred: torch.Tensor, target: torch.Tensor, valid: Optional[torch.Tensor] = None,
                  min_depth: Optional[float] = None, max_depth: Optional[float] = None,
                  reduction: str = "pixel") -> dict:
    """Dict of float64 0-dim tensors ``rmse``, ``abs_rel``, ``delta1..3`` over valid pixels (see
    the module docstring); NaN when no pixel is valid."""
    _check_reduction(reduction)
    s = _depth_sums(pred, target, _depth_valid(pred, target, valid, min_depth, max_depth))
    if reduction == "pixel":
        return _finish({k: v.sum() for k, v in s.items()})
    per = _finish(s)
    has = s["count"] > 0
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return {k: (v[has].mean() if bool(has.any()) else nan) for k, v in per.items()}


class DepthMetrics:
    """Accumulates depth metrics over batches (pooled pixels, or per-image means);
    ``compute()`` -> dict of floats (all-reduced across ranks when torch.distributed is up)."""

    def __init__(self, min_depth: Optional[float] = None, max_depth: Optional[float] = None,
                 reduction: str = "pixel"):
        _check_reduction(reduction)
        self.min_depth, self.max_depth, self.reduction = min_depth, max_depth, reduction
        self.sums = torch.zeros(len(DEPTH_METRICS) + 1, dtype=torch.float64)  # + count

    def update(self, pred, target, valid=None) -> None:
        s = _depth_sums(pred, target, _depth_valid(pred, target, valid, self.min_depth,
                                                   self.max_depth))
        if self.reduction == "pixel":
            vals = [s[k].sum() for k in _SUM_KEYS]
        else:
            has = s["count"] > 0
            per = _finish({k: v[has] for k, v in s.items()})
            vals = [per[k].sum() for k in DEPTH_METRICS] + [has.sum().double()]
        self.sums += torch.stack([v.cpu() for v in vals])

    def compute(self, sync: bool = True) -> dict:
        sums = self.sums
        if sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = sums.clone()
            torch.distributed.all_reduce(sums)
        n = sums[-1]
        if not n:
            return {k: float("nan") for k in DEPTH_METRICS}
        if self.reduction == "pixel":
            return {k: float(v) for k, v in _finish(dict(zip(_SUM_KEYS, sums))).items()}
        # per-image mean: sums hold sum over images of rmse, abs_rel, deltas
        return {k: float(sums[i] / n) for i, k in enumerate(DEPTH_METRICS)}
