"""The benchmark harness and CLI (adaperceiver.bench): grid parsing, flag errors, result files,
the plot and the roofline projection. Fast: a tiny model and a tiny timm baseline."""
from __future__ import annotations

import csv
import json
import struct

import pytest

from adaperceiver.bench import RELEASED, Config, GridError, ModelAxes, parse_grid
from adaperceiver.bench.__main__ import run
from adaperceiver.bench.report import ROW_FIELDS, ENV_COLUMNS, read_accuracy_csv
from adaperceiver.bench.roofline import GPUS, format_roofline, roofline_rows
from adaperceiver.bench.timing import time_interleaved, time_step

TINY = ["--model-kwargs", "embed_dim=64", "num_heads=2", "depth=3", "mask_token_grans=[8,16]",
        "max_latent_tokens=16", "mat_dims=[32,64]", "num_classes=10", "img_size=32",
        "patch_size=16"]
TINY_AXES = ModelAxes(grans=(8, 16), mat_dims=(32, 64), depth=3, embed_dim=64)
FAST = ["--img-size", "32", "--warmup", "1", "--rounds", "2", "--min-rounds", "2",
        "--no-progress", "--threads", "2"]


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])  # IHDR width, height


# ---------------------------------------------------------------------------- grid
def test_all_grid_is_378_distinct_configs_of_the_released_model():
    grid = parse_grid("all", RELEASED)
    assert len(grid) == 378 == len(set(grid))
    assert {c.t for c in grid} == {32, 64, 96, 128, 192, 256}
    assert {c.w for c in grid} == {416, 624, 832}
    assert {c.l for c in grid} == set(range(1, 22))


def test_all_grid_from_the_registered_model_config():
    from adaperceiver.bench.runner import model_config
    axes = ModelAxes.from_config(model_config("adaperceiver_v1_in1k", {}))
    assert axes == RELEASED
    assert len(parse_grid(["all"], axes)) == 378


def test_default_grid_is_the_documented_subset():
    grid = parse_grid("default", RELEASED)
    assert len(grid) == 18
    assert {c.t for c in grid} == {32, 128, 256}
    assert {c.w for c in grid} == {416, 832}
    assert {c.l for c in grid} == {7, 14, 21}
    assert parse_grid(None, RELEASED) == grid


def test_explicit_axes_ranges_and_missing_axes():
    grid = parse_grid("t=32,256 w=all l=7,14,21", RELEASED)
    assert len(grid) == 2 * 3 * 3
    assert Config(256, 624, 14) in grid
    # tokens as argv pieces; range a-b and a..b; a missing axis takes its default subset
    g2 = parse_grid(["t=64", "l=1-3"], RELEASED)
    assert {(c.t, c.l) for c in g2} == {(64, 1), (64, 2), (64, 3)}
    assert {c.w for c in g2} == {416, 832}
    assert parse_grid("t=64 l=1..3", RELEASED) == g2
    assert parse_grid("w=default t=all l=21", RELEASED) == parse_grid("t=all l=21", RELEASED)


BAD_GRIDS = [
    ("t=0", ["t (num_tokens)=0", "positive"]),
    ("t=-32", ["t (num_tokens)=-32", "positive"]),
    ("", ["empty", "allowed"]),
    ("t=", ["no values", "allowed"]),
    ("w=0", ["w (mat_dim)=0", "1..832"]),
    ("w=833", ["w (mat_dim)=833", "1..832"]),
    ("l=0", ["l (depth)=0", "1..21"]),
    ("l=22", ["l (depth)=22", "1..21"]),
    ("l=5-3", ["range", "empty"]),
    ("t=abc", ["'abc'", "not an int", "allowed"]),
    ("x=3", ["'x=3'", "allowed"]),
    ("t=32 t=64", ["twice"]),
]


@pytest.mark.parametrize("spec, words", BAD_GRIDS, ids=[s or "(empty)" for s, _ in BAD_GRIDS])
def test_bad_grids_name_axis_value_and_allowed(spec, words):
    with pytest.raises(GridError) as e:
        parse_grid(spec, RELEASED)
    for w in words:
        assert w in str(e.value)
    assert isinstance(e.value, ValueError)


