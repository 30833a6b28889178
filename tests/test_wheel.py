"""The wheel is the package: built from a copy of the source (extension skipped with
ADAPERCEIVER_BUILD_EXT=0, so it takes seconds), it holds every subpackage, and installed
non-editable into a scratch environment it imports every public module from outside the tree.

An editable install (the project's own venv) resolves imports from the source tree, so a package
left out of setup.py goes unnoticed there; these tests install the wheel where the tree is not on
sys.path. The scratch venv sees the project venv's packages (torch, timm, ...) through a .pth
line; the editable-install finder of that venv is itself a .pth file, which a .pth-added
directory does not process, so ``adaperceiver`` can only come from the wheel. Nothing touches the
network (--no-index) or the source tree (the build runs on a copy).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what the build needs; everything else (tests, benchmarks, .venv, build dirs) stays out
SOURCES = ("setup.py", "pyproject.toml", "README.md", "adaperceiver", "kernels", "csrc")
_IGNORE = shutil.ignore_patterns("*.so", "*.pyd", "__pycache__", "*.egg-info", "build")


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kw)
    assert res.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n"
                                 f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _source_packages() -> set[str]:
    """Every package of the source tree, dotted: adaperceiver[.x...] plus adaperceiver.kernels."""
    pkgs = {"adaperceiver.kernels"}
    for init in (ROOT / "adaperceiver").rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if "__pycache__" not in rel.parts:
            pkgs.add(".".join(rel.parts))
    return pkgs


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=_IGNORE)
        elif path.exists():
            shutil.copy2(path, src / name)
    dist = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "ADAPERCEIVER_BUILD_EXT": "0"}
    res = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                "--no-build-isolation", "-v", "-w", str(dist), str(src)], env=env, cwd=src)
    # setuptools prints deprecations (e.g. the old `project.license` table) into the build log
    assert "SetuptoolsDeprecationWarning" not in res.stdout + res.stderr, (
        res.stdout + res.stderr)[-3000:]
    wheels = list(dist.glob("adaperceiver-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_every_subpackage_and_the_kernels(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    packages = {os.path.dirname(n).replace("/", ".") for n in names if n.endswith("__init__.py")}
    want = _source_packages()
    assert {"adaperceiver.train", "adaperceiver.dense", "adaperceiver.baselines",
            "adaperceiver.bench", "adaperceiver.ops", "adaperceiver.model"} <= want
    assert want <= packages, f"missing from the wheel: {sorted(want - packages)}"
    # every module of the tree, not only the __init__ files
    for py in (ROOT / "adaperceiver").rglob("*.py"):
        assert str(py.relative_to(ROOT)) in names, f"{py.relative_to(ROOT)} not in the wheel"
    for py in (ROOT / "kernels").glob("*.py"):
        assert f"adaperceiver/kernels/{py.name}" in names, f"kernels/{py.name} not in the wheel"
    # kernels ship inside the package only, never as a top-level `kernels`; no tests, no build
    # products (ADAPERCEIVER_BUILD_EXT=0 builds no _C)
    tops = {n.split("/")[0] for n in names}
    assert tops == {"adaperceiver", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1]
                    + ".dist-info"}, tops
    assert not [n for n in names if n.endswith((".so", ".pyd", ".pyc"))]
    meta = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in meta
    entry = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "adaperceiver-bench = adaperceiver.bench.__main__:main" in entry
    assert "adaperceiver-eval = adaperceiver.eval.__main__:main" in entry


def test_ext_flag_refuses_other_values(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "setup.py"), "--name"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "ADAPERCEIVER_BUILD_EXT": "no"})
    assert res.returncode != 0
    assert "ADAPERCEIVER_BUILD_EXT='no' is not allowed" in res.stderr


_IMPORT_ALL = textwrap.dedent("""
    import importlib, os, pkgutil, sys
    import adaperceiver
    site = os.path.realpath(sys.argv[1])
    assert os.path.realpath(adaperceiver.__file__).startswith(site), adaperceiver.__file__
    names = ["adaperceiver"]
    for info in pkgutil.walk_packages(adaperceiver.__path__, "adaperceiver."):
        if info.name.rsplit(".", 1)[-1] != "__main__":   # run below with -m instead
            names.append(info.name)
    for name in names:
        mod = importlib.import_module(name)
        assert os.path.realpath(mod.__file__).startswith(site), (name, mod.__file__)
    import adaperceiver.timm, timm
    assert "adaperceiver_v1_in1k" in timm.list_models("adaperceiver*")
    from adaperceiver.bench import baselines   # imports adaperceiver.baselines.avit
    print("\\n".join(sorted(names)))
""")


def test_wheel_installs_non_editable_and_imports_every_module(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                     ).stdout.strip())
    # the project venv's packages (torch, timm, triton, ...), not its editable adaperceiver
    (site / "project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
          "--ignore-installed", "--no-compile", str(wheel)])
    away = tmp_path / "elsewhere"      # a cwd outside the tree: nothing imports from the source
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TRITON_INTERPRET"] = "1"
    out = _run([str(py), "-c", _IMPORT_ALL, str(site)], cwd=away, env=env).stdout.split()
    for pkg in sorted(_source_packages()):
        assert pkg in out, f"{pkg} did not import from the installed wheel"
    assert "adaperceiver.baselines.avit" in out and "adaperceiver.dense.train" in out
    # every `python -m adaperceiver.<pkg>` of the tree runs from the installed wheel
    mains = sorted(".".join(m.parent.relative_to(ROOT).parts)
                   for m in (ROOT / "adaperceiver").rglob("__main__.py"))
    assert {"adaperceiver.train", "adaperceiver.bench", "adaperceiver.eval"} <= set(mains)
    for mod in mains:
        res = _run([str(py), "-m", mod, "--help"], cwd=away, env=env)
        assert "usage" in res.stdout.lower(), (mod, res.stdout)
    for script in ("adaperceiver-bench", "adaperceiver-eval"):
        res = _run([str(venv / "bin" / script), "--help"], cwd=away, env=env)
        assert "usage" in res.stdout.lower(), (script, res.stdout)
