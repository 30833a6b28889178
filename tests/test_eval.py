"""adaperceiver.eval (issue #25): accuracy of every (t, w, l) from real images, one pass per width.

Real images: the digits recipe's test split written out as PNGs (the data ships with
scikit-learn). Checked: grid readouts equal separate forwards (exactly on the reference backend,
the counts on every backend), every CSV row equals separate ``model(x, num_tokens=t,
mat_dim=w, depth=l)`` runs on the same images, a short digits training's checkpoint reproduces
the recipe's own accuracy table, two gloo processes under torchrun write the same CSV as one,
per-sample policies, and bad input fails up front naming what is wrong.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("timm")

from adaperceiver.bench.grid import Config, ModelAxes, parse_grid  # noqa: E402
from adaperceiver.eval import (grid_logits, plan_forwards, topk_hits,  # noqa: E402
                               write_digits_folder)
from adaperceiver.eval.__main__ import run  # noqa: E402
from adaperceiver.eval.data import (DIGITS_FOLDER_CONFIG, limit_indices,  # noqa: E402
                                    rank_batches)

from helpers import tiny_model  # noqa: E402

DIGITS_KW = [f"--mean={DIGITS_FOLDER_CONFIG['mean'][0]!r}",
             f"--std={DIGITS_FOLDER_CONFIG['std'][0]!r}", "--crop-pct=1.0"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: one thread (on a shared 2-core machine two threads wait on
    each other at every small op: a digits training step took 1.5 s instead of 0.35 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "test"
    write_digits_folder(str(root), "test")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of the digits recipe on a smaller model (C=64, 4 layers, widths 16/32/64):
    a checkpoint written by the recipe whose accuracies differ across (t, w, l)."""
    from adaperceiver.data import digits_split
    from adaperceiver.train.digits import DigitsRecipe, train_digits
    out = tmp_path_factory.mktemp("digits_run")
    split = digits_split(0)
    recipe = DigitsRecipe(epochs=2, model=dict(embed_dim=64, num_heads=2, depth=4,
                                               mat_dims=[16, 32, 64]))
    model, _ = train_digits(recipe, split=split, out_dir=str(out), log=lambda m: None,
                            max_steps=19)
    return model.eval(), split, str(out / "checkpoint")


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _folder_tensors(root, model):
    """The folder's images through the model's transform, as the CLI reads them."""
    from timm.data import create_transform

    from adaperceiver.eval.data import data_config, open_dataset
    cfg = data_config(model, dict(DIGITS_FOLDER_CONFIG))
    ds = open_dataset(str(root), 10, create_transform(**cfg), img_mode="L").dataset
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


# ---------------------------------------------------------------------------- readouts
def test_plan_forwards_one_run_for_the_granularities():
    from adaperceiver.config import AdaPerceiverConfig
    cfg = AdaPerceiverConfig()
    assert plan_forwards(cfg, [32, 64, 96, 128, 192, 256]) == [(256, [32, 64, 96, 128, 192,
                                                                      256])]
    # 50 is no granularity: its own run; 64 read from the 128 run; 300 > max_latent_tokens
    assert plan_forwards(cfg, [300, 128, 64, 50]) == [(300, [300]), (128, [64, 128]),
                                                      (50, [50])]
    assert plan_forwards(AdaPerceiverConfig(attn_layer="full"), [32, 64]) == [(64, [64]),
                                                                              (32, [32])]
    causal = AdaPerceiverConfig(block_mask="causal")
    assert plan_forwards(causal, [5, 50, 64]) == [(64, [5, 50, 64])]