def test_t_outside_the_grans_runs_with_a_warning():
    with pytest.warns(UserWarning, match="t=100 is not one of"):
        grid = parse_grid("t=100 w=416 l=1", RELEASED)
    assert grid == [Config(100, 416, 1)]


# ---------------------------------------------------------------------------- CLI errors
BAD_FLAGS = [
    (["--model", "resnet50"], ["--model 'resnet50'", "adaperceiver_v1_in1k"]),
    (["--configs", "t=0"], ["t (num_tokens)=0", "positive"]),
    (["--configs", "w=65"], ["w (mat_dim)=65", "1..64"]),
    (["--configs", "l=4"], ["l (depth)=4", "1..3"]),
    (["--configs", ""], ["--configs is empty"]),
    (["--baselines", "no_such_net"], ["'no_such_net'", "timm"]),
    (["--baselines", "none", "vit_tiny_patch16_224"], ["'none' cannot be combined"]),
    (["--batch-size", "0"], ["--batch-size 0", ">= 1"]),
    (["--img-size", "40"], ["--img-size 40", "patch_size=16"]),
    (["--precision", "fp8"], ["--precision 'fp8'", "float32"]),
    (["--results-file", "out.txt"], ["--results-file", "'.txt'", ".json, .csv"]),
    (["--plot", "p.jpg"], ["--plot", ".png"]),
    (["--backend", "fast"], ["--backend 'fast'", "reference"]),
    (["--device", "cuda:0"], ["--device"]),
    (["--backend", "cuda"], ["--backend 'cuda' cannot run t=8 w=32 l=1"]),
    (["--model-kwargs", "no_such_key=1"], ["no_such_key"]),
]


@pytest.mark.parametrize("argv, words", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flags_exit_with_a_clear_message(argv, words, capsys):
    import torch
    if "cuda" in argv[1] and torch.cuda.is_available():
        pytest.skip("CUDA is available: this flag is valid here")
    with pytest.raises(SystemExit) as e:
        run(TINY + ["--img-size", "32", "--baselines", "none", "--dry-run"] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err


def test_dry_run_lists_configs_and_baselines(capsys):
    out = run(TINY + ["--img-size", "32", "--configs", "all", "--baselines",
                      "vit_tiny_patch16_224", "--dry-run"])
    assert len(out["grid"]) == 2 * 2 * 3 and out["baselines"] == ["vit_tiny_patch16_224"]
    text = capsys.readouterr().out
    assert "t=16 w=64 l=3" in text and "vit_tiny_patch16_224" in text


# ---------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    out = run(TINY + FAST + [
        "--configs", "t=8,16", "w=all", "l=1,3", "--baselines", "vit_tiny_patch16_224",
        "--speedup-baseline", "vit_tiny_patch16_224", "--results-file", str(d / "r.csv"),
        "--out-dir", str(d / "out")])
    return d, out


def test_run_measures_every_config_and_baseline(tiny_run):
    d, out = tiny_run
    rows = out["rows"]
    model_rows = [r for r in rows if r["kind"] == "adaperceiver"]
    assert {(r["t"], r["w"], r["l"]) for r in model_rows} == {
        (t, w, l) for t in (8, 16) for w in (32, 64) for l in (1, 3)}
    assert [r["name"] for r in rows if r["kind"] == "baseline"] == ["vit_tiny_patch16_224"]
    for r in rows:
        assert r["rounds"] == 2 and len(r["times_ms"]) == 2 and r["warmup"] == 1
        assert "interleaved" in r["timer"]
        assert r["ms_min"] <= r["ms_per_step"] <= r["ms_max"]
        assert r["img_per_s"] == pytest.approx(4 / (r["ms_per_step"] / 1e3))
        assert r["gflops"] > 0 and r["params"] > 0
    base = rows[-1]
    assert base["speedup"] == pytest.approx(1.0)
    assert model_rows[0]["speedup"] == pytest.approx(model_rows[0]["img_per_s"]
                                                     / base["img_per_s"])
    # more depth at the same (t, w) means more FLOPs and more parameters used
    by = {(r["t"], r["w"], r["l"]): r for r in model_rows}
    assert by[(16, 64, 3)]["gflops"] > by[(16, 64, 1)]["gflops"]
    assert by[(16, 64, 3)]["params"] > by[(16, 64, 1)]["params"]
    assert by[(16, 64, 3)]["gflops"] > by[(8, 64, 3)]["gflops"]
    assert "t=8 w=32 l=1" in out["table"] and "vit_tiny_patch16_224" in out["table"]


