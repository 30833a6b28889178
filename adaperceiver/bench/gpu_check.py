"""``make gpu-check`` / ``python -m adaperceiver.bench.gpu_check``: one command that tells a GPU
owner whether this package's GPU path works and how fast it is, in at most 10 minutes on one
H100.

Stages (each in its own subprocess under its own time limit; a stage that fails, raises or runs
out of time is recorded and the run goes on; each item inside a stage is recorded as it ends,
so a stage cut short keeps what it finished; a stage may also use the time the stages before
it left unused, the last one all that is left; the stages whose items compile anew (attention
shapes, torch.compile variants) skip, by name, an item estimated not to fit in the time left):

  env          driver, GPU, torch / CUDA / cuDNN / triton versions, ``build_info()``
  correctness  the Triton and CUDA kernels on the device in bf16, fp16 and fp32 against the
               float64 reference: attention forward and backward (group-causal grans, RoPE on q
               and k, seq_lens with tails and an empty sample), the packed-rows forward, the FFN
               forward and backward with per-sample widths, NaN propagation. fp16/bf16 are held
               to flash-attn's rule (error <= 2x that of the plain PyTorch reference in the same
               dtype); fp32 to the same rule against the fp32 reference.
  attention    micro-benchmarks at the model's shapes (batch 64-256, 13 heads, head_dim 64,
               N 32-256) and at N=4096: ours (Triton, CUDA) against SDPA's flash and cuDNN
               backends (no mask), FlexAttention compiled with the block mask, flash-attn when
               installed
  ffn          the Matryoshka FFN with mixed per-sample widths against cuBLAS: the dense
               full-width FFN and the per-width GEMMs (samples pre-grouped by width)
  e2e          the released architecture end to end in bf16 against timm's flexivit_large
  cuda_graph   CUDA-graph capture and replay of the model (fixed configuration and a mixed batch
               given as lists), under ``torch.cuda.set_sync_debug_mode("error")`` for the eager
               calls
  compile      torch.compile of the model (default and mode="reduce-overhead")
  pytest       the kernel test files on the device (tests/ of a source checkout), in shards run
               side by side so that their Triton variants compile in parallel; last, with
               all the budget the stages before it left

Without a CUDA device (or with ``--dry``) the same stages run in a dry mode: tiny shapes, CPU
tensors, the Triton kernels in their interpreter, eager stand-ins where a GPU feature is missing.
Its figures mean nothing; it exists so that this command cannot rot (tests/test_gpu_check.py
runs it). Output: ``<out-dir>/report.txt`` (the tables printed at the end) and
``<out-dir>/gpu_check.json``; the targets a GPU run must meet are in benchmarks/README.md.
Exit status: 0 when every stage chosen ran to its end with no failed item (or was skipped for
want of budget), 1 when a stage failed, crashed or was stopped at its time limit (the report
names it; the stages after it still run).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

__all__ = ["STAGES", "TARGETS", "main", "run_check", "format_report", "sparse_attention_reference"]

# (stage, seconds on a GPU, seconds in the dry mode); the GPU limits sum to 600 s. A stage may
# also use the time the stages before it left unused (many of them compile first on a host
# whose speed is unknown), and the last one run takes all the budget left (the kernel tests:
# their many tile variants compile in side-by-side processes, pytest_shards)
STAGES = (
    ("env", 30, 120),
    ("correctness", 130, 120),
    ("attention", 110, 120),
    ("ffn", 45, 120),
    ("e2e", 95, 120),
    ("cuda_graph", 50, 120),
    ("compile", 80, 120),
    ("pytest", 60, 120),
)
# the dry mode takes about a minute on an idle 2-core CPU; its limits leave room for a loaded CI
TOTAL_BUDGET_S = {"gpu": 600, "dry": 600}
# a stage is started only with at least this much of the total budget left
MIN_STAGE_S = 5.0

# what a GPU run must meet (benchmarks/README.md): (key, description, op, bound)
TARGETS = (
    ("attn_nomask_vs_sdpa_flash", "attention at the model's shapes, no mask: time / SDPA-flash",
     "<=", 1.2),
    ("attn_mask_vs_flex", "attention at the model's shapes, block mask: time / FlexAttention",
     "<", 1.0),
    ("ffn_per_width_over_ours", "FFN mixed widths: cuBLAS per-width time / ours", ">=", 0.9),
    ("e2e_vs_flexivit_large", "end to end bf16, full config: img/s / flexivit_large's", ">=",
     1.36),
)


# ----------------------------------------------------------------------------- stage context
@dataclass
class Ctx:
    """What a stage gets: the mode, the device, ``record`` for its result rows, and ``fits``
    for its time left."""
    mode: str                 # "gpu" or "dry"
    rows_path: Optional[str]  # JSON lines, one row per finished item
    rows: list
    deadline: Optional[float] = None  # time.perf_counter() the stage must end by; None: no limit

    def fits(self, item: str, need_s: float) -> bool:
        """Whether an item estimated to take ``need_s`` seconds fits in the stage's time left;
        if not, it is recorded as skipped with both figures (a stage stopped at its limit
        would fail and lose the items after it; a skipped item is named in the report)."""
        if self.deadline is None:
            return True
        left = self.deadline - time.perf_counter()
        if need_s <= left:
            return True
        self.record(item=item, status="skip", detail=f"not started: it needs about {need_s:.0f}s "
                    f"(estimated from the items before it), {max(left, 0):.0f}s of the stage's "
                    "limit are left")
        return False

    @property
    def dry(self) -> bool:
        return self.mode == "dry"

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def record(self, **row) -> dict:
        self.rows.append(row)
        if self.rows_path:
            with open(self.rows_path, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        status = row.get("status", "ok")
        detail = row.get("detail", "")
        print(f"  [{status}] {row.get('item', '')} {detail}".rstrip(), flush=True)
        return row

    @contextlib.contextmanager
    def item(self, name: str, **fields):
        """Run one item; an exception is recorded as its failure and the stage goes on."""
        t0 = time.perf_counter()
        try:
            yield
        except Exception as e:  # noqa: BLE001 - recorded, the next item runs
            self.record(item=name, status="error", detail=_one_line(e), **fields,
                        seconds=round(time.perf_counter() - t0, 2),
                        traceback=traceback.format_exc()[-2000:])


def _one_line(e: BaseException, width: int = 300) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:width] if text else ''}"


def _sync(device):
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- env
def stage_env(ctx: Ctx) -> None:
    import torch

    import adaperceiver
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
           else None,
           "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "cuda_available": torch.cuda.is_available(),
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        env["triton"] = f"not importable: {e}"
    try:
        import flash_attn  # noqa: F401
        env["flash_attn"] = getattr(flash_attn, "__version__", "installed")
    except Exception:  # noqa: BLE001
        env["flash_attn"] = None
    env["build_info"] = adaperceiver.build_info()
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = (r.stdout or r.stderr).strip()
    if torch.cuda.is_available() and not ctx.dry:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   memory_gb=round(p.total_memory / 2 ** 30, 1))
    ctx.record(item="environment", status="ok", env=env,
               detail=f"torch {env['torch']} (CUDA {env['torch_cuda']}), triton "
                      f"{env['triton']}, GPU {env.get('gpu', 'none')}, cuda part built: "
                      f"{env['build_info'].get('cuda_compiled')}")
    if not ctx.dry and not env["build_info"].get("cuda_compiled"):
        ctx.record(item="extension", status="FAIL",
                   detail="adaperceiver._C has no CUDA part: the cuda backend is unavailable "
                          "(reinstall with nvcc on PATH / CUDA_HOME set)")


# ----------------------------------------------------------------------------- correctness
def _dtypes(ctx):
    import torch
    # the interpreter's bf16 is broken: bf16 runs on a GPU only
    return ([torch.float32, torch.float16] if ctx.dry
            else [torch.bfloat16, torch.float16, torch.float32])


def _dname(dtype) -> str:
    return str(dtype).replace("torch.", "")


def max_err(a, b) -> float:
    """max |a - b| in float64; equal infinities count as 0, NaN as inf."""
    import torch
    a, b = a.detach().double(), b.detach().to(a.device).double()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    both = torch.isinf(a) & torch.isinf(b) & (a == b)
    d = torch.where(both, torch.zeros_like(a), (a - b).abs())
    return torch.nan_to_num(d, nan=float("inf")).max().item() if d.numel() else 0.0


def flash_rule(ours, plain, truth, floor: float = 1e-4) -> tuple[float, float]:
    """(error of ours vs truth, bound): bound = 2 x the plain reference's error + floor x the
    truth's magnitude (flash-attn's rule)."""
    scale = max(1.0, truth.detach().abs().max().item() if truth.numel() else 1.0)
    return max_err(ours, truth), 2.0 * max_err(plain, truth) + floor * scale


def _why_not(op: str, inputs, backend: str) -> list[str]:
    """What ``backend`` says against running ``op`` on ``inputs`` (an ops.inputs object)."""
    from adaperceiver import ops
    return ops.available_backends(op, inputs)[backend]


def _attention_case(ctx, backend, dtype, *, B, H, N, D, grans, lens, packed):
    """Forward and backward of the public op under ``backend`` against the reference."""
    import torch

    from adaperceiver import ops
    from adaperceiver.ops import reference as ref
    from adaperceiver.ops.inputs import AttentionInputs
    dev = ctx.device
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype) for _ in range(3))
    seq_lens = torch.tensor(lens, dtype=torch.int32).to(dev)
    rope = ref.rope_tables(N, D, device=dev)
    scale = D ** -0.5
    why = _why_not("attention", AttentionInputs.build(q, k, v, grans, seq_lens=seq_lens,
                                                      q_rope=rope, k_rope=rope), backend)
    name = (f"attention {backend} {_dname(dtype)} B={B} H={H} N={N} D={D}"
            + (" packed" if packed else ""))
    if why:
        return ctx.record(item=name, status="skip", detail="; ".join(why)[:300])
    if packed:
        rows = torch.cat([torch.arange(b * N, b * N + n) for b, n in enumerate(lens)]).to(dev)
        pk = [t.transpose(1, 2).reshape(B * N, H, D).index_select(0, rows).contiguous()
              for t in (q, k, v)]
        with ops.use_backend(backend):
            got = ops.block_masked_attention_varlen(*pk, lens, grans, scale=scale,
                                                    q_rope=rope, k_rope=rope)
        res = {}
        for dt in (torch.float64, dtype):
            o = ref.attention_forward(*(t.to(dt) for t in (q, k, v)), grans, scale, seq_lens,
                                      rope, rope)[0]
            res[dt] = o.transpose(1, 2).reshape(B * N, H, D).index_select(0, rows)
        err, bound = flash_rule(got, res[dtype], res[torch.float64])
        return ctx.record(item=name, status="ok" if err <= bound else "FAIL",
                          detail=f"out err {err:.3g} <= {bound:.3g}", err=err, bound=bound)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with ops.use_backend(backend):
        out = ops.block_masked_attention(*leaves, grans, scale=scale, seq_lens=seq_lens,
                                         q_rope=rope, k_rope=rope)
        go = torch.randn_like(out)
        out.backward(go)
    got = [out.detach()] + [t.grad for t in leaves]
    results = {}
    for dt in (torch.float64, dtype):
        lv = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = ref.attention(*lv, grans, scale=scale, seq_lens=seq_lens, q_rope=rope, k_rope=rope)
        o.backward(go.to(dt))
        results[dt] = [o.detach()] + [t.grad for t in lv]
    return _record_rule(ctx, name, ("out", "dq", "dk", "dv"), got, results[dtype],
                        results[torch.float64])


def _record_rule(ctx, name, parts, ours, plain, truth):
    """Record one correctness item: every part of ``ours`` within flash-attn's rule against
    ``truth`` (float64), ``plain`` being the plain reference in the same precision."""
    worst, detail = "ok", []
    for part, g, p, t in zip(parts, ours, plain, truth):
        err, bound = flash_rule(g, p, t)
        detail.append(f"{part} {err:.2g}/{bound:.2g}")
        if not err <= bound:
            worst = "FAIL"
    return ctx.record(item=name, status=worst, detail="err/bound: " + ", ".join(detail))


def sparse_attention_reference(q, k, v, grans, scale, seq_lens, qr, kr):
    """float64 (out, lse) of block-sparse attention: each row combines only the keys it may
    see (masked and padded positions are never multiplied, not even by 0), so a NaN reaches
    exactly the rows that read it. Differentiable (autograd gives the gradients' pattern)."""
    import torch

    from adaperceiver.ops.reference import apply_rope
    from adaperceiver.ops.schedule import block_mask
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if qr is not None:
        q = apply_rope(q, *qr)
    if kr is not None:
        k = apply_rope(k, *kr)
    allowed = block_mask(Nq, grans, Nk, device=q.device)[None, None]
    if seq_lens is not None:
        n = seq_lens.long().to(q.device)[:, None, None, None]
        allowed = allowed & (torch.arange(Nq, device=q.device)[:, None] < n) \
            & (torch.arange(Nk, device=q.device)[None, :] < n)
    allowed = allowed.expand(B, H, Nq, Nk)
    kk = torch.where(allowed[..., None], k[:, :, None], 0.0)
    s = torch.where(allowed, (q[:, :, :, None, :] * kk).sum(-1) * scale, float("-inf"))
    seen = allowed.any(-1, keepdim=True)
    s = torch.where(seen, s, 0.0)
    p = torch.where(allowed, torch.softmax(s, -1), 0.0)
    out = (p[..., None] * torch.where(allowed[..., None], v[:, :, None], 0.0)).sum(-2)
    lse = torch.where(seen[..., 0], torch.logsumexp(torch.where(allowed, s, float("-inf")), -1),
                      float("-inf"))
    return out, lse


def _attention_nan_case(ctx, backend, dtype, *, B, H, N, D, grans, lens):
    """A NaN in one q row, an inf in one k row and a NaN in one v element (inside the lengths):
    elementwise on the valid rows, the output's NaN set holds the block-sparse reference's (no
    reached NaN became a number) and lies inside the reference backend's (which sums over the
    pairs a row reads too) widened by the tiles' slack: the poisoned v column of that (sample,
    head), where 0 * NaN meets the zero probabilities of a tile that crosses a group boundary.
    Elements outside that bound are within the rule."""
    import torch

    from adaperceiver import ops
    from adaperceiver.ops import reference as ref
    from adaperceiver.ops.inputs import AttentionInputs
    dev = ctx.device
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype) for _ in range(3))
    q[0, 0, 3, 5] = float("nan")
    k[B - 1, H - 1, 1, 0] = float("inf")
    v[0, H - 1, N // 2, 1] = float("nan")
    seq_lens = torch.tensor(lens, dtype=torch.int32).to(dev)
    name = f"attention NaN/inf {backend} {_dname(dtype)}"
    why = _why_not("attention", AttentionInputs.build(q, k, v, grans, seq_lens=seq_lens),
                   backend)
    if why:
        return ctx.record(item=name, status="skip", detail="; ".join(why)[:300])
    scale = D ** -0.5
    with ops.use_backend(backend):
        out = ops.block_masked_attention(q, k, v, grans, scale=scale, seq_lens=seq_lens)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    dense = ref.attention(q64, k64, v64, grans, scale=scale, seq_lens=seq_lens)
    sparse = sparse_attention_reference(q64, k64, v64, grans, scale, seq_lens, None, None)[0]
    valid = (torch.arange(N, device=dev)[None, :] < seq_lens.long()[:, None])[:, None, :, None]
    o, s, d = (torch.isnan(t) & valid for t in (out, sparse, dense))
    slack = torch.zeros_like(d)
    slack[0, H - 1, :, 1] = True
    d = d | (slack & valid)
    lost, extra = int((s & ~o).sum()), int((o & ~d).sum())
    fin = valid.expand_as(dense) & ~d
    plain = ref.attention(q, k, v, grans, scale=scale, seq_lens=seq_lens)
    err, bound = flash_rule(out[fin], plain[fin], dense[fin])
    ok = not lost and not extra and err <= bound and int(o.sum()) > 0
    return ctx.record(item=name, status="ok" if ok else "FAIL",
                      detail=f"NaN: sparse ref {int(s.sum())} <= ours {int(o.sum())} <= bound "
                             f"{int(d.sum())} (lost {lost}, extra {extra}); rest err "
                             f"{err:.2g}/{bound:.2g}")


def _ffn_case(ctx, backend, dtype, *, B, N, C, H, hidden):
    import torch

    from adaperceiver import ops
    from adaperceiver.ops import reference as ref
    from adaperceiver.ops.inputs import FfnInputs
    dev = ctx.device
    x = torch.randn(B, N, C, device=dev, dtype=dtype)
    w1 = (torch.randn(H, C, device=dev) / C ** 0.5).to(dtype)
    b1 = (torch.randn(H, device=dev) * 0.5).to(dtype)
    w2 = (torch.randn(C, H, device=dev) / H ** 0.5).to(dtype)
    b2 = (torch.randn(C, device=dev) * 0.5).to(dtype)
    ins = (x, w1, b1, w2, b2)
    name = f"ffn {backend} {_dname(dtype)} B={B} N={N} C={C} H={H} widths={sorted(set(hidden))}"
    why = _why_not("ffn", FfnInputs.build(*ins, hidden), backend)
    if why:
        return ctx.record(item=name, status="skip", detail="; ".join(why)[:300])
    leaves = [t.clone().requires_grad_() for t in ins]
    with ops.use_backend(backend):
        out = ops.matryoshka_ffn(*leaves, hidden)
        go = torch.randn_like(out)
        out.backward(go)
    got = [out.detach()] + [t.grad for t in leaves]
    results = {}
    for dt in (torch.float64, dtype):
        lv = [t.detach().to(dt).requires_grad_() for t in ins]
        o = ref.matryoshka_ffn(*lv, hidden)
        o.backward(go.to(dt))
        results[dt] = [o.detach()] + [t.grad for t in lv]
    return _record_rule(ctx, name, ("out", "dx", "dW1", "db1", "dW2", "db2"), got,
                        results[dtype], results[torch.float64])


def stage_correctness(ctx: Ctx) -> None:
    import torch
    torch.manual_seed(0)
    if ctx.dry:
        attn = [dict(B=3, H=2, N=45, D=64, grans=[7, 20, 33], lens=[45, 29, 0])]
        ffn = [dict(B=3, N=5, C=24, H=41, hidden=[41, 17, 30])]
    else:
        grans = [32, 64, 96, 128, 192, 256]
        attn = [dict(B=4, H=13, N=256, D=64, grans=grans, lens=[256, 200, 77, 0]),
                dict(B=3, H=4, N=181, D=128, grans=[5, 40, 100], lens=[181, 64, 1]),
                dict(B=3, H=4, N=97, D=32, grans=None, lens=[97, 50, 33])]
        ffn = [dict(B=6, N=64, C=832, H=2138, hidden=[1069, 2138, 1603, 1069, 2138, 17]),
               dict(B=3, N=37, C=96, H=247, hidden=[247, 100, 1])]
    for backend in ("triton", "cuda"):
        for dtype in _dtypes(ctx):
            for case in attn:
                for packed in (False, True):
                    kw = dict(case)
                    if packed and kw["grans"] is None:
                        continue
                    with ctx.item(f"attention {backend} {_dname(dtype)} {kw}"):
                        _attention_case(ctx, backend, dtype, packed=packed, **kw)
            for case in ffn:
                with ctx.item(f"ffn {backend} {_dname(dtype)} {case}"):
                    _ffn_case(ctx, backend, dtype, **case)
            with ctx.item(f"attention NaN {backend} {_dname(dtype)}"):
                _attention_nan_case(ctx, backend, dtype, B=2, H=2, N=40, D=64,
                                    grans=[8, 24, 40], lens=[40, 31])


# ----------------------------------------------------------------------------- pytest
def _source_root() -> Optional[str]:
    """The checkout holding tests/ (the package's parent directory), if there is one."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return root if os.path.isdir(os.path.join(root, "tests")) else None


def pytest_shards(dry: bool) -> int:
    """How many pytest processes the stage runs side by side: on a GPU one per two CPU cores, at
    most 4 (the tests' Triton kernels compile on the host, one variant at a time per process, and
    compiling dominates their first run); in the dry mode one."""
    return 1 if dry else max(1, min(4, (os.cpu_count() or 1) // 2))


def stage_pytest(ctx: Ctx) -> None:
    root = _source_root()
    if root is None:
        ctx.record(item="pytest", status="skip", detail="no tests/ next to the package (an "
                   "installed copy): nothing to run")
        return
    # (tests/test_kernels_cuda.py repeats the correctness stage's checks: not run again here)
    files = ["tests/test_kernels_attention.py", "tests/test_kernels_matryoshka.py"]
    # the interpreter is slow and CI runs these files itself: the dry mode runs one quick slice
    selection = [files[0], "-k", "why_not"] if ctx.dry else files
    n = pytest_shards(ctx.dry)
    shard = ["-p", "adaperceiver.bench._pytest_shard"] if n > 1 else []
    args = ["-q", "-p", "no:cacheprovider", *shard, *selection]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)   # conftest decides: the GPU when there is one
    t0 = time.perf_counter()
    procs = []
    for i in range(n):
        shard_env = dict(env, ADAPERCEIVER_PYTEST_SHARD=f"{i}/{n}") if n > 1 else env
        # (in the worker's process group: stopping the stage stops them too)
        procs.append(subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=root,
                                      env=shard_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    deadline = ctx.deadline
    outs, codes, stopped = [], [], False
    for p in procs:
        try:
            out, err = p.communicate(timeout=None if deadline is None else
                                     max(0.1, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            stopped = True
        outs.append((out or "", err or ""))
        codes.append(p.returncode)
    item = "pytest " + " ".join(selection) + (f" ({n} shards side by side)" if n > 1 else "")
    tails = [([ln for ln in out.strip().splitlines() if ln.strip()][-1:] or [err[-300:]])[0]
             for out, err in outs]
    output = "\n".join(out[-4000 // n:] for out, _ in outs)
    seconds = round(time.perf_counter() - t0, 1)
    if stopped:
        ctx.record(item=item, status="error",
                   detail=f"stopped after {deadline - t0:.0f}s (the stage's limit); progress: "
                          + " | ".join(t[-120:] for t in tails),
                   seconds=seconds, output=output)
        return
    # exit 5: a shard that collected nothing (more shards than tests)
    ok = all(c in (0, 5) for c in codes) and any(c == 0 for c in codes)
    ctx.record(item=item, status="ok" if ok else "FAIL", detail=" | ".join(tails)[:300],
               seconds=seconds, output=output)


# ----------------------------------------------------------------------------- timing
def _time(ctx, steps: dict, *, inner: int, rounds: int, warmup: int = 1) -> dict:
    """{name: ms per call or None (it failed: recorded)} of the ``steps``, timed round-robin
    (every round runs each once), each timed over ``inner`` back-to-back calls."""
    from adaperceiver.bench.timing import time_interleaved
    names = list(steps)
    fns = [lambda f=steps[n]: [f() for _ in range(inner)] for n in names]
    errors = {}

    def on_error(i, e):
        errors[names[i]] = _one_line(e)

    timings = time_interleaved(fns, ctx.device, warmup=warmup, rounds=rounds, min_rounds=1,
                               on_error=on_error)
    out = {}
    for n, t in zip(names, timings):
        out[n] = None if t is None else t.median_ms / inner
        if t is None:
            out[n + " (error)"] = errors.get(n, "failed")
    return out


def _attention_impls(ctx, B, H, N, D, dtype, grans):
    """{name: callable} of every attention implementation on these shapes (the ones that
    cannot run are left out and recorded)."""
    import torch
    import torch.nn.functional as F

    from adaperceiver import ops
    from adaperceiver.ops.inputs import AttentionInputs
    from adaperceiver.ops.schedule import row_end
    dev = ctx.device
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype) for _ in range(3))
    impls, skipped = {}, {}
    for backend in ("triton", "cuda"):
        for mask in (False, True):
            g = grans if mask else None
            why = _why_not("attention", AttentionInputs.build(q, k, v, g), backend)
            key = f"ours-{backend}" + (" mask" if mask else "")
            if why:
                skipped[key] = "; ".join(why)[:200]
                continue

            def run(backend=backend, g=g):
                with ops.use_backend(backend):
                    return ops.block_masked_attention(q, k, v, g)
            impls[key] = run
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for label, sdpa_backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                                ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        def run(b=sdpa_backend):
            with sdpa_kernel(b):
                return F.scaled_dot_product_attention(q, k, v)
        impls[label] = run
    dense = torch.arange(N, device=dev)[None, :] < row_end(N, grans, device=dev)[:, None]

    def sdpa_mask():
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    impls["sdpa-efficient mask"] = sdpa_mask
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        re = row_end(N, grans, device=dev)

        def mask_mod(b, h, qi, ki):
            return ki < re[qi]
        block_mask = create_block_mask(mask_mod, None, None, N, N, device=dev)
        # compiled on the GPU (its real use); eager in the dry mode (the compile of the CPU
        # path takes longer than the whole dry run)
        flex = flex_attention if ctx.dry else torch.compile(flex_attention, dynamic=False)
        impls["flex mask"] = lambda: flex(q, k, v, block_mask=block_mask)
    except Exception as e:  # noqa: BLE001
        skipped["flex mask"] = f"{type(e).__name__}: {e}"[:200]
    try:
        from flash_attn import flash_attn_func
        qf, kf, vf = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        impls["flash-attn"] = lambda: flash_attn_func(qf, kf, vf)
    except Exception as e:  # noqa: BLE001 - optional
        skipped["flash-attn"] = f"not available ({type(e).__name__})"
    return impls, skipped


def stage_attention(ctx: Ctx) -> None:
    import torch
    torch.manual_seed(0)
    grans = [32, 64, 96, 128, 192, 256]
    if ctx.dry:
        shapes = [(2, 2, 32, 64), (1, 1, 128, 64)]
        dtype, inner, rounds = torch.float32, 1, 1
    else:
        shapes = [(64, 13, 32, 64), (64, 13, 256, 64), (256, 13, 64, 64), (256, 13, 256, 64),
                  (4, 13, 4096, 64)]
        dtype, inner, rounds = torch.bfloat16, 10, 10
    longest = 0.0
    for B, H, N, D in shapes:
        name = f"B={B} H={H} N={N} D={D} {_dname(dtype)}"
        # each shape compiles FlexAttention and the kernels anew: about as long as the longest
        # shape before it
        if longest and not ctx.fits(f"attention {name}", 1.5 * longest + 5):
            continue
        t_shape = time.perf_counter()
        with ctx.item(f"attention {name}"):
            impls, skipped = _attention_impls(ctx, B, H, N, D, dtype, grans)
            ms = _time(ctx, impls, inner=inner, rounds=rounds)
            ref_nomask, ref_mask = ms.get("sdpa-flash"), ms.get("flex mask")
            row = {"shape": [B, H, N, D], "dtype": _dname(dtype), "ms": ms, "skipped": skipped}
            for backend in ("triton", "cuda"):
                ours, ours_m = ms.get(f"ours-{backend}"), ms.get(f"ours-{backend} mask")
                if ours and ref_nomask:
                    row[f"{backend}_nomask_vs_sdpa_flash"] = ours / ref_nomask
                if ours_m and ref_mask:
                    row[f"{backend}_mask_vs_flex"] = ours_m / ref_mask
            ctx.record(item=f"attention {name}", status="ok", detail=_ms_line(ms), **row)
        longest = max(longest, time.perf_counter() - t_shape)


def _ms_line(ms: dict) -> str:
    return ", ".join(f"{k} {v * 1e3:.0f}us" if isinstance(v, float) else f"{k}: {v}"
                     for k, v in ms.items() if not k.endswith("(error)") and v is not None) + (
        "" if not any(k.endswith("(error)") for k in ms) else
        " | errors: " + "; ".join(f"{k}: {v}" for k, v in ms.items() if k.endswith("(error)")))


# ----------------------------------------------------------------------------- ffn
def _ffn_impls(ctx, B, N, C, hmax, hidden, dtype):
    import torch
    import torch.nn.functional as F

    from adaperceiver import ops
    from adaperceiver.ops.inputs import FfnInputs
    dev = ctx.device
    x = torch.randn(B, N, C, device=dev, dtype=dtype)
    w1 = (torch.randn(hmax, C, device=dev) / C ** 0.5).to(dtype)
    b1 = torch.zeros(hmax, device=dev, dtype=dtype).normal_()
    w2 = (torch.randn(C, hmax, device=dev) / hmax ** 0.5).to(dtype)
    b2 = torch.zeros(C, device=dev, dtype=dtype).normal_()
    impls, skipped = {}, {}
    for backend in ("triton", "cuda"):
        why = _why_not("ffn", FfnInputs.build(x, w1, b1, w2, b2, hidden), backend)
        if why:
            skipped[f"ours-{backend}"] = "; ".join(why)[:200]
            continue

        def run(backend=backend):
            with ops.use_backend(backend):
                return ops.matryoshka_ffn(x, w1, b1, w2, b2, hidden)
        impls[f"ours-{backend}"] = run
    impls["dense full width"] = lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    # the per-width GEMMs: samples grouped by width beforehand (no gather in the timing), one
    # fc1 and one fc2 on the sliced weights per width: the cuBLAS time of exactly the work
    groups = {}
    for b, h in enumerate(hidden):
        groups.setdefault(h, []).append(b)
    grouped = [(h, x[torch.tensor(bs, device=dev)].reshape(-1, C)) for h, bs in groups.items()]

    def per_width():
        return [F.linear(F.gelu(F.linear(xg, w1[:h], b1[:h])), w2[:, :h], b2)
                for h, xg in grouped]
    impls["cuBLAS per-width"] = per_width
    return impls, skipped


def stage_ffn(ctx: Ctx) -> None:
    import torch

    from adaperceiver.config import AdaPerceiverConfig, hidden_size
    cfg = AdaPerceiverConfig()
    if ctx.dry:
        C, widths = 64, [32, 48, 64]
        shapes, dtype, inner, rounds = [(4, 8)], torch.float32, 1, 1
    else:
        C, widths = cfg.embed_dim, cfg.mat_dims
        shapes, dtype, inner, rounds = [(64, 64), (64, 256), (256, 256)], torch.bfloat16, 5, 10
    hs = [hidden_size(w, cfg.ffn_ratio) for w in widths]
    hmax = hidden_size(C, cfg.ffn_ratio)
    rng = random.Random(0)
    for B, N in shapes:
        hidden = [hs[i % len(hs)] for i in range(len(hs))] + [rng.choice(hs)
                                                              for _ in range(B - len(hs))]
        name = f"ffn B={B} N={N} C={C} Hmax={hmax} widths={sorted(set(hidden))} {_dname(dtype)}"
        with ctx.item(name):
            impls, skipped = _ffn_impls(ctx, B, N, C, hmax, hidden, dtype)
            ms = _time(ctx, impls, inner=inner, rounds=rounds)
            row = {"shape": [B, N, C, hmax], "dtype": _dname(dtype), "ms": ms,
                   "skipped": skipped}
            for backend in ("triton", "cuda"):
                ours = ms.get(f"ours-{backend}")
                if ours and ms.get("cuBLAS per-width"):
                    row[f"{backend}_per_width_over_ours"] = ms["cuBLAS per-width"] / ours
                if ours and ms.get("dense full width"):
                    row[f"{backend}_dense_over_ours"] = ms["dense full width"] / ours
            ctx.record(item=name, status="ok", detail=_ms_line(ms), **row)


# ----------------------------------------------------------------------------- models
TINY = dict(embed_dim=64, num_heads=2, depth=2, img_size=32, patch_size=16, num_classes=10,
            mat_dims=[32, 64], mask_token_grans=[8, 16], max_latent_tokens=16)


def _model(ctx, dtype):
    """The released architecture (random init) on the GPU; a tiny one in the dry mode."""
    import adaperceiver
    model = (adaperceiver.create_model("adaperceiver_v1_in1k", **TINY) if ctx.dry
             else adaperceiver.create_model("adaperceiver_v1_in1k"))
    return model.eval().to(device=ctx.device, dtype=dtype)


def _configs(model) -> dict:
    cfg = model.config
    t, w, d = cfg.mask_token_grans, cfg.mat_dims, cfg.depth
    return {"full": dict(num_tokens=t[-1], mat_dim=w[-1], depth=d),
            "small": dict(num_tokens=t[0], mat_dim=w[0], depth=max(1, d // 3)),
            "mixed lists": dict(num_tokens=[t[-1], t[0], t[len(t) // 2], t[-1]],
                                mat_dim=[w[0], w[-1], w[-1], w[0]],
                                depth=[d, max(1, d // 3), d, max(1, d // 2)])}


def _dry_backend(ctx) -> str:
    # the dry mode runs the model's ops on Triton's interpreter, the GPU path's kernels
    return "triton" if ctx.dry else "auto"


def stage_e2e(ctx: Ctx) -> None:
    import torch

    from adaperceiver import ops
    from adaperceiver.bench.baselines import build_baseline
    from adaperceiver.bench.inference import _paired
    from adaperceiver.bench.timing import time_interleaved
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    batch, rounds = (2, 1) if ctx.dry else (64, 5)
    model = _model(ctx, dtype)
    img = model.config.img_size
    base_name = "flexivit_small" if ctx.dry else "flexivit_large"
    baseline = build_baseline(base_name, img_size=img, device=ctx.device, dtype=dtype)
    x = torch.randn(batch, 3, img, img, device=ctx.device, dtype=dtype)
    cfgs = _configs(model)
    backends = ["cpp"] if ctx.dry else ["auto", "cuda"]

    def step(backend, cfg):
        def run():
            with torch.inference_mode(), ops.use_backend(backend):
                return model(x, **cfg).logits
        return run
    steps = {"baseline": lambda: baseline(x)}
    for backend in backends:
        for cname in ("full", "small"):
            steps[f"{backend} {cname}"] = step(backend, cfgs[cname])
    names = list(steps)
    errors = {}
    with torch.inference_mode():
        timings = time_interleaved([steps[n] for n in names], ctx.device, warmup=1,
                                   rounds=rounds, min_rounds=1,
                                   on_error=lambda i, e: errors.update({names[i]: _one_line(e)}))
    t = dict(zip(names, timings))
    tb = t["baseline"]
    for n in names[1:]:
        if t[n] is None:
            ctx.record(item=f"e2e {n}", status="error", detail=errors.get(n, "failed"))
            continue
        ratio = _paired(tb.times_ms, t[n].times_ms) if tb else None
        ctx.record(item=f"e2e {n}", status="ok", backend=n.split()[0], config=n.split()[1],
                   batch=batch, dtype=_dname(dtype), img_s=batch / (t[n].median_ms / 1e3),
                   baseline=base_name,
                   baseline_img_s=batch / (tb.median_ms / 1e3) if tb else None,
                   vs_baseline=ratio,
                   detail=f"{batch / (t[n].median_ms / 1e3):.1f} img/s, x{ratio or 0:.2f} "
                          f"{base_name}")


# ----------------------------------------------------------------------------- cuda graphs
class _EagerCapture:
    """The dry mode's stand-in for _CudaCapture: ``capture`` runs the function once,
    ``replay`` runs it again into the same output buffer, so the code around a capture runs."""

    def capture(self, fn):
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self):
        return self.out.copy_(self.fn())


class _CudaCapture:
    """One CUDA graph: ``capture(fn)`` records fn's kernels (its output is the graph's static
    output), ``replay()`` reruns them on whatever the static inputs hold now."""

    def __init__(self):
        import torch
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn):
        import torch
        with torch.cuda.graph(self.graph):
            self.out = fn()
        return self.out

    def replay(self):
        self.graph.replay()
        return self.out


def _warm_on_side_stream(ctx, fn, n=2):
    import torch
    if ctx.dry:
        fn()
        return
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(n):
            fn()
    torch.cuda.current_stream().wait_stream(s)


@contextlib.contextmanager
def _sync_debug_error(ctx):
    """On the GPU: any synchronising call (a read-back, a blocking copy) raises."""
    import torch
    if ctx.dry:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def graph_check(ctx, model, x, cfg, backend) -> dict:
    """Capture ``model(static_x, **cfg)`` in a CUDA graph, replay it on a new input copied into
    the static buffer, and compare with the eager output on that input. The eager second call
    runs under sync-debug "error" (no host sync allowed)."""
    import torch

    from adaperceiver import ops
    static_x = x.clone()

    def fwd():
        with ops.use_backend(backend):
            return model(static_x, **cfg).logits
    with torch.inference_mode():
        _warm_on_side_stream(ctx, fwd)
        if not ctx.dry:       # (the dry mode's warm-up call above is its eager call)
            with _sync_debug_error(ctx):
                fwd()
        graph = _EagerCapture() if ctx.dry else _CudaCapture()
        graph.capture(fwd)
        new_x = torch.randn_like(x)
        static_x.copy_(new_x)
        replayed = graph.replay()      # the captured output, rewritten by the replay
        _sync(ctx.device)
        replayed = replayed.clone()
        with ops.use_backend(backend):
            eager = model(new_x, **cfg).logits
    err = max_err(replayed, eager)
    scale = max(1.0, eager.abs().max().item())
    return {"err": err, "ok": err <= 1e-3 * scale, "scale": scale}


def stage_cuda_graph(ctx: Ctx) -> None:
    import torch
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    model = _model(ctx, dtype)
    img = model.config.img_size
    x = torch.randn(4, 3, img, img, device=ctx.device, dtype=dtype)
    backends = [_dry_backend(ctx)] if ctx.dry else ["triton", "cuda"]
    configs = _configs(model)
    if ctx.dry:    # the interpreter is slow: a fixed and a mixed configuration
        configs.pop("small")
    for backend in backends:
        for cname, cfg in configs.items():
            name = f"graph {backend} {cname}"
            with ctx.item(name):
                r = graph_check(ctx, model, x, cfg, backend)
                ctx.record(item=name, status="ok" if r["ok"] else "FAIL",
                           detail=("(dry: eager stand-in for the graph) " if ctx.dry else "")
                           + f"replay vs eager max err {r['err']:.3g}", **r)


# ----------------------------------------------------------------------------- compile
def stage_compile(ctx: Ctx) -> None:
    import torch

    from adaperceiver import ops
    from adaperceiver.bench.timing import time_interleaved
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    model = _model(ctx, dtype)
    img = model.config.img_size
    x = torch.randn(2 if ctx.dry else 64, 3, img, img, device=ctx.device, dtype=dtype)
    cfg = _configs(model)["full"]
    backend = _dry_backend(ctx)
    # dry: dynamo's tracing with the eager backend (inductor's CPU compile takes minutes)
    variants = ([("eager-backend", dict(backend="eager"))] if ctx.dry else
                [("default", {}), ("reduce-overhead", dict(mode="reduce-overhead"))])
    with torch.inference_mode(), ops.use_backend(backend):
        eager_out = model(x, **cfg).logits
        steps = {"eager": lambda: model(x, **cfg).logits}
        first_s = 0.0
        for label, kw in variants:
            name = f"torch.compile {label}"
            # another compile of the whole model: about as long as the one before it
            if first_s and not ctx.fits(name, 1.5 * first_s + 10):
                continue
            with ctx.item(name):
                torch._dynamo.reset()
                compiled = torch.compile(lambda inp: model(inp, **cfg).logits, **kw)
                t0 = time.perf_counter()
                out = compiled(x)
                out = compiled(x)      # reduce-overhead records its graph on a later call
                _sync(ctx.device)
                first = time.perf_counter() - t0
                first_s = max(first_s, first)
                err = max_err(out.clone(), eager_out)
                scale = max(1.0, eager_out.abs().max().item())
                tol = (1e-4 if dtype == torch.float32 else 3e-2) * scale
                ctx.record(item=name, status="ok" if err <= tol else "FAIL",
                           detail=f"max err vs eager {err:.3g} (tol {tol:.2g}), compile + 2 "
                                  f"calls {first:.1f}s", err=err, compile_s=first)
                steps[label] = lambda c=compiled: c(x)
        if len(steps) > 1:
            with ctx.item("compile timing"):
                names = list(steps)
                ts = time_interleaved([steps[n] for n in names], ctx.device,
                                      warmup=0 if ctx.dry else 1,
                                      rounds=1 if ctx.dry else 10, min_rounds=1,
                                      on_error=lambda i, e: None)
                ms = {n: (t.median_ms if t else None) for n, t in zip(names, ts)}
                ctx.record(item="compile timing (ms per forward)", status="ok", ms=ms,
                           detail=", ".join(f"{k} {v:.2f}ms" for k, v in ms.items() if v))


STAGE_FUNCS: dict[str, Callable] = {
    "env": stage_env, "correctness": stage_correctness, "pytest": stage_pytest,
    "attention": stage_attention, "ffn": stage_ffn, "e2e": stage_e2e,
    "cuda_graph": stage_cuda_graph, "compile": stage_compile,
}


# ----------------------------------------------------------------------------- runner
# seconds of a stage's limit kept back from its items: the worker's start (imports) and end
STAGE_MARGIN_S = 10.0


def _worker(stage: str, mode: str, rows_path: str, limit_s: float) -> int:
    ctx = Ctx(mode, rows_path, [], deadline=time.perf_counter() + limit_s - STAGE_MARGIN_S)
    STAGE_FUNCS[stage](ctx)
    return 0


def _stage_env(mode: str) -> dict:
    env = dict(os.environ)
    if mode == "dry":
        env["TRITON_INTERPRET"] = "1"     # before any @triton.jit is applied
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def stage_command(stage: str, mode: str, rows_path: str, limit_s: float) -> list[str]:
    """The command line of one stage's worker process (it appends its rows to ``rows_path``)."""
    return [sys.executable, "-m", "adaperceiver.bench.gpu_check", "--worker", stage,
            "--mode", mode, "--rows", rows_path, "--limit", str(limit_s)]


