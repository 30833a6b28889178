"""``make gpu-check`` (adaperceiver.bench.gpu_check): its dry mode runs here end to end, so the
command cannot rot; the parts a GPU run adds (target verdicts, the report of a GPU run, a stage
cut at its time limit, the exit status) are checked on synthetic inputs."""
import json
import os
import subprocess
import sys

import pytest

from adaperceiver.bench import gpu_check as G


def test_dry_run_end_to_end(tmp_path):
    """Every stage runs (tiny shapes, the Triton interpreter), each within its limit, and the
    report and JSON are written. The NaN items and the correctness items must pass: the
    interpreter runs the same checking code a GPU run does."""
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "adaperceiver.bench.gpu_check", "--dry",
                        "--out-dir", str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=700)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["mode"] == "dry"
    by = {s["stage"]: s for s in doc["stages"]}
    assert list(by) == [s for s, *_ in G.STAGES]
    for name, s in by.items():
        assert s["status"] == "ok", (name, s.get("error"), s["rows"][-3:])
        assert s["rows"], name
        assert s["seconds"] <= s["limit_s"]
    corr = by["correctness"]["rows"]
    assert any(r["status"] == "ok" and "NaN" in r["item"] for r in corr)
    # the cuda backend cannot take CPU tensors: skipped with its reason, not silently dropped
    assert any(r["status"] == "skip" and "cuda" in r["item"] for r in corr)
    assert any(r["status"] == "ok" and "packed" in r["item"] for r in corr)
    report = (tmp_path / "report.txt").read_text()
    assert "NOT GPU figures" in report and "Targets" in report
    assert all(t["verdict"].startswith("n/a") or t["measured"] is None for t in doc["targets"])
    assert "ours-triton" in json.dumps(by["attention"]["rows"])
    assert r.stdout.rstrip().endswith("gpu_check.json")


def _stage(name, rows, status="ok"):
    return {"stage": name, "status": status, "error": None, "limit_s": 60, "seconds": 1.0,
            "rows": rows}


def test_targets_and_report_of_a_gpu_run():
    """The verdicts a GPU run prints: per shape the better of our backends counts, the worst
    shape decides; the N=4096 row is not a model shape."""
    stages = [
        _stage("attention", [
            {"item": "a", "status": "ok", "shape": [64, 13, 256, 64],
             "triton_nomask_vs_sdpa_flash": 1.1, "cuda_nomask_vs_sdpa_flash": 3.0,
             "triton_mask_vs_flex": 0.8},
            {"item": "b", "status": "ok", "shape": [256, 13, 64, 64],
             "triton_nomask_vs_sdpa_flash": 1.3, "cuda_nomask_vs_sdpa_flash": 1.15,
             "triton_mask_vs_flex": 1.2},
            {"item": "c", "status": "ok", "shape": [4, 13, 4096, 64],
             "triton_nomask_vs_sdpa_flash": 9.0}]),
        _stage("ffn", [{"item": "f", "status": "ok", "shape": [64, 256, 832, 2138],
                        "triton_per_width_over_ours": 0.95, "cuda_per_width_over_ours": 0.5}]),
        _stage("e2e", [{"item": "e", "status": "ok", "config": "full", "backend": "auto",
                        "vs_baseline": 1.2}]),
    ]
    t = {x["target"]: x for x in G.evaluate_targets(stages, "gpu")}
    assert t["attn_nomask_vs_sdpa_flash"]["measured"] == pytest.approx(1.15)
    assert t["attn_nomask_vs_sdpa_flash"]["verdict"] == "met"
    assert t["attn_mask_vs_flex"]["measured"] == pytest.approx(1.2)
    assert t["attn_mask_vs_flex"]["verdict"] == "MISSED"
    assert t["ffn_per_width_over_ours"]["verdict"] == "met"
    assert t["e2e_vs_flexivit_large"]["verdict"] == "MISSED"
    doc = {"mode": "gpu", "time_utc": "now", "seconds": 3.0,
           "stages": stages + [_stage("compile", [], "timeout")],
           "targets": list(t.values())}
    report = G.format_report(doc)
    assert "NOT GPU figures" not in report
    assert "MISSED" in report and "met" in report and "timeout" in report
    # nothing measured: said so, not a verdict
    empty = G.evaluate_targets([], "gpu")
    assert all(x["verdict"] == "not measured" for x in empty)


