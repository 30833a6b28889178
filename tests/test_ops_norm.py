"""ops.layer_scale_residual / layer_norm / residual_layer_norm (adaperceiver/ops/norm.py) and the
extension's row kernel behind them (csrc/cpu/norm.cpp), against torch's addcmul and layer_norm:
the residual bit for bit, the norm within flash-attn's rule, NaN and inf where torch has them,
row and channel tails, strided inputs, the routing (the kernel without gradients for bfloat16 /
float16 outside autocast, for a float32 stream with a 16-bit branch, and for a float32 x whose
norm is asked for in bfloat16 / float16 (out_dtype); torch's ops otherwise), clear errors, and
the op's fallback to torch's ops off AVX-512 (in a child process: ADAPERCEIVER_CPU_ISA is read
once)."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from adaperceiver import _ext, ops
from adaperceiver.ops import norm as norm_mod

from helpers import case_id, flash_rule

pytestmark = pytest.mark.skipif(not _ext.available(),
                                reason=f"adaperceiver._C not loaded: {_ext.load_error()}")
NAN = float("nan")
DTYPES = [torch.bfloat16, torch.float16]
# leading shape, C: rows and channels that are not multiples of 16 (the vector width) or of the
# rows a parallel task takes, one row, a 3-d input, the model's width
SHAPES = [((37,), 832), ((5,), 50), ((1,), 17), ((3, 4), 33), ((300,), 64)]
EPS = 1e-6


def _poison_heap(shape):
    """Best effort: leave a NaN-filled freed block of the outputs' size for the allocator, so an
    element the kernel forgets to write shows up as NaN."""
    t = torch.full(shape, NAN)
    del t


def _inputs(lead, C, dtype, seed, affine=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, C, generator=g).to(dtype)
    br = torch.randn(*lead, C, generator=g).to(dtype)
    gamma = (torch.rand(C, generator=g) + 0.3).to(dtype)
    w = (torch.rand(C, generator=g) + 0.5).to(dtype) if affine else None
    b = (0.2 * torch.randn(C, generator=g)).to(dtype) if affine else None
    return x, br, gamma, w, b


def _norm_truth(r, w, b):
    return F.layer_norm(r.double(), (r.shape[-1],), None if w is None else w.double(),
                        None if b is None else b.double(), EPS)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count the row kernel's calls (and fail when the extension has none)."""
    k = norm_mod._kernel()
    assert k is not None, "the extension has no residual_layer_norm"
    calls = []

    def spy(*args):
        calls.append(args[6])   # normalize
        return k(*args)
    monkeypatch.setattr(norm_mod, "_kernel", lambda: spy)
    return calls


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,C", SHAPES, ids=[case_id(s, "lead C") for s in SHAPES])
def test_matches_torch(lead, C, dtype, affine, kernel_calls):
    """Each of the three ops against torch on fresh random inputs, outputs written into
    NaN-poisoned memory: the residual equal to addcmul's, bit for bit; the norm within 2x the
    plain torch error against float64, from the rounded residual."""
    x, br, gamma, w, b = _inputs(lead, C, dtype, seed=C + len(lead), affine=affine)
    with torch.inference_mode():
        _poison_heap(x.shape)
        r, n = ops.residual_layer_norm(x, br, gamma, w, b, EPS)
        _poison_heap(x.shape)
        r_only = ops.layer_scale_residual(x, br, gamma)
        _poison_heap(x.shape)
        n_only = ops.layer_norm(x, w, b, EPS)
    assert kernel_calls == [True, False, True]
    ref_r = torch.addcmul(x, br, gamma)
    assert torch.equal(r, ref_r) and torch.equal(r_only, ref_r)
    for got, src in ((n, ref_r), (n_only, x)):
        assert got.dtype == dtype and got.shape == x.shape
        plain = F.layer_norm(src, (C,), w, b, EPS)
        err, bound = flash_rule(got, plain, _norm_truth(src, w, b))
        assert err <= bound, (err, bound)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,C", SHAPES, ids=[case_id(s, "lead C") for s in SHAPES])