@pytest.mark.parametrize("chunk_layers", [None, 1, 2])
@pytest.mark.parametrize("overrides,counts", [
    ({}, [32, 64, 96, 128, 192, 256]),           # the released grans, one run
    ({}, [20, 64, 100]),                         # non-granularities: runs of their own
    ({"attn_layer": "full"}, [32, 64]),          # no mask: a run per t
    ({"block_mask": "causal"}, [7, 33, 80]),     # every t a prefix
])
def test_grid_readouts_equal_separate_forwards_float64(reference_backend, monkeypatch,
                                                       overrides, counts, chunk_layers):
    """In float64 on the reference backend the folded write-out (the query folded into the
    key/value projections, sums reassociated) equals the separate forwards to rounding: a
    wrong prefix, layer, width or RoPE position would be off by far more than 1e-12. Two
    widths in one call: the read latents they share are not modified by the first. The exit
    layers written out all in one call (None), one per call, or two per call (3 exits: a full
    chunk and a remainder) at the largest run's size."""
    import warnings

    from adaperceiver.eval import grid_readouts, readouts
    model = tiny_model(**overrides).double().eval()
    if chunk_layers:
        n = max(c for _, cs in readouts.plan_forwards(model.config, counts) for c in cs)
        monkeypatch.setattr(readouts, "_WRITE_CHUNK_BYTES",
                            chunk_layers * 2 * n * model.config.embed_dim * 8)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")     # attn_layer="full" warns that it drops the mask
        keys, logits = grid_readouts(model, x, [72, 24], counts, [1, 3, 4])
        assert sorted(keys) == sorted((t, w, l) for t in counts for w in (72, 24)
                                      for l in (1, 3, 4))
        assert logits.shape == (len(keys), 2, model.config.num_classes)
        for (t, w, l), got in zip(keys, logits):
            ref = model(x, num_tokens=t, mat_dim=w, depth=l).logits[:, 0]
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, msg=str((t, w, l)))


def test_grid_readouts_without_classifier(reference_backend):
    """num_classes=0 (timm's reset_classifier(0)): the readouts are the written-out features,
    as the separate forward returns them."""
    from adaperceiver.eval import grid_readouts
    model = tiny_model().double().eval()
    model.reset_classifier(0)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        keys, out = grid_readouts(model, x, [48], [32, 256], [2, 4])
        assert out.shape == (4, 2, model.config.embed_dim)
        for (t, w, l), got in zip(keys, out):
            ref = model(x, num_tokens=t, mat_dim=w, depth=l).logits[:, 0]
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,autocast", [(torch.float32, None), (torch.bfloat16, None),
                                            (torch.float32, torch.bfloat16)])
def test_grid_logits_precision_default_backend(dtype, autocast):
    """The default backend, float32, bfloat16 and bf16 autocast: each readout's error against
    the float64 forward is at most 2x that of the separate forward in the same precision
    (flash-attn's rule; the write-out itself runs in float32), plus a tiny floor."""
    import contextlib
    model = tiny_model().eval()
    x = torch.randn(5, 3, 64, 64)
    truth_model = tiny_model().double().eval()
    truth_model.load_state_dict(model.state_dict())
    run_model = model.to(dtype)
    amp = (torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext())
    with torch.inference_mode():
        with amp:
            out = grid_logits(run_model, x.to(dtype), 48, [32, 96, 256], [2, 4])
        for (t, l), logits in out.items():
            assert logits.dtype == (dtype if autocast is None else logits.dtype)
            truth = truth_model(x.double(), num_tokens=t, mat_dim=48, depth=l).logits[:, 0]
            with amp:
                ref = run_model(x.to(dtype), num_tokens=t, mat_dim=48, depth=l).logits[:, 0]
            err = (logits.double() - truth).abs().max().item()
            ref_err = (ref.double() - truth).abs().max().item()
            assert err <= 2 * ref_err + 1e-6, ((t, l), err, ref_err)


