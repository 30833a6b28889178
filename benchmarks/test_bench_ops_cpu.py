"""CPU extension (adaperceiver._C) vs torch baselines, side by side, 2 threads, float32 and
bfloat16 (the bf16 cases on CPUs that run bf16 natively, AVX512-BF16 / AMX: both sides in bf16).

Targets (issue text):
  * block-masked attention vs torch SDPA with a dense boolean mask, B=8, H=13, D=64:
    >= 1.25x at N=256 with the released grans, >= 1.8x at N=1024 with grans every 64 (float32
    and bfloat16; float16 reported; each line names the kernel that ran: AMX tiles, AVX512-BF16
    dot products or float32, and a 16-bit kernel's line its speed-up over the float32 kernel);
  * Matryoshka FFN, one batch of mixed widths: <= 1.1x the sum of the same samples run in
    single-width batches, and >= 0.95 x (B*Hmax)/sum(widths) times faster than the masked
    full-width reference.
  * (report only) the model's projection GEMMs, ops.linear against F.linear (MKL) in float32,
    against oneDNN on a weight reordered once in bf16 (what a cache of reordered weights could
    at most save) and against oneDNN's GEMM in fp16; the block's residual + LayerNorm row kernel against torch's addcmul +
    layer_norm.
Run: pytest benchmarks/test_bench_ops_cpu.py -s  (the ratios are printed; set
ADAPERCEIVER_BENCH_ASSERT=0 to only report them, e.g. on a loaded machine).
Timing: the two sides alternate call by call and the median of each is compared, so drifts
in machine load hit both sides alike.
"""
import itertools
import math
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from adaperceiver import _ext
from adaperceiver.bench.timing import time_interleaved
from adaperceiver.ops import reference as R
from adaperceiver.ops.schedule import block_mask

pytestmark = pytest.mark.skipif(not _ext.available(),
                                reason=f"adaperceiver._C not loaded: {_ext.load_error()}")
ASSERT = os.environ.get("ADAPERCEIVER_BENCH_ASSERT", "1") != "0"


@pytest.fixture(autouse=True)
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def side_by_side(fns: dict, rounds: int = 15, warmup: int = 2) -> dict:
    """Median wall time (s) of each callable, calls interleaved round-robin."""
    res = time_interleaved(list(fns.values()), "cpu", warmup=warmup, rounds=rounds)
    return {k: r.median_ms / 1e3 for k, r in zip(fns, res)}


ATTN = [
    pytest.param(256, [32, 64, 96, 128, 192, 256], 1.25, id="N256-released-grans"),
    pytest.param(1024, list(range(64, 1025, 64)), 1.8, id="N1024-grans-every-64"),
]


def _native(dtype):
    """Skip a bfloat16 case where the CPU has no native bf16 (it would compute in float32)."""
    if dtype == torch.bfloat16 and not _ext.build_info()["cpu_native_bf16"]:
        pytest.skip("no native bf16 on this CPU (AVX512-BF16 / AMX-BF16)")


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}
# float16 attention: report only (the issue's targets are float32 and bfloat16's); it runs on
# AMX tiles only on CPUs with AMX-FP16, else in float32 (build_info's cpu_attention_fp16)
PRODUCTS = {"amx": "AMX tiles", "avx512-bf16": "AVX512-BF16 products"}
ATTN_DTYPES = DTYPES + [pytest.param(torch.float16, id="fp16")]


def _attention_path(dtype):
    """Which kernel the attention forward runs for dtype (the bench line names it)."""
    if dtype == torch.float32:
        return "float32 " + _ext.build_info()["cpu_isa"]
    tag = "bf16" if dtype == torch.bfloat16 else "fp16"
    path = _ext.build_info()[f"cpu_attention_{tag}"]
    return PRODUCTS.get(path) or "float32 " + _ext.build_info()["cpu_isa"]


