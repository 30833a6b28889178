"""bfloat16 and float16 through the cpp backend, by flash-attn's accuracy rule.

For each op and for the whole model: the error of our result in bf16 / fp16 against a float64
truth must be at most 2x the error of the plain PyTorch reference (adaperceiver/ops/reference.py,
or the model on the reference backend) run in the same precision, plus a tiny absolute floor
(1e-4 of the truth's largest magnitude). Inputs are fresh random values; shapes have tails (rows
and widths that are not multiples of the tiles), RoPE, token granularities, seq_lens, packed
rows and per-sample widths. The bf16 model's top-1 on the digits recipe's test split agrees with
float32 within 0.5 points (slow: trains the recipe).
"""
from __future__ import annotations

import math

import pytest
import torch

import adaperceiver
from adaperceiver import _ext
from adaperceiver.ops import cpp_backend as C
from adaperceiver.ops import reference as R
from adaperceiver.ops.inputs import AttentionInputs, FfnInputs, PackedAttentionInputs

from helpers import pad_rows, tiny_model, unpad_rows

pytestmark = pytest.mark.skipif(not _ext.available(),
                                reason=f"adaperceiver._C not loaded: {_ext.load_error()}")

LOW = [torch.bfloat16, torch.float16]


def assert_rule(ours, ref_low, truth, what):
    truth = truth.double()
    err = (ours.double() - truth).abs().max().item()
    err_ref = (ref_low.double() - truth).abs().max().item()
    floor = 1e-4 * truth.abs().max().item()
    assert err <= 2 * err_ref + floor, (f"{what}: error {err:.3g} > 2 x the reference's "
                                        f"{err_ref:.3g} + {floor:.2g}")


ATTN_CASES = [
    # B, H, N, D, grans, seq_lens, rope
    (2, 3, 77, 64, [5, 20, 32, 64, 77], [77, 40], True),
    (1, 2, 100, 32, [32, 64, 96], None, False),
    (1, 1, 600, 16, None, None, True),       # two key chunks (KC = 512)
    (3, 1, 33, 64, [32], [0, 1, 33], False),
    (1, 2, 300, 80, [37, 100, 256], [300], True),    # D = 80; odd kend; 2 chunks on tiles
    (2, 1, 520, 128, None, [520, 301], False),       # D = 128; 3 chunks on tiles (KT = 256)
    (1, 1, 45, 33, [7, 45], None, False),            # odd D (a padded pair on tiles)
]


