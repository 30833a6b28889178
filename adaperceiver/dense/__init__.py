"""Dense prediction on the adaptive distilled backbone: segmentation and depth heads, their
metrics, head (+ per-patch readout) training on a frozen trunk, and the encoder-FLOPs
comparison with ViTs. Each module's docstring lists how it follows the authors' public code
(pjjajal/adaperceiver-public) and where it departs from it.

    from adaperceiver.dense import AdaPerceiverSegmenter, AdaPerceiverDepth
    seg = AdaPerceiverSegmenter(150, backbone="path/to/adaperceiver_v1")   # released format
    logits = seg(images, num_tokens=512, mat_dim=624, depth=14)          # (B, 150, H, W)
"""
from __future__ import annotations

from .heads import (AdaPerceiverDepth, AdaPerceiverSegmenter, DepthBinsHead,
                    SegmentationHead, load_backbone, load_dense)
from .metrics import DepthMetrics, MeanIoU, confusion_matrix, depth_metrics, mean_iou
from .train import DepthLoss, SegmentationLoss, silog_loss, train_dense_head

__all__ = ["AdaPerceiverSegmenter", "AdaPerceiverDepth", "SegmentationHead", "DepthBinsHead",
           "load_backbone", "load_dense", "confusion_matrix", "mean_iou", "MeanIoU",
           "depth_metrics", "DepthMetrics", "SegmentationLoss", "DepthLoss", "silog_loss",
           "train_dense_head"]