def _float32_inside(fn):
    """fn with torch.backends.mkldnn off: the 16-bit attention's products then run in float32
    (inputs converted as they are read), the kernel a 16-bit path is measured against."""
    def run():
        old = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            return fn()
        finally:
            torch.backends.mkldnn.enabled = old
    return run


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("n,grans,target", ATTN)
def test_attention_vs_sdpa_dense_mask(benchmark, n, grans, target, dtype):
    _native(dtype)
    if dtype == torch.float16 and not _ext.build_info()["cpu_native_fp16"]:
        pytest.skip("no native fp16 on this CPU (AVX512-FP16 / AMX-FP16)")
    B, H, D = 8, 13, 64
    q, k, v = (torch.randn(B, H, n, D).to(dtype) for _ in range(3))
    mask = block_mask(n, grans)
    scale = 1.0 / math.sqrt(D)
    ours = lambda: torch.ops.adaperceiver.block_masked_attention_fwd(  # noqa: E731
        q, k, v, grans, scale, None, None, None, None, None)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    # same result first (a fast wrong kernel is no win)
    torch.testing.assert_close(ours()[0], sdpa(), atol=TOL[dtype], rtol=TOL[dtype])
    fns = {"ours": ours, "sdpa": sdpa}
    sixteen = dtype != torch.float32 and _attention_path(dtype) in PRODUCTS.values()
    if sixteen:
        fns["f32"] = _float32_inside(ours)
    t = side_by_side(fns, rounds=15 if n == 256 else 7)
    ratio = t["sdpa"] / t["ours"]
    allowed = block_mask(n, grans).float().mean().item()
    report_only = dtype == torch.float16
    inside = (f", float32 inside {t['f32'] * 1e3:.2f} ms ({t['f32'] / t['ours']:.2f}x)"
              if sixteen else "")
    print(f"\n[attention N={n} {str(dtype)[6:]}, {_attention_path(dtype)}] sdpa+dense mask "
          f"{t['sdpa'] * 1e3:.2f} ms, cpp {t['ours'] * 1e3:.2f} ms: {ratio:.2f}x ("
          f"{'report only' if report_only else f'target {target}x'}; scores allowed "
          f"{allowed:.3f}){inside}")
    benchmark.extra_info.update(ratio=ratio, sdpa_ms=t["sdpa"] * 1e3, ours_ms=t["ours"] * 1e3,
                                path=_attention_path(dtype))
    benchmark.pedantic(ours, rounds=3, iterations=1)
    if ASSERT and not report_only:
        assert ratio >= target, f"{ratio:.2f}x < {target}x"


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("n,grans,target", ATTN)
def test_attention_backward_vs_sdpa_dense_mask(benchmark, n, grans, target, dtype):
    """Report only (no target in the issue): the 16-bit attention backward (dq, dk, dv from the
    forward's out and lse) in 16 bits against the float32-inside backward on the same inputs
    (torch.backends.mkldnn off for that call: 16-bit inputs converted up front) and against
    SDPA's backward with a dense boolean mask (autograd of its forward, graph kept), all in
    dtype, timed side by side."""
    tag = "bf16" if dtype == torch.bfloat16 else "fp16"
    if _ext.build_info()[f"cpu_attention_bwd_{tag}"] == "float32":
        pytest.skip(f"the {tag} attention backward runs in float32 here (no 16-bit products)")
    B, H, D = 8, 13, 64
    q, k, v, go = (torch.randn(B, H, n, D).to(dtype) for _ in range(4))
    scale = 1.0 / math.sqrt(D)
    out, lse = torch.ops.adaperceiver.block_masked_attention_fwd(q, k, v, grans, scale, None,
                                                                 None, None, None, None)
    ours = lambda: torch.ops.adaperceiver.block_masked_attention_bwd(  # noqa: E731
        go, q, k, v, out, lse, grans, scale, None, None, None, None, None)
    float32_inside = _float32_inside(ours)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    sdpa_out = F.scaled_dot_product_attention(*leaves, attn_mask=block_mask(n, grans))
    sdpa = lambda: torch.autograd.grad(sdpa_out, leaves, go, retain_graph=True)  # noqa: E731
    for a, b, c in zip(ours(), float32_inside(), sdpa()):  # the same gradients first
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
        torch.testing.assert_close(a, c, atol=5e-2, rtol=5e-2)
    t = side_by_side({"ours": ours, "f32": float32_inside, "sdpa": sdpa},
                     rounds=15 if n == 256 else 7)
    print(f"\n[attention backward N={n} {tag}, {_attention_path(dtype)}] sdpa+dense mask "
          f"{t['sdpa'] * 1e3:.2f} ms, float32 inside {t['f32'] * 1e3:.2f} ms, 16-bit "
          f"{t['ours'] * 1e3:.2f} ms: {t['sdpa'] / t['ours']:.2f}x sdpa, "
          f"{t['f32'] / t['ours']:.2f}x float32 inside (report only)")
    benchmark.extra_info.update(vs_sdpa=t["sdpa"] / t["ours"], vs_float32=t["f32"] / t["ours"],
                                sdpa_ms=t["sdpa"] * 1e3, f32_ms=t["f32"] * 1e3,
                                ours_ms=t["ours"] * 1e3)
    benchmark.pedantic(ours, rounds=3, iterations=1)