def _attn_inputs(B, H, N, D, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", range(len(ATTN_CASES)))
def test_attention_forward_rule(dtype, case):
    B, H, N, D, grans, lens, rope = ATTN_CASES[case]
    q, k, v, _ = _attn_inputs(B, H, N, D, case)
    q, k, v = (t.to(dtype) for t in (q, k, v))     # the same low-precision inputs for all
    tables = R.rope_tables(N, D) if rope else None
    kw = dict(token_grans=grans, seq_lens=None if lens is None else torch.tensor(lens),
              q_rope=tables, k_rope=tables)
    out, lse = C.attention_forward(AttentionInputs.build(q, k, v, **kw))
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref, ref_lse = R.attention_forward(q, k, v, **kw)
    truth, truth_lse = R.attention_forward(q.double(), k.double(), v.double(), **kw)
    assert_rule(out, ref, truth, "out")
    fin = truth_lse.isfinite()
    assert torch.equal(fin, lse.isfinite())
    assert_rule(lse[fin], ref_lse[fin], truth_lse[fin], "lse")


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", [0, 1, 3])
def test_attention_backward_rule(dtype, case):
    B, H, N, D, grans, lens, rope = ATTN_CASES[case]
    q, k, v, go = _attn_inputs(B, H, N, D, 10 + case)
    q, k, v, go = (t.to(dtype) for t in (q, k, v, go))
    tables = R.rope_tables(N, D) if rope else None
    kw = dict(token_grans=grans, seq_lens=None if lens is None else torch.tensor(lens),
              q_rope=tables, k_rope=tables)
    inputs = AttentionInputs.build(q, k, v, **kw)
    out, lse = C.attention_forward(inputs)
    ours = C.attention_backward(inputs, go, out, lse)

    def autograd(dt):  # plain PyTorch autograd through the reference in dtype dt
        leaves = [t.detach().to(dt).clone().requires_grad_(True) for t in (q, k, v)]
        R.attention(*leaves, grans, seq_lens=kw["seq_lens"], q_rope=tables,
                    k_rope=tables).backward(go.to(dt))
        return [t.grad for t in leaves]

    for name, g, r, t in zip(("dq", "dk", "dv"), ours, autograd(dtype), autograd(torch.float64)):
        assert g.dtype == dtype
        assert_rule(g, r, t, name)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_packed_attention_rule(dtype):
    lens, H, D, grans = [50, 0, 37, 64], 2, 64, [16, 32, 64]
    g = torch.Generator().manual_seed(5)
    R_ = sum(lens)
    q, k, v = (torch.randn(R_, H, D, generator=g).to(dtype) for _ in range(3))
    tables = R.rope_tables(max(lens), D)
    out, _ = C.attention_varlen_forward(PackedAttentionInputs.build(q, k, v, lens, grans,
                                                                    q_rope=tables, k_rope=tables))
    assert out.dtype == dtype

    kw = dict(token_grans=grans, seq_lens=torch.tensor(lens), q_rope=tables, k_rope=tables)
    ref, _ = R.attention_forward(*(pad_rows(t, lens) for t in (q, k, v)), **kw)
    truth, _ = R.attention_forward(*(pad_rows(t, lens).double() for t in (q, k, v)), **kw)
    assert_rule(out, unpad_rows(ref, lens), unpad_rows(truth, lens), "packed out")


FFN_CASES = [([40, 17, 29], 7), ([40, 40], 33), ([1, 40, 23, 23], 5)]


def _ffn_inputs(hidden, N, seed, dtype, C_=24, Hmax=40, Cout=19):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(len(hidden), N, C_, generator=g), torch.randn(Hmax, C_, generator=g) / 4,
         torch.randn(Hmax, generator=g), torch.randn(Cout, Hmax, generator=g) / 6,
         torch.randn(Cout, generator=g)]
    return [x.to(dtype) for x in t]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", range(len(FFN_CASES)))
def test_ffn_forward_rule(dtype, case):
    hidden, N = FFN_CASES[case]
    args = _ffn_inputs(hidden, N, case, dtype)
    out = C.ffn_forward(FfnInputs.build(*args, hidden))
    assert out.dtype == dtype
    ref = R.ffn_forward(*args, hidden)
    truth = R.ffn_forward(*(a.double() for a in args), hidden)
    assert_rule(out, ref, truth, "ffn out")


def _assert_ffn_nan_rule(outs, args, hidden):
    """Each of outs (name: FFN output on args): NaN exactly where the float64 truth has it
    (somewhere), the finite rest by the rule."""
    ref = R.ffn_forward(*args, hidden)
    truth = R.ffn_forward(*(a.double() for a in args), hidden)
    fin = truth.isfinite()
    for name, out in outs.items():
        assert torch.equal(out.isnan(), truth.isnan()) and out.isnan().any(), name
        assert_rule(out[fin], ref[fin], truth[fin], name)


# GEMMs that oneDNN would run on one of 2 threads (csrc/cpu/onednn.h, gemm_row_chunks):
# fc1 of 1000 units on 800..1663 rows and fc2 of 833 outputs there; on AMX the pair runs on one
# block of rows per thread (ffn_thread_rows), elsewhere fc1 on consecutive row blocks and fc2 on
# one row block per thread at full width (linear_row_blocks), consecutive row blocks on a column
# slice; one width, and a width group of 900 rows beside a narrower one (a column slice of fc2)
FFN_CHUNKED = [([1000] * 4, 256), ([1000, 517, 1000, 1000], 300)]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", range(len(FFN_CHUNKED)))
def test_ffn_forward_rule_row_chunks(dtype, case):
    from adaperceiver.ops.linear import row_chunks
    hidden, N = FFN_CHUNKED[case]
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = _ffn_inputs(hidden, N, 40 + case, dtype, C_=48, Hmax=1000, Cout=833)
        rows = N * hidden.count(1000)
        if dtype == torch.bfloat16 and _ext.build_info()["cpu_native_bf16"]:
            assert row_chunks(rows, 1000, dtype) > 1 and row_chunks(rows, 833, dtype) > 1
        args[0][-1, -1, 7] = math.nan               # the last block's last row
        out = C.ffn_forward(FfnInputs.build(*args, hidden))
        again = C.ffn_forward(FfnInputs.build(*args, hidden))
    finally:
        torch.set_num_threads(old)
    _assert_ffn_nan_rule({"ffn out": out}, args, hidden)
    torch.testing.assert_close(out, again, rtol=0, atol=0, equal_nan=True)


