"""The tile schedule of the group-causal block mask, computed in one place.

Every mask this package uses is a monotone per-row bound: query row i sees keys k < row_end[i],
with row_end nondecreasing. Group-causal: row_end[i] is the end of i's group; causal is
grans = 1, 2, ..., N; no mask is row_end[i] = Nk. A sample's seq_len n clips every bound to n
and rows i >= n produce zeros.

For a query tile [m0, m1) (rows clipped to the sample's length):
  * key tiles below ``full_end = min(row_end[m0], n) // BN`` are fully visible (no mask needed);
  * key tiles from there up to ``ceil(min(row_end[m1 - 1], n) / BN)`` need the per-row test;
  * key tiles past that hold no allowed score and are never loaded.
Every backend (Triton, C++ CPU, CUDA) derives its loop bounds from ``row_end`` this way, and the
tests count kernel visits against :func:`tile_schedule`.
"""
from __future__ import annotations

import collections
import numbers
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = ["group_ends", "row_end", "block_mask", "tile_schedule", "TileSchedule", "check_grans",
           "to_device", "ranges", "device_memo", "clear_device_memo", "DEVICE_MEMO_SIZE"]


# ----------------------------------------------------------------------------- device memo
# Index tensors that host-known values determine (row_end of a mask, a batch's seq_lens, packed
# row starts, the FFN's schedule) are built on a GPU once per value and reused: a second call
# with the same configuration makes no host-to-device copy at all, so it can run inside a CUDA
# graph capture (where a pageable copy is not allowed) and costs no host time. The memo is
# keyed by the values themselves (and the device and dtype), never by call history, and its
# tensors are never written after they are built (every user reads them), so nothing can make
# an entry stale. Entries are built outside inference mode (a tensor made under
# ``torch.inference_mode`` could not be saved for a later backward). Under a FakeTensorMode the
# entries are fake and live with that mode (a weak key); under torch.compile's tracing nothing
# is memoised. CPU tensors are never memoised (no copy to save). LRU, DEVICE_MEMO_SIZE entries.
DEVICE_MEMO_SIZE = 4096
_memo: "collections.OrderedDict" = collections.OrderedDict()
_fake_memos: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_memo_lock = threading.Lock()


def _active_memo():
    """The memo for the current mode: the real one, a fake mode's own, or None (tracing)."""
    if torch.compiler.is_compiling():
        return None
    from torch._guards import detect_fake_mode
    fake = detect_fake_mode()
    if fake is None:
        return _memo
    with _memo_lock:
        return _fake_memos.setdefault(fake, collections.OrderedDict())