def _thread_cpu_ns() -> dict:
    """CPU time (ns) of each thread of this process, by thread id (Linux per-thread clocks)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:  # the clock id of thread tid: MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)
            out[tid] = time.clock_gettime_ns(((~int(tid)) << 3) | 6)
        except (OSError, ValueError):
            pass
    return out


def side_by_side_rounds(fns: dict, rounds: int, warmup: int = 2) -> tuple[dict, dict]:
    """Each callable timed once per round, round-robin: per round its wall time (s) and the
    CPU time (s) of the busiest thread of the process during the call. On a machine shared
    with other jobs the second is what a quiet machine's wall time would be when the threads
    overlap (OpenMP threads should wait passively: OMP_WAIT_POLICY=PASSIVE)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall = {k: [] for k in fns}
    busy = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            c0 = _thread_cpu_ns()
            t0 = time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - t0)
            c1 = _thread_cpu_ns()
            busy[k].append(max(c1[t] - c0.get(t, 0) for t in c1) / 1e9)
    return wall, busy


def _median_ratio(num: list, den: list) -> float:
    """Median over rounds of num[r] / den[r] (both timed in round r)."""
    return statistics.median(a / b for a, b in zip(num, den))


def per_clock(wall: dict, busy: dict, ratios: dict) -> dict:
    """For each clock of side_by_side_rounds ("wall", "busiest thread"): (the median ms of each
    callable, the median per-round ratio num / den of each pair named in ratios)."""
    out = {}
    for clock, t in (("wall", wall), ("busiest thread", busy)):
        med = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        out[clock] = (med, {r: _median_ratio(t[a], t[b]) for r, (a, b) in ratios.items()})
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_matryoshka_ffn_mixed_widths(benchmark, dtype):
    _native(dtype)
    B, N, C = 8, 256, 832
    widths = [2138, 1069, 1603, 1069, 2138, 1603, 1069, 1603]  # interleaved: gathers needed
    hmax = 2138
    x = torch.randn(B, N, C).to(dtype)
    w1, b1 = (torch.randn(hmax, C) / math.sqrt(C)).to(dtype), torch.randn(hmax).to(dtype)
    w2, b2 = (torch.randn(C, hmax) / math.sqrt(hmax)).to(dtype), torch.randn(C).to(dtype)
    ffn = torch.ops.adaperceiver.matryoshka_ffn_fwd
    groups = {h: [i for i, w in enumerate(widths) if w == h] for h in sorted(set(widths))}
    xs = {h: x[idx].contiguous() for h, idx in groups.items()}

    mixed = lambda: ffn(x, w1, b1, w2, b2, widths)  # noqa: E731

    def single_width_batches():
        for h, idx in groups.items():
            ffn(xs[h], w1, b1, w2, b2, [h] * len(idx))

    masked = lambda: R.ffn_forward(x, w1, b1, w2, b2, widths)  # noqa: E731
    full = lambda: ffn(x, w1, b1, w2, b2, [hmax] * B)  # noqa: E731
    tol = 1e-3 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(mixed(), masked(), atol=tol, rtol=tol)
    wall, busy = side_by_side_rounds({"mixed": mixed, "single": single_width_batches,
                                      "masked": masked, "full": full}, rounds=9)
    bound = B * hmax / sum(widths)
    figures = per_clock(wall, busy, {"cost": ("mixed", "single"), "speedup": ("masked", "mixed")})
    for name, (med, r) in figures.items():
        cost, speedup = r["cost"], r["speedup"]
        print(f"\n[ffn {str(dtype)[6:]}, {name}] mixed batch {med['mixed']:.1f} ms, single-width "
              f"batches {med['single']:.1f} ms ({cost:.3f}x, target <= 1.1), masked full width "
              f"{med['masked']:.1f} ms: {speedup:.3f}x faster = {speedup / bound:.3f} of the "
              f"work bound {bound:.3f} (target >= 0.95); our full width {med['full']:.1f} ms")
    cost, speedup = figures["wall"][1]["cost"], figures["wall"][1]["speedup"]
    benchmark.extra_info.update(cost_vs_single=cost, speedup_vs_masked=speedup, bound=bound,
                                busiest_thread=figures["busiest thread"][1])
    benchmark.pedantic(mixed, rounds=3, iterations=1)
    if ASSERT:
        assert cost <= 1.1
        assert speedup >= 0.95 * bound


