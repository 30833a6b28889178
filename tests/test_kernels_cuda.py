"""The CUDA backend's kernels (csrc/cuda) and the Triton kernels on the GPU, through the public
ops, against float64: the checks of ``make gpu-check``'s correctness stage (the same functions,
which its dry mode runs here on the interpreter), as tests. They run where a CUDA device is
present; elsewhere they are skipped (nothing CUDA runs on a machine without one)."""
import pytest
import torch

from adaperceiver.bench import gpu_check as G
from helpers import HAS_CUDA, dtype_params

pytestmark = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")

DTYPES = dtype_params([torch.bfloat16, torch.float16, torch.float32])
BACKENDS = ["triton", "cuda"]


def _ctx():
    return G.Ctx("gpu", None, [])


def _ok(row):
    assert row["status"] in ("ok", "skip"), row
    if row["status"] == "skip":
        pytest.skip(row["detail"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("case", [
    dict(B=4, H=13, N=256, D=64, grans=[32, 64, 96, 128, 192, 256], lens=[256, 200, 77, 0]),
    dict(B=3, H=4, N=181, D=128, grans=[5, 40, 100], lens=[181, 64, 1]),
    dict(B=3, H=2, N=97, D=32, grans=[97], lens=[97, 50, 33]),
], ids=["released", "d128", "d32"])
def test_attention_on_gpu(backend, dtype, packed, case):
    _ok(G._attention_case(_ctx(), backend, dtype, packed=packed, **case))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ffn_on_gpu(backend, dtype):
    _ok(G._ffn_case(_ctx(), backend, dtype, B=6, N=64, C=832, H=2138,
                    hidden=[1069, 2138, 1603, 1069, 2138, 17]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_on_gpu(backend, dtype):
    _ok(G._attention_nan_case(_ctx(), backend, dtype, B=2, H=2, N=40, D=64,
                              grans=[8, 24, 40], lens=[40, 31]))


def test_cuda_backend_takes_batch_heads_above_65535():
    """B * H = 66300 (grid.x): the CUDA backend runs it (the Triton one declines: its grid.y
    limit) and every sampled (batch, head) equals the reference."""
    from adaperceiver import ops
    from adaperceiver.ops import reference as ref
    from adaperceiver.ops.inputs import AttentionInputs
    B, H, N, D = 5100, 13, 16, 32
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.float16) for _ in range(3))
    why = ops.available_backends("attention", AttentionInputs.build(q, k, v, [4, 16]))
    assert any("65535" in r for r in why["triton"]) and not why["cuda"], why
    with ops.use_backend("cuda"):
        out = ops.block_masked_attention(q, k, v, [4, 16])
    for b in (0, 2600, B - 1):
        want = ref.attention(q[b:b + 1].double(), k[b:b + 1].double(), v[b:b + 1].double(),
                             [4, 16])
        assert (out[b:b + 1].double() - want).abs().max().item() < 4e-3