def test_grid_readout_reads_only_its_prefix(reference_backend):
    """A NaN put in latent j after block 2 reaches the readouts of g > j and no readout of
    g <= j (each sums its own first g rows, as the separate g-token forward sees them)."""
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    counts, exits = [32, 64, 96, 128], [2, 3, 4]
    with torch.inference_mode():
        clean = grid_logits(model, x, 72, counts, exits)

        def poison(module, args, out):
            out.view(2, 128, -1)[1, 70] = float("nan")    # sample 1, latent 70

        handle = model.blocks[1].register_forward_hook(poison)
        try:
            dirty = grid_logits(model, x, 72, counts, exits)
        finally:
            handle.remove()
    for (t, l), logits in dirty.items():
        assert torch.equal(logits[0], clean[(t, l)][0]), (t, l)    # sample 0 untouched
        if t > 70:
            assert logits[1].isnan().all(), (t, l)
        else:
            assert torch.equal(logits[1], clean[(t, l)][1]), (t, l)


def test_grid_logits_bad_exits():
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="exits=.*1..4"):
        grid_logits(model, torch.randn(1, 3, 64, 64), 48, [32], [0, 2])


def test_evaluate_counts_a_grid_that_is_no_product():
    """evaluate() with configurations that are no product of axes ((32, l=1) and (64, l=2) at
    one width, (64, l=2) at another): the rows are those configurations, each counting the
    separate forward's hits (the readouts of the (t, l) not asked for are read but not
    counted)."""
    from adaperceiver.eval import evaluate
    model = tiny_model(num_classes=7).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, 64, 64, generator=g)
    y = torch.randint(0, 7, (10,), generator=g)
    configs = [Config(32, 72, 1), Config(64, 72, 2), Config(64, 24, 2)]
    res = evaluate(model, torch.utils.data.TensorDataset(x, y), configs, batch_size=4,
                   progress=False)
    want = [(c.t, c.w, c.l) for c in sorted(configs)]
    assert [(r["t"], r["w"], r["l"]) for r in res.rows] == want
    with torch.inference_mode():
        for r in res.rows:
            logits = model(x, num_tokens=r["t"], mat_dim=r["w"], depth=r["l"]).logits[:, 0]
            h1, h5 = topk_hits(logits, y)
            assert (r["top1"], r["top5"], r["images"]) == (100 * h1 / 10, 100 * h5 / 10, 10)


# ---------------------------------------------------------------------------- data split
@pytest.mark.parametrize("n,b,world", [(359, 32, 2), (10, 4, 3), (5, 8, 2), (64, 16, 4)])
def test_rank_batches_count_every_image_once(n, b, world):
    idx = limit_indices(n, None)
    single = rank_batches(idx, b)
    parts = [rank_batches(idx, b, r, world) for r in range(world)]
    got = sorted(i for p in parts for batch in p for i in batch)
    assert got == list(range(n))                      # no padding, no duplicates
    assert sorted(map(tuple, (bb for p in parts for bb in p))) == sorted(map(tuple, single))


def test_limit_spreads_over_the_set():
    assert limit_indices(100, 4) == [0, 25, 50, 75]
    assert limit_indices(5, 10) == list(range(5))