def test_json_results_carry_every_field_and_the_environment(tiny_run):
    d, out = tiny_run
    doc = json.loads((d / "out" / "bench.json").read_text())
    assert len(doc["results"]) == 9
    for r in doc["results"]:
        assert set(r) == set(ROW_FIELDS)
    for key in ("torch", "timm", "cpu_model", "torch_threads", "device", "python"):
        assert doc["environment"][key] not in (None, ""), key
    assert doc["environment"]["torch_threads"] == 2
    assert doc["args"]["batch_size"] == 4
    assert doc["roofline_projection"]["note"].startswith("PROJECTION")


def test_csv_results_carry_every_field(tiny_run):
    d, out = tiny_run
    with open(d / "r.csv", newline="") as f:
        recs = list(csv.DictReader(f))
    assert len(recs) == 9
    assert set(recs[0]) == set(ROW_FIELDS) | set(ENV_COLUMNS)
    for rec, row in zip(recs, out["rows"]):
        assert float(rec["img_per_s"]) == pytest.approx(row["img_per_s"])
        assert len(rec["times_ms"].split(";")) == row["rounds"]
        assert rec["config"] == row["config"]


def test_out_dir_files(tiny_run):
    d, _ = tiny_run
    out = d / "out"
    w, h = _png_size(out / "pareto.png")
    assert w > 100 and h > 100
    txt = (out / "bench.txt").read_text()
    assert "img/s" in txt and "ms/step" in txt and "x vit_tiny_patch16_224" in txt
    roof = (out / "roofline.txt").read_text()
    assert roof.startswith("ROOFLINE PROJECTION (not a measurement")
    assert "H100" in roof and "H200" in roof and "t=16 w=64 l=3" in roof


def test_plot_with_accuracy_csv_adds_a_panel(tiny_run, tmp_path):
    from adaperceiver.bench.plot import pareto_plot
    _, out = tiny_run
    acc = tmp_path / "acc.csv"
    acc.write_text("t,w,l,top1\n8,32,1,70.5\n16,64,3,80.1\n16,32,3,78.0\n")
    accuracy = read_accuracy_csv(str(acc))
    assert accuracy[(16, 64, 3)] == 80.1
    one = pareto_plot(out["rows"], str(tmp_path / "one.png"))
    two = pareto_plot(out["rows"], str(tmp_path / "two.png"), accuracy)
    w1, _ = _png_size(one)
    w2, _ = _png_size(two)
    assert w2 > 1.5 * w1   # the accuracy panel is there