def run_stage(stage: str, mode: str, limit_s: float, tmp: str) -> dict:
    """Run one stage in a subprocess under ``limit_s``; its rows, status and time."""
    rows_path = os.path.join(tmp, f"{stage}.jsonl")
    open(rows_path, "w").close()
    cmd = stage_command(stage, mode, rows_path, limit_s)
    t0 = time.perf_counter()
    print(f"== {stage} (limit {limit_s:.0f}s)", flush=True)
    proc = subprocess.Popen(cmd, env=_stage_env(mode), stdout=None, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    status, error = "ok", None
    try:
        _, err = proc.communicate(timeout=limit_s)
        if proc.returncode:
            status = "crashed"
            error = f"exit {proc.returncode}: " + (err or "").strip()[-1500:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)       # the stage's process group: it and its children
        proc.communicate()
        status, error = "timeout", f"stopped at its {limit_s:.0f}s limit"
    rows = []
    with open(rows_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if status == "ok" and any(r.get("status") in ("FAIL", "error") for r in rows):
        status = "failed"
    return {"stage": stage, "status": status, "error": error, "limit_s": limit_s,
            "seconds": round(time.perf_counter() - t0, 1), "rows": rows}


def evaluate_targets(stages: list[dict], mode: str = "gpu") -> list[dict]:
    """Each target's measured value (the worst over the model's shapes / backends measured)."""
    rows = {s["stage"]: s["rows"] for s in stages}
    vals: dict[str, list] = {k: [] for k, *_ in TARGETS}
    for r in rows.get("attention", []):
        shape = r.get("shape") or [0, 0, 0]
        if shape[2] > 256:    # the targets are at the model's shapes (N <= 256)
            continue
        for backend in ("triton", "cuda"):
            if f"{backend}_nomask_vs_sdpa_flash" in r:
                vals["attn_nomask_vs_sdpa_flash"].append(
                    (r[f"{backend}_nomask_vs_sdpa_flash"], f"{backend} {shape}"))
            if f"{backend}_mask_vs_flex" in r:
                vals["attn_mask_vs_flex"].append((r[f"{backend}_mask_vs_flex"],
                                                  f"{backend} {shape}"))
    for r in rows.get("ffn", []):
        for backend in ("triton", "cuda"):
            if f"{backend}_per_width_over_ours" in r:
                vals["ffn_per_width_over_ours"].append((r[f"{backend}_per_width_over_ours"],
                                                        f"{backend} {r.get('shape')}"))
    for r in rows.get("e2e", []):
        if r.get("config") == "full" and r.get("vs_baseline") is not None:
            vals["e2e_vs_flexivit_large"].append((r["vs_baseline"], r.get("backend")))
    out = []
    for key, desc, op, bound in TARGETS:
        got = vals[key]
        if not got:
            out.append({"target": key, "description": desc, "bound": f"{op} {bound}",
                        "measured": None, "where": "", "verdict": "not measured"})
            continue
        # the best backend per shape is what a user gets (auto picks it); the worst shape counts
        by_where: dict[str, float] = {}
        for v, where in got:
            shape = where.split(" ", 1)[-1]
            better = (min if op in ("<=", "<") else max)
            by_where[shape] = better(by_where.get(shape, v), v)
        worst_fn = max if op in ("<=", "<") else min
        where, value = worst_fn(by_where.items(), key=lambda kv: kv[1])
        ok = {"<=": value <= bound, "<": value < bound, ">=": value >= bound}[op]
        verdict = ("n/a (dry mode: not a GPU figure)" if mode == "dry"
                   else "met" if ok else "MISSED")
        out.append({"target": key, "description": desc, "bound": f"{op} {bound}",
                    "measured": value, "where": where, "verdict": verdict})
    return out


def format_report(doc: dict) -> str:
    from adaperceiver.bench.report import align_table
    lines = [f"adaperceiver gpu-check ({doc['mode']} mode) {doc['time_utc']}"]
    if doc["mode"] == "dry":
        lines.append("No CUDA device (or --dry): tiny shapes on the CPU, Triton in its "
                     "interpreter. The figures below are NOT GPU figures.")
    env = next((r.get("env") for s in doc["stages"] if s["stage"] == "env"
                for r in s["rows"] if r.get("env")), None)
    if env:
        bi = env.get("build_info") or {}
        lines.append(f"GPU: {env.get('gpu', 'none')} (sm {env.get('capability', '-')}), "
                     f"driver/nvidia-smi: {env.get('nvidia_smi', '-')}")
        lines.append(f"torch {env.get('torch')} CUDA {env.get('torch_cuda')} cuDNN "
                     f"{env.get('cudnn')} triton {env.get('triton')} flash-attn "
                     f"{env.get('flash_attn')}; extension: cpp {bi.get('cpp_compiled')}, cuda "
                     f"{bi.get('cuda_compiled')} archs {bi.get('cuda_archs')}")
    lines += ["", "Stages"]
    rows = []
    for s in doc["stages"]:
        n = len(s["rows"])
        bad = sum(r.get("status") in ("FAIL", "error") for r in s["rows"])
        skip = sum(r.get("status") == "skip" for r in s["rows"])
        rows.append((s["stage"], s["status"], f"{s['seconds']:.1f}", f"{s['limit_s']:.0f}",
                     f"{n - bad - skip}/{n}", str(skip), (s.get("error") or "")[:80]))
    lines.append(align_table(("stage", "status", "seconds", "limit", "items ok", "skipped",
                              "note"), rows, left={0, 1, 6}))
    for s in doc["stages"]:
        if not s["rows"]:
            continue
        lines += ["", f"{s['stage']}"]
        lines.append(align_table(("status", "item", "detail"),
                                 [(r.get("status", ""), str(r.get("item", ""))[:70],
                                   str(r.get("detail", ""))[:160]) for r in s["rows"]],
                                 left={0, 1, 2}))
    lines += ["", "Targets (benchmarks/README.md)"]
    lines.append(align_table(
        ("target", "required", "measured", "where", "verdict"),
        [(t["description"], t["bound"],
          "-" if t["measured"] is None else f"{t['measured']:.3f}", t["where"], t["verdict"])
         for t in doc["targets"]], left={0, 3, 4}))
    return "\n".join(lines) + "\n"


def run_check(out_dir: str, *, dry: bool = False, stages=None, scale_limits: float = 1.0) -> dict:
    """Run the stages, write ``out_dir``/gpu_check.json and report.txt; returns the document."""
    import torch
    mode = "gpu" if torch.cuda.is_available() and not dry else "dry"
    if mode == "dry":
        print("gpu-check: " + ("no CUDA device found" if not torch.cuda.is_available()
                               else "--dry given") + ": running the dry mode (tiny shapes, CPU, "
              "Triton interpreter); its figures are not GPU figures.", flush=True)
    known = [s for s, *_ in STAGES]
    chosen = known if not stages else list(stages)
    for s in chosen:
        if s not in known:
            raise ValueError(f"stage {s!r} is not known; allowed: {', '.join(known)}")
    chosen_order = [s for s in known if s in chosen]
    budget = TOTAL_BUDGET_S[mode] * scale_limits
    t_start = time.perf_counter()
    results = []
    planned = 0.0   # the chosen stages' own limits so far
    with tempfile.TemporaryDirectory() as tmp:
        for stage, gpu_s, dry_s in STAGES:
            if stage not in chosen:
                continue
            own = (gpu_s if mode == "gpu" else dry_s) * scale_limits
            planned += own
            elapsed = time.perf_counter() - t_start
            left = budget - elapsed
            # its own limit plus the time the stages before it left unused (planned - elapsed);
            # the last stage takes all that is left
            limit = left if stage == chosen_order[-1] else min(max(own, planned - elapsed), left)
            if limit < MIN_STAGE_S:
                results.append({"stage": stage, "status": "skipped", "limit_s": 0,
                                "seconds": 0.0, "rows": [],
                                "error": "the run's total budget is spent"})
                continue
            results.append(run_stage(stage, mode, limit, tmp))
    doc = {"mode": mode, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "seconds": round(time.perf_counter() - t_start, 1), "stages": results}
    doc["targets"] = evaluate_targets(results, mode)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    report = format_report(doc)
    with open(os.path.join(out_dir, "report.txt"), "w") as f:
        f.write(report)
    print("\n" + report, flush=True)
    print(f"written: {os.path.join(out_dir, 'report.txt')} and gpu_check.json", flush=True)
    return doc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adaperceiver.bench.gpu_check",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default="results/gpu")
    ap.add_argument("--dry", action="store_true", help="the dry mode even with a GPU")
    ap.add_argument("--stages", default=None,
                    help="comma-separated subset of: " + ", ".join(s for s, *_ in STAGES))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.mode, args.rows, args.limit)
    doc = run_check(args.out_dir, dry=args.dry,
                    stages=args.stages.split(",") if args.stages else None)
    bad = [s["stage"] for s in doc["stages"] if s["status"] not in ("ok", "skipped")]
    if bad:
        print(f"gpu-check: stages not ok: {', '.join(bad)}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
