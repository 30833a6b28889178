"""ops.linear: the model's projections, on oneDNN for float32 CPU inference, F.linear otherwise."""
import math
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
    """Count the calls that reach oneDNN's op or the extension's tile GEMM (which bf16 GEMMs of
    few rows take on AMX CPUs; tests/test_ops_tile_linear.py)."""
    calls = []
    real, real_ext = linear_mod._onednn_linear, linear_mod._extension_op

    def spy(real_op):
        def call(*args):
            calls.append(args[0].shape)
            return real_op(*args)
        return call

    def extension_op(name):
        op = real_ext(name)
        return spy(op) if name == "tile_linear" and op is not None else op

    monkeypatch.setattr(linear_mod, "_onednn_linear", spy(real) if real is not None else None)
    monkeypatch.setattr(linear_mod, "_extension_op", extension_op)
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
    # other dtypes: F.linear
    with torch.no_grad():
        ops.linear(x.double(), w.double())
    assert len(calls) == 1
    # autocast: oneDNN (or the tile GEMM) on the casts where the CPU has native bf16 GEMMs, else
    # F.linear
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.linear(x, w).dtype == torch.bfloat16
    assert len(calls) == (2 if linear_mod.native_low_precision(torch.bfloat16) else 1)
    assert calls[-1] == x.shape


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
# inference: the float32 GEMM is the one float32 takes (oneDNN where it is the library), its
# result rounded once to the dtype
import importlib
lm = importlib.import_module("adaperceiver.ops.linear")
calls, real = [], lm._onednn_linear
onednn = real is not None and ops.cpu_gemm_library() == "onednn"
if onednn:
    lm._onednn_linear = lambda *a: calls.append(a[0].dtype) or real(*a)
for dt in (torch.bfloat16, torch.float16):
    xl, wl, bl = (t.to(dt) for t in (x, w, b))
    with torch.inference_mode():
        out = ops.linear(xl, wl, bl)
    want = F.linear(xl.float(), wl.float(), bl.float())
    bound = torch.finfo(dt).eps * want.abs() + 1e-5 * want.abs().max()
    assert out.dtype == dt and ((out.float() - want).abs() <= bound).all(), dt