# At few rows fc1 and fc2 run on the AMX tile GEMM where the CPU has it (csrc/cpu/
# tile_linear.cpp; fc1's bias and GELU in its epilogue; several widths up to 448 rows, fc1 in
# each 32-row block up to its rows' widest width): inf and NaN in x must come out where
# the float32 reference puts them (GELU(+inf) is NaN there, as in bf16 / fp16; float64's is
# inf), the other rows by the rule. Not the bf16 reference's places: torch's bf16 GEMM spreads
# a NaN row into its neighbour at some shapes (21 x 1000 x 833 here).
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("hidden, N", [([40, 17, 29], 7), ([1000, 517], 100),
                                       ([1000, 517, 1000], 107)])
def test_ffn_forward_nonfinite_few_rows(dtype, hidden, N):
    args = _ffn_inputs(hidden, N, 80 + N, dtype, C_=48, Hmax=1000, Cout=833)
    args[0][0, 3, 5] = math.inf
    args[0][-1, N - 1, 0] = -math.inf
    args[0][1, 0, 47] = math.nan
    out = C.ffn_forward(FfnInputs.build(*args, hidden))
    ref = R.ffn_forward(*args, hidden)
    ref32 = R.ffn_forward(*(a.float() for a in args), hidden)
    truth = R.ffn_forward(*(a.double() for a in args), hidden)
    assert torch.equal(out.isnan(), ref32.isnan()) and out.isnan().any()
    assert torch.equal(out.isinf(), ref32.isinf())
    fin = ref32.isfinite() & ref.isfinite()
    assert_rule(out[fin], ref[fin], truth[fin], "ffn out")


# Batches of more than 512 rows run one GEMM pair per width on that width's samples
# (csrc/ffn_banded.cpp): a full-width group spread over the batch (copied in and out), a
# consecutive narrower pair (read and written in place), a lone sample; then the full width
# consecutive and a narrower width spread out. Every sample's rows must come from its own
# width's GEMMs: the reference checks them all.
FFN_GROUPS = [([1000, 517, 517, 1000, 300, 1000], 100), ([517, 1000, 1000, 517, 1000], 110)]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", range(len(FFN_GROUPS)))
def test_ffn_forward_rule_width_groups(dtype, case):
    hidden, N = FFN_GROUPS[case]
    assert len(hidden) * N > 512          # past the one-pair path for small batches
    args = _ffn_inputs(hidden, N, 60 + case, dtype, C_=48, Hmax=1000, Cout=50)
    out = C.ffn_forward(FfnInputs.build(*args, hidden))
    ref = R.ffn_forward(*args, hidden)
    truth = R.ffn_forward(*(a.double() for a in args), hidden)
    assert_rule(out, ref, truth, "ffn out")


