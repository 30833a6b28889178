"""Training: the once-for-all objective, distillation, an exact single/multi-process trainer and
the digits recipe (``python -m adaperceiver.train --recipe digits``)."""
from .objective import (OnceForAll, depth_weights, feature_loss, freeze_backbone,  # noqa: F401
                        kd_loss, teacher_targets)
from .trainer import Trainer, init_distributed, unwrap, world  # noqa: F401

__all__ = ["OnceForAll", "Trainer", "depth_weights", "feature_loss", "freeze_backbone",
           "kd_loss", "teacher_targets", "init_distributed", "unwrap", "world"]