def test_matryoshka_ffn_small_mixed_batch(benchmark):
    """The FFN of a mixed batch's deeper layers in bf16 (the model's shapes: two samples of 96
    and 128 latents at widths 2138 and 1603, packed in groups of 32 rows; on CPUs with AMX one
    GEMM pair on the tile GEMM, each 32-row block up to its own width) against the per-sample
    average of single-width batches of 4 samples. Report only: the end-to-end mixed-batch
    figure (<= 1.2x) carries the consequence."""
    _native(torch.bfloat16)
    dt, C, H = torch.bfloat16, 832, 2138
    w1, b1 = (torch.randn(H, C) / math.sqrt(C)).to(dt), torch.randn(H).to(dt)
    w2, b2 = (torch.randn(C, H) / math.sqrt(H)).to(dt), torch.randn(C).to(dt)
    ffn = torch.ops.adaperceiver.matryoshka_ffn_fwd
    x = torch.randn(7, 32, C).to(dt)
    widths = [2138] * 3 + [1603] * 4
    singles = {(96, 2138): torch.randn(4, 96, C).to(dt),
               (128, 1603): torch.randn(4, 128, C).to(dt)}
    steps = {"mixed": lambda: ffn(x, w1, b1, w2, b2, widths)}
    for (n, h), xs in singles.items():
        steps[f"{n}x{h}"] = lambda xs=xs, h=h: ffn(xs, w1, b1, w2, b2, [h] * 4)
    wall, busy = side_by_side_rounds(steps, rounds=15)
    for name, t in (("wall", wall), ("busiest thread", busy)):
        per_sample = [(a + b) / 4 for a, b in zip(*(t[k] for k in steps if k != "mixed"))]
        ratio = _median_ratio(t["mixed"], [2 * p for p in per_sample])
        ms = statistics.median(t["mixed"]) * 1e3
        print(f"\n[ffn small mixed batch, {name}] 2 samples {ms:.2f} ms: {ratio:.2f}x the "
              f"per-sample average of single-width batches (report only)")
    benchmark.pedantic(steps["mixed"], rounds=3, iterations=1)


