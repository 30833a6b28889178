"""A pytest plugin (``-p adaperceiver.bench._pytest_shard``) that runs one shard of the collected
tests: with ``ADAPERCEIVER_PYTEST_SHARD=i/n`` in the environment, the i-th of n contiguous
slices of the collected items (0 <= i < n), the others deselected; without it, every test.
``make gpu-check`` runs the kernel test files as n such processes side by side, so that the
Triton kernel variants the tests need compile on n cores at once (compiling dominates their
first run on a GPU). Contiguous slices keep a test's parametrizations, which share kernel
variants, in one process."""
from __future__ import annotations

import os

ENV = "ADAPERCEIVER_PYTEST_SHARD"


def shard_of(value: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n), or a ValueError naming the variable, the value and what is allowed."""
    try:
        i, n = (int(p) for p in value.split("/"))
    except ValueError:
        i, n = -1, 0
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"{ENV}={value!r} is not allowed; allowed: 'i/n' with n >= 1 and "
                         "0 <= i < n")
    return i, n


def shard_slice(count: int, i: int, n: int) -> range:
    """The indices of shard i of n over ``count`` items: contiguous, sizes differing by <= 1."""
    return range(i * count // n, (i + 1) * count // n)


def pytest_collection_modifyitems(config, items):
    value = os.environ.get(ENV, "").strip()
    if not value:
        return
    i, n = shard_of(value)
    keep = shard_slice(len(items), i, n)
    dropped = [it for j, it in enumerate(items) if j not in keep]
    items[:] = [it for j, it in enumerate(items) if j in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
