"""NaN and inf through the C++ CPU kernels (csrc/cpu): the reference's pattern, never a number.

One element of q, k or v poisoned with NaN, +inf or -inf, or a NaN / infinite scale: the cpp
backend's output must be NaN / +inf / -inf exactly where the plain PyTorch reference's is (rows
a sample owns; lse everywhere), and every other element must equal the cpp backend's own
output on the clean inputs bit for bit. Forward and backward (per head: the same heads get
non-finite gradients, the other heads' gradients are unchanged), padded and packed rows, RoPE,
token granularities, seq_lens, float32 / bfloat16 / float16, and every instruction-set path of
the attention this CPU has (ADAPERCEIVER_CPU_ISA in a child process: amx, bfloat16 / float16
products on AMX tiles; avx512, avx2, portable: the float32 microkernel; unset on a CPU with
AVX512-BF16 and no AMX, the parent itself: bfloat16 products on AVX512-BF16 dot products).

The reference sums over the (query, key) pairs a row reads, as the kernels do: rows past a
sample's length are zeros (lse -inf) and a value row v[j] reaches only the rows that attend to
key j (tested below). The one slack a tile has, 0 * NaN where a tile crossing a group boundary
meets a poisoned v (or, backward, q/k/v) at a pair some of its rows do not read, is bounded in
tests/test_nan_propagation.py.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from adaperceiver import _ext
from adaperceiver.ops import cpp_backend as C
from adaperceiver.ops import reference as R
from adaperceiver.ops.inputs import AttentionInputs, FfnInputs, PackedAttentionInputs

pytestmark = pytest.mark.skipif(not _ext.available(),
                                reason=f"adaperceiver._C not loaded: {_ext.load_error()}")

NAN, INF = float("nan"), float("inf")
B, H, N, D = 2, 3, 45, 16          # N: a full 32-row tile and a tail of 13
GRANS = [8, 20, 45]
LENS = [45, 30]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (tensor, (b, h, row, d)): a q row of sample 1 inside its length; a k row every later row
# sees; a v row every row sees (key < the first granularity: no tile skips it)
POISON_AT = {"q": (1, 1, 12, 3), "k": (0, 2, 10, 5), "v": (1, 0, 3, 7)}


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, go = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(4))
    return q, k, v, go


def _pattern(t):
    t = t.float()
    return torch.stack((t.isnan(), t.isposinf(), t.isneginf()))


def _rows_owned(lens):
    """(B, 1, N, 1) bool: rows < seq_lens[b]."""
    if lens is None:
        return torch.ones(B, 1, N, 1, dtype=torch.bool)
    return (torch.arange(N)[None, :] < torch.tensor(lens)[:, None])[:, None, :, None]


def _untouched(poison, lens):
    """(B, H, N, D) bool: the output rows that do not depend on the poisoned element: other
    heads, other rows (q), rows whose group ends at or before the poisoned key (k, v)."""
    far = torch.ones(B, H, N, D, dtype=torch.bool)
    if poison == "scale":
        return far & False
    b, h, j = POISON_AT[poison][:3]
    if poison == "q":
        far[b, h, j] = False
    else:
        row_end = torch.tensor([next(g for g in GRANS + [N] if g > i) for i in range(N)])
        far[b, h, row_end > j] = False
    return far


def _poisoned(poison, value, q, k, v, scale):
    """(q, k, v, scale) with ``poison`` ("q", "k", "v" at POISON_AT, or "scale") set to
    ``value``; the inputs are not changed."""
    if poison == "scale":
        return q, k, v, value
    t = {"q": q, "k": k, "v": v}[poison].clone()
    t[POISON_AT[poison]] = value
    return (*(t if n == poison else x for n, x in zip("qkv", (q, k, v))), scale)


def _forward(q, k, v, token_grans=None, **kw):
    """(out, lse) of the C++ attention forward (called directly, not through the op)."""
    return C.attention_forward(AttentionInputs.build(q, k, v, token_grans, **kw))


def _backward(go, q, k, v, **kw):
    """(dq, dk, dv) of the C++ attention backward, after its forward."""
    inputs = AttentionInputs.build(q, k, v, **kw)
    return C.attention_backward(inputs, go, *C.attention_forward(inputs))


def _check_forward(poison, value, dtype, rope, lens):
    q, k, v, _ = _inputs(dtype)
    scale = 1.0 / math.sqrt(D)
    clean = (q, k, v, scale)
    q, k, v, scale = _poisoned(poison, value, q, k, v, scale)
    tables = R.rope_tables(N, D) if rope else None
    sl = None if lens is None else torch.tensor(lens)
    kw = dict(token_grans=GRANS, seq_lens=sl, q_rope=tables, k_rope=tables)
    out, lse = _forward(q, k, v, scale=scale, **kw)
    ref, ref_lse = R.attention_forward(q.float(), k.float(), v.float(), scale=scale, **kw)
    base, base_lse = _forward(clean[0], clean[1], clean[2], scale=clean[3], **kw)
    owned = _rows_owned(lens).expand(B, H, N, D)
    assert torch.equal(_pattern(out)[:, owned], _pattern(ref)[:, owned]), \
        f"{poison}={value}: NaN/inf pattern of out differs from the reference"
    assert torch.equal(_pattern(lse), _pattern(ref_lse)), \
        f"{poison}={value}: NaN/inf pattern of lse differs from the reference"
    # something must be non-finite, or the case tests nothing
    assert not out[owned].float().isfinite().all(), f"{poison}={value} poisoned nothing"
    # rows the poison cannot reach: bit for bit the clean output; the other finite elements
    # (a key at -inf weighs 0, a +-inf value gives +-inf only where its weight is not 0) close
    # to the reference
    far = _untouched(poison, lens)
    assert torch.equal(out[far], base[far]), f"{poison}={value}: untouched rows changed"
    assert torch.equal(lse[far[..., 0]], base_lse[far[..., 0]])
    fin = torch.isfinite(ref) & owned
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out[fin].float(), ref[fin], rtol=tol, atol=tol)
    if lens is not None:  # rows past a length: zeros, whatever the poison
        assert torch.equal(out[~owned], torch.zeros_like(out[~owned]))
    return out, lse


CASES = [(p, v) for p in "qkv" for v in (NAN, INF, -INF)] + [("scale", v) for v in
                                                              (NAN, INF, -INF)]


@pytest.mark.parametrize("poison,value", CASES, ids=[f"{p}={v}" for p, v in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_forward_nan_pattern(poison, value, dtype):
    for rope in (False, True):
        for lens in (None, LENS):
            _check_forward(poison, value, dtype, rope, lens)


def _check_backward(poison, value, dtype):
    q, k, v, go = _inputs(dtype, seed=1)
    scale = 1.0 / math.sqrt(D)
    kw = dict(token_grans=GRANS, seq_lens=torch.tensor(LENS),
              q_rope=R.rope_tables(N, D), k_rope=R.rope_tables(N, D))
    base = _backward(go, q, k, v, scale=scale, **kw)
    q, k, v, scale = _poisoned(poison, value, q, k, v, scale)
    grads = _backward(go, q, k, v, scale=scale, **kw)
    qf, kf, vf, gf = (t.float() for t in (q, k, v, go))
    ref = R.attention_backward(gf, qf, kf, vf, *R.attention_forward(qf, kf, vf, scale=scale,
                                                                     **kw), scale=scale, **kw)
    any_bad = False
    for name, g, r, g0 in zip(("dq", "dk", "dv"), grads, ref, base):
        bad = ~g.float().isfinite().flatten(2).all(-1)     # (B, H): a head with a non-finite
        bad_ref = ~r.isfinite().flatten(2).all(-1)
        assert torch.equal(bad, bad_ref), f"{poison}={value}: heads with non-finite {name}"
        any_bad |= bool(bad.any())
        ok = ~bad
        assert torch.equal(g[ok], g0[ok]), f"{poison}={value}: {name} of clean heads changed"
    assert any_bad, f"{poison}={value} poisoned no gradient"


@pytest.mark.parametrize("poison,value", CASES, ids=[f"{p}={v}" for p, v in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_backward_nan_heads(poison, value, dtype):
    _check_backward(poison, value, dtype)


@pytest.mark.parametrize("poison,value", [("q", NAN), ("k", INF), ("v", -INF), ("scale", NAN)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_attention_nan_pattern(poison, value, dtype):
    """The packed-rows kernel gives the padded kernel's pattern and values on the owned rows."""
    out, lse = _check_forward(poison, value, dtype, True, LENS)
    q, k, v, _ = _inputs(dtype)
    scale = 1.0 / math.sqrt(D)
    q, k, v, scale = _poisoned(poison, value, q, k, v, scale)
    pack = lambda x: torch.cat([x[b, :, :n].transpose(0, 1) for b, n in enumerate(LENS)])  # noqa: E731
    tables = R.rope_tables(max(LENS), D)
    pout, plse = C.attention_varlen_forward(PackedAttentionInputs.build(
        pack(q), pack(k), pack(v), LENS, GRANS, scale=scale, q_rope=tables, k_rope=tables))
    want = pack(out)
    assert torch.equal(_pattern(pout), _pattern(want))
    fin = want.float().isfinite()
    torch.testing.assert_close(pout[fin].float(), want[fin].float(), rtol=0, atol=1e-6)
    assert torch.equal(_pattern(plse), _pattern(lse))