FFN_BWD_WIDTHS = [
    pytest.param([2138] * 8, id="uniform"),
    pytest.param([2138, 1069, 1603, 1069, 2138, 1603, 1069, 1603], id="mixed"),
]


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("widths", FFN_BWD_WIDTHS)
def test_matryoshka_ffn_backward_low_precision(benchmark, widths, dtype):
    """The FFN backward in bf16 / fp16 (8 x 256 rows, the model's widths): the kernel's path in
    the dtype (native GEMMs), the same kernel computing in float32 (ADAPERCEIVER_FFN_BWD=float32,
    read on every call) and plain autograd through the reference forward in the dtype, side by
    side. Asserts only that the native path beats the float32 one where it runs."""
    _native(dtype)
    if dtype == torch.float16 and not _ext.build_info()["cpu_native_fp16"]:
        pytest.skip("no native fp16 on this CPU (AVX512-FP16 / AMX-FP16)")
    B, N, C, hmax = 8, 256, 832, 2138
    x = torch.randn(B, N, C).to(dtype)
    w1, b1 = (torch.randn(hmax, C) / math.sqrt(C)).to(dtype), torch.randn(hmax).to(dtype)
    w2, b2 = (torch.randn(C, hmax) / math.sqrt(hmax)).to(dtype), torch.randn(C).to(dtype)
    go = torch.randn(B, N, C).to(dtype)
    bwd = torch.ops.adaperceiver.matryoshka_ffn_bwd
    native = lambda: bwd(go, x, w1, b1, w2, b2, widths)  # noqa: E731

    def float32_inside():
        os.environ["ADAPERCEIVER_FFN_BWD"] = "float32"
        try:
            return bwd(go, x, w1, b1, w2, b2, widths)
        finally:
            del os.environ["ADAPERCEIVER_FFN_BWD"]

    leaves = [t.clone().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    out = R.matryoshka_ffn(*leaves, widths)
    reference = lambda: torch.autograd.grad(out, leaves, go, retain_graph=True)  # noqa: E731
    for a, b in zip(native(), reference()):
        torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)
    wall, busy = side_by_side_rounds({"native": native, "float32": float32_inside,
                                      "reference": reference}, rounds=9)
    kind = "one width" if len(set(widths)) == 1 else f"{len(set(widths))} widths"
    figures = per_clock(wall, busy, {"vs_f32": ("float32", "native"),
                                     "vs_ref": ("reference", "native")})
    for name, (med, r) in figures.items():
        vs_f32, vs_ref = r["vs_f32"], r["vs_ref"]
        print(f"\n[ffn backward {str(dtype)[6:]}, {kind}, {name}] native {med['native']:.1f} ms, "
              f"float32 inside {med['float32']:.1f} ms ({vs_f32:.2f}x), reference autograd in "
              f"{str(dtype)[6:]} {med['reference']:.1f} ms ({vs_ref:.2f}x)")
    vs_f32, vs_ref = figures["wall"][1]["vs_f32"], figures["wall"][1]["vs_ref"]
    benchmark.extra_info.update(speedup_vs_float32=vs_f32, speedup_vs_reference=vs_ref,
                                busiest_thread=figures["busiest thread"][1])
    benchmark.pedantic(native, rounds=3, iterations=1)
    if ASSERT:
        assert vs_f32 > 1.0


# the full configuration's GEMMs at batch 4 x 256 latents (FFN hidden 2138 = int(832 * 2.57))
PROJECTIONS = [
    pytest.param(1024, 832, 2496, id="qkv-1024x832x2496"),
    pytest.param(1024, 832, 832, id="out-1024x832x832"),
    pytest.param(1024, 832, 2138, id="fc1-1024x832x2138"),
    pytest.param(1024, 2138, 832, id="fc2-1024x2138x832"),
]


@pytest.mark.parametrize("m,k,n", PROJECTIONS)
def test_projection_gemm_library(benchmark, m, k, n):
    """The model's float32 CPU projections (ops.linear: oneDNN unless ADAPERCEIVER_CPU_GEMM=mkl)
    against F.linear (MKL) on the full configuration's shapes (batch 4 x 256 latents). Report
    only: the issue sets no target here; the end-to-end figures carry the consequence."""
    from adaperceiver import ops
    x, w, b = torch.randn(m, k), torch.randn(n, k) / math.sqrt(k), torch.randn(n)
    with torch.inference_mode():
        torch.testing.assert_close(ops.linear(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-4)
        t = side_by_side({"ops": lambda: ops.linear(x, w, b),
                          "mkl": lambda: F.linear(x, w, b)}, rounds=9)
        flops = 2 * m * k * n
        print(f"\n[projection {m}x{k}x{n}] F.linear (MKL) {flops / t['mkl'] / 1e9:.0f} GFLOP/s, "
              f"ops.linear ({ops.cpu_gemm_library()}) {flops / t['ops'] / 1e9:.0f} GFLOP/s: "
              f"{t['mkl'] / t['ops']:.2f}x")
        benchmark.extra_info.update(library=ops.cpu_gemm_library(), ratio=t["mkl"] / t["ops"])
        benchmark.pedantic(lambda: ops.linear(x, w, b), rounds=3, iterations=1)


def _gemm_operands(m: int, k: int, n: int, dtype: torch.dtype):
    """Six (n, k) weights (a forward reads each layer's weight once: they take turns), x (m, k)
    and a bias, in dtype."""
    ws = [(torch.randn(n, k) / math.sqrt(k)).to(dtype) for _ in range(6)]
    return ws, torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)