# Stands in for a stage's worker process (gpu_check.stage_command): records one item, and for
# the stage named "correctness" starts a child (a stage's tools run in children) and then sleeps
# far past any limit the test gives it, recording an item afterwards that must never appear.
_FAKE_WORKER = r"""
import json, os, subprocess, sys, time
stage, rows = sys.argv[1], sys.argv[2]
def record(item, **kw):
    with open(rows, "a") as f:
        f.write(json.dumps({"item": item, "status": "ok", **kw}) + "\n")
record(stage + " first item", pid=os.getpid())
if stage == "correctness":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record("child started", pid=child.pid)
    time.sleep(60)
    record("after the sleep")
"""


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_stage_over_its_limit_is_stopped_and_the_rest_run(tmp_path, monkeypatch, capsys):
    """A stage that sleeps 60 s under a 2 s limit is stopped (its process group killed: the
    worker and its child), reported as a timeout with the items it finished, the stages after it
    still run, and the command exits 1 (the module's documented status for a stage not ok)."""
    import time
    monkeypatch.setattr(G, "STAGES", (("correctness", 30, 2), ("env", 30, 20),
                                      ("attention", 30, 20)))
    monkeypatch.setattr(G, "MIN_STAGE_S", 1.0)
    monkeypatch.setattr(G, "stage_command", lambda stage, mode, rows, limit:
                        [sys.executable, "-c", _FAKE_WORKER, stage, rows])
    out_dir = tmp_path / "out"
    rc = G.main(["--dry", "--out-dir", str(out_dir)])
    printed = capsys.readouterr().out
    assert rc == 1
    doc = json.loads((out_dir / "gpu_check.json").read_text())
    by = {s["stage"]: s for s in doc["stages"]}
    assert list(by) == ["correctness", "env", "attention"]
    cut = by["correctness"]
    assert cut["status"] == "timeout" and cut["error"] == "stopped at its 2s limit", cut
    items = [r["item"] for r in cut["rows"]]
    assert items == ["correctness first item", "child started"], items
    assert by["env"]["status"] == by["attention"]["status"] == "ok"
    assert [r["item"] for r in by["attention"]["rows"]] == ["attention first item"]
    # the worker and the child it started are both gone (killed with the process group)
    pids = [r["pid"] for r in cut["rows"]]
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [p for p in pids if not _gone(p)]
    for p in alive:             # a survivor would outlive the test: ended, then reported
        os.kill(p, 9)
    assert not alive, f"still running after the stage was stopped: {alive}"
    report = (out_dir / "report.txt").read_text()
    line = next(ln for ln in report.splitlines() if ln.lstrip().startswith("correctness"))
    assert "timeout" in line and "stopped at its 2s limit" in line, line
    assert "stages not ok: correctness" in printed


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="stage 'nope' is not known; allowed: env"):
        G.run_check(str(tmp_path), dry=True, stages=["nope"])


def test_stages_use_the_time_the_earlier_ones_left(tmp_path, monkeypatch):
    """A stage runs under its own limit plus what the stages before it left unused; the last
    one (the kernel tests, whose Triton variants compile first on a GPU) gets all of the total
    budget still left."""
    monkeypatch.setattr(G, "STAGES", (("env", 30, 7), ("correctness", 30, 9),
                                      ("attention", 30, 11), ("ffn", 30, 13)))
    monkeypatch.setattr(G, "stage_command", lambda stage, mode, rows, limit:
                        [sys.executable, "-c", _FAKE_WORKER, stage, rows])
    doc = G.run_check(str(tmp_path), dry=True, stages=["env", "attention", "ffn"])
    by = {s["stage"]: s for s in doc["stages"]}
    assert list(by) == ["env", "attention", "ffn"]
    env, attn, ffn = by["env"], by["attention"], by["ffn"]
    assert env["limit_s"] == 7
    # 11 s of its own and the 7 - (env's time) env left; the stages' bookkeeping takes a little
    assert 18 - env["seconds"] - 1 < attn["limit_s"] <= 18 - env["seconds"], attn["limit_s"]
    spent = env["seconds"] + attn["seconds"]
    budget = G.TOTAL_BUDGET_S["dry"]
    assert budget - spent - 2 < ffn["limit_s"] <= budget - spent, ffn["limit_s"]