def test_value_rows_a_tile_never_reads_stay_out():
    """v[j] poisoned: rows whose tiles end below key j are exact, as the reference's (which
    sums over the pairs a row reads); the rows that attend to key j are NaN in both."""
    n, grans = 100, [32, 64, 100]
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, D, generator=g) for _ in range(3))
    base, _ = _forward(q, k, v, grans)
    v[0, 1, 80, 4] = NAN
    out, _ = _forward(q, k, v, grans)
    ref, _ = R.attention_forward(q, k, v, grans)
    assert ref[0, 1, 64:].isnan().any(-1).all()             # the reference: rows reading it
    assert not ref[0, 1, :64].isnan().any()
    assert out[0, 1, 64:].isnan().any(-1).all()             # rows that see key 80
    assert torch.equal(out[0, 1, :64], base[0, 1, :64])     # rows that never read it
    assert torch.equal(out[0, 0], base[0, 0])               # the other head


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_value_rows_reach_only_gradients_that_read_them(value, dtype):
    """Backward, v[j] poisoned, grans that split a query tile (20, 40 inside tiles of 32 or 64
    rows) and keys in two chunks (300 > 256): dv stays finite, dq is non-finite exactly on the
    rows that see key j (their out, so delta = dO . out, is), dk where those rows read, element
    by element as in the reference (dP's column j meets a row's mask by replacement, not by
    0 * NaN); the other elements are the clean run's (up to the rounding of the forward's redone
    rows). bfloat16 / float16 run the AMX tiles' backward where build_info says so, float32 the
    float32 backward."""
    n, grans, d = 300, [20, 40, 130, 300], 64
    g = torch.Generator().manual_seed(8)
    q, k, v, go = (torch.randn(1, 2, n, d, generator=g).to(dtype) for _ in range(4))
    base = _backward(go, q, k, v, token_grans=grans, scale=0.125)
    for j, first_row in ((25, 20), (270, 130)):        # first_row: the first row that sees j
        vp = v.clone()
        vp[0, 1, j, 5] = value
        grads = _backward(go, q, k, vp, token_grans=grans, scale=0.125)
        qf, kf, vf, gf = (t.float() for t in (q, k, vp, go))
        ref = R.attention_backward(gf, qf, kf, vf, *R.attention_forward(
            qf, kf, vf, grans, 0.125), grans, 0.125)
        for name, got, want, clean in zip(("dq", "dk", "dv"), grads, ref, base):
            assert torch.equal(_pattern(got), _pattern(want)), f"v[{j}]={value}: {name}"
            fin = want.isfinite()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got[fin].float(), clean[fin].float(), rtol=tol, atol=tol,
                                       msg=f"v[{j}]={value}: {name} elsewhere")
            assert torch.equal(got[0, 0], clean[0, 0]), f"{name}: the other head changed"
        bad_q = ~grads[0][0, 1].float().isfinite().all(-1)
        assert bad_q[first_row:].all() and not bad_q[:first_row].any()
        assert grads[2].float().isfinite().all()