assert calls == ([torch.float32] * 2 if onednn else []), calls
print("ok")
"""


def test_low_precision_without_native_gemms_runs_float32():
    """On a CPU without native bf16 / fp16 GEMMs (emulated here by ADAPERCEIVER_CPU_ISA=avx2,
    which turns the native paths off) a bf16 / fp16 projection is a float32 GEMM rounded once
    (in inference on oneDNN, as float32's projections); with native GEMMs it is F.linear in the
    dtype."""
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


# ----------------------------------------------------------------------------- bf16 / fp16
def _native(dtype):
    from adaperceiver.ops.linear import native_low_precision
    if not ONEDNN or not native_low_precision(dtype):
        pytest.skip(f"no native {dtype} GEMM (or no oneDNN) on this CPU")


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _flash_rule(got, plain, x, w, b):
    """flash-attn's rule against the float64 product: got's error <= 2x the plain bf16/fp16
    F.linear's error plus a tiny floor."""
    truth = F.linear(x.double(), w.double(), None if b is None else b.double())
    err, err_plain = ((t.double() - truth).abs().max().item() for t in (got, plain))
    assert err <= 2 * err_plain + 1e-4 * truth.abs().max().item(), (err, err_plain)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_runs_onednn_with_native_gemms(monkeypatch, dtype):
    """bf16 / fp16 inference on a CPU with native GEMMs for them: oneDNN's GEMM on the plain
    weight (a row slice too: the fused q/k/v weight's parts), within flash-attn's rule."""
    _native(dtype)
    x = torch.randn(3, 37, 40).to(dtype)
    w, b = (torch.randn(3 * 19, 40) / 6).to(dtype), torch.randn(3 * 19).to(dtype)
    calls = _spy(monkeypatch)
    with torch.inference_mode():
        got = ops.linear(x, w[19:], b[19:])
        _flash_rule(got, F.linear(x, w[19:], b[19:]), x, w[19:], b[19:])
        assert len(calls) == 1 and got.dtype == dtype and got.shape == (3, 37, 38)
    wg = w.clone().requires_grad_(True)            # gradients: F.linear
    ops.linear(x, wg).float().sum().backward()
    assert wg.grad is not None and len(calls) == 1


# Products run as one block of rows per thread (csrc/cpu/onednn.h, gemm_thread_rows): inside the
# band oneDNN runs on one of 2 threads, and (on AMX) more than 1100 outputs on 800..1279 rows,
# with tails: rows, outputs and K that are not multiples of 16 / 32 / 64
SPLIT = [(1031, 833, 72), (800, 1100, 64), (1662, 769, 70), (4 * 256, 832, 130)]
SPLIT_WIDE = [(4 * 256, 2496, 72), (1279, 1101, 66), (801, 1500, 33)]


def _amx_bf16():
    from adaperceiver import _ext
    return _ext.build_info().get("cpu_attention_bf16") == "amx"


@pytest.fixture
def row_blocks_spy(monkeypatch):
    """Count the calls of the row-block op (and fail if it is missing)."""
    op = linear_mod._row_blocks_op()
    if op is None:
        pytest.skip("the extension is not loaded")
    calls = []

    def spy(*args):
        calls.append(args[3])
        return op(*args)

    monkeypatch.setattr(linear_mod, "_row_blocks_op", lambda: spy)
    return calls


def test_one_thread_band_edges(two_threads):
    """The extension's rules, which ops.linear and the C++ FFN both read: in bfloat16 at 2
    threads on a CPU with native bf16 GEMMs, blocks of <= 768 rows (gemm_row_chunks, the FFN's
    backward) exactly inside rows 800..1663 and outputs 769..1100, and there one block of about
    half the rows per thread (row_block, a multiple of 32); one GEMM at its edges, in float32
    and float16 and at one thread."""
    _native(torch.bfloat16)
    if linear_mod._row_blocks_op() is None:
        pytest.skip("the extension is not loaded")
    rc, rb, bf = linear_mod.row_chunks, linear_mod.row_block, torch.bfloat16
    assert [rc(r, 832, bf) for r in (799, 800, 1536, 1537, 1663, 1664)] == [1, 2, 2, 3, 3, 1]
    assert [rc(1024, n, bf) for n in (768, 769, 1100, 1101)] == [1, 2, 2, 1]
    assert rc(1024, 832, torch.float32) == rc(1024, 832, torch.float16) == 1
    assert [rb(r, 833, bf) for r in (799, 800, 1024, 1031, 1663, 1664)] == [0, 416, 512, 544,
                                                                             832, 0]
    assert rb(1024, 768, bf) == rb(1024, 833, torch.float32) == rb(1024, 833, torch.float16) == 0
    torch.set_num_threads(1)
    assert rc(1024, 832, bf) == 1 and rb(1024, 832, bf) == 0


def test_thread_rows_wide_and_ffn_edges(two_threads):
    """On AMX: more than 1100 outputs on 800..1279 rows (gemm_thread_rows), the FFN's pair on
    768..2047 rows (ffn_thread_rows); elsewhere, at one thread and in other dtypes 0."""
    _native(torch.bfloat16)
    if linear_mod._row_blocks_op() is None:
        pytest.skip("the extension is not loaded")
    rb, bf = linear_mod.row_block, torch.bfloat16
    ffn_rows = torch.ops.adaperceiver.ffn_thread_rows
    wide = [rb(r, 2496, bf) for r in (799, 800, 1024, 1279, 1280)]
    ffn = [ffn_rows(r, bf) for r in (767, 768, 1024, 1025, 2047, 2048)]
    if _amx_bf16():
        assert wide == [0, 416, 512, 640, 0] and rb(1024, 1101, bf) == 512
        assert ffn == [0, 384, 512, 544, 1024, 0]
    else:
        assert wide == [0] * 5 and ffn == [0] * 6
    assert ffn_rows(1024, torch.float32) == ffn_rows(1024, torch.float16) == 0
    assert rb(1024, 2496, torch.float16) == 0
    torch.set_num_threads(1)
    assert rb(1024, 2496, bf) == ffn_rows(1024, bf) == 0


@pytest.mark.parametrize("rows,n,k", SPLIT + SPLIT_WIDE)
@pytest.mark.parametrize("with_bias", [True, False])
def test_row_block_bf16_gemm(two_threads, row_blocks_spy, rows, n, k, with_bias):
    """A bf16 GEMM the rule runs as one block of rows per thread: every row written (the
    allocator is handed a NaN-filled block of the output's size just before, and each element
    compared), each within flash-attn's rule against float64, NaN and inf exactly where the
    float64 product has them, and the same output on a second call and after a run at one
    thread."""
    _native(torch.bfloat16)
    block = linear_mod.row_block(rows, n, torch.bfloat16)
    if n > 1100 and not _amx_bf16():
        assert block == 0
        pytest.skip("more than 1100 outputs run as row blocks on AMX only")
    assert block % 32 == 0 and block < rows <= 2 * block
    assert linear_mod.row_block(rows, n, torch.float32) == 0
    x = torch.randn(rows, k).bfloat16()
    w, b = (torch.randn(n, k) / 8).bfloat16(), torch.randn(n).bfloat16() if with_bias else None
    x[rows - 1, 5] = math.nan                      # the last row (second block)
    x[block - 1, 6] = -math.inf                    # the first block's last row
    w[n - 1, 3] = math.inf                         # the last output column
    with torch.inference_mode():
        poison = torch.full((rows, n), math.nan, dtype=torch.bfloat16)
        del poison
        got = ops.linear(x, w, b)
        again = ops.linear(x, w, b)
        torch.set_num_threads(1)
        one = ops.linear(x, w, b)                  # one GEMM at one thread
        torch.set_num_threads(2)
        after = ops.linear(x, w, b)
    assert row_blocks_spy == [block, block, block]
    truth = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert torch.equal(got.isnan(), truth.isnan()) and torch.equal(got.isinf(), truth.isinf())
    want = F.linear(x, w, b)
    fin = truth.isfinite() & want.isfinite()
    assert fin.sum() > rows * n * 0.9
    _flash_rule(torch.where(fin, got, 0), torch.where(fin, want, 0), x.nan_to_num(0, 0, 0),
                w.nan_to_num(0, 0, 0), b)
    torch.testing.assert_close(got, again, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got, after, rtol=0, atol=0, equal_nan=True)
    fin &= one.isfinite()
    _flash_rule(torch.where(fin, one, 0), torch.where(fin, want, 0), x.nan_to_num(0, 0, 0),
                w.nan_to_num(0, 0, 0), b)


def test_row_block_odd_k_3d(two_threads, row_blocks_spy):
    """Odd K, a 3-d x (finite inputs): the row blocks as F.linear within flash-attn's rule."""
    _native(torch.bfloat16)
    x, w, b = torch.randn(3, 521, 71).bfloat16(), (torch.randn(769, 71) / 8).bfloat16(), None
    with torch.inference_mode():
        got = ops.linear(x, w, b)
    assert row_blocks_spy == [800] and got.shape == (3, 521, 769)
    _flash_rule(got, F.linear(x, w, b), x, w, b)


def test_row_block_rule_is_a_rule_of_the_shape(two_threads):
    """Outside the bands, another dtype or another thread count: one GEMM (0); the C++ FFN's
    row-chunk rule covers the one-thread band."""
    outside = [(799, 832), (1664, 832), (1024, 768), (799, 2496), (1280, 2496)]
    if not _amx_bf16():
        outside.append((1024, 2496))
    for rows, n in outside:
        assert linear_mod.row_block(rows, n, torch.bfloat16) == 0, (rows, n)
    for rows, n in ((799, 832), (1664, 832), (1024, 768), (1024, 1101)):
        assert linear_mod.row_chunks(rows, n, torch.bfloat16) == 1, (rows, n)
    if linear_mod.native_low_precision(torch.bfloat16) and linear_mod._row_blocks_op():
        assert linear_mod.row_block(1024, 832, torch.bfloat16) == 512
        assert linear_mod.row_chunks(1024, 832, torch.bfloat16) == 2
    torch.set_num_threads(1)
    assert linear_mod.row_block(1024, 832, torch.bfloat16) == 0
    assert linear_mod.row_chunks(1024, 832, torch.bfloat16) == 1


def test_row_block_op_checks_its_arguments():
    op = linear_mod._row_blocks_op()
    if op is None:
        pytest.skip("the extension is not loaded")
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(RuntimeError, match="block must be positive, got 0"):
        op(x, w, None, 0)
    with pytest.raises(RuntimeError, match="must agree on K"):
        op(x, torch.randn(6, 7), None, 4)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(x, w, torch.randn(5), 4)
    with pytest.raises(RuntimeError, match="one dtype"):
        op(x, w.double(), None, 4)
    # float32, three and four blocks (the last a tail), no extension state between calls
    x, b = torch.randn(10, 8), torch.randn(6)
    with torch.inference_mode():
        torch.testing.assert_close(op(x, w, b, 4), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(op(x.view(2, 5, 8), w, None, 3), F.linear(x, w).view(2, 5, 6),
                                   rtol=1e-5, atol=1e-5)