def _report_rates(label: str, flops: int, t: dict, names: dict) -> None:
    """Prints each side's GFLOP/s and the first side's time over the second's (names: the keys
    of t, in that order, and what to call them)."""
    (a, name_a), (b, name_b) = names.items()
    print(f"\n[{label}] {name_a} {flops / t[a] / 1e9:.0f} GFLOP/s, {name_b} "
          f"{flops / t[b] / 1e9:.0f} GFLOP/s: {t[a] / t[b]:.2f}x (report only)")


def _rotating_weights(fns: dict, rounds: int) -> dict:
    """side_by_side of name -> (f, weights): each call of f takes the next of its weights in
    rotation, as a forward reads each layer's weight once."""
    cycles = {k: itertools.cycle(ws) for k, (_, ws) in fns.items()}
    return side_by_side({k: (lambda f=f, c=cycles[k]: f(next(c))) for k, (f, _) in fns.items()},
                        rounds=rounds)


@pytest.mark.parametrize("m,k,n", PROJECTIONS)
def test_bf16_projection_vs_weight_reordered_once(benchmark, m, k, n):
    """The full configuration's bf16 GEMMs as the model runs them (ops.linear: oneDNN on the
    plain weight, which it reorders on every call, or one block of rows per thread) against
    oneDNN's matmul on a weight reordered once outside the timed calls
    (mkldnn._reorder_linear_weight): how much a cache of reordered weights, which the package
    does not keep (an edit through ``.data`` would leave it stale), could at most save. Report
    only."""
    _native(torch.bfloat16)
    from adaperceiver import ops
    if ops.cpu_gemm_library() != "onednn":
        pytest.skip("oneDNN is not the CPU GEMM library here")
    ws, x, b = _gemm_operands(m, k, n, torch.bfloat16)
    lin, reorder = torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
    packed = [reorder(w, m) for w in ws]
    with torch.inference_mode():
        assert torch.equal(lin(x, packed[0], b, "none", [], ""), lin(x, ws[0], b, "none", [], ""))
        torch.testing.assert_close(ops.linear(x, ws[0], b).float(),
                                   F.linear(x.float(), ws[0].float(), b.float()),
                                   atol=0.05, rtol=0.02)
        t = _rotating_weights({"ops": (lambda w: ops.linear(x, w, b), ws),
                               "packed": (lambda w: lin(x, w, b, "none", [], ""), packed)},
                              rounds=24)
    _report_rates(f"bf16 projection {m}x{k}x{n}", 2 * m * k * n, t,
                  {"ops": "ops.linear", "packed": "oneDNN on a weight reordered once"})
    benchmark.extra_info.update(ops_over_packed=t["ops"] / t["packed"])
    benchmark.pedantic(lambda: ops.linear(x, ws[0], b), rounds=3, iterations=1)