FFN_HIDDEN = [40, 17, 29]


def _ffn_poisoned(where, idx, value, dtype, seed, Nf=7):
    """The FFN's arguments (3 samples of Nf rows, C = Cout = 24, Hmax = 40, widths FFN_HIDDEN)
    with args[where][idx] set to value, the clean run's output and the poisoned run's."""
    g = torch.Generator().manual_seed(seed)
    Bf, Cf, Hf = 3, 24, 40
    args = {"x": torch.randn(Bf, Nf, Cf, generator=g),
            "fc1_weight": torch.randn(Hf, Cf, generator=g) / 4,
            "fc1_bias": torch.randn(Hf, generator=g),
            "fc2_weight": torch.randn(Cf, Hf, generator=g) / 4,
            "fc2_bias": torch.randn(Cf, generator=g)}
    args = {k: t.to(dtype) for k, t in args.items()}
    base = C.ffn_forward(FfnInputs.build(*args.values(), FFN_HIDDEN))
    args[where] = args[where].clone()
    args[where][idx] = value
    return args, base, C.ffn_forward(FfnInputs.build(*args.values(), FFN_HIDDEN))


FFN_CASES = [("x", (1, 3, 5)), ("fc1_weight", (4, 7)), ("fc1_bias", (2,)),
             ("fc2_weight", (6, 3)), ("fc2_bias", (9,))]