def test_bad_accuracy_csv(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("t,w,top1\n8,32,70\n")
    with pytest.raises(ValueError, match=r"lacks columns \['l'\]"):
        read_accuracy_csv(str(p))
    with pytest.raises(ValueError, match="does not exist"):
        read_accuracy_csv(str(tmp_path / "missing.csv"))


def test_pareto_front():
    from adaperceiver.bench.plot import pareto_front
    pts = [(10, 70), (5, 80), (8, 60), (1, 85), (5, 75)]
    assert sorted(pareto_front(pts)) == [(1, 85), (5, 80), (10, 70)]


# ---------------------------------------------------------------------------- roofline, timing
def test_roofline_bound_is_max_of_compute_and_memory():
    item = {"kind": "adaperceiver", "config": "c", "flops": 1e10, "params": 1e8,
            "num_classes": 1000}
    rows = roofline_rows([item], [1, 1024], 224, bytes_per_el=2)
    assert len(rows) == 2 * len(GPUS)
    h100 = {r["batch_size"]: r for r in rows if r["gpu"] == "H100"}
    mem1 = (1e8 * 2 + (3 * 224 * 224 + 1000) * 2) / 3.35e12
    assert h100[1]["bound"] == "memory"
    assert h100[1]["time_bound_ms"] == pytest.approx(mem1 * 1e3)
    assert h100[1024]["bound"] == "compute"
    assert h100[1024]["time_bound_ms"] == pytest.approx(1e10 * 1024 / 989e12 * 1e3)
    h200 = {r["batch_size"]: r for r in rows if r["gpu"] == "H200"}
    assert h200[1]["time_bound_ms"] < h100[1]["time_bound_ms"]   # more bandwidth
    assert "PROJECTION" in format_roofline(rows)


def test_time_step_budget_cuts_rounds_but_not_below_min():
    import time
    calls = []

    def step():
        calls.append(1)
        time.sleep(0.02)

    t = time_step(step, "cpu", warmup=1, rounds=10, min_rounds=3, budget_s=0.001)
    assert t.rounds == 3 and len(calls) == 4
    t = time_step(step, "cpu", warmup=1, rounds=4, min_rounds=2, budget_s=None)
    assert t.rounds == 4
    assert all(x >= 19 for x in t.times_ms) and t.min_ms <= t.median_ms <= t.max_ms
    with pytest.raises(ValueError, match="rounds=0"):
        time_step(step, "cpu", rounds=0)


def test_baselines_are_built_with_a_1000_class_head_and_parse():
    from adaperceiver.bench.baselines import DEFAULT_BASELINES, baseline_flops, parse_baselines
    # vit_huge_patch14_224 has no head by default: 630,764,800 parameters without one
    flops, params = baseline_flops("vit_huge_patch14_224", 224)
    assert params == 630_764_800 + 1280 * 1000 + 1000
    assert flops / 1e9 == pytest.approx(334.59, abs=0.01)   # 167.3 GMACs x 2
    assert parse_baselines(["all"]) == list(DEFAULT_BASELINES)
    assert parse_baselines(["none"]) == []
    assert parse_baselines(["vit_tiny_patch16_224,all"])[0] == "vit_tiny_patch16_224"
    assert len(parse_baselines(["all", "flexivit_large"])) == 6


def test_time_interleaved_runs_round_robin_and_cuts_rounds_to_budget():
    import time
    calls = []

    def make(i, sleep):
        def step():
            calls.append(i)
            time.sleep(sleep)
        return step

    seen = []
    ts = time_interleaved([make(0, 0.001), make(1, 0.02)], "cpu", warmup=1, rounds=3,
                          min_rounds=1, on_step=lambda i, ph, n: seen.append((i, ph, n)))
    assert calls == [0, 1] * 4          # 1 warm-up pass + 3 rounds, each over both steps
    assert [t.rounds for t in ts] == [3, 3]
    assert ts[1].min_ms > ts[0].max_ms  # each timing belongs to its own step
    assert seen[:2] == [(0, "warmup", 3), (1, "warmup", 3)] and seen[-1] == (1, "timed", 3)
    calls.clear()
    # budget 0.015 s per step x 2 steps = 0.03 s; a pass takes ~0.021 s: 1 round fits, min 2
    ts = time_interleaved([make(0, 0.001), make(1, 0.02)], "cpu", warmup=1, rounds=5,
                          min_rounds=2, budget_s=0.015)
    assert [t.rounds for t in ts] == [2, 2] and calls == [0, 1] * 3


def test_sequential_schedule_gives_the_same_rows(tmp_path):
    out = run(TINY + FAST + ["--configs", "t=8", "w=32", "l=1,3", "--baselines", "none",
                             "--schedule", "sequential", "--backend", "reference,auto",
                             "--results-file", str(tmp_path / "s.json")])
    rows = out["rows"]
    assert [(r["t"], r["w"], r["l"]) for r in rows][:2] == [(8, 32, 1), (8, 32, 3)]
    assert {r["backend"] for r in rows} >= {"reference"}
    assert all(r["speedup"] is None for r in rows)   # no baseline measured
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["args"]["schedule"] == "sequential"
    assert all(set(r) == set(ROW_FIELDS) for r in doc["results"])
    assert all("interleaved" not in r["timer"] for r in doc["results"])


def test_inference_flag_adds_the_figures(tmp_path, monkeypatch, capsys):
    import adaperceiver.bench.inference as inf
    seen = {}

    def fake_full(model, **kw):
        seen["full"] = (model.config.embed_dim, kw)
        return {"model_img_s": 1.5}

    def fake_mixed(model, **kw):
        seen["mixed"] = kw
        return {"mixed_ms": 2.5}

    monkeypatch.setattr(inf, "full_config_figures", fake_full)
    monkeypatch.setattr(inf, "mixed_batch_figures", fake_mixed)
    monkeypatch.setattr(inf, "format_figures", lambda f, m: f"FIGURES {f} {m}")
    out = run(TINY + FAST + ["--configs", "t=8", "w=32", "l=1", "--baselines", "none",
                             "--inference", "--results-file", str(tmp_path / "i.json")])
    assert seen["full"] == (64, {"batch": 4, "img_size": 32, "rounds": inf.FULL_MIN_ROUNDS,
                                 "device": seen["full"][1]["device"]})
    assert seen["mixed"]["batch"] == 4
    assert seen["mixed"]["rounds"] == inf.MIXED_MIN_ROUNDS   # --rounds 2 is raised for both
    assert "FIGURES {'model_img_s': 1.5} {'mixed_ms': 2.5}" in out["table"]
    doc = json.loads((tmp_path / "i.json").read_text())
    assert doc["inference"] == {"full": {"model_img_s": 1.5}, "mixed": {"mixed_ms": 2.5}}


@pytest.mark.parametrize("schedule", ["interleaved", "sequential"])
def test_a_failing_config_is_reported_and_the_sweep_goes_on(tmp_path, monkeypatch, schedule):
    import adaperceiver.bench.runner as runner
    from adaperceiver.bench.__main__ import main
    real = runner.adaperceiver_step

    def flaky(model, cfg, x, settings, backend="auto"):
        step = real(model, cfg, x, settings, backend)
        if cfg.l == 3:
            def boom():
                raise RuntimeError("kernel exploded")
            return boom
        return step

    monkeypatch.setattr(runner, "adaperceiver_step", flaky)
    argv = TINY + FAST + ["--configs", "t=8", "w=32", "l=1,3", "--baselines", "none",
                          "--schedule", schedule, "--results-file", str(tmp_path / "f.json")]
    assert main(argv) == 1
    doc = json.loads((tmp_path / "f.json").read_text())
    assert [r["config"] for r in doc["results"]] == ["t=8 w=32 l=1"]
    assert len(doc["failures"]) == 1 and "t=8 w=32 l=3" in doc["failures"][0]
    assert "kernel exploded" in doc["failures"][0]


def test_figures_table_prints_the_library_gemm_rows_without_a_verdict():
    from adaperceiver.bench.inference import format_figures
    full = {"gemm_gflops": 102.0, "library": "onednn", "library_gemm_gflops": 124.0,
            "full_vs_library_gemm_bound": 0.86, "model_img_s": 1.43, "model_spread_pct": 5.0,
            "flexivit_large_img_s": 0.75, "full_vs_flexivit_large": 1.91,
            "full_vs_gemm_bound": 1.04}
    lines = format_figures(full, None).splitlines()
    lib = [ln for ln in lines if ln.startswith("GEMM rate, onednn")]
    strict = [ln for ln in lines if ln.startswith("full / GEMM bound at onednn's rate")]
    assert len(lib) == 1 and "124 GFLOP/s" in lib[0] and lib[0].rstrip().endswith("-")
    assert len(strict) == 1 and "0.86x" in strict[0] and strict[0].rstrip().endswith("-")
    bound = [ln for ln in lines if ln.startswith("full / GEMM bound ")]
    assert "1.04x" in bound[0] and bound[0].rstrip().endswith("yes")
    # without the library fields (MKL is the model's library, or a GPU) the rows are absent
    del full["library"], full["library_gemm_gflops"], full["full_vs_library_gemm_bound"]
    assert "onednn" not in format_figures(full, None)
    assert "autocast" not in format_figures(full, None)
    # an autocast run: its cost over the model cast to the dtype, against the 1.1x target
    for value, verdict in ((1.34, "NO"), (1.08, "yes")):
        full.update(autocast_vs_cast_model=value, cast_model_precision="bfloat16")
        amp = [ln for ln in format_figures(full, None).splitlines()
               if ln.startswith("autocast / model cast to bfloat16")]
        assert len(amp) == 1 and f"{value:.2f}x" in amp[0] and "<= 1.1x" in amp[0]
        assert amp[0].rstrip().endswith(verdict)


def test_inference_ratios_are_medians_of_per_round_ratios(monkeypatch):
    """Each figure's ratio pairs the steps of one round; with load that drifts between rounds
    the median of the per-round ratios differs from the ratio of the medians (which the
    expected values here would not match)."""
    import torch
    import adaperceiver.bench.inference as inf
    from adaperceiver.bench.timing import Timing
    from adaperceiver.flops import count_flops
    from helpers import tiny_model

    model = tiny_model().eval()
    plan = {}

    def fake_interleaved(steps, device, **kw):
        return [Timing(list(plan[len(steps)][i]), 1, "fake") for i in range(len(steps))]

    monkeypatch.setattr(inf, "time_interleaved", fake_interleaved)
    monkeypatch.setattr(inf, "_library_gemm_step", lambda device: None)
    # mixed (2 samples): mixed, single x 2, padded; round loads 1, 3, 2 (not proportional)
    plan[4] = [[10.0, 20.0, 60.0], [8.0, 60.0, 30.0], [12.0, 20.0, 30.0],
               [30.0, 30.0, 240.0]]
    configs = [(32, 48, 1), (64, 96, 2)]
    m = inf.mixed_batch_figures(model, configs, batch=2, img_size=64, rounds=3)
    # per round, singles sum / B = 10, 40, 30: ratios 1, 0.5, 2 -> 1 (medians: 20 / 30)
    assert m["mixed_vs_single_config_avg"] == pytest.approx(1.0)
    assert m["padded_over_mixed"] == pytest.approx(3.0)     # 3, 1.5, 4 (medians: 1.5)
    big = count_flops(model, 64, 96, 2, img_size=64).needed * 2
    mix = sum(count_flops(model, *c, img_size=64).needed for c in configs)
    assert m["flops_ratio"] == pytest.approx(big / mix)
    assert m["padded_over_mixed_vs_flops_ratio"] == pytest.approx(abs(3.0 / (big / mix) - 1))
    # full config: gemm, model, baseline
    plan[3] = [[2.0, 1.0, 3.0], [10.0, 10.0, 30.0], [20.0, 15.0, 90.0]]
    f = inf.full_config_figures(model, batch=2, img_size=64, rounds=3,
                                baseline=torch.nn.Identity())
    assert f["full_vs_flexivit_large"] == pytest.approx(2.0)   # 2, 1.5, 3 (medians: 1.5)
    cfg = model.config
    needed = count_flops(model, cfg.max_latent_tokens, cfg.embed_dim, cfg.depth, 64).needed
    per_img = needed * 2 / (2 * 2048 ** 3)
    # gemm / model per round: 0.2, 0.1, 0.1 -> 0.1 (medians: 2 / 10 = 0.2)
    assert f["full_vs_gemm_bound"] == pytest.approx(per_img * 0.1)
    assert f["model_img_s"] == pytest.approx(2 / 0.010)
    assert "autocast_vs_cast_model" not in f
    # autocast: gemm, the model under autocast, baseline, the model cast to bfloat16 (timed in
    # the same rounds): per round 1.2, 2, 1.5 -> 1.5 (medians: 15 / 10)
    plan[4] = [[2.0, 1.0, 3.0], [12.0, 10.0, 30.0], [20.0, 15.0, 90.0], [10.0, 5.0, 20.0]]
    f = inf.full_config_figures(model, batch=2, img_size=64, rounds=3,
                                baseline=torch.nn.Identity(), amp_dtype=torch.bfloat16)
    assert f["autocast_vs_cast_model"] == pytest.approx(1.5)
    assert f["cast_model_precision"] == "bfloat16" and f["precision"] == "autocast bfloat16"
    assert f["full_vs_flexivit_large"] == pytest.approx(20 / 12)   # 20/12, 1.5, 3