# A small batch of several widths runs one GEMM pair at its widest width on CPUs where oneDNN
# runs the dtype on AMX (csrc/ffn_banded.cpp, padded_pair: at most 512 rows), each sample's
# units past its width zeroed between the two (in bf16 up to 448 rows on the tile GEMM, fc1 in
# each 32-row block only up to its rows' widest width): odd widths and sizes, a widest width below
# Hmax (fc2 on a column slice), the model's own shapes, rows in blocks that straddle samples,
# 448 and 450, 512 and 513 rows on either side of the limits (the results do not say which
# path ran; all must meet the rule)
FFN_SMALL = [
    # hidden, N, C, Hmax, Cout
    ([201, 17, 64, 129, 1], 11, 50, 201, 70),
    ([96, 32, 96, 64], 40, 64, 96, 64),
    ([2138, 1603, 1603, 1069], 24, 832, 2138, 832),
    ([30, 17], 50, 24, 41, 19),
    ([40, 7], 256, 24, 41, 19),
    ([40, 7, 3], 171, 24, 41, 19),
    ([1603, 2138, 1069], 107, 48, 2138, 50),
    ([30, 17, 41, 9], 112, 24, 41, 19),
    ([30, 17, 41], 150, 24, 41, 19),
]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", range(len(FFN_SMALL)))
def test_ffn_forward_rule_mixed_widths_small_batch(dtype, case):
    hidden, N, C_, Hmax, Cout = FFN_SMALL[case]
    args = _ffn_inputs(hidden, N, 60 + case, dtype, C_=C_, Hmax=Hmax, Cout=Cout)
    out = C.ffn_forward(FfnInputs.build(*args, hidden))
    assert out.dtype == dtype and out.shape == (len(hidden), N, Cout)
    ref = R.ffn_forward(*args, hidden)
    truth = R.ffn_forward(*(a.double() for a in args), hidden)
    assert_rule(out, ref, truth, "ffn out")
    for b, h in enumerate(hidden):  # each sample by itself (one width: the oneDNN path)
        alone = C.ffn_forward(FfnInputs.build(args[0][b:b + 1], *args[1:], [h]))
        assert_rule(out[b:b + 1], ref[b:b + 1], truth[b:b + 1], f"sample {b}")
        torch.testing.assert_close(out[b:b + 1], alone, atol=0.02, rtol=0.02)
    torch.testing.assert_close(C.ffn_forward(FfnInputs.build(*args, hidden)), out, rtol=0,
                               atol=0)


# On AMX at 2 threads a width's pair on 768..2047 rows runs on one block of rows per thread,
# fc1 and fc2 of a block on one thread (csrc/cpu/onednn.h, ffn_thread_rows): one width at full
# and at a narrower width (fc2 on a column slice), rows that are not a multiple of 32 (each
# block's tail), 2047 rows (blocks of 1024 and 1023), a width group of 800 rows spread over the
# batch beside a narrower one, and one of 900 rows whose blocks split a sample (each thread
# gathers its rows and scatters its results); NaN in the first block's last row and in the
# last row. Each case also at one thread (one GEMM pair), equal within the rule.
FFN_THREAD_ROWS = [([1000] * 3, 261, 1000), ([517] * 3, 300, 1000), ([40], 2047, 41),
                   ([1000, 517, 1000, 1000, 1000, 517], 200, 1000),
                   ([517, 1000, 517, 1000, 517], 300, 1000)]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", range(len(FFN_THREAD_ROWS)))