@pytest.mark.parametrize("where,idx", FFN_CASES, ids=[c[0] for c in FFN_CASES])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ffn_nan_pattern(where, idx, value, dtype):
    """The Matryoshka FFN (forward, mixed widths): the reference's pattern, poisoned units
    inside every sample's width (past it the reference's 0/1 mask gives 0 * NaN)."""
    args, base, out = _ffn_poisoned(where, idx, value, dtype, seed=3)
    # (torch's float32 / bfloat16 / float16 GELU, and oneDNN's, give NaN for +inf, not the
    # exact +inf of float64: the kernels follow the reference in that too)
    ref = R.ffn_forward(*(t.float() for t in args.values()), FFN_HIDDEN)
    assert torch.equal(_pattern(out), _pattern(ref)), f"{where}={value}"
    assert not out.float().isfinite().all()
    fin = ref.isfinite()
    assert torch.equal(out[fin], base[fin])


def _one_pair_path(dtype, rows) -> bool:
    """Whether the CPU FFN runs a batch of several widths as one GEMM pair at its widest width
    (csrc/ffn_banded.cpp, padded_pair): bf16 / fp16 where oneDNN runs the dtype on AMX (the
    attention's tile test says so) and at most 512 rows."""
    from adaperceiver.ops.linear import cpu_gemm_library
    info = _ext.build_info()
    key = {torch.bfloat16: "cpu_attention_bf16", torch.float16: "cpu_attention_fp16"}.get(dtype)
    return (key is not None and info[key] == "amx" and rows <= 512
            and cpu_gemm_library() == "onednn")


