"""``make gpu-check`` (adaperceiver.bench.gpu_check): its dry mode runs here end to end, so the
command cannot rot; the parts a GPU run adds (target verdicts, the report of a GPU run, a stage
cut at its time limit) are checked on synthetic inputs."""
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


def test_stage_cut_at_its_limit_keeps_its_finished_items(tmp_path):
    """A stage that runs past its limit is stopped (its process group killed), recorded as a
    timeout, and keeps the items it finished."""
    # 1 s: less than the stage's own start-up (importing torch), so it is cut on any machine
    res = G.run_stage("correctness", "dry", 1.0, str(tmp_path))
    assert res["status"] == "timeout" and "limit" in res["error"]
    assert res["seconds"] < 20
    assert all("item" in r for r in res["rows"])


def test_unknown_stage_is_refused(tmp_path):
    with pytest.raises(ValueError, match="stage 'nope' is not known; allowed: env"):
        G.run_check(str(tmp_path), dry=True, stages=["nope"])


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
