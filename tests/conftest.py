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