@pytest.mark.parametrize("where,idx", [("fc1_weight", (20, 3)), ("fc1_bias", (20,)),
                                       ("fc2_weight", (5, 20))], ids=["fc1_weight", "fc1_bias",
                                                                      "fc2_weight"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ffn_units_past_a_width(where, idx, dtype):
    """Unit 20 poisoned (NaN), inside the widths of samples 0 and 2 (40, 29), past sample 1's
    (17). Samples 0 and 2: the reference's NaN pattern. Sample 1, which the reference makes NaN
    through its 0/1 mask (0 * NaN): from fc1's row or bias, the clean run's values (the kernels
    do not compute the unit); from fc2's column, NaN in that output column on the one-pair path
    for small bf16 / fp16 batches (a 0 activation times the column, as in the reference), the
    clean run's values on every other path (docs/design.md, the FFN contract)."""
    args, base, out = _ffn_poisoned(where, idx, NAN, dtype, seed=11)
    Nf, Cf = 7, 24
    ref = R.ffn_forward(*(t.float() for t in args.values()), FFN_HIDDEN)
    assert ref[1].isnan().any(), "the reference's mask: 0 * NaN"
    for b in (0, 2):
        assert torch.equal(_pattern(out[b]), _pattern(ref[b])), f"sample {b}"
    if where == "fc2_weight" and _one_pair_path(dtype, 3 * Nf):
        assert torch.equal(_pattern(out[1]), _pattern(ref[1]))
        assert out[1, :, 5].isnan().all()
        keep = torch.arange(Cf) != 5
        assert torch.equal(out[1][:, keep], base[1][:, keep])
    else:
        assert torch.equal(out[1], base[1]), "sample 1 reads nothing of unit 20"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ffn_fc2_column_past_widths_in_their_own_row_blocks(dtype):
    """As above with 32 rows a sample, so that on the bf16 tile GEMM each sample is its own
    block of 32 rows, and fc2's column 35 poisoned: past the widths of samples 1 and 2 (17, 29)
    and past their widths rounded up to a K step of 32, inside the batch's widest (40). On the
    one-pair path both get NaN in that output column whatever their own block's widths (every
    K step runs: a 0 activation times the column, as in the reference); elsewhere the clean
    run's values."""
    args, base, out = _ffn_poisoned("fc2_weight", (5, 35), NAN, dtype, seed=13, Nf=32)
    ref = R.ffn_forward(*(t.float() for t in args.values()), FFN_HIDDEN)
    assert torch.equal(_pattern(out[0]), _pattern(ref[0]))
    keep = torch.arange(24) != 5
    for b in (1, 2):
        if _one_pair_path(dtype, 3 * 32):
            assert torch.equal(_pattern(out[b]), _pattern(ref[b])), f"sample {b}"
            assert out[b, :, 5].isnan().all()
            assert torch.equal(out[b][:, keep], base[b][:, keep])
        else:
            assert torch.equal(out[b], base[b]), f"sample {b} reads nothing of unit 35"


def _isas():
    caps = torch._C._cpu._get_cpu_capability()
    have = ["portable"] + (["avx2"] if caps.get("avx2") and caps.get("fma3") else []) + \
        (["avx512"] if caps.get("avx512_f") else []) + \
        (["amx"] if caps.get("avx512_f") and caps.get("amx_tile") and caps.get("amx_bf16")
         else [])
    return have


def _this_path():
    """This process's attention path: "amx" or "avx512-bf16" when bfloat16 runs its products
    in 16 bits (on AMX tiles, on AVX512-BF16 dot products; float32 on the microkernel's
    instruction set), else that instruction set."""
    info = _ext.build_info()
    lowp = info["cpu_attention_bf16"]
    return lowp if lowp != "float32" else info["cpu_isa"]


@pytest.mark.parametrize("isa", ["amx", "avx512", "avx2", "portable"])
def test_every_isa_path(isa):
    """This file's attention tests again in a child process whose kernels run on another
    instruction-set path (the parent runs the best one; avx512 below amx runs bfloat16 /
    float16 through the float32 kernel instead of the AMX tiles)."""
    if isa not in _isas():
        pytest.skip(f"this CPU has no {isa}")
    if isa == _this_path():
        pytest.skip(f"{isa} is this process's path (the tests above ran it)")
    env = dict(os.environ, ADAPERCEIVER_CPU_ISA=isa, ADAPERCEIVER_NAN_CHILD=isa)
    res = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x",
                          "-p", "no:cacheprovider", "-k", "not every_isa and not ffn"],
                         env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


def test_child_runs_the_requested_isa():
    want = os.environ.get("ADAPERCEIVER_NAN_CHILD")
    if not want:
        pytest.skip("runs in test_every_isa_path's child processes")
    info = _ext.build_info()
    assert info["cpu_isa"] == ("avx512" if want == "amx" else want)
    assert info["cpu_attention_bf16"] == ("amx" if want == "amx" else "float32")