@pytest.mark.parametrize("m,k,n", PROJECTIONS)
def test_fp16_projection_vs_onednn(benchmark, m, k, n):
    """The full configuration's float16 GEMMs as the model runs them (ops.linear: the tile GEMM
    on exact bf16 pairs where the CPU has AMX-BF16 but no AMX-FP16) against oneDNN's float16
    GEMM, which such a CPU runs at about float32's rate. Report only."""
    from adaperceiver import ops
    from adaperceiver.ops.linear import tile_linear_why_not
    why = tile_linear_why_not(m, torch.float16)
    if why:
        pytest.skip(f"float16 GEMMs stay on oneDNN here: {why}")
    ws, x, b = _gemm_operands(m, k, n, torch.float16)
    lin = torch.ops.mkldnn._linear_pointwise
    with torch.inference_mode():
        truth = F.linear(x.double(), ws[0].double(), b.double())
        err_ops = (ops.linear(x, ws[0], b).double() - truth).abs().max().item()
        err_onednn = (lin(x, ws[0], b, "none", [], "").double() - truth).abs().max().item()
        assert err_ops <= 2 * err_onednn + 1e-4 * truth.abs().max().item()
        t = _rotating_weights({"ops": (lambda w: ops.linear(x, w, b), ws),
                               "onednn": (lambda w: lin(x, w, b, "none", [], ""), ws)},
                              rounds=12)
    _report_rates(f"fp16 projection {m}x{k}x{n}", 2 * m * k * n, t,
                  {"onednn": "oneDNN", "ops": "ops.linear (tile GEMM, bf16 pairs)"})
    benchmark.extra_info.update(vs_onednn=t["onednn"] / t["ops"])
    benchmark.pedantic(lambda: ops.linear(x, ws[0], b), rounds=3, iterations=1)


@pytest.mark.parametrize("patch", [pytest.param(16, id="classifier-p16"),
                                   pytest.param(14, id="distilled-p14")])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16")])
