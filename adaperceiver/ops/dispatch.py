"""Backend selection for the two ops, in the manner of xformers' op dispatch.

Every call of an op is one inputs object (inputs.py), validated at the public entry:
``AttentionInputs`` (padded attention), ``PackedAttentionInputs`` (packed rows), ``FfnInputs``.
A backend is a module exposing, for each op it implements:
  attention:        ``why_not_attention(inp) -> list[str]``,
                    ``attention_forward(inp) -> (out, lse)``,
                    ``attention_backward(inp, grad_out, out, lse) -> (dq, dk, dv)``;
  attention_varlen: ``why_not_attention_varlen(inp) -> list[str]``,
                    ``attention_varlen_forward(inp) -> (out, lse)`` (optional: without it the
                    op pads the rows and runs ``attention``);
  ffn:              ``why_not_ffn(inp) -> list[str]``, ``ffn_forward(inp) -> out``,
                    ``ffn_backward(inp, grad_out) -> (dx, dW1, db1, dW2, db2)``.
``lse`` is the natural-log logsumexp of the scaled, masked scores, float32 (B, H, Nq), -inf on
rows that see no key: every backend writes and reads the same, so they are interchangeable.

Each backend says why it cannot take an input (only what it cannot take: the input itself was
checked at the entry); the dispatcher asks once per call and picks the first that can, in the
order CUDA tensors: triton, cuda, reference; CPU tensors: cpp, reference. A backend forced by
``use_backend(name)`` or ``ADAPERCEIVER_BACKEND`` is used or raises with every reason. The Triton
backend runs CPU tensors only when forced and ``TRITON_INTERPRET=1`` (the interpreter is far too
slow to be picked on its own).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
from typing import Callable, Optional

__all__ = ["BACKENDS", "use_backend", "forced_backend", "select", "select_kernel",
           "available_backends", "NoBackendError"]

BACKENDS = ("triton", "cuda", "cpp", "reference")
_MODULES = {
    "triton": "adaperceiver.ops.triton_backend",
    "cuda": "adaperceiver.ops.cuda_backend",
    "cpp": "adaperceiver.ops.cpp_backend",
    "reference": "adaperceiver.ops.reference_backend",
}
_local = threading.local()


class NoBackendError(RuntimeError):
    pass


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not known; allowed: {', '.join(BACKENDS)}")
    return name


def forced_backend() -> Optional[str]:
    """The backend forced by ``use_backend`` (innermost) or ``ADAPERCEIVER_BACKEND``, if any."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get("ADAPERCEIVER_BACKEND", "").strip()
    if env and env != "auto":
        return _check_name(env)
    return None


@contextlib.contextmanager
def use_backend(name: str):
    """Force one backend (``"triton"``, ``"cuda"``, ``"cpp"``, ``"reference"``; ``"auto"`` undoes
    an outer choice) for the ops called inside the ``with`` block."""
    if name != "auto":
        _check_name(name)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(None if name == "auto" else name)
    try:
        yield
    finally:
        stack.pop()


def _load(name: str):
    """The backend module, or a string saying why it cannot be loaded."""
    module = sys.modules.get(_MODULES[name])   # imported already: import_module's checks cost
    if module is not None:                      # microseconds a call
        return module
    try:
        return importlib.import_module(_MODULES[name])
    except Exception as e:  # noqa: BLE001 - the reason is reported to the user
        return f"{name} backend could not be loaded: {type(e).__name__}: {e}"


def _why_not(name: str, op: str, inputs) -> list[str]:
    mod = _load(name)
    if isinstance(mod, str):
        return [mod]
    check: Optional[Callable] = getattr(mod, f"why_not_{op}", None)
    if check is None:
        return [f"{name} backend has no {op} kernel"]
    return list(check(inputs))


def _auto_order(device_type: str) -> tuple[str, ...]:
    return ("triton", "cuda", "reference") if device_type == "cuda" else ("cpp", "reference")


def select(op: str, inputs):
    """The backend module to run ``op`` (``"attention"`` or ``"ffn"``) on ``inputs``."""
    forced = forced_backend()
    order = (forced,) if forced else _auto_order(inputs.device.type)
    reasons = []
    for name in order:
        why = _why_not(name, op, inputs)
        if not why:
            return _load(name)
        reasons.extend(f"{name}: {r}" for r in why)
    what = f"forced backend {forced!r} cannot" if forced else "no backend can"
    raise NoBackendError(f"{what} run {op} on this input:\n  " + "\n  ".join(reasons))


def select_kernel(op: str, inputs):
    """The first backend, in the same order as ``select`` (the forced one alone when forced),
    that has a kernel for ``op`` and can take ``inputs``; None when none has. For ops with a
    generic fallback (``attention_varlen``: pad, run ``attention``, pack), which the caller runs
    then."""
    forced = forced_backend()
    for name in (forced,) if forced else _auto_order(inputs.device.type):
        mod = _load(name)
        if (not isinstance(mod, str) and hasattr(mod, f"why_not_{op}")
                and not _why_not(name, op, inputs)):
            return mod
    return None


def available_backends(op: str, inputs) -> dict[str, list[str]]:
    """For every backend, the reasons it cannot run ``op`` on ``inputs`` (empty: it can)."""
    return {name: _why_not(name, op, inputs) for name in BACKENDS}