# ---------------------------------------------------------------------------- the CLI
def test_every_row_equals_separate_runs(trained, digits_dir, tmp_path):
    model, _, ckpt = trained
    out = tmp_path / "eval.csv"
    res = run([str(digits_dir), "--pretrained", ckpt, "--out", str(out), "-b", "64",
               "--limit", "160", "--workers", "0", "--no-progress", *DIGITS_KW])
    rows = _read(out)
    assert [tuple(int(r[k]) for k in "twl") for r in rows] == sorted(
        (t, w, l) for t in (8, 16, 32, 64) for w in (16, 32, 64) for l in range(1, 5))
    x, y = _folder_tensors(digits_dir, model)
    keep = limit_indices(len(y), 160)         # the images --limit 160 evaluates
    x, y = x[keep], y[keep]
    n = len(y)
    import adaperceiver
    accs = set()
    with torch.inference_mode():
        for r in rows:
            t, w, l = int(r["t"]), int(r["w"]), int(r["l"])
            logits = model(x, num_tokens=t, mat_dim=w, depth=l).logits[:, 0]
            h1, h5 = topk_hits(logits, y)
            assert int(r["images"]) == n == 160
            assert r["top1"] == f"{100 * h1 / n:.4f}", (t, w, l)
            assert r["top5"] == f"{100 * h5 / n:.4f}", (t, w, l)
            gf = adaperceiver.count_flops(model.config, t, w, l, img_size=8).total / 1e9
            assert float(r["gflops"]) == pytest.approx(gf, rel=1e-5)
            accs.add(r["top1"])
    assert len(accs) > 5               # the accuracies differ: a mixed-up (t, l) would show
    assert (tmp_path / "eval.png").stat().st_size > 5000
    assert "accuracy-FLOPs front" in res["table"]
    # usable as is by the bench CLI and by BudgetPolicy
    from adaperceiver.bench.report import read_accuracy_csv
    from adaperceiver.eval import budget_policy
    acc = read_accuracy_csv(str(out))
    assert len(acc) == 48
    pol = budget_policy(str(out))
    best = pol.best_under(float("inf"))
    assert acc[best] == max(acc.values())


def test_checkpoint_reproduces_the_recipe_table(trained, digits_dir, tmp_path):
    """The recipe's own table (evaluate_grid on its test tensors) from the PNG folder."""
    from adaperceiver.train.digits import evaluate_grid
    model, split, ckpt = trained
    table = evaluate_grid(model, split.x_test, split.y_test)
    out = tmp_path / "eval.csv"
    run([str(digits_dir), "--pretrained", ckpt, "--out", str(out), "-b", "256",
         "--workers", "0", "--no-progress", "--plot", "none", *DIGITS_KW])
    rows = {(int(r["t"]), int(r["w"]), int(r["l"])): r for r in _read(out)}
    assert set(rows) == set(table)
    for c, correct in table.items():
        assert rows[c]["top1"] == f"{100 * int(correct.sum()) / len(correct):.4f}", c