_FAKE_TESTS = """
import os, time
import pytest

@pytest.mark.parametrize("i", range({n}))
def test_case(i):
    name = f"{{os.getpid()}}-{{i}}-{{os.path.basename(__file__)}}"
    with open(os.path.join({out!r}, name), "w"):
        pass
    assert i != {fail}
    if i == {hang}:
        time.sleep(60)
"""


def _fake_kernel_tests(root, n=7, fail=-1, hang=-1):
    """tests/test_kernels_attention.py and tests/test_kernels_matryoshka.py under ``root``, n
    cases each, each case leaving a file named ``<pid>-<case>-<file>`` in root/ran; case ``fail``
    fails, case ``hang`` sleeps 60 s."""
    ran = root / "ran"
    ran.mkdir(parents=True)
    (root / "tests").mkdir()
    for name in ("test_kernels_attention.py", "test_kernels_matryoshka.py"):
        (root / "tests" / name).write_text(_FAKE_TESTS.format(n=n, out=str(ran), fail=fail,
                                                              hang=hang))
    return ran


@pytest.mark.parametrize("shards", [1, 3])
def test_pytest_stage_runs_the_kernel_tests_in_side_by_side_shards(tmp_path, monkeypatch,
                                                                   shards):
    """On a GPU the kernel test files run as ``pytest_shards`` processes at once (their Triton
    variants compile in parallel): each test exactly once over the shards, the shards in
    processes of their own, one row saying ok."""
    ran = _fake_kernel_tests(tmp_path)
    monkeypatch.setattr(G, "_source_root", lambda: str(tmp_path))
    monkeypatch.setattr(G, "pytest_shards", lambda dry: shards)
    ctx = G.Ctx("gpu", None, [])
    G.stage_pytest(ctx)
    (row,) = ctx.rows
    assert row["status"] == "ok", row
    assert row["item"].startswith("pytest tests/test_kernels_attention.py "
                                  "tests/test_kernels_matryoshka.py")
    assert ("side by side" in row["item"]) == (shards > 1)
    names = [f.name for f in ran.iterdir()]
    cases = sorted(n.split("-")[1] for n in names)
    assert cases == sorted([str(i) for i in range(7)] * 2), cases
    assert len({n.split("-")[0] for n in names}) == shards


def test_pytest_stage_reports_a_failing_shard_and_stops_a_hanging_one(tmp_path, monkeypatch):
    import time
    monkeypatch.setattr(G, "_source_root", lambda: str(tmp_path))
    monkeypatch.setattr(G, "pytest_shards", lambda dry: 2)
    _fake_kernel_tests(tmp_path, fail=3)
    ctx = G.Ctx("gpu", None, [])
    G.stage_pytest(ctx)
    assert ctx.rows[-1]["status"] == "FAIL" and "1 failed" in ctx.rows[-1]["detail"], ctx.rows
    hang = tmp_path / "hang"
    hang.mkdir()
    _fake_kernel_tests(hang, hang=2)
    monkeypatch.setattr(G, "_source_root", lambda: str(hang))
    ctx.deadline = time.perf_counter() + 8    # the worker's: its limit less STAGE_MARGIN_S
    G.stage_pytest(ctx)
    assert ctx.rows[-1]["status"] == "error", ctx.rows[-1]
    assert ctx.rows[-1]["detail"].startswith("stopped after 8s (the stage's limit)")


def test_an_item_that_would_overrun_its_stage_is_skipped_not_started():
    """A stage stopped at its limit fails and loses what comes after; an item whose estimate
    does not fit in the time left is recorded as skipped instead, with both figures."""
    import time
    ctx = G.Ctx("gpu", None, [], deadline=time.perf_counter() + 30)
    assert ctx.fits("small", 5) and not ctx.rows
    assert not ctx.fits("torch.compile reduce-overhead", 100)
    (row,) = ctx.rows
    assert row["item"] == "torch.compile reduce-overhead" and row["status"] == "skip"
    assert row["detail"].startswith("not started: it needs about 100s"), row
    assert "s of the stage's limit are left" in row["detail"]
    assert G.Ctx("gpu", None, []).fits("no deadline", 1e9)


def test_worker_gives_its_stage_a_deadline_inside_the_limit(tmp_path, monkeypatch):
    import time
    seen = {}
    monkeypatch.setitem(G.STAGE_FUNCS, "env",
                        lambda ctx: seen.update(left=ctx.deadline - time.perf_counter()))
    G._worker("env", "dry", str(tmp_path / "rows.jsonl"), 42.0)
    assert 42.0 - G.STAGE_MARGIN_S - 1 < seen["left"] <= 42.0 - G.STAGE_MARGIN_S


