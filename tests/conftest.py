import os

# Triton runs here only in its interpreter; this must be set before any @triton.jit is applied.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different random draw per test (reproducible from the test's node id)."""
    import zlib
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def randomize_(model: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    """Give every parameter a random value of order ``scale`` (LayerScale included), so that no
    block is a near-identity and every test of the model exercises every layer."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.3, 1.0)
            elif p.dim() >= 2:
                p.normal_(0.0, scale / p.shape[-1] ** 0.5 if "pos_embed" not in name else scale)
            else:
                p.normal_(0.0, scale * 0.2)
            if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return model


TINY = dict(embed_dim=96, num_heads=3, depth=4, img_size=64, patch_size=16, num_classes=17,
            mat_dims=[48, 72, 96])


def tiny_model(**overrides):
    """A small AdaPerceiver with the released token grans (N up to 256), randomized."""
    import adaperceiver
    return randomize_(adaperceiver.create_model("adaperceiver_v1_in1k", **{**TINY, **overrides}))


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


def hard_exit(worker):
    """For torch.multiprocessing workers: leave with os._exit once the work is done (0) or has
    failed (1, traceback printed). Torch's gloo teardown at interpreter exit intermittently
    aborts a finished worker ("terminate called without an active exception"), which would fail
    a test whose work succeeded."""
    import functools

    @functools.wraps(worker)
    def run(*args, **kwargs):
        import os
        import sys
        import traceback
        code = 0
        try:
            worker(*args, **kwargs)
        except BaseException:  # noqa: BLE001 - reported, then the exit code says it failed
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return run