def test_float32_stream_with_16bit_branch(lead, C, dtype, kernel_calls):
    """Autocast's blocks: a float32 residual stream, a bfloat16 / float16 branch, float32
    parameters. The residual equal to torch's addcmul (which converts the branch first) bit for
    bit, in float32; the norm float32, within 2x torch's float32 error against float64; NaN-
    poisoned outputs. float32 throughout stays torch's (no kernel call)."""
    x, br, gamma, w, b = _inputs(lead, C, torch.float32, seed=3 * C + len(lead))
    br = br.to(dtype)
    with torch.inference_mode():
        _poison_heap(x.shape)
        r, n = ops.residual_layer_norm(x, br, gamma, w, b, EPS)
        _poison_heap(x.shape)
        r_only = ops.layer_scale_residual(x, br, gamma)
        ops.layer_scale_residual(x, br.float(), gamma)     # float32 throughout: torch's
        ops.layer_norm(x, w, b, EPS)                       # (no kernel call)
    assert kernel_calls == [True, False]
    ref_r = torch.addcmul(x, br, gamma)
    assert ref_r.dtype == torch.float32
    assert torch.equal(r, ref_r) and torch.equal(r_only, ref_r)
    assert n.dtype == torch.float32 and n.shape == x.shape
    plain = F.layer_norm(ref_r, (C,), w, b, EPS)
    err, bound = flash_rule(n, plain, _norm_truth(ref_r, w, b))
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("branch", [None, torch.bfloat16, torch.float16, torch.float32],
                         ids=["norm-only", "bf16-branch", "fp16-branch", "fp32-branch"])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,C", SHAPES, ids=[case_id(s, "lead C") for s in SHAPES])
