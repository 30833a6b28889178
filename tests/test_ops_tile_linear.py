"""The extension's AMX tile GEMM (csrc/cpu/tile_linear.cpp): x (..., K) weight (N, K)^T + bias
with the weight read as it is. bfloat16: ops.linear and the C++ FFN's fc2 take it for GEMMs of
at most 256 rows on CPUs with AMX-BF16. float16, as exact pairs of bfloat16 products on CPUs
with AMX-BF16 but no AMX-FP16: the projections and the FFN's fc1 (its GELU in the epilogue) and
fc2 at any row count. Against float64 by flash-attn's rule, on tails of every dimension, a
column slice read in place, NaN / inf, batch and thread invariance, the rule, the routing, and
the errors."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from adaperceiver import ops
from helpers import flash_rule

linear_mod = importlib.import_module("adaperceiver.ops.linear")
BF16, F16 = torch.bfloat16, torch.float16
WHY_NOT = linear_mod.tile_linear_why_not(1, BF16)
WHY_NOT_F16 = linear_mod.tile_linear_why_not(1, F16)
DTYPES = [pytest.param(BF16, id="bf16"), pytest.param(F16, id="fp16")]


def _op(dtype=BF16):
    why = WHY_NOT if dtype == BF16 else WHY_NOT_F16
    if why:
        pytest.skip(f"the tile GEMM does not run {dtype} here: {why}")
    return torch.ops.adaperceiver.tile_linear


def _truth(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def _check(got, x, w, b):
    truth = _truth(x, w, b)
    err, bound = flash_rule(got, F.linear(x, w, b), truth)
    assert err <= bound, (err, bound)


# (rows, K, N): tails of 16 / 32 rows, of 32 values of K (odd K too) and of 32 outputs
SHAPES = [(1, 1, 1), (5, 33, 17), (37, 65, 70), (31, 64, 32), (33, 95, 63), (100, 832, 832),
          (224, 2138, 832), (200, 832, 2138), (256, 96, 100)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_tile_linear_matches_float64(rows, k, n, with_bias, dtype):
    """Every output of every shape within flash-attn's rule (an output left unwritten would
    hold whatever the allocator handed back: a NaN-filled block of the output's size is freed
    just before, so it shows up as an error)."""
    op = _op(dtype)
    x = torch.randn(rows, k).to(dtype)
    w = (torch.randn(n, k) / math.sqrt(k)).to(dtype)
    b = torch.randn(n).to(dtype) if with_bias else None
    with torch.inference_mode():
        poison = torch.full((rows, n), math.nan, dtype=dtype)
        del poison
        got = op(x, w, b)
    assert got.shape == (rows, n) and got.dtype == dtype and got.isfinite().all()
    _check(got, x, w, b)


@pytest.mark.parametrize("rows,k,n", [(300, 70, 45), (1000, 64, 33)])
def test_tile_linear_fp16_any_rows(rows, k, n):
    """float16 has no row limit (oneDNN's float16 GEMM is no faster at any row count)."""
    op = _op(F16)
    x, w, b = torch.randn(rows, k).to(F16), (torch.randn(n, k) / 8).to(F16), torch.randn(n).to(F16)
    with torch.inference_mode():
        got = op(x, w, b)
    _check(got, x, w, b)


def test_tile_linear_fp16_row_chunks():
    """float16 runs its rows in chunks of 2048 (a bounded scratch): rows past the first chunk
    are the same bits as alone, and an inf there reaches oneDNN for its own row only."""
    op = _op(F16)
    x = torch.randn(2100, 70).to(F16)
    w, b = (torch.randn(45, 70) / 8).to(F16), torch.randn(45).to(F16)
    x_inf = x.clone()
    x_inf[2090, 3] = math.inf
    with torch.inference_mode():
        full = op(x, w, b)
        tail = op(x[2040:], w, b)
        dirty = op(x_inf, w, b)
    _check(full, x, w, b)
    assert torch.equal(full[2040:], tail)
    truth = _truth(x_inf, w, b)[2090]
    assert truth.isinf().all() and torch.equal(dirty[2090], truth.to(F16))
    others = torch.ones(2100, dtype=torch.bool)
    others[2090] = False
    assert torch.equal(dirty[others], full[others])


@pytest.mark.parametrize("k", [4, 3])
def test_tile_linear_fp16_pairs_are_exact(k):
    """v = hi + lo exactly, and all four products are summed: on values whose products and sums
    are exact in float32 (11-bit integers / 1024, K <= 4), every output is the float64 result
    rounded once to float16, bit for bit. Dropping any of the four products (lo x lo the
    smallest) or rounding lo would change some outputs."""
    op = _op(F16)
    g = torch.Generator().manual_seed(k)
    x = (torch.randint(-2047, 2048, (37, k), generator=g) / 1024).to(F16)
    w = (torch.randint(-2047, 2048, (45, k), generator=g) / 1024).to(F16)
    with torch.inference_mode():
        got = op(x, w, None)
    truth = F.linear(x.double(), w.double())
    assert torch.equal(got, truth.to(F16))
    # the lo parts are not all zero (else the test would not reach them)
    assert (x.float() != x.bfloat16().float()).any() and (w.float() != w.bfloat16().float()).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_linear_keeps_leading_dims(dtype):
    op = _op(dtype)
    x, w = torch.randn(3, 5, 40).to(dtype), torch.randn(24, 40).to(dtype)
    b = torch.randn(24).to(dtype)
    with torch.inference_mode():
        got = op(x, w, b)
    assert got.shape == (3, 5, 24)
    _check(got.reshape(15, 24), x.reshape(15, 40), w, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [64, 70])
def test_tile_linear_column_slice_in_place(k, dtype):
    """A column slice of a wider weight (fc2 at a narrower width) runs in place, and the
    columns past the slice are never read: NaN and inf there change nothing (in float16 they
    would also send the call to oneDNN)."""
    op = _op(dtype)
    x = torch.randn(40, k).to(dtype)
    wide = torch.randn(50, 96).to(dtype)
    wide[:, k:] = math.nan
    wide[7, k:] = math.inf
    b = torch.randn(50).to(dtype)
    with torch.inference_mode():
        got = op(x, wide[:, :k], b)
        copy = op(x, wide[:, :k].contiguous(), b)
    assert got.isfinite().all()
    assert torch.equal(got, copy)
    _check(got, x, wide[:, :k].contiguous(), b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_linear_nan_inf_as_the_product(dtype):
    """NaN and inf where the float64 product has them: a NaN in a row of x makes that row NaN,
    an inf in a weight row makes its output column inf (or NaN against an opposite inf)."""
    op = _op(dtype)
    x = torch.randn(70, 130).to(dtype)
    w, b = (torch.randn(66, 130) / 11).to(dtype), torch.randn(66).to(dtype)
    x[69, 129] = math.nan    # the last row, the K tail
    w[65, 3] = math.inf      # the last output (the output tail)
    w[31, 128] = -math.inf   # the first block's last output, in the K tail
    with torch.inference_mode():
        got = op(x, w, b)
    truth = _truth(x, w, b)
    assert torch.equal(got.isnan(), truth.isnan()) and torch.equal(got.isinf(), truth.isinf())
    assert torch.equal(got.isinf() & (got > 0), truth.isinf() & (truth > 0))
    fin = truth.isfinite()
    assert fin.sum() > 0.9 * fin.numel()
    err, bound = flash_rule(torch.where(fin, got, 0), torch.where(fin, F.linear(x, w, b), 0),
                            torch.where(fin, truth, 0))
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("where", ["x", "weight"])
def test_tile_linear_fp16_inf_stays_inf(where):
    """float16 splits v into hi + lo, and inf - inf is NaN: an inf in x (or in the weight)
    against a weight (or x) column whose values are exact in bfloat16 (lo = 0) would give
    inf * 0 = NaN. The outputs of such a row are computed by oneDNN instead: inf where the
    product is inf, oneDNN's bits there; the other outputs stay the tiles'."""
    op = _op(F16)
    x = torch.randn(40, 70).to(F16)
    w, b = (torch.randn(36, 70) / 8).to(F16), torch.randn(36).to(F16)
    if where == "x":
        x[5, 66] = math.inf                    # the K tail
        w[:, 66] = w[:, 66].bfloat16().half()  # lo = 0 in that column
    else:
        w[33, 2] = -math.inf                   # the output tail
        x[:, 2] = x[:, 2].bfloat16().half()
        x[:, 2][x[:, 2] == 0] = 1
    with torch.inference_mode():
        got = op(x, w, b)
        onednn = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    truth = _truth(x, w, b)
    assert truth.isinf().sum() >= 30 and not truth.isnan().any()
    assert torch.equal(got.isinf(), truth.isinf()) and not got.isnan().any()
    inf = truth.isinf()
    assert torch.equal(got[inf], onednn[inf]) and torch.equal(got[inf], truth[inf].half())
    err, bound = flash_rule(torch.where(inf, 0, got), torch.where(inf, 0, F.linear(x, w, b)),
                            torch.where(inf, 0, truth))
    assert err <= bound, (err, bound)


def test_tile_linear_fp16_nonfinite_rows_leave_the_others_alone():
    """A row of x or of the weight with inf or NaN sends only its own outputs to oneDNN: every
    other output is the same bits as without it (batch composition never changes a result)."""
    op = _op(F16)
    x = torch.randn(70, 300).to(F16)
    w, b = (torch.randn(100, 300) / 17).to(F16), torch.randn(100).to(F16)
    x2, w2 = x.clone(), w.clone()
    x2[0, 0] = math.nan
    x2[69, 299] = math.inf
    w2[33, 150] = -math.inf
    with torch.inference_mode():
        clean = op(x, w, b)
        dirty = op(x2, w2, b)
        fallback = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    keep = torch.ones_like(clean, dtype=torch.bool)
    keep[[0, 69]] = False
    keep[:, 33] = False
    assert torch.equal(dirty[keep], clean[keep])
    assert dirty[0].isnan().all() and not dirty[keep].isnan().any()
    assert dirty[~keep].isfinite().sum() == 0
    assert not torch.equal(clean, fallback)   # the tiles' sums, not oneDNN's, where finite


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_linear_is_batch_and_thread_invariant(dtype):
    """Each output is one float32 sum in a fixed order: a row gives the same bits alone, in a
    batch, in another order of the batch, and at one or two threads."""
    op = _op(dtype)
    x = torch.randn(200, 833).to(dtype)
    w, b = (torch.randn(97, 833) / 29).to(dtype), torch.randn(97).to(dtype)
    perm = torch.randperm(200)
    old = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(2)
            full = op(x, w, b)
            alone = torch.stack([op(x[i:i + 1], w, b)[0] for i in (0, 17, 199)])
            shuffled = op(x[perm], w, b)
            torch.set_num_threads(1)
            one_thread = op(x, w, b)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(alone, full[[0, 17, 199]])
    assert torch.equal(shuffled, full[perm])
    assert torch.equal(one_thread, full)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_linear_sees_weight_edits(dtype):
    """Nothing is kept between calls: an in-place edit of the weight (through .data too) and a
    new bias are seen by the next call."""
    op = _op(dtype)
    x = torch.randn(64, 96).to(dtype)
    w, b = torch.randn(40, 96).to(dtype), torch.randn(40).to(dtype)
    with torch.inference_mode():
        before = op(x, w, b)
        w.data[5].mul_(-2)
        after = op(x, w, b)
        fresh = op(x, w.clone(), b.clone())
    assert not torch.equal(before[:, 5], after[:, 5])
    assert torch.equal(before[:, 6:], after[:, 6:]) and torch.equal(after, fresh)


def test_tile_linear_rule():
    """The rule is of the dtype and the row count (and the machine): bfloat16 at 1..256 rows,
    float16 at any positive row count where the CPU has AMX-BF16 but no AMX-FP16, each refusal
    naming the value and what is allowed."""
    why = linear_mod.tile_linear_why_not
    assert "Float (the tiles' GEMM multiplies bfloat16, and float16" in why(4, torch.float32)
    assert "257 rows" in why(257, BF16) and "1..256" in why(257, BF16)
    assert "0 rows" in why(0, BF16) and "0 rows" in why(0, F16)
    if not WHY_NOT:
        assert why(1, BF16) == why(256, BF16) == ""
    if not WHY_NOT_F16:
        assert why(1, F16) == why(257, F16) == why(100_000, F16) == ""
    elif not WHY_NOT:   # the tiles are there: float16 is refused for AMX-FP16 only
        assert "AMX-FP16" in WHY_NOT_F16
    info = torch.ops.adaperceiver.tile_linear_why_not
    assert info(256, BF16) == why(256, BF16) and info(300, F16) == why(300, F16)


def test_tile_linear_errors():
    op = _op()
    x, w = torch.randn(4, 8).to(BF16), torch.randn(6, 8).to(BF16)
    with pytest.raises(RuntimeError, match="257 rows"):
        op(torch.randn(257, 8).to(BF16), w, None)
    with pytest.raises(RuntimeError, match="Float .the tiles' GEMM multiplies bfloat16"):
        op(x.float(), w.float(), None)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(x, w.float(), None)
    with pytest.raises(RuntimeError, match=r"x \(\.\.\., K\) and weight \(N, K\)"):
        op(x, torch.randn(6, 9).to(BF16), None)
    with pytest.raises(RuntimeError, match="bias of weight.size"):
        op(x, w, torch.randn(5).to(BF16))
    with pytest.raises(RuntimeError, match="no gradient formula"):
        op(x, w.clone().requires_grad_(True), None)
    with torch.inference_mode():
        assert op(torch.randn(0, 8).to(BF16), w, None).shape == (0, 6)
        # K = 0: an empty sum, the bias in every row
        b = torch.randn(6).to(BF16)
        got = op(torch.randn(5, 0).to(BF16), torch.randn(6, 0).to(BF16), b)
        assert torch.equal(got, b.expand(5, 6))
        assert torch.equal(op(torch.randn(3, 0).to(BF16), torch.randn(6, 0).to(BF16), None),
                           torch.zeros(3, 6, dtype=BF16))


def _rows_on_tiles(monkeypatch, dtype, row_counts):
    """ops.linear on x of each row count (inference, within flash-attn's rule): the row counts
    of the calls that reached the tile GEMM."""
    op = _op(dtype)
    seen = []

    def spy(*args):
        seen.append(args[0].shape[0])
        return op(*args)

    real = linear_mod._extension_op
    monkeypatch.setattr(linear_mod, "_extension_op",
                        lambda name: spy if name == "tile_linear" else real(name))
    w, b = (torch.randn(70, 64) / 8).to(dtype), torch.randn(70).to(dtype)
    with torch.inference_mode():
        for rows in row_counts:
            x = torch.randn(rows, 64).to(dtype)
            _check(ops.linear(x, w, b), x, w, b)
    return seen


def test_ops_linear_takes_the_tiles_up_to_256_rows(monkeypatch):
    """ops.linear: bf16 inference of at most 256 rows on the tile GEMM, more rows on oneDNN
    (the rule's edge)."""
    assert _rows_on_tiles(monkeypatch, BF16, (256, 257)) == [256]


def test_ops_linear_takes_the_tiles_for_fp16_at_any_rows(monkeypatch):
    """ops.linear: float16 inference on the tile GEMM at any row count."""
    assert _rows_on_tiles(monkeypatch, F16, (1, 257, 700)) == [1, 257, 700]


def test_build_info_says_which_gemm_runs():
    """build_info()'s cpu_tile_linear_bf16 / _fp16 (and the bench header): "amx" /
    "amx-bf16-pairs" where the rule takes the dtype's GEMMs, "onednn" elsewhere, and
    ADAPERCEIVER_CPU_ISA=avx512 (the tiles off, as for the attention) gives "onednn" with the
    reason."""
    import json
    import os
    import subprocess
    import sys

    from adaperceiver import _ext
    info = _ext.build_info()
    if info["load_error"] is not None:
        pytest.skip("the extension is not loaded")
    assert info["cpu_tile_linear_bf16"] == ("onednn" if WHY_NOT else "amx")
    assert info["cpu_tile_linear_fp16"] == ("onednn" if WHY_NOT_F16 else "amx-bf16-pairs")
    from adaperceiver.bench.timing import cpu_kernels_summary   # the bench header says it too
    header = cpu_kernels_summary()
    assert ("bf16 GEMMs of <= 256 rows (FFNs of several widths: <= 448) on the AMX tile GEMM"
            in header) == (not WHY_NOT)
    assert ("fp16 GEMMs on the AMX tile GEMM" in header) == (not WHY_NOT_F16)
    code = ("import importlib, json, torch; from adaperceiver import _ext;"
            " lin = importlib.import_module('adaperceiver.ops.linear');"
            " i = _ext.build_info();"
            " print(json.dumps([i['cpu_tile_linear_bf16'], i['cpu_tile_linear_fp16'],"
            " lin.tile_linear_why_not(1, torch.bfloat16),"
            " lin.tile_linear_why_not(1, torch.float16)]))")
    env = dict(os.environ, ADAPERCEIVER_CPU_ISA="avx512")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    path, path16, why, why16 = json.loads(out.strip().splitlines()[-1])
    assert path == path16 == "onednn" and why and why16
    if not WHY_NOT:
        assert "ADAPERCEIVER_CPU_ISA=avx512" in why and "ADAPERCEIVER_CPU_ISA=avx512" in why16


def test_tile_linear_between_other_tile_users():
    """The tile GEMM between the other users of the AMX tiles on the same threads (the
    attention's cpublas::brgemm, torch's SDPA, oneDNN's matmul): every result the same bits as
    when it ran first, whatever ran before it."""
    op = _op()
    q = torch.randn(2, 3, 200, 64).to(BF16)
    x, w = torch.randn(200, 96).to(BF16), torch.randn(80, 96).to(BF16)
    rows300 = torch.randn(300, 96).to(BF16)    # past the rule: oneDNN's matmul
    steps = {
        "ours": lambda: ops.block_masked_attention(q, q, q, [64, 128, 200]),
        "sdpa": lambda: F.scaled_dot_product_attention(q, q, q),
        "tiles": lambda: op(x, w, None),
        "onednn": lambda: ops.linear(rows300, w),
    }
    if not WHY_NOT_F16:
        x16, w16 = x.half(), w.half()
        steps["tiles16"] = lambda: op(x16, w16, None)
    with torch.inference_mode():
        first = {k: f() for k, f in steps.items()}
        for order in (["tiles", "ours", "tiles", "sdpa", "tiles", "onednn", "ours", "sdpa"],
                      ["sdpa", "tiles", "onednn", "tiles", "ours"],
                      ["tiles16", "ours", "tiles", "tiles16", "onednn", "tiles16", "sdpa"]):
            for k in (k for k in order if k in steps):
                assert torch.equal(steps[k](), first[k]), k
