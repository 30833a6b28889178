"""Adaptive-compute baselines next to AdaPerceiver, run on this package's kernels.

``avit``: A-ViT (Yin et al., CVPR 2022), adaptive token halting (one axis: tokens x depth) on a
timm DeiT/ViT, with compacted inference through ``block_masked_attention(seq_lens=...)``.
"""
from .avit import (AViT, AViTOutput, avit_flops, avit_losses, create_avit, halting_depths,
                   train_avit_digits)

__all__ = ["AViT", "AViTOutput", "avit_flops", "avit_losses", "create_avit", "halting_depths",
           "train_avit_digits"]