def test_float32_norm_out_dtype_is_the_cast(lead, C, out_dtype, branch, kernel_calls):
    """A float32 stream whose norm feeds matmuls under autocast: ``out_dtype`` gives the norm
    rounded once to bfloat16 / float16, bit for bit the cast of the float32 norm the same call
    gives without it (NaN where it has NaN), written into NaN-poisoned memory, the residual
    unchanged; the kernel runs with and without a branch; within the rule against torch's
    layer_norm cast to the dtype. NaN, inf and -inf rows included."""
    x, br, gamma, w, b = _inputs(lead, C, torch.float32, seed=7 * C + len(lead))
    rows = x.view(-1, C)
    rows[0, C - 1] = NAN                      # the last channel: a vector tail
    if rows.shape[0] > 2:
        rows[1, 0] = math.inf
        rows[-1, C // 2] = -math.inf
    br = None if branch is None else br.to(branch)
    with torch.inference_mode():
        if br is None:
            ops.layer_norm(x, w, b, EPS, out_dtype=torch.float32)   # float32: torch's, no call
            _poison_heap(x.shape)
            n = ops.layer_norm(x, w, b, EPS, out_dtype=out_dtype)
            n32 = torch.ops.adaperceiver.residual_layer_norm(x, None, None, w, b, EPS, True)[1]
            r, r32 = x, x
        else:
            r32, n32 = torch.ops.adaperceiver.residual_layer_norm(x, br, gamma, w, b, EPS, True)
            _poison_heap(x.shape)
            r, n = ops.residual_layer_norm(x, br, gamma, w, b, EPS, out_dtype=out_dtype)
    assert kernel_calls == [True], "the row kernel takes a float32 x with a 16-bit norm"
    assert n.dtype == out_dtype and n.shape == x.shape and r.dtype == torch.float32
    torch.testing.assert_close(r, r32, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(n, n32.to(out_dtype), rtol=0, atol=0, equal_nan=True)
    ref_r = x if br is None else torch.addcmul(x, br, gamma)
    plain = F.layer_norm(ref_r, (C,), w, b, EPS).to(out_dtype)
    assert torch.equal(n.isnan(), plain.isnan()), "NaN pattern"
    fin = plain.isfinite()
    err, bound = flash_rule(n[fin], plain[fin], _norm_truth(ref_r, w, b)[fin])
    assert err <= bound, (err, bound)


def test_out_dtype_with_gradients_and_matmul_input_dtype(kernel_calls):
    """With gradients recorded the norm is torch's layer_norm cast to ``out_dtype`` (bit for
    bit, gradients through the cast), and a 16-bit x with another ``out_dtype`` is torch's too;
    ``matmul_input_dtype`` is autocast's 16-bit dtype for a float32 x under CPU autocast only."""
    x, br, gamma, w, b = _inputs((9,), 40, torch.float32, seed=11)
    wp, bp = (t.clone().requires_grad_(True) for t in (w, b))
    n = ops.layer_norm(x, wp, bp, EPS, out_dtype=torch.bfloat16)
    ref = F.layer_norm(x, (40,), w, b, EPS).to(torch.bfloat16)
    assert n.dtype == torch.bfloat16 and torch.equal(n, ref)
    n.float().sum().backward()
    assert wp.grad is not None and torch.isfinite(wp.grad).all()
    with torch.inference_mode():
        xb = x.bfloat16()
        got = ops.layer_norm(xb, w.bfloat16(), b.bfloat16(), EPS, out_dtype=torch.float16)
    assert kernel_calls == [] and got.dtype == torch.float16
    assert torch.equal(got, F.layer_norm(xb, (40,), w.bfloat16(), b.bfloat16(), EPS).half())
    assert ops.matmul_input_dtype(x) is None
    for dtype in DTYPES:
        with torch.autocast("cpu", dtype=dtype):
            assert ops.matmul_input_dtype(x) == dtype
            assert ops.matmul_input_dtype(x.bfloat16()) is None
            assert ops.matmul_input_dtype(x.double()) is None


@pytest.mark.parametrize("bad", [torch.int32, torch.bool, "bfloat16"], ids=str)
def test_out_dtype_must_be_a_float_dtype(bad):
    """ops.layer_norm / residual_layer_norm: an out_dtype that is not a float dtype is an error
    naming the parameter, its value and what is allowed (never a silent integer cast)."""
    x, br, gamma, w, b = _inputs((3,), 16, torch.float32, seed=6)
    for call in (lambda: ops.layer_norm(x, w, b, EPS, out_dtype=bad),
                 lambda: ops.residual_layer_norm(x, br, gamma, w, b, EPS, out_dtype=bad)):
        with pytest.raises(TypeError, match=r"out_dtype=.* is not allowed; allowed: None"):
            call()


@pytest.mark.parametrize("x_dtype,norm_dtype", [(torch.float32, torch.float64),
                                                (torch.bfloat16, torch.float16),
                                                (torch.float16, torch.float32)],
                         ids=["float32-to-float64", "bf16-to-fp16", "fp16-to-fp32"])
def test_kernel_rejects_a_norm_dtype_it_cannot_write(x_dtype, norm_dtype):
    """The kernel's norm_dtype: x's dtype, or bfloat16 / float16 for a float32 x; anything else
    is an error naming the parameter, the value and what is allowed."""
    x, _, _, w, b = _inputs((4,), 24, x_dtype, seed=4)
    with pytest.raises(RuntimeError) as e:
        torch.ops.adaperceiver.residual_layer_norm(x, None, None, w, b, EPS, True, norm_dtype)
    msg = str(e.value)
    got = {torch.float64: "Double", torch.float16: "Half", torch.float32: "Float"}[norm_dtype]
    assert "norm_dtype must be x's dtype" in msg and msg.endswith("got " + got), msg


@pytest.mark.parametrize("branch", [True, False], ids=["residual", "norm-only"])
def test_kernel_float32_throughout(branch):
    """The kernel called directly on float32 x and branch (the Python ops leave that case to
    torch, whose float32 kernels run at memory speed): the residual bit for bit addcmul's, the
    norm within the rule against float64, on tails (C = 33)."""
    x, br, gamma, w, b = _inputs((29,), 33, torch.float32, seed=17)
    k = torch.ops.adaperceiver.residual_layer_norm
    with torch.inference_mode():
        _poison_heap(x.shape)
        r, n = k(x, br if branch else None, gamma if branch else None, w, b, EPS, True)
    src = torch.addcmul(x, br, gamma) if branch else x
    if branch:
        assert r.dtype == torch.float32 and torch.equal(r, src)
    else:
        assert r.numel() == 0
    plain = F.layer_norm(src, (33,), w, b, EPS)
    err, bound = flash_rule(n, plain, _norm_truth(src, w, b))
    assert n.dtype == torch.float32 and err <= bound, (err, bound)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32], ids=str)
