"""Run timm's own ``benchmark.py`` on our models.

``benchmark.py`` lives in timm's git repository (huggingface/pytorch-image-models), not in the
wheel, and not in the PyPI sdist either (checked for timm 1.0.31 and 0.9.16: the sdists hold
only ``timm/``, ``tests/`` and the metadata). This script finds a copy, registers our models
with timm (``import adaperceiver.timm``) and runs it unchanged::

    python scripts/timm_benchmark.py --model adaperceiver_v1_in1k --bench inference -b 4 \\
        --img-size 224 --device cpu --num-warm-iter 2 --num-bench-iter 4 \\
        --model-kwargs num_tokens=128 mat_dim=624 exit_depth=14

Where ``benchmark.py`` comes from, first found wins:

1. ``$TIMM_BENCHMARK_PY`` (a path to a checkout's ``benchmark.py``);
2. the cache, ``$ADAPERCEIVER_CACHE`` (default ``~/.cache/adaperceiver``)/``timm-<version>/``;
3. the sdist of the installed timm version (``pip download timm==<v> --no-binary :all:``), in
   case a release ships it;
4. ``https://raw.githubusercontent.com/huggingface/pytorch-image-models/v<version>/benchmark.py``.

What the runner adds, and only when needed:

* nothing for timm's generic keywords (``in_chans=3``, ``global_pool='fast'``,
  ``drop_rate=0.``, ``drop_path_rate``, ``drop_block_rate``, ``device``): the entrypoints of
  ``adaperceiver.timm`` translate them themselves (``adaperceiver.timm.timm_kwargs_to_config``:
  ``in_chans`` -> ``in_channels``, ``drop_rate`` -> ``head_drop``, ``drop_path_rate`` ->
  ``drop_path``; ``global_pool`` is dropped: the model reads out with a latent token, it has no
  pooling; a non-zero ``drop_block_rate`` is an error);
* revisions of ``benchmark.py`` older than ``--device`` / ``--model-kwargs`` get those two flags
  (the benchmark's runners already take ``device=``; the model kwargs are passed to its
  ``create_model``). The timing code is timm's, untouched.
"""
from __future__ import annotations

import os
import runpy
import sys
import tarfile
import urllib.request
from typing import Optional, Sequence

__all__ = ["find_benchmark", "benchmark_from_sdist", "run", "main"]

GITHUB_RAW = ("https://raw.githubusercontent.com/huggingface/pytorch-image-models/v{version}/"
              "benchmark.py")


def cache_dir(version: str) -> str:
    root = os.environ.get("ADAPERCEIVER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "adaperceiver")
    return os.path.join(root, f"timm-{version}")


def benchmark_from_sdist(tarball: str, dest: str) -> Optional[str]:
    """Extract ``<top>/benchmark.py`` of a timm sdist into ``dest``; None when it is not there."""
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) == 2 and parts[1] == "benchmark.py" and member.isfile():
                os.makedirs(dest, exist_ok=True)
                out = os.path.join(dest, "benchmark.py")
                with tar.extractfile(member) as src, open(out, "wb") as f:
                    f.write(src.read())
                return out
    return None


def _pip_download_sdist(version: str, dest: str) -> Optional[str]:
    import subprocess
    os.makedirs(dest, exist_ok=True)
    name = f"timm-{version}.tar.gz"
    if os.path.isfile(os.path.join(dest, name)):
        return os.path.join(dest, name)
    cmd = [sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-binary", ":all:",
           "--no-deps", "-q", "-d", dest]
    if subprocess.run(cmd, check=False).returncode != 0:
        return None
    return os.path.join(dest, name) if os.path.isfile(os.path.join(dest, name)) else None


def find_benchmark(version: str, download: bool = True) -> str:
    """The path of timm's benchmark.py for timm ``version`` (see the module docstring)."""
    env = os.environ.get("TIMM_BENCHMARK_PY")
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"TIMM_BENCHMARK_PY={env!r} is not a file; allowed: the path "
                                    "of benchmark.py in a pytorch-image-models checkout")
        return env
    cache = cache_dir(version)
    cached = os.path.join(cache, "benchmark.py")
    if os.path.isfile(cached):
        return cached
    if not download:
        raise FileNotFoundError(f"no benchmark.py in the cache {cache!r} and download=False")
    tried = []
    tarball = _pip_download_sdist(version, os.path.join(cache, "sdist"))
    if tarball and benchmark_from_sdist(tarball, cache):
        return cached
    tried.append(f"the timm {version} sdist on PyPI (" +
                 ("has no benchmark.py)" if tarball else "could not be downloaded)"))
    url = GITHUB_RAW.format(version=version)
    try:
        with urllib.request.urlopen(url, timeout=20) as r:
            data = r.read()
        os.makedirs(cache, exist_ok=True)
        with open(cached, "wb") as f:
            f.write(data)
        return cached
    except OSError as e:
        tried.append(f"{url} ({e.__class__.__name__}: {e})")
    raise FileNotFoundError(
        f"timm's benchmark.py for timm {version} was not found; tried: {'; '.join(tried)}. "
        f"Clone https://github.com/huggingface/pytorch-image-models (tag v{version}) and set "
        f"TIMM_BENCHMARK_PY=<checkout>/benchmark.py, or copy it to {cached!r}")


def _register_ours() -> None:
    # registers the entrypoints with timm; they translate timm's generic keywords and take
    # device / dtype themselves (adaperceiver.timm.timm_kwargs_to_config)
    import adaperceiver.timm  # noqa: F401


def _add_missing_flags(g: dict) -> None:
    """Older benchmark.py revisions lack --device / --model-kwargs: add them. ``g`` is the
    script's module namespace (``main.__globals__``, which its functions read)."""
    parser = g["parser"]
    have = parser._option_string_actions
    if "--device" not in have:
        parser.add_argument("--device", default="cuda", type=str,
                            help="(added by adaperceiver's runner) device to run on")
    if "--model-kwargs" not in have:
        parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="K=V",
                            help="(added by adaperceiver's runner) model keyword arguments")
        extra = _parse_kv(parser.parse_known_args(sys.argv[1:])[0].model_kwargs)
        create = g["create_model"]

        def create_model(*args, **kwargs):
            return create(*args, **{**kwargs, **extra})
        g["create_model"] = create_model


def _parse_kv(items: Sequence[str]) -> dict:
    import ast
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--model-kwargs item {item!r} is not allowed; allowed: key=value")
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def run(benchmark_py: str, argv: Sequence[str]) -> None:
    """Run ``benchmark_py`` as ``python benchmark_py *argv`` with our models registered."""
    _register_ours()
    sys.argv = [benchmark_py, *argv]
    g = runpy.run_path(benchmark_py, run_name="timm_benchmark")   # a copy of its globals
    if "parser" not in g or not callable(g.get("main")):
        raise ValueError(f"{benchmark_py!r} is not timm's benchmark.py (no parser / main)")
    g = g["main"].__globals__
    _add_missing_flags(g)
    g["main"]()


def main(argv: Optional[Sequence[str]] = None) -> None:
    import timm
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        path = find_benchmark(timm.__version__)
    except FileNotFoundError as e:
        sys.exit(f"timm_benchmark: {e}")
    if argv[:1] == ["--where"]:
        print(path)
        return
    run(path, argv)


if __name__ == "__main__":
    main()