def test_attention_stage_skips_the_shapes_that_no_longer_fit(monkeypatch):
    """Each shape compiles anew; once the longest shape so far (x 1.5, + 5 s) no longer fits
    in the time left, the remaining shapes are skipped, each named."""
    import time
    monkeypatch.setattr(G, "_attention_impls", lambda *a: (time.sleep(1.0), ({}, {}))[1])
    monkeypatch.setattr(G, "_time", lambda ctx, impls, **kw: {})
    ctx = G.Ctx("dry", None, [], deadline=time.perf_counter() + 5.5)
    G.stage_attention(ctx)
    assert [r["status"] for r in ctx.rows] == ["ok", "skip"], ctx.rows
    assert ctx.rows[1]["item"].startswith("attention B=1 H=1 N=128")


def test_pytest_shard_plugin(tmp_path):
    """The shard plugin: contiguous slices covering every item once; a bad value is refused
    naming the variable, the value and what is allowed."""
    from adaperceiver.bench import _pytest_shard as S
    for count in (0, 1, 5, 7, 64):
        for n in (1, 2, 3, 4, 9):
            got = [j for i in range(n) for j in S.shard_slice(count, i, n)]
            assert got == list(range(count)), (count, n)
    assert S.shard_of(" 2/3".strip()) == (2, 3)
    for bad in ("3/3", "-1/2", "1/0", "a/b", "1"):
        with pytest.raises(ValueError, match=f"ADAPERCEIVER_PYTEST_SHARD='{bad}' is not "
                                             "allowed; allowed: 'i/n'"):
            S.shard_of(bad)


class _FakeCuda:
    """Stands in for the torch.cuda calls graph_check makes on a GPU (streams, CUDAGraph,
    torch.cuda.graph, sync-debug mode), recording them: the GPU branch's Python runs here on
    CPU tensors. ``graph`` records the captured work and ``replay`` runs it again."""

    def __init__(self):
        self.calls = []
        fake = self

        class Stream:
            def wait_stream(self, other):
                fake.calls.append("wait_stream")

        class CUDAGraph:
            def replay(self):
                # what a replay does: rerun the captured kernels into the static output
                fake.calls.append("replay")
                fake.capture.out.copy_(fake.captured())

        self.Stream, self.CUDAGraph = Stream, CUDAGraph

    def current_stream(self):
        return self.Stream()

    def stream(self, s):
        import contextlib
        self.calls.append("stream")
        return contextlib.nullcontext()

    def graph(self, g):
        import contextlib
        self.calls.append("graph")
        fake = self

        @contextlib.contextmanager
        def capturing():
            # the body runs once under capture; replay must run it again: take the function
            # being captured from the caller (_CudaCapture.capture's ``fn``)
            import inspect
            caller = next(f for f in inspect.stack() if f.function == "capture")
            fake.captured = caller.frame.f_locals["fn"]
            fake.capture = caller.frame.f_locals["self"]
            yield
        return capturing()

    def set_sync_debug_mode(self, mode):
        self.calls.append(f"sync_debug={mode}")


def test_graph_check_gpu_branch_on_fake_cuda(monkeypatch):
    """graph_check as a GPU run executes it (side-stream warm-up, a sync-debug "error" eager
    call, capture, replay after copying a new input into the static one), with torch.cuda's
    calls faked: the replayed output equals the eager output of the new input."""
    import torch

    fake = _FakeCuda()
    for name in ("Stream", "CUDAGraph", "current_stream", "stream", "graph",
                 "set_sync_debug_mode"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))

    class CpuCtx(G.Ctx):
        device = "cpu"       # a "gpu" mode run whose tensors stay on the CPU

    ctx = CpuCtx("gpu", None, [])
    assert not ctx.dry
    model = G._model(G.Ctx("dry", None, []), torch.float32)
    x = torch.randn(2, 3, 32, 32)
    for cfg in G._configs(model).values():
        fake.calls.clear()
        r = G.graph_check(ctx, model, x[:1].expand(4, -1, -1, -1).clone(), cfg, "cpp")
        assert r["ok"] and r["err"] == 0.0, r
        assert fake.calls == ["wait_stream", "stream", "wait_stream", "sync_debug=error",
                              "sync_debug=default", "graph", "replay"], fake.calls