def device_memo(key, device, build: Callable[[], object]):
    """``build()`` (tensors on ``device``) memoised under ``(key, device)`` when ``device`` is
    not the CPU. ``key`` must hold every value the result depends on (hashable). Callers never
    write into what they get."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    memo = None if device.type == "cpu" else _active_memo()
    if memo is None:
        return build()
    full = (key, str(device))
    with _memo_lock:
        hit = memo.get(full)
        if hit is not None:
            memo.move_to_end(full)
            return hit
    with torch.inference_mode(False):
        value = build()
    with _memo_lock:
        memo[full] = value
        while len(memo) > DEVICE_MEMO_SIZE:
            memo.popitem(last=False)
    return value


def clear_device_memo() -> None:
    """Drop every memoised device index tensor (they are rebuilt on their next use)."""
    with _memo_lock:
        _memo.clear()
        _fake_memos.clear()


def _copy_to_device(values, device, dtype) -> torch.Tensor:
    return torch.as_tensor(values, dtype=dtype).to(device, non_blocking=True)


def to_device(values, device, dtype=torch.int64) -> torch.Tensor:
    """Host-known values (a sequence or a CPU tensor) as a ``dtype`` tensor on ``device``.

    Converted on the host, then copied with ``non_blocking=True``: from pageable host memory
    CUDA stages the bytes and returns without waiting for the GPU's queued work, where a
    blocking copy (``torch.tensor(values, device="cuda")``, ``.to("cuda")``) synchronises the
    stream, a host sync in every forward. Keep such copies short (B values, not B x N: see
    :func:`ranges`). On the CPU no copy is made. Off the CPU the result is memoised by value
    (see :func:`device_memo`): the same values cost one copy, ever. Do not write into it."""
    if isinstance(values, torch.Tensor):
        if values.device.type != "cpu":
            raise ValueError(f"to_device copies host values; got a tensor on {values.device}")
        return _copy_to_device(values, device, dtype)
    values = tuple(values)
    if not all(type(v) in (int, float, bool) for v in values):
        # a key must be its values: anything else (a 0-d tensor, say) hashes by identity and
        # could change under the same key, so it is copied, not memoised
        return _copy_to_device(values, device, dtype)
    return device_memo(("to_device", values, dtype), device,
                       lambda: _copy_to_device(values, device, dtype))


def ranges(starts, lengths, device, dtype=torch.int64) -> torch.Tensor:
    """``cat([arange(s, s + n) for s, n in zip(starts, lengths)])`` on ``device``, built
    there from the B starts and lengths (a copy of B values instead of sum(lengths); the output
    size is known on the host, so repeat_interleave needs no sync). Memoised by value off the
    CPU (:func:`device_memo`); do not write into it."""
    starts, lengths = tuple(int(s) for s in starts), tuple(int(n) for n in lengths)
    return device_memo(("ranges", starts, lengths, dtype), device,
                       lambda: _ranges(starts, lengths, device, dtype))


def _ranges(starts, lengths, device, dtype) -> torch.Tensor:
    total = sum(lengths)
    offsets, before = [], 0              # each range's start minus the rows before it
    for s, n in zip(starts, lengths):
        offsets.append(s - before)
        before += n
    shift = torch.repeat_interleave(to_device(offsets, device, dtype),
                                    to_device(lengths, device), output_size=total)
    return torch.arange(total, dtype=dtype, device=device) + shift


def check_grans(token_grans, name: str = "token_grans") -> list[int]:
    """Return ``token_grans`` as a list of ints, or raise naming what is wrong."""
    allowed = "strictly increasing positive ints"
    if type(token_grans) is list and all(type(g) is int for g in token_grans):
        values = token_grans     # the model's own grans: checked below without conversions
    else:
        values = _gran_values(token_grans, name, allowed)
    grans = [int(g) for g in values]
    if not grans:
        raise ValueError(f"{name} must not be empty; allowed: strictly increasing positive ints")
    if grans[0] < 1 or any(b <= a for a, b in zip(grans, grans[1:])):
        raise ValueError(
            f"{name}={grans!r} is not allowed: it must be strictly increasing positive ints")
    return grans


def _gran_values(token_grans, name: str, allowed: str) -> list:
    """The values of a sequence or tensor of grans, each an integral real number."""
    try:
        values = list(token_grans.tolist() if isinstance(token_grans, torch.Tensor)
                      else token_grans)
    except TypeError:
        raise TypeError(f"{name}={token_grans!r} is not allowed; allowed: a sequence of "
                        f"{allowed}") from None
    for g in values:
        if (isinstance(g, bool) or not isinstance(g, numbers.Real)
                or isinstance(g, float) and not g.is_integer()):
            raise ValueError(f"{name}={values!r} holds {g!r}; allowed: {allowed}")
    return values


def group_ends(n: int, token_grans: Sequence[int]) -> list[int]:
    """Ends of the mask groups for ``n`` tokens: the grans <= n, then n if n > the last."""
    ends = [int(g) for g in token_grans if g <= n]
    if not ends or ends[-1] < n:
        ends.append(int(n))
    return ends


def row_end(n: int, token_grans: Optional[Sequence[int]], n_k: Optional[int] = None,
            device=None) -> torch.Tensor:
    """int32 (n,): for each query row, the end (exclusive) of the keys it may see.

    ``token_grans=None`` means no mask: every row sees all ``n_k`` keys (``n_k`` defaults to n).
    """
    if token_grans is None:
        return torch.full((n,), n if n_k is None else n_k, dtype=torch.int32, device=device)
    ends = tuple(group_ends(n, token_grans))
    return device_memo(("row_end", n, ends), device, lambda: _row_end(n, ends, device))


def _row_end(n: int, ends: tuple, device) -> torch.Tensor:
    ends_t = torch.tensor(ends, dtype=torch.int64)
    rows = torch.arange(n, dtype=torch.int64)
    # the group of row i ends at the smallest end strictly greater than i
    idx = torch.searchsorted(ends_t, rows, right=True)
    return _copy_to_device(ends_t[idx], device, torch.int32)


def block_mask(n: int, token_grans: Optional[Sequence[int]], n_k: Optional[int] = None,
               device=None) -> torch.Tensor:
    """Dense boolean (n, n_k) mask, True where query i may attend to key k."""
    n_k = n if n_k is None else n_k
    re = row_end(n, token_grans, n_k, device=device)
    return torch.arange(n_k, device=device)[None, :] < re[:, None]


@dataclass(frozen=True)
class TileSchedule:
    """Per query tile: how many key tiles are fully visible and how many need the mask."""
    block_m: int
    block_n: int
    full: tuple[int, ...]      # key tiles [0, full[i]) of query tile i need no mask
    end: tuple[int, ...]       # key tiles [full[i], end[i]) need the per-row test; none past

    @property
    def visits(self) -> int:
        """Key tiles loaded over all query tiles (one (batch, head))."""
        return sum(self.end)

    @property
    def masked_visits(self) -> int:
        return sum(e - f for f, e in zip(self.full, self.end))


def tile_schedule(n: int, token_grans: Optional[Sequence[int]], block_m: int, block_n: int,
                  n_k: Optional[int] = None, seq_len: Optional[int] = None) -> TileSchedule:
    """The key tiles each query tile visits, fully or partially (see module docstring)."""
    n_k = n if n_k is None else n_k
    length_q = n if seq_len is None else min(n, seq_len)
    length_k = n_k if seq_len is None else min(n_k, seq_len)
    re = row_end(n, token_grans, n_k).tolist()
    full, end = [], []
    for m0 in range(0, n, block_m):
        m1 = min(m0 + block_m, length_q)
        if m0 >= length_q:
            full.append(0)
            end.append(0)
            continue
        lo = min(re[m0], length_k)
        hi = min(re[m1 - 1], length_k)
        f = lo // block_n
        # row_end is nondecreasing, so row m0 has the smallest bound of the tile: key tiles
        # below it are seen by every row of the tile
        full.append(f)
        end.append(-(-hi // block_n))
    return TileSchedule(block_m, block_n, tuple(full), tuple(end))