def test_two_gloo_processes_write_the_same_csv(trained, digits_dir, tmp_path):
    _, _, ckpt = trained
    args = [str(digits_dir), "--pretrained", ckpt, "-b", "16", "--limit", "100",
            "--configs", "t=all w=16,64 l=1,2,4", "--policy", "tau=0.6,t=32",
            "--workers", "0", "--no-progress", "--plot", "none", *DIGITS_KW]
    run(args + ["--out", str(tmp_path / "one.csv")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", "-m", "adaperceiver.eval", *args,
         "--out", str(tmp_path / "two.csv")],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = _read(tmp_path / "one.csv"), _read(tmp_path / "two.csv")
    assert len(one) == 4 * 2 * 3 and one == two
    assert all(r["images"] == "100" for r in two)
    assert (_read(tmp_path / "one_policies.csv") == _read(tmp_path / "two_policies.csv"))
    assert "2 processes (gloo)" in proc.stderr


def test_confidence_exit_policy(trained, digits_dir, tmp_path):
    import adaperceiver
    model, _, ckpt = trained
    x, y = _folder_tensors(digits_dir, model)
    with torch.inference_mode():    # tau = the median confidence at layer 1: images part ways
        first = model(x, num_tokens=64, mat_dim=32, depth=1).logits[:, 0]
        tau = float(first.softmax(-1).amax(-1).median())
        o = model(x, num_tokens=64, mat_dim=32, depth_tau=tau, exit="sample")
    out = tmp_path / "eval.csv"
    run([str(digits_dir), "--pretrained", ckpt, "--out", str(out), "-b", "359",
         "--configs", "t=64 w=64 l=4", "--policy", f"tau={tau!r},t=64,w=32",
         "--workers", "0", "--no-progress", "--plot", "none", *DIGITS_KW])
    (pol,) = _read(tmp_path / "eval_policies.csv")
    h1, _ = topk_hits(o.logits[:, 0], y)
    assert pol["top1"] == f"{100 * h1 / len(y):.4f}"
    cfg = model.config
    per = []
    for d in o.depths.tolist():
        f = adaperceiver.count_flops(cfg, 64, 32, d, img_size=8)
        per.append(f.total + (d - 1) * (f.parts["write_proj"] + f.parts["write_attention"]
                                        + f.parts["head"]))
    assert float(pol["gflops"]) == pytest.approx(sum(per) / len(per) / 1e9, rel=1e-5)
    assert len(set(o.depths.tolist())) > 1     # images did leave at different layers


def test_learned_policy_round_trip(trained, digits_dir, tmp_path):
    from adaperceiver.eval import load_learned_policy, save_learned_policy
    from adaperceiver.eval.policies import parse_policy
    from adaperceiver.policy import fit_learned_policy
    model, split, _ = trained
    configs = [(8, 16, 2), (64, 64, 4)]
    correct = {c: torch.rand(len(split.y_val)) > 0.5 for c in configs}
    pol = fit_learned_policy(model, split.x_val, configs, correct,
                             {configs[0]: 1.0, configs[1]: 10.0}, steps=5)
    path = str(tmp_path / "policy.pt")
    save_learned_policy(pol, path)
    again = load_learned_policy(path)
    x = split.x_test[:16]
    assert torch.equal(pol.choose(model, x)["index"], again.choose(model, x)["index"])
    spec = parse_policy(f"learned={path}", model.config)
    logits, flops = spec.run(model, x)
    choice = pol.choose(model, x)
    with torch.inference_mode():
        ref = model(x, num_tokens=choice["num_tokens"], mat_dim=choice["mat_dim"],
                    depth=choice["depth"]).logits[:, 0]
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    assert set(flops.tolist()) <= {spec.flops(model.config, *c, img_size=(8, 8))
                                   for c in configs}
    with pytest.raises(ValueError, match="not a policy written"):
        (tmp_path / "junk.pt").write_bytes(b"junk")
        parse_policy(f"learned={tmp_path / 'junk.pt'}", model.config)


def test_budget_policy_from_the_grid_and_from_a_table(capsys, trained, digits_dir, tmp_path):
    """budget=G: the most accurate configuration of at most G GFLOPs per image, chosen from
    this run's grid (its row) or from a table of other images (val.csv: that configuration run
    on every image, which gives the grid's row for it)."""
    _, _, ckpt = trained
    base = [str(digits_dir), "--pretrained", ckpt, "-b", "128", "--workers", "0",
            "--no-progress", "--plot", "none", *DIGITS_KW]
    val = tmp_path / "val.csv"
    run(base + ["--limit", "120", "--out", str(val)])

    def best_under(rows, budget):
        ok = [r for r in rows if float(r["gflops"]) <= budget]
        return max(ok, key=lambda r: (float(r["top1"]), -float(r["gflops"])))

    def key(r):
        return r["t"], r["w"], r["l"]

    out = tmp_path / "eval.csv"
    run(base + ["--out", str(out)])
    grid = _read(out)
    top = best_under(grid, float("inf"))
    cheapest = min(float(r["gflops"]) for r in grid)
    budget = (cheapest + float(top["gflops"])) / 2     # the most accurate row is out of budget
    assert best_under(grid, budget) != top
    run(base + ["--out", str(out), "--policy", f"budget={budget!r}",
                "--policy", f"budget={budget!r},table={val}"])
    assert _read(out) == grid
    from_grid, from_table = _read(tmp_path / "eval_policies.csv")
    best = best_under(grid, budget)
    assert (from_grid["top1"], from_grid["top5"], from_grid["gflops"]) == (
        best["top1"], best["top5"], best["gflops"])
    assert "t={} w={} l={}".format(*key(best)) in from_grid["policy"]
    chosen = best_under(_read(val), budget)
    row = next(r for r in grid if key(r) == key(chosen))
    assert "t={} w={} l={}".format(*key(chosen)) in from_table["policy"]
    assert (from_table["top1"], from_table["top5"]) == (row["top1"], row["top5"])
    assert float(from_table["gflops"]) == pytest.approx(float(row["gflops"]), rel=1e-6)
    for p in (from_grid, from_table):
        assert float(p["gflops"]) <= budget and p["images"] == "359"
    # a budget below every configuration of the table
    err = _error(capsys, base + ["--out", str(out), "--policy", f"budget=1e-9,table={val}"])
    assert "budget=1e-09 is below the cheapest configuration" in err and "val.csv" in err


def _write_mnist_files(raw, images, labels):
    """torchvision's MNIST raw files (idx format, uncompressed) holding ``images`` (N, H, W)
    uint8 as the test split; a one-image train split, which torchvision requires to exist."""
    import numpy as np
    raw.mkdir(parents=True)

    def idx(name, magic, arr):
        with open(raw / name, "wb") as f:
            f.write(np.array([magic, *arr.shape], dtype=">i4").tobytes())
            f.write(arr.astype(np.uint8).tobytes())

    for split, x, y in (("t10k", images, labels), ("train", images[:1], labels[:1])):
        idx(f"{split}-images-idx3-ubyte", 0x803, x)
        idx(f"{split}-labels-idx1-ubyte", 0x801, y)


def test_timm_sources_give_the_folder_result(trained, digits_dir, tmp_path):
    """Sources that are no image folder, read offline: a .tar of the class folders (timm's tar
    reader, as ``create_dataset('', root=...tar)`` reads it) and ``torch/mnist`` through timm's
    ``create_dataset`` (torchvision's MNIST files holding the same 8x8 digits in the folder's
    order), both with the transform of ``resolve_data_config``/``create_transform``: the same
    CSV as the folder."""
    import tarfile

    import numpy as np
    from PIL import Image

    from adaperceiver.eval.data import open_dataset
    _, _, ckpt = trained
    base = ["--pretrained", ckpt, "-b", "64", "--configs", "t=16,64 w=16,64 l=2,4",
            "--workers", "0", "--no-progress", "--plot", "none", *DIGITS_KW]
    run([str(digits_dir), *base, "--out", str(tmp_path / "folder.csv")])
    tar = tmp_path / "digits.tar"
    with tarfile.open(tar, "w") as tf:
        for c in sorted(os.listdir(digits_dir)):
            tf.add(digits_dir / c, arcname=c)
    run([str(tar), *base, "--out", str(tmp_path / "tar.csv")])
    reader = open_dataset(str(digits_dir), 10, lambda im: im, img_mode="L").dataset.reader
    pixels = np.stack([np.asarray(Image.open(reader[i][0])) for i in range(len(reader))])
    labels = np.array([int(reader[i][1]) for i in range(len(reader))])
    _write_mnist_files(tmp_path / "mnist" / "MNIST" / "raw", pixels, labels)
    res = run(["torch/mnist", "--data-dir", str(tmp_path / "mnist"), *base,
               "--out", str(tmp_path / "mnist.csv")])
    folder = _read(tmp_path / "folder.csv")
    assert len(folder) == 8 and all(r["images"] == "359" for r in folder)
    assert _read(tmp_path / "tar.csv") == folder
    assert _read(tmp_path / "mnist.csv") == folder
    assert len({r["top1"] for r in folder}) > 2       # rows differ: a mix-up would show
    assert res["rows"][0]["images"] == 359


@pytest.mark.parametrize("device,env,gpus,want", [
    (None, {}, 0, ("cpu", None)),
    (None, {}, 2, ("cuda:0", None)),
    ("cuda", {"WORLD_SIZE": "1"}, 1, ("cuda:0", None)),
    ("cuda:1", {}, 2, ("cuda:1", None)),
    (None, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 2, ("cuda:1", "nccl")),
    ("cuda", {"WORLD_SIZE": "4", "LOCAL_RANK": "3", "RANK": "7"}, 4, ("cuda:3", "nccl")),
    ("cpu", {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 2, ("cpu", "gloo")),   # GPUs unused
    (None, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 0, ("cpu", "gloo")),
])
def test_process_device_and_backend(device, env, gpus, want):
    """Device and process group backend per process, from --device and torchrun's environment
    with a given number of visible GPUs (what only a GPU run shows: NCCL itself)."""
    from adaperceiver.eval.__main__ import process_device
    dev, backend = process_device(device, env, gpus)
    assert (str(dev), backend) == want


@pytest.mark.parametrize("device,env,gpus,match", [
    ("cuda", {"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, 2,
     "LOCAL_RANK=3 but 2 CUDA devices visible; allowed: --nproc_per_node <= 2"),
    ("cuda:0", {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, 2,
     "--device 'cuda:0' under torchrun with 2 processes puts them all on one GPU"),
    ("cuda", {}, 0, "--device 'cuda': CUDA is not available here; allowed: cpu"),
    ("cuda:2", {}, 2, "--device 'cuda:2': 2 CUDA devices visible; allowed: cuda:0..cuda:1"),
    ("banana", {}, 0, "--device 'banana' is not a device; allowed: cpu, cuda, cuda:N"),
])
def test_process_device_errors(device, env, gpus, match):
    from adaperceiver.eval.__main__ import process_device
    with pytest.raises(ValueError) as e:
        process_device(device, env, gpus)
    assert match in str(e.value)


# ---------------------------------------------------------------------------- bad input
def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


DIGITS_MODEL_KW = ["--model-kwargs", "img_size=8", "patch_size=2", "in_channels=1",
                   "embed_dim=32", "num_heads=2", "depth=2", "max_latent_tokens=16",
                   "mask_token_grans=[8,16]", "mat_dims=[16,32]", "num_classes=10"]


def test_missing_and_empty_folders(capsys, tmp_path):
    err = _error(capsys, [str(tmp_path / "nope"), *DIGITS_MODEL_KW, *DIGITS_KW])
    assert "does not exist" in err and "nope" in err
    (tmp_path / "empty" / "a").mkdir(parents=True)
    err = _error(capsys, [str(tmp_path / "empty"), *DIGITS_MODEL_KW, *DIGITS_KW])
    assert "holds no images" in err and "empty" in err


def test_classes_must_match_or_be_mapped(capsys, digits_dir, tmp_path):
    import shutil
    sub = tmp_path / "three"
    for c in ("1", "4", "7"):
        shutil.copytree(digits_dir / c, sub / c)
    out = tmp_path / "eval.csv"
    base = [str(sub), *DIGITS_MODEL_KW, *DIGITS_KW, "--out", str(out), "--workers", "0",
            "--no-progress", "--plot", "none"]
    err = _error(capsys, base)
    assert "3 class folders" in err and "num_classes=10" in err and "--class-map" in err
    assert not out.exists()
    cmap = tmp_path / "map.txt"
    cmap.write_text("1 1\n4 4\n")
    err = _error(capsys, base + ["--class-map", str(cmap)])
    assert "does not map the folders '7'" in err
    cmap.write_text("1 1\n4 4\n7 12\n")
    err = _error(capsys, base + ["--class-map", str(cmap)])
    assert "0..9" in err and "12" in err
    # mapped: labels are the digits themselves, so a trained-like check holds on counts
    cmap.write_text("1 1\n4 4\n7 7\n")
    res = run(base + ["--class-map", str(cmap), "--configs", "t=16 w=32 l=2"])
    n = sum(len(os.listdir(sub / c)) for c in ("1", "4", "7"))
    assert res["rows"][0]["images"] == n


def test_unreadable_images_fail_before_the_run(capsys, digits_dir, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(digits_dir, bad)
    (bad / "3" / "zz_broken.png").write_bytes(b"this is not a png")
    out = tmp_path / "eval.csv"
    err = _error(capsys, [str(bad), *DIGITS_MODEL_KW, *DIGITS_KW, "--out", str(out),
                          "--workers", "0", "--no-progress"])
    assert "unreadable images" in err and "zz_broken.png" in err
    assert not out.exists()


def test_truncated_image_raises_naming_it(digits_dir, tmp_path):
    """A header that reads and pixels that do not: the run stops naming the file (timm's own
    dataset would skip it and count the next image twice)."""
    import io
    import shutil

    from PIL import Image
    bad = tmp_path / "trunc"
    shutil.copytree(digits_dir, bad)
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).save(buf, format="PNG")
    (bad / "5" / "zz_cut.png").write_bytes(buf.getvalue()[:200])
    with pytest.raises(RuntimeError, match="zz_cut.png"):
        run([str(bad), *DIGITS_MODEL_KW, *DIGITS_KW, "--out", str(tmp_path / "e.csv"),
             "--workers", "0", "--no-progress", "--configs", "t=8 w=16 l=1"])


@pytest.mark.parametrize("spec,match", [
    (["w=999"], "w \\(mat_dim\\)=999 is not allowed"),
    (["x=3"], "'x=3' is not understood"),
    (["l=0"], "l \\(depth\\)=0 is not allowed"),
])
def test_unknown_configs(capsys, digits_dir, spec, match):
    import re
    err = _error(capsys, [str(digits_dir), *DIGITS_MODEL_KW, *DIGITS_KW, "--configs", *spec])
    assert re.search(match, err), err


@pytest.mark.parametrize("extra,match", [
    (["--policy", "tau=2"], "tau=2.0 is not allowed"),
    (["--policy", "speed=fast"], "not understood"),
    (["--policy", "budget=abc"], "budget='abc' is not allowed; allowed: a finite number"),
    (["--policy", "budget=-1"], "budget='-1' is not allowed; allowed: a finite number"),
    (["--policy", "budget=inf"], "budget='inf' is not allowed; allowed: a finite number"),
    (["--policy", "budget=1e-9"], "budget=1e-09 GFLOPs is below the cheapest configuration "
                                  "of --configs"),
    (["--policy", "budget=1,tau=0.5"], "budget= takes only table="),
    (["--policy", "budget=1,table=nope.csv"], "table='nope.csv' does not exist"),
    (["--device", "nope"], "--device 'nope' is not a device"),
    (["--out", "x.json"], "allowed: a .csv path"),
    (["--model", "nope"], "--model 'nope' is not known"),
    (["--mean", "0.1", "0.2"], "mean and std need 1 or 1 values"),
])
def test_bad_flags(capsys, digits_dir, extra, match):
    err = _error(capsys, [str(digits_dir), *DIGITS_MODEL_KW, *DIGITS_KW, *extra])
    assert match in err, err


def test_console_script_is_the_module_main(capsys):
    """``adaperceiver-eval`` (pyproject's [project.scripts]) resolves to the module's main,
    which runs the CLI and returns its exit status."""
    import importlib
    import pathlib
    import tomllib
    root = pathlib.Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["adaperceiver-eval"].partition(":")
    main = getattr(importlib.import_module(module), attr)
    from adaperceiver.eval.__main__ import main as module_main
    assert main is module_main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "usage: python -m adaperceiver.eval" in capsys.readouterr().out


def test_grid_syntax_is_the_bench_one():
    cfg = tiny_model().config
    axes = ModelAxes.from_config(cfg)
    assert len(parse_grid("all", axes)) == 6 * 3 * 4
    assert parse_grid("t=32 w=48 l=2", axes) == [Config(32, 48, 2)]