def test_patchify_gemm_vs_convolution(benchmark, dtype, patch):
    """The patch embedding's convolution (a batch of 4 at 224 px, 832 outputs; patch 16: the
    classifier's 196 patches, 14: the distilled backbone's 256) as the model runs it on the CPU
    (model/layers.py ``_Conv``: one GEMM of the flattened patches through ops.linear) against
    ``F.conv2d``, which it replaced. Report only: the end-to-end figures carry the
    consequence."""
    from adaperceiver.model.layers import _Conv
    torch.manual_seed(0)
    conv = _Conv(3, 832, patch).to(dtype)
    x = torch.randn(4, 3, 224, 224).to(dtype)
    w, b = conv.proj.weight, conv.proj.bias
    with torch.inference_mode():
        truth = F.conv2d(x.double(), w.double(), b.double(), stride=patch)
        truth = truth.flatten(2).transpose(1, 2)
        err = (conv(x).double() - truth).abs().max().item()
        err_conv = (F.conv2d(x, w, b, stride=patch).flatten(2).transpose(1, 2).double()
                    - truth).abs().max().item()
        assert err <= 2 * err_conv + 1e-6 * truth.abs().max().item(), (err, err_conv)
        t = side_by_side({"gemm": lambda: conv(x),
                          "conv": lambda: F.conv2d(x, w, b, stride=patch)}, rounds=21)
    P = (224 // patch) ** 2
    print(f"\n[patchify 4x3x224x224 -> 4x{P}x832 {str(dtype)[6:]}] conv2d "
          f"{t['conv'] * 1e3:.2f} ms, GEMM {t['gemm'] * 1e3:.2f} ms: {t['conv'] / t['gemm']:.2f}x "
          f"(report only)")
    benchmark.extra_info.update(vs_conv2d=t["conv"] / t["gemm"])
    benchmark.pedantic(lambda: conv(x), rounds=3, iterations=1)


@pytest.mark.parametrize("rows", [pytest.param(1024, id="full-config-1024"),
                                  pytest.param(448, id="mixed-batch-448")])
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16")])
def test_residual_layer_norm(benchmark, rows, dtype):
    """A block's residual with LayerScale and the LayerNorm after it in 16 bits
    (ops.residual_layer_norm: the extension's one-pass row kernel; float32 stays on torch's)
    against torch's addcmul then layer_norm, in the model's shapes (C = 832; 1024 rows: the full configuration at batch 4; 448: the mixed batch's first
    layers), and the two halves alone against theirs. Report only: the end-to-end figures
    carry the consequence."""
    from adaperceiver import ops
    C = 832
    x, br = torch.randn(rows, C).to(dtype), torch.randn(rows, C).to(dtype)
    g, w, b = (torch.rand(C) + 0.5).to(dtype), (torch.rand(C) + 0.5).to(dtype), \
        torch.randn(C).to(dtype)
    with torch.inference_mode():
        r, n = ops.residual_layer_norm(x, br, g, w, b, 1e-6)
        ref_r = torch.addcmul(x, br, g)
        assert torch.equal(r, ref_r)
        torch.testing.assert_close(n, F.layer_norm(ref_r, (C,), w, b, 1e-6), atol=TOL[dtype],
                                   rtol=TOL[dtype])
        t = side_by_side({
            "fused": lambda: ops.residual_layer_norm(x, br, g, w, b, 1e-6),
            "torch": lambda: F.layer_norm(torch.addcmul(x, br, g), (C,), w, b, 1e-6),
            "norm": lambda: ops.layer_norm(x, w, b, 1e-6),
            "torch_norm": lambda: F.layer_norm(x, (C,), w, b, 1e-6),
            "res": lambda: ops.layer_scale_residual(x, br, g),
            "torch_res": lambda: torch.addcmul(x, br, g)}, rounds=31)
    us = {k: v * 1e6 for k, v in t.items()}
    print(f"\n[residual + LayerNorm {rows}x{C} {str(dtype)[6:]}] torch {us['torch']:.0f} us, "
          f"ours {us['fused']:.0f} us: {t['torch'] / t['fused']:.2f}x; LayerNorm alone "
          f"{t['torch_norm'] / t['norm']:.2f}x, residual alone {t['torch_res'] / t['res']:.2f}x "
          f"(report only)")
    benchmark.extra_info.update(vs_torch=t["torch"] / t["fused"],
                                norm_vs_torch=t["torch_norm"] / t["norm"],
                                residual_vs_torch=t["torch_res"] / t["res"])
    benchmark.pedantic(lambda: ops.residual_layer_norm(x, br, g, w, b, 1e-6), rounds=3,
                       iterations=1)


def test_packed_attention_vs_padding(benchmark):
    """A mixed batch's self-attention (the model's shapes: 13 heads of 64, q/k/v as heads of one
    fused projection, RoPE, the released grans) on its packed rows against what the model did
    before: pad q, k and v to the longest sample, the padded kernel with seq_lens, pack the
    output. Report only: the end-to-end mixed-batch figures carry the consequence."""
    from adaperceiver import ops
    from adaperceiver.model.ragged import Layout
    from adaperceiver.ops.reference import rope_tables
    lens, H, D = [128, 96, 128, 96], 13, 64
    grans = [32, 64, 96, 128, 192, 256]
    R = sum(lens)
    qkv = torch.randn(R, 3 * H * D)
    rope = rope_tables(max(lens), D)
    layout = Layout.build(lens, [1] * len(lens), "cpu")
    heads = lambda t: t.view(*t.shape[:-1], H, D)  # noqa: E731

    def packed():
        q, k, v = (heads(t) for t in qkv.split(H * D, dim=1))
        return ops.block_masked_attention_varlen(q, k, v, lens, grans, q_rope=rope, k_rope=rope)

    def padded():
        q, k, v = (heads(t).transpose(1, 2) for t in layout.pad(qkv).split(H * D, dim=-1))
        o = ops.block_masked_attention(q, k, v, grans, seq_lens=layout.seq_lens, q_rope=rope,
                                       k_rope=rope, heads_last=True)
        return layout.pack(o.flatten(2)).view(R, H, D)

    with torch.inference_mode():
        torch.testing.assert_close(packed(), padded(), atol=1e-5, rtol=1e-5)
        t = side_by_side({"packed": packed, "padded": padded}, rounds=25)
    print(f"\n[packed attention, lengths {lens}] pad + padded kernel + pack "
          f"{t['padded'] * 1e3:.2f} ms, packed rows {t['packed'] * 1e3:.2f} ms: "
          f"{t['padded'] / t['packed']:.2f}x")
    benchmark.extra_info.update(ratio=t["padded"] / t["packed"])
    benchmark.pedantic(packed, rounds=3, iterations=1)