def test_nan_and_inf_where_torch_has_them(dtype, kernel_calls):
    """A NaN in x, an inf in the branch, a -inf in x and an inf in gamma (a whole column): the
    residual equal to addcmul's NaN for NaN, the norm NaN in exactly the rows and places torch's
    is, its finite values within the rule."""
    x, br, gamma, w, b = _inputs((23,), 70, dtype, seed=5)
    if dtype == torch.float32:    # autocast's blocks: a 16-bit branch on the float32 stream
        br = br.bfloat16()
    x[3, 7] = NAN
    br[9, 69] = math.inf          # the last channel (a vector tail)
    x[15, 0] = -math.inf
    g2 = gamma.clone()
    g2[40] = math.inf             # every row's channel 40 infinite, or NaN where branch is 0
    br[20, 40] = 0.0
    with torch.inference_mode():
        r, n = ops.residual_layer_norm(x, br, gamma, w, b, EPS)
        r2, n2 = ops.residual_layer_norm(x, br, g2, w, b, EPS)
    assert len(kernel_calls) == 2
    for got_r, got_n, gm in ((r, n, gamma), (r2, n2, g2)):
        ref_r = torch.addcmul(x, br, gm)
        torch.testing.assert_close(got_r, ref_r, rtol=0, atol=0, equal_nan=True)
        plain = F.layer_norm(ref_r, (70,), w, b, EPS)
        assert torch.equal(got_n.isnan(), plain.isnan()), "NaN pattern"
        assert torch.equal(got_n.isinf(), plain.isinf()), "inf pattern"
        fin = plain.isfinite()
        truth = _norm_truth(ref_r, w, b)
        err, bound = flash_rule(got_n[fin], plain[fin], truth[fin])
        assert err <= bound, (err, bound)
    assert n[3].isnan().all() and n[9].isnan().all() and n[15].isnan().all()
    assert not n[0].isnan().any() and n2.isnan().all()


def test_strided_inputs_and_thread_counts(kernel_calls):
    """x and branch as strided views (a column slice, a transpose) and gamma and the weight as
    strided vectors give the values of their contiguous copies; one and two threads give the
    same bits (rows are independent)."""
    base = torch.randn(40, 2 * 96).bfloat16()
    x = base[:, :96]                                   # row stride 192
    br = torch.randn(96, 40).bfloat16().t()            # transposed
    _, _, gamma, w, b = _inputs((1,), 96, torch.bfloat16, seed=3)
    gamma = torch.stack([gamma, -gamma], 1)[:, 0]      # every other value of a pair list
    w = torch.stack([w.flip(0), w], 1)[:, 1]
    assert gamma.stride(0) == 2 and w.stride(0) == 2
    old = torch.get_num_threads()
    try:
        with torch.inference_mode():
            r, n = ops.residual_layer_norm(x, br, gamma, w, b, EPS)
            rc, nc = ops.residual_layer_norm(x.contiguous(), br.contiguous(),
                                             gamma.contiguous(), w.contiguous(), b, EPS)
            torch.set_num_threads(1)
            r1, n1 = ops.residual_layer_norm(x, br, gamma, w, b, EPS)
    finally:
        torch.set_num_threads(old)
    assert len(kernel_calls) == 3
    assert torch.equal(r, rc) and torch.equal(n, nc) and torch.equal(r, r1) and torch.equal(n, n1)


