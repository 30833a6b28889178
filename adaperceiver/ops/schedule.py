"""The mask's tile schedule and the device memo, for the op layer and the model.

Defined once in ``adaperceiver.kernels.schedule`` (kernels/schedule.py), the lowest layer, so
that the kernels read it without importing the ops above them; re-exported here unchanged.
"""
from adaperceiver.kernels.schedule import (  # noqa: F401 - re-exports
    DEVICE_MEMO_SIZE, TileSchedule, block_mask, check_grans, clear_device_memo, device_memo,
    group_ends, ranges, row_end, tile_schedule, to_device)
from adaperceiver.kernels.schedule import __all__  # noqa: F401
