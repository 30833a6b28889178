"""scripts/timm_benchmark.py without the network: where it finds timm's benchmark.py (an
environment variable, the cache, an sdist), and that it runs a benchmark.py-shaped script with
our model registered, timm's generic create_model keywords translated and, for older revisions,
--device / --model-kwargs added."""
import importlib.util
import io
import json
import os
import sys
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["embed_dim=64", "num_heads=2", "depth=2", "mask_token_grans=[8,16]",
         "max_latent_tokens=16", "img_size=32", "mat_dims=[32,64]"]


@pytest.fixture
def tb(monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "timm_benchmark_script", os.path.join(ROOT, "scripts", "timm_benchmark.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    return mod


def _tarball(path, files: dict):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_benchmark_from_sdist(tb, tmp_path):
    with_it = _tarball(tmp_path / "a.tar.gz", {"timm-9.9/timm/__init__.py": "",
                                               "timm-9.9/benchmark.py": "# bench 9.9\n"})
    without = _tarball(tmp_path / "b.tar.gz", {"timm-9.9/timm/benchmark.py": "# wrong place\n",
                                               "timm-9.9/README.md": ""})
    out = tb.benchmark_from_sdist(with_it, str(tmp_path / "cache"))
    assert open(out).read() == "# bench 9.9\n"
    assert tb.benchmark_from_sdist(without, str(tmp_path / "cache2")) is None


def test_find_benchmark_env_then_cache(tb, tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPERCEIVER_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("TIMM_BENCHMARK_PY", raising=False)
    with pytest.raises(FileNotFoundError, match="no benchmark.py in the cache"):
        tb.find_benchmark("9.9", download=False)
    cached = tmp_path / "c" / "timm-9.9" / "benchmark.py"
    cached.parent.mkdir(parents=True)
    cached.write_text("# cached\n")
    assert tb.find_benchmark("9.9", download=False) == str(cached)
    mine = tmp_path / "mine.py"
    mine.write_text("# mine\n")
    monkeypatch.setenv("TIMM_BENCHMARK_PY", str(mine))
    assert tb.find_benchmark("9.9", download=False) == str(mine)
    monkeypatch.setenv("TIMM_BENCHMARK_PY", str(tmp_path / "nope.py"))
    with pytest.raises(FileNotFoundError, match="TIMM_BENCHMARK_PY="):
        tb.find_benchmark("9.9", download=False)


def test_timm_kwargs_to_config():
    """The translation the entrypoints apply to timm's generic keywords (the runner relies on
    it: it registers the entrypoints and adds nothing)."""
    from adaperceiver.timm import timm_kwargs_to_config
    out = timm_kwargs_to_config(dict(in_chans=3, global_pool="fast", drop_rate=0.1,
                                     drop_path_rate=0.2, drop_block_rate=None, num_tokens=8))
    assert out == dict(in_channels=3, head_drop=0.1, drop_path=0.2, num_tokens=8)
    with pytest.raises(ValueError, match="drop_block_rate=0.1"):
        timm_kwargs_to_config(dict(drop_block_rate=0.1))


# a benchmark.py of the old shape (no --device, no --model-kwargs) and of the new shape
OLD = """
import argparse, json
import torch
from timm.models import create_model
parser = argparse.ArgumentParser()
parser.add_argument('--model', '-m', default='resnet50')
parser.add_argument('--out')
def run(args, device='cuda', **kwargs):
    m = create_model(args.model, num_classes=None, in_chans=3, global_pool='fast',
                     scriptable=False, drop_rate=0., drop_path_rate=None, drop_block_rate=None)
    m.to(device).eval()
    x = torch.randn(2, 3, m.config.img_size, m.config.img_size, device=device)
    with torch.no_grad():
        y = m(x)
        ref = type(m).__mro__[1].forward(m, x, num_tokens=m.run_config['num_tokens'],
                                         mat_dim=m.run_config['mat_dim'],
                                         depth=m.run_config['depth']).logits[:, 0]
    json.dump(dict(device=device, shape=list(y.shape), run=m.run_config,
                   embed_dim=m.config.embed_dim, equal=bool(torch.equal(y, ref))),
              open(args.out, 'w'))
def main():
    args = parser.parse_args()
    run(args, **{k: v for k, v in vars(args).items() if k == 'device'})
"""
NEW = OLD.replace("parser.add_argument('--out')", textwrap.dedent("""\
    parser.add_argument('--out')
    from timm.utils import ParseKwargs
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)""")).replace(
    "drop_block_rate=None)", "drop_block_rate=None, **args.model_kwargs)")


@pytest.mark.parametrize("shape", ["old", "new"])
def test_run_registers_and_builds_our_model(tb, tmp_path, shape):
    script = tmp_path / "benchmark.py"
    script.write_text(OLD if shape == "old" else NEW)
    out = tmp_path / "out.json"
    tb.run(str(script), ["--model", "adaperceiver_v1_in1k", "--device", "cpu", "--out", str(out),
                         "--model-kwargs", *SMALL, "num_tokens=8", "mat_dim=32", "exit_depth=1"])
    got = json.loads(out.read_text())
    assert got["device"] == "cpu" and got["shape"] == [2, 1000] and got["embed_dim"] == 64
    assert got["run"] == dict(num_tokens=8, mat_dim=32, depth=1)
    assert got["equal"]


def test_run_rejects_other_scripts(tb, tmp_path):
    script = tmp_path / "other.py"
    script.write_text("x = 1\n")
    with pytest.raises(ValueError, match="is not timm's benchmark.py"):
        tb.run(str(script), [])
