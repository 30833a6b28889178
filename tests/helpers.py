"""Shared helpers of the test suite (imported by test modules as ``helpers``; the fixtures live
in conftest.py). Importing this module first decides Triton's interpreter mode."""
import contextlib
import os

import torch

# Triton's interpreter only where no CUDA device is present, or when asked
# (ADAPERCEIVER_TEST_INTERPRET=1, or TRITON_INTERPRET set by the caller). It must be decided
# before any @triton.jit is applied, i.e. before adaperceiver.kernels is imported: importing
# torch and asking for a device does not import Triton.
if "TRITON_INTERPRET" not in os.environ:
    _ask = os.environ.get("ADAPERCEIVER_TEST_INTERPRET", "") == "1"
    os.environ["TRITON_INTERPRET"] = "1" if _ask or not torch.cuda.is_available() else "0"

import pytest  # noqa: E402

# Where the kernels under test run. INTERPRET: Triton runs CPU tensors in its interpreter
# (fp32/fp16 only: its bf16 is broken); otherwise Triton and the CUDA extension run on the GPU.
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cpu" if INTERPRET or not HAS_CUDA else "cuda"
# the devices the model / op tests run on (every one present)
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# the Triton kernels' dtypes on TRITON_DEVICE, the low-precision ones held to flash-attn's rule
TRITON_DTYPES = ([torch.float32, torch.float16] if TRITON_DEVICE == "cpu"
                 else [torch.float32, torch.float16, torch.bfloat16])
TRITON_LOW_DTYPES = [d for d in TRITON_DTYPES if d != torch.float32]


def device_params(devices=None):
    """pytest params over ``devices`` (default: every device present), ids "cpu"/"cuda"."""
    return [pytest.param(d, id=d) for d in (DEVICES if devices is None else devices)]


def dtype_params(dtypes):
    return [pytest.param(d, id=str(d).replace("torch.", "")) for d in dtypes]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64; infinities of the same sign count as equal, NaN as inf."""
    a, b = a.double(), b.to(a.device).double()
    assert a.shape == b.shape, (a.shape, b.shape)
    both = torch.isinf(a) & torch.isinf(b) & (a == b)
    d = torch.where(both, torch.zeros_like(a), (a - b).abs())
    return torch.nan_to_num(d, nan=float("inf")).max().item() if d.numel() else 0.0


def flash_rule(ours: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, *,
               factor: float = 2.0, floor: float = 1e-4) -> tuple[float, float]:
    """flash-attn's rule for low precision: the error of ``ours`` against the float64 ``truth``
    is at most ``factor`` x the error of ``plain`` (the plain PyTorch reference run in the same
    low precision) plus a tiny absolute ``floor`` scaled by the truth's magnitude. Returns
    (error, bound); the caller asserts error <= bound."""
    scale = max(1.0, truth.abs().max().item() if truth.numel() else 1.0)
    return max_err(ours, truth), factor * max_err(plain, truth) + floor * scale


def randomize_(model: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    """Give every parameter a random value of order ``scale`` (LayerScale included), so that no
    block is a near-identity and every test of the model exercises every layer."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.3, 1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, scale / p.shape[-1] ** 0.5 if "pos_embed" not in name else scale)
            else:
                p.normal_(0.0, scale * 0.2)
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return model


TINY = dict(embed_dim=96, num_heads=3, depth=4, img_size=64, patch_size=16, num_classes=17,
            mat_dims=[48, 72, 96])


def tiny_model(**overrides):
    """A small AdaPerceiver with the released token grans (N up to 256), randomized."""
    import adaperceiver
    return randomize_(adaperceiver.create_model("adaperceiver_v1_in1k", **{**TINY, **overrides}))


def hard_exit(worker):
    """For torch.multiprocessing workers: leave with os._exit once the work is done (0) or has
    failed (1, traceback printed). Torch's gloo teardown at interpreter exit intermittently
    aborts a finished worker ("terminate called without an active exception"), which would fail
    a test whose work succeeded."""
    import functools

    @functools.wraps(worker)
    def run(*args, **kwargs):
        import os
        import sys
        import traceback
        code = 0
        try:
            worker(*args, **kwargs)
        except BaseException:  # noqa: BLE001 - reported, then the exit code says it failed
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return run


def case_id(case, fields: str) -> str:
    """A readable pytest id for a tuple ``case`` whose entries are named by ``fields`` (space
    separated): numbers as ``B2``, lists as ``grans=5,20,32``, True flags by their name, False
    and None left out. E.g. case_id((2, 77, [5, 20], None, True), "B N grans lens rope")
    -> "B2-N77-grans=5,20-rope"."""
    parts = []
    for name, v in zip(fields.split(), case):
        if v is None or v is False:
            continue
        if v is True:
            parts.append(name)
        elif isinstance(v, (list, tuple)):
            vals = [str(x) for x in v]
            if len(vals) > 6:
                vals = [vals[0], "..", vals[-1]]
            parts.append(f"{name}=" + ",".join(vals))
        else:
            parts.append(f"{name}{v}")
    return "-".join(parts)


def pad_rows(x: torch.Tensor, lens) -> torch.Tensor:
    """Packed rows (R, H, D), samples of ``lens`` one after another, as a zero-padded
    (B, H, max(lens), D) tensor of x's dtype."""
    B, H, D = len(lens), x.shape[1], x.shape[2]
    p = torch.zeros(B, H, max(lens), D, dtype=x.dtype)
    s = 0
    for b, n in enumerate(lens):
        p[b, :, :n] = x[s:s + n].transpose(0, 1)
        s += n
    return p


def unpad_rows(p: torch.Tensor, lens) -> torch.Tensor:
    """The inverse of pad_rows: the rows each sample owns, packed (R, H, D)."""
    return torch.cat([p[b, :, :n].transpose(0, 1) for b, n in enumerate(lens)])


@contextlib.contextmanager
def mkldnn_off():
    """torch.backends.mkldnn disabled for the block: the C++ attention takes its float32
    kernels (its AMX tiles go through oneDNN's brgemm), so a test can compare both paths in one
    process."""
    old = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = old
