"""Triton kernels of adaperceiver, installed as ``adaperceiver.kernels``, and the tile schedule
every backend follows (schedule.py: plain torch, no Triton; the lowest layer, which the op
layer above re-exports as ``adaperceiver.ops.schedule``)."""
import os


def interpreting() -> bool:
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1, read when asked: tests and
    tools set it before any kernel is jitted)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def fp32_dot_precision(fp32_highest: str) -> str:
    """``tl.dot``'s input_precision for float32 operands, following
    ``torch.get_float32_matmul_precision()`` as torch's own float32 matmuls do: "highest" ->
    ``fp32_highest`` (the kernel's fp32-accurate choice), "high" / "medium" -> "tf32" (tensor
    cores, products of 10-bit mantissas). Read on the host at each launch (a constexpr: each
    setting has its own compiled kernel)."""
    import torch
    return fp32_highest if torch.get_float32_matmul_precision() == "highest" else "tf32"