def test_ffn_forward_rule_thread_rows(dtype, case):
    hidden, N, Hmax = FFN_THREAD_ROWS[case]
    ffn_rows = torch.ops.adaperceiver.ffn_thread_rows
    groups = {h: N * hidden.count(h) for h in hidden}
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        args = _ffn_inputs(hidden, N, 90 + case, dtype, C_=48, Hmax=Hmax, Cout=833)
        wide = max(hidden, key=lambda h: groups[h])        # the width group of 768.. rows
        block = ffn_rows(groups[wide], torch.bfloat16)
        if dtype == torch.bfloat16 and _ext.build_info()["cpu_attention_bf16"] == "amx":
            assert block > 0
        ids = [b for b, h in enumerate(hidden) if h == wide]
        last = (block or groups[wide]) - 1                # its first block's last row
        args[0][ids[last // N], last % N, 7] = math.nan
        args[0][-1, -1, 3] = math.nan                     # the last row
        out = C.ffn_forward(FfnInputs.build(*args, hidden))
        torch.set_num_threads(1)
        one = C.ffn_forward(FfnInputs.build(*args, hidden))
    finally:
        torch.set_num_threads(old)
    _assert_ffn_nan_rule({"ffn out": out, "ffn out, one thread": one}, args, hidden)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_ffn_small_batch_without_amx(isa):
    """The same cases, and those of the one-thread band, on the paths of CPUs without AMX (in a
    child process: avx512 runs bf16 / fp16 per width on oneDNN where the CPU has native GEMMs,
    fc2 in the band on one block of rows per thread; avx2 in float32)."""
    import os
    import subprocess
    import sys
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512") and isa == "avx512":
        pytest.skip("this CPU has no AVX-512")
    env = dict(os.environ, ADAPERCEIVER_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x",
                          "-p", "no:cacheprovider", "-k",
                          "mixed_widths_small_batch or row_chunks or thread_rows"],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", range(len(FFN_CASES)))
def test_ffn_backward_rule(dtype, case):
    hidden, N = FFN_CASES[case]
    args = _ffn_inputs(hidden, N, 20 + case, dtype)
    go = torch.randn(len(hidden), N, 19, generator=torch.Generator().manual_seed(9)).to(dtype)
    ours = C.ffn_backward(FfnInputs.build(*args, hidden), go)

    def autograd(dt):
        leaves = [a.detach().to(dt).clone().requires_grad_(True) for a in args]
        R.matryoshka_ffn(*leaves, hidden).backward(go.to(dt))
        return [a.grad for a in leaves]

    for name, g, r, t in zip(("dx", "dw1", "db1", "dw2", "db2"), ours, autograd(dtype),
                             autograd(torch.float64)):
        assert g.dtype == dtype
        assert_rule(g, r, t, name)


MODEL_CONFIGS = [dict(num_tokens=70, mat_dim=96, depth=4), dict(num_tokens=33, mat_dim=48, depth=2),
                 dict(num_tokens=[70, 33, 50], mat_dim=[48, 96, 61], depth=[4, 1, 3])]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_model().eval()


def _logits(model, x, dtype, backend, amp=False, **kw):
    import copy
    m = copy.deepcopy(model).to(torch.float32 if amp else dtype)
    with torch.inference_mode(), adaperceiver.use_backend(backend):
        if amp:
            with torch.autocast("cpu", dtype=dtype):
                return m(x.float(), token_grans=[16, 32, 50, 70], **kw).logits
        return m(x.to(dtype), token_grans=[16, 32, 50, 70], **kw).logits


@pytest.mark.parametrize("amp", [False, True], ids=["cast", "autocast"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("cfg", range(len(MODEL_CONFIGS)))
def test_model_rule(model, cfg, dtype, amp):
    """The whole model (model.to(dtype), or float32 weights under autocast) on the cpp backend
    against the same on the reference backend, both against the float64 model."""
    kw = MODEL_CONFIGS[cfg]
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(cfg)).to(dtype)
    ours = _logits(model, x, dtype, "cpp", amp, **kw)
    ref = _logits(model, x, dtype, "reference", amp, **kw)
    truth = _logits(model, x, torch.float64, "reference", **kw)
    assert_rule(ours, ref, truth, f"logits {kw}")


@pytest.mark.slow
def test_digits_top1_bf16_agrees_with_fp32(digits_run):
    """The digits recipe's trained model (its saved checkpoint) in bf16 against float32."""
    from adaperceiver.checkpoint import from_pretrained
    from adaperceiver.data import digits_split
    from adaperceiver.train.digits import DigitsRecipe
    _, out_dir = digits_run
    split = digits_split(DigitsRecipe().seed)
    model = from_pretrained(out_dir / "checkpoint").eval()
    x, y = split.x_test, split.y_test
    with torch.inference_mode():
        # logits (B, 1, classes): one readout
        top1_32 = (model(x).logits[:, 0].argmax(-1) == y).float().mean().item()
        mb = model.to(torch.bfloat16)
        top1_16 = (mb(x.bfloat16()).logits[:, 0].argmax(-1) == y).float().mean().item()
    assert top1_32 > 0.9, top1_32       # a trained model, or the comparison says nothing
    assert abs(top1_16 - top1_32) <= 0.005, (top1_32, top1_16)
