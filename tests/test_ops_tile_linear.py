"""The extension's AMX tile GEMM (csrc/cpu/tile_linear.cpp): x (..., K) weight (N, K)^T + bias in
bfloat16 with the weight read as it is, which ops.linear and the C++ FFN's fc2 take for bf16
GEMMs of at most 256 rows on CPUs with AMX-BF16. Against float64 by flash-attn's rule, on tails
of every dimension, a column slice read in place, NaN / inf, batch and thread invariance, the
rule, the routing, and the errors."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from adaperceiver import ops
from helpers import flash_rule

linear_mod = importlib.import_module("adaperceiver.ops.linear")
BF16 = torch.bfloat16
WHY_NOT = linear_mod.tile_linear_why_not(1, BF16)


def _op():
    if WHY_NOT:
        pytest.skip(f"the tile GEMM does not run here: {WHY_NOT}")
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


@pytest.mark.parametrize("rows,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_tile_linear_matches_float64(rows, k, n, with_bias):
    """Every output of every shape within flash-attn's rule (an output left unwritten would
    hold whatever the allocator handed back: a NaN-filled block of the output's size is freed
    just before, so it shows up as an error)."""
    op = _op()
    x = torch.randn(rows, k).to(BF16)
    w = (torch.randn(n, k) / math.sqrt(k)).to(BF16)
    b = torch.randn(n).to(BF16) if with_bias else None
    with torch.inference_mode():
        poison = torch.full((rows, n), math.nan, dtype=BF16)
        del poison
        got = op(x, w, b)
    assert got.shape == (rows, n) and got.dtype == BF16 and got.isfinite().all()
    _check(got, x, w, b)


def test_tile_linear_keeps_leading_dims():
    op = _op()
    x, w, b = torch.randn(3, 5, 40).to(BF16), torch.randn(24, 40).to(BF16), torch.randn(24).to(BF16)
    with torch.inference_mode():
        got = op(x, w, b)
    assert got.shape == (3, 5, 24)
    _check(got.reshape(15, 24), x.reshape(15, 40), w, b)


@pytest.mark.parametrize("k", [64, 70])
def test_tile_linear_column_slice_in_place(k):
    """A column slice of a wider weight (fc2 at a narrower width) runs in place, and the
    columns past the slice are never read: NaN and inf there change nothing."""
    op = _op()
    x = torch.randn(40, k).to(BF16)
    wide = torch.randn(50, 96).to(BF16)
    wide[:, k:] = math.nan
    wide[7, k:] = math.inf
    b = torch.randn(50).to(BF16)
    with torch.inference_mode():
        got = op(x, wide[:, :k], b)
        copy = op(x, wide[:, :k].contiguous(), b)
    assert got.isfinite().all()
    assert torch.equal(got, copy)
    _check(got, x, wide[:, :k].contiguous(), b)


def test_tile_linear_nan_inf_as_the_product():
    """NaN and inf where the float64 product has them: a NaN in a row of x makes that row NaN,
    an inf in a weight row makes its output column inf (or NaN against an opposite inf)."""
    op = _op()
    x = torch.randn(70, 130).to(BF16)
    w, b = (torch.randn(66, 130) / 11).to(BF16), torch.randn(66).to(BF16)
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


def test_tile_linear_is_batch_and_thread_invariant():
    """Each output is one float32 sum in a fixed order: a row gives the same bits alone, in a
    batch, in another order of the batch, and at one or two threads."""
    op = _op()
    x = torch.randn(200, 833).to(BF16)
    w, b = (torch.randn(97, 833) / 29).to(BF16), torch.randn(97).to(BF16)
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


def test_tile_linear_sees_weight_edits():
    """Nothing is kept between calls: an in-place edit of the weight (through .data too) and a
    new bias are seen by the next call."""
    op = _op()
    x = torch.randn(64, 96).to(BF16)
    w, b = torch.randn(40, 96).to(BF16), torch.randn(40).to(BF16)
    with torch.inference_mode():
        before = op(x, w, b)
        w.data[5].mul_(-2)
        after = op(x, w, b)
        fresh = op(x, w.clone(), b.clone())
    assert not torch.equal(before[:, 5], after[:, 5])
    assert torch.equal(before[:, 6:], after[:, 6:]) and torch.equal(after, fresh)


def test_tile_linear_rule():
    """The rule is of the dtype and the row count (and the machine): bfloat16 only, 1..256 rows,
    each refusal naming the value and what is allowed."""
    why = linear_mod.tile_linear_why_not
    assert "bfloat16 only" in why(4, torch.float16) and "bfloat16 only" in why(4, torch.float32)
    assert "257 rows" in why(257, BF16) and "1..256" in why(257, BF16)
    assert "0 rows" in why(0, BF16)
    if not WHY_NOT:
        assert why(1, BF16) == why(256, BF16) == ""
    info = torch.ops.adaperceiver.tile_linear_why_not
    assert info(256, BF16) == why(256, BF16)


def test_tile_linear_errors():
    op = _op()
    x, w = torch.randn(4, 8).to(BF16), torch.randn(6, 8).to(BF16)
    with pytest.raises(RuntimeError, match="257 rows"):
        op(torch.randn(257, 8).to(BF16), w, None)
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        op(x.half(), w.half(), None)
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


def test_ops_linear_takes_the_tiles_up_to_256_rows(monkeypatch):
    """ops.linear: bf16 inference of at most 256 rows on the tile GEMM, more rows on oneDNN
    (the rule's edge), both within flash-attn's rule."""
    op = _op()
    seen = []

    def spy(*args):
        seen.append(args[0].shape)
        return op(*args)

    real = linear_mod._extension_op
    monkeypatch.setattr(linear_mod, "_extension_op",
                        lambda name: spy if name == "tile_linear" else real(name))
    w, b = (torch.randn(70, 64) / 8).to(BF16), torch.randn(70).to(BF16)
    with torch.inference_mode():
        for rows in (256, 257):
            x = torch.randn(rows, 64).to(BF16)
            _check(ops.linear(x, w, b), x, w, b)
    assert seen == [(256, 64)]


def test_build_info_says_which_gemm_runs():
    """build_info()'s cpu_tile_linear_bf16 (and the bench header): "amx" where the rule takes
    bf16 GEMMs, "onednn" elsewhere, and ADAPERCEIVER_CPU_ISA=avx512 (the tiles off, as for the attention) gives
    "onednn" with the reason."""
    import json
    import os
    import subprocess
    import sys

    from adaperceiver import _ext
    info = _ext.build_info()
    if info["load_error"] is not None:
        pytest.skip("the extension is not loaded")
    assert info["cpu_tile_linear_bf16"] == ("onednn" if WHY_NOT else "amx")
    from adaperceiver.bench.timing import cpu_kernels_summary   # the bench header says it too
    assert ("AMX tile GEMM" in cpu_kernels_summary()) == (not WHY_NOT)
    code = ("import importlib, json, torch; from adaperceiver import _ext;"
            " lin = importlib.import_module('adaperceiver.ops.linear');"
            " print(json.dumps([_ext.build_info()['cpu_tile_linear_bf16'],"
            " lin.tile_linear_why_not(1, torch.bfloat16)]))")
    env = dict(os.environ, ADAPERCEIVER_CPU_ISA="avx512")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    path, why = json.loads(out.strip().splitlines()[-1])
    assert path == "onednn" and why
    if not WHY_NOT:
        assert "ADAPERCEIVER_CPU_ISA=avx512" in why


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
    with torch.inference_mode():
        first = {k: f() for k, f in steps.items()}
        for order in (["tiles", "ours", "tiles", "sdpa", "tiles", "onednn", "ours", "sdpa"],
                      ["sdpa", "tiles", "onednn", "tiles", "ours"]):
            for k in order:
                assert torch.equal(steps[k](), first[k]), k
