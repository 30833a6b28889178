"""Fixtures of the test suite; the shared helpers and constants are in helpers.py (imported
first: it decides Triton's interpreter mode before anything imports Triton)."""
import helpers  # noqa: F401  (sets TRITON_INTERPRET)

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different random draw per test (reproducible from the test's node id)."""
    import zlib
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


@pytest.fixture
def reference_backend():
    import adaperceiver
    with adaperceiver.use_backend("reference"):
        yield


@pytest.fixture(scope="session")
def released_model():
    """The released classifier's architecture at random init (built once: 144M parameters)."""
    import adaperceiver
    return adaperceiver.create_model("adaperceiver_v1_in1k").eval()


# The digits recipe runs as a user runs it (``python -m adaperceiver.train --recipe digits``) in a
# child process, started once collection has selected a test that needs it; those tests run
# last.
# Why: most of the suite keeps one of the two cores busy (the Triton interpreter runs on one
# thread), so the child, on one thread at the lowest priority, trains on the other core meanwhile
# instead of holding the suite up for its two minutes.
_DIGITS = pytest.StashKey[dict]()


def _start_digits(config):
    """The digits run's child process and output directory (started once per session), or None
    without scikit-learn (its dataset); the fixture then skips."""
    if _DIGITS not in config.stash:
        if importlib.util.find_spec("sklearn") is None:
            return None
        out = Path(tempfile.mkdtemp(prefix="adaperceiver_digits_"))
        with open(out / "run.log", "w") as log:  # the child writes through its own copy
            proc = subprocess.Popen(
                [sys.executable, "-m", "adaperceiver.train", "--recipe", "digits", "--out-dir",
                 str(out), "--threads", "1"], stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=lambda: os.nice(19))
        config.stash[_DIGITS] = {"proc": proc, "out": out}
    return config.stash[_DIGITS]


def _needs_digits(item) -> bool:
    return "digits_run" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """Tests that use the digits run go last (see above)."""
    items[:] = ([it for it in items if not _needs_digits(it)]
                + [it for it in items if _needs_digits(it)])


def pytest_collection_finish(session):
    """The digits run starts as soon as a selected test needs it (see above). Not in a
    pytest-xdist worker: every worker collects every test, so there the fixture starts it in
    each worker that runs such a test."""
    config = session.config
    if (not config.option.collectonly and not hasattr(config, "workerinput")
            and any(map(_needs_digits, session.items))):
        _start_digits(config)


def pytest_unconfigure(config):
    """The digits child stopped (when the session ends before it does) and its files removed."""
    run = config.stash.get(_DIGITS, None)
    if run is not None:
        if run["proc"].poll() is None:
            run["proc"].kill()
            run["proc"].wait()
        shutil.rmtree(run["out"], ignore_errors=True)


@pytest.fixture(scope="session")
def digits_run(request):
    """The digits recipe's run (a few minutes on one core, beside the rest of the suite):
    (summary as its CLI wrote it to digits.json, output directory). Its targets are checked by
    test_digits_recipe; the bf16 test loads the checkpoint it saved."""
    run = _start_digits(request.config)
    if run is None:
        pytest.skip("scikit-learn is not installed (the digits dataset)")
    try:
        rc = run["proc"].wait(timeout=1500)
    except subprocess.TimeoutExpired:
        run["proc"].kill()
        pytest.fail("the digits run did not finish within 1500 s")
    out = run["out"]
    assert rc == 0, (f"python -m adaperceiver.train --recipe digits exited {rc}:\n"
                     f"{(out / 'run.log').read_text()[-3000:]}")
    return json.loads((out / "digits.json").read_text()), out


def _readable(val, depth=0):
    """A short readable rendering of a parameter value, or None (pytest's default id)."""
    if isinstance(val, torch.dtype):
        return str(val).replace("torch.", "")
    if val is None or isinstance(val, (bool, int, float, str)):
        return str(val)
    if depth == 0 and isinstance(val, (list, tuple)):
        parts = [_readable(v, 1) for v in val]
        if None in parts:
            return None
        if len(parts) > 6:  # long lists (e.g. grans every 64): first..last, then the count
            return f"[{parts[0]},..,{parts[-1]}]({len(parts)})"
        return "[" + ",".join(parts) + "]"
    if depth == 0 and isinstance(val, dict):
        parts = [(k, _readable(v, 1)) for k, v in val.items()]
        if any(p is None for _, p in parts):
            return None
        return "{" + ",".join(f"{k}={p}" for k, p in parts) + "}"
    return None


def pytest_make_parametrize_id(config, val, argname):
    """Parameter ids that say what the case is (``grans=[32,64]``, ``{N=70,D=30}``,
    ``bfloat16``) instead of pytest's ``grans0`` / ``case0`` / ``dtype0``."""
    text = _readable(val)
    if text is None or len(text) > 60:
        return None
    return text if isinstance(val, (torch.dtype, bool, int, float, str)) or val is None \
        else f"{argname}={text}"
