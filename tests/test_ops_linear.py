"""ops.linear: the model's projections, on oneDNN for float32 CPU inference, F.linear otherwise."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import importlib

from adaperceiver import ops

linear_mod = importlib.import_module("adaperceiver.ops.linear")

ONEDNN = ops.cpu_gemm_library() == "onednn"


def _spy(monkeypatch):
    """Count the calls that reach oneDNN's op."""
    calls = []
    real = linear_mod._onednn_linear

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(linear_mod, "_onednn_linear", spy if real is not None else None)
    return calls


@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 33), (3, 1, 4, 33)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_equals_f_linear(shape, with_bias):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    w = torch.randn(19, 33)   # 19 outputs: not a multiple of any vector width
    b = torch.randn(19) if with_bias else None
    with torch.inference_mode():
        got = ops.linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert got.shape == (*shape[:-1], 19)


def test_strided_input_and_row_slice(monkeypatch):
    torch.manual_seed(1)
    x = torch.randn(4, 6, 40)[..., 3:36]          # non-contiguous rows
    w = torch.randn(50, 33)[:21]                  # a row slice: still contiguous
    b = torch.randn(50)[:21]
    calls = _spy(monkeypatch)
    with torch.no_grad():
        got = ops.linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert len(calls) == (1 if ONEDNN else 0)


@pytest.mark.skipif(not ONEDNN, reason="oneDNN is not this torch's CPU GEMM here")
def test_which_inputs_go_to_onednn(monkeypatch):
    """oneDNN only for float32 CPU work without autograd on a contiguous weight; everything
    else (and what it would get wrong or run on its 1000x slower reference kernel) F.linear."""
    torch.manual_seed(2)
    x = torch.randn(8, 24)
    w = torch.randn(16, 24)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        ops.linear(x, w)
    assert len(calls) == 1
    # a column slice (the Matryoshka fc2 band) is not contiguous
    wide = torch.randn(16, 40)
    with torch.no_grad():
        got = ops.linear(x, wide[:, :24])
    torch.testing.assert_close(got, F.linear(x, wide[:, :24]))
    assert len(calls) == 1
    # gradients: F.linear, and the gradient flows
    wg = w.clone().requires_grad_(True)
    ops.linear(x, wg).sum().backward()
    assert wg.grad is not None and len(calls) == 1
    # other dtypes, autocast
    with torch.no_grad():
        ops.linear(x.double(), w.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ops.linear(x, w).dtype == torch.bfloat16
    assert len(calls) == 1


@pytest.mark.skipif(not ONEDNN, reason="oneDNN is not this torch's CPU GEMM here")
def test_flop_counter_sees_the_onednn_gemm():
    x = torch.randn(2, 5, 12)
    w = torch.randn(7, 12)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ops.linear(x, w, torch.randn(7))
    assert counter.get_total_flops() == 2 * 10 * 12 * 7


def test_library_env_is_checked():
    env = dict(os.environ, ADAPERCEIVER_CPU_GEMM="openblas")
    res = subprocess.run([sys.executable, "-c", "import adaperceiver.ops"], env=env,
                         capture_output=True, text=True)
    assert res.returncode != 0
    assert "ADAPERCEIVER_CPU_GEMM='openblas'" in res.stderr and "onednn, mkl" in res.stderr
    env["ADAPERCEIVER_CPU_GEMM"] = "mkl"
    res = subprocess.run([sys.executable, "-c",
                          "from adaperceiver import ops; print(ops.cpu_gemm_library())"],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "mkl", res.stderr


_CHILD = r"""
import torch, torch.nn.functional as F
from adaperceiver import ops
from adaperceiver.ops.linear import native_low_precision
torch.manual_seed(0)
x, w, b = torch.randn(37, 24), torch.randn(19, 24), torch.randn(19)
for dt in (torch.bfloat16, torch.float16):
    xl, wl, bl = (t.to(dt).requires_grad_(True) for t in (x, w, b))
    out = ops.linear(xl, wl, bl)
    want = F.linear(xl.float(), wl.float(), bl.float()).to(dt)
    assert out.dtype == dt
    assert native_low_precision(dt) is False
    assert torch.equal(out, want), dt
    out.sum().backward()
    assert xl.grad is not None and wl.grad is not None and bl.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):   # autocast keeps its own choice
        assert torch.equal(ops.linear(x, w, b), F.linear(x, w, b))
print("ok")
"""


def test_low_precision_without_native_gemms_runs_float32():
    """On a CPU without native bf16 / fp16 GEMMs (emulated here by ADAPERCEIVER_CPU_ISA=avx2,
    which turns the native paths off) a bf16 / fp16 projection is a float32 GEMM rounded once;
    with native GEMMs it is F.linear in the dtype."""
    env = dict(os.environ, ADAPERCEIVER_CPU_ISA="avx2")
    caps = torch._C._cpu._get_cpu_capability()
    if not caps.get("avx2"):
        pytest.skip("this CPU has no AVX2")
    res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
    from adaperceiver.ops.linear import native_low_precision
    x, w, b = (torch.randn(*s).bfloat16() for s in ((9, 16), (5, 16), (5,)))
    if native_low_precision(torch.bfloat16):
        assert torch.equal(ops.linear(x, w, b), F.linear(x, w, b))