def test_routing(kernel_calls):
    """The kernel runs without gradients only: with parameters that require grad (training)
    the ops are torch's and give torch's gradients; float32 throughout, a 16-bit x under
    autocast, a broadcast branch and mixed parameter dtypes go to torch too; autocast's float32
    stream with a bf16 branch takes the kernel."""
    x, br, gamma, w, b = _inputs((6,), 24, torch.bfloat16, seed=1)
    gp, wp, bp = (t.clone().requires_grad_(True) for t in (gamma, w, b))
    r, n = ops.residual_layer_norm(x, br, gp, wp, bp, EPS)
    (r.sum() + (n * n).sum()).backward()
    gq, wq, bq = (t.clone().requires_grad_(True) for t in (gamma, w, b))
    rr = torch.addcmul(x, br, gq)
    (rr.sum() + (F.layer_norm(rr, (24,), wq, bq, EPS) ** 2).sum()).backward()
    for a, c in ((gp, gq), (wp, wq), (bp, bq)):
        torch.testing.assert_close(a.grad, c.grad, rtol=0, atol=0)
    assert kernel_calls == []
    with torch.no_grad():
        ops.layer_norm(x, wp, bp, EPS)                 # no_grad: the kernel
        ops.layer_scale_residual(x, br[:1], gamma)     # broadcast branch: torch
        f32 = ops.layer_norm(x.float(), w.float(), b.float(), EPS)  # float32: torch's
        assert torch.equal(f32, F.layer_norm(x.float(), (24,), w.float(), b.float(), EPS))
        with pytest.raises(RuntimeError, match="mixed dtype"):  # mixed dtypes: torch's
            ops.layer_norm(x.float(), w.double(), b.double(), EPS)  # error, not the kernel's
    assert kernel_calls == [True]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.layer_norm(x, w, b, EPS)             # autocast's own rule for layer_norm
        ref = F.layer_norm(x, (24,), w, b, EPS)
    assert kernel_calls == [True] and out.dtype == ref.dtype and torch.equal(out, ref)
    # autocast's blocks: the float32 stream with the bf16 branch takes the kernel (float32
    # results); with gradients recorded, torch's ops and torch's gradients
    xf, gf, wf, bf = (t.float() for t in (x, gamma, w, b))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        r, n = ops.residual_layer_norm(xf, br, gf, wf, bf, EPS)
    assert kernel_calls == [True, True] and r.dtype == n.dtype == torch.float32
    xg = xf.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r, n = ops.residual_layer_norm(xg, br, gf, wf, bf, EPS)
    (n * n).sum().backward()
    xq = xf.clone().requires_grad_(True)
    (F.layer_norm(torch.addcmul(xq, br, gf), (24,), wf, bf, EPS) ** 2).sum().backward()
    assert kernel_calls == [True, True] and torch.equal(xg.grad, xq.grad)


@pytest.mark.parametrize("bad,what", [
    (lambda x, br, g, w, b: (x, br, g[:-1], w, b), "gamma must be a (24,)"),
    (lambda x, br, g, w, b: (x, br, g, w.double(), b), "weight must be a (24,)"),
    (lambda x, br, g, w, b: (x, br[:, :-1], g, w, b), "branch must match x"),
    (lambda x, br, g, w, b: (x, br, None, w, b), "gamma (the LayerScale) is required"),
    (lambda x, br, g, w, b: (x, br, g, w, None), "weight and bias must be given together"),
    (lambda x, br, g, w, b: (x.double(), None, None, None, None),
     "x must be bfloat16, float16 or float32"),
    (lambda x, br, g, w, b: (x, br.float(), g, w, b), "a float32 x also takes a bfloat16"),
], ids=["gamma-size", "weight-dtype", "branch-shape", "no-gamma", "bias-missing", "float64-x",
        "float32-branch-on-bf16-x"])
def test_kernel_errors_name_the_parameter(bad, what):
    """The kernel itself (called directly) rejects what it cannot compute, naming the argument,
    its value and what is allowed."""
    args = bad(*_inputs((6,), 24, torch.bfloat16, seed=2))
    with pytest.raises(RuntimeError, match=None) as e:
        torch.ops.adaperceiver.residual_layer_norm(*args, EPS, True)
    assert what in str(e.value), str(e.value)


def test_torch_fallback_in_a_child():
    """Where the kernel's AVX-512 path does not run (ADAPERCEIVER_CPU_ISA=portable, read once,
    so in a child process) the op runs torch's addcmul and layer_norm: the same tests pass."""
    res = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x",
                          "-p", "no:cacheprovider", "-k",
                          "matches_torch or nan_and_inf or float32_stream or out_dtype"],
                         env=dict(os.environ, ADAPERCEIVER_CPU_ISA="portable"),
                         capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
