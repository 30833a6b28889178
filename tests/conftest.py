"""Fixtures of the test suite; the shared helpers and constants are in helpers.py (imported
first: it decides Triton's interpreter mode before anything imports Triton)."""
import helpers  # noqa: F401  (sets TRITON_INTERPRET)

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


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """The digits recipe run once (about 2 minutes on 2 cores): (summary, output directory).
    Its targets are checked by test_digits_recipe; the bf16 test loads the checkpoint it saved
    instead of training the same recipe a second time."""
    pytest.importorskip("sklearn")
    from adaperceiver.train.digits import DigitsRecipe, run_digits
    out = tmp_path_factory.mktemp("digits")
    summary = run_digits(DigitsRecipe(), out_dir=str(out), avit=True, log=lambda m: None)
    return summary, out


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
