"""Configuration grids for the benchmark: which (t, w, l) to run.

A configuration is ``(t, w, l)``: ``t`` latent tokens (``num_tokens``), ``w`` the Matryoshka
width (``mat_dim``; FFN hidden ``int(w * ffn_ratio)``) and ``l`` the exit depth (``depth``).

Grid syntax (``--configs``), space-separated axes, comma-separated values::

    all                         every t in the grans x every w in mat_dims x l in 1..depth
                                (6 x 3 x 21 = 378 for the released model)
    default                     the default CPU subset (see :func:`default_axes`)
    t=32,256 w=all l=7,14,21    explicit axes; ``all`` = every value of that axis,
                                ``default`` = the default subset of that axis,
                                ``a-b`` (or ``a..b``) = an inclusive integer range
    t=64                        an axis left out takes its default-subset values

Allowed values: t an int in 1..MAX_NUM_TOKENS (4096; values outside the model's token granularities run, with a
warning: the model was not trained at them); w in 1..embed_dim; l in 1..depth.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..config import MAX_NUM_TOKENS

__all__ = ["Config", "ModelAxes", "parse_grid", "parse_grid_for", "default_axes", "all_axes",
           "GridError"]

AXES = ("t", "w", "l")
_AXIS_NAMES = {"t": "t (num_tokens)", "w": "w (mat_dim)", "l": "l (depth)"}


class GridError(ValueError):
    """A ``--configs`` grid that cannot be run; the message names the axis, value and what is
    allowed."""


@dataclass(frozen=True, order=True)
class Config:
    t: int
    w: int
    l: int  # noqa: E741 - the paper's name for the exit depth

    @property
    def label(self) -> str:
        return f"t={self.t} w={self.w} l={self.l}"


@dataclass(frozen=True)
class ModelAxes:
    """What a model allows: its token granularities, Matryoshka widths, depth and embed dim."""
    grans: tuple[int, ...]
    mat_dims: tuple[int, ...]
    depth: int
    embed_dim: int

    @classmethod
    def from_config(cls, cfg) -> "ModelAxes":
        grans = getattr(cfg, "mask_token_grans", None) or getattr(cfg, "token_grans", None)
        if not grans:
            grans = [getattr(cfg, "max_latent_tokens")]
        embed = int(cfg.embed_dim)
        mat = getattr(cfg, "mat_dims", None) or [embed]
        return cls(tuple(int(g) for g in grans), tuple(int(m) for m in mat), int(cfg.depth),
                   embed)


# the released model's axes: grans [32..256], mat_dims [416, 624, 832], depth 21
RELEASED = ModelAxes((32, 64, 96, 128, 192, 256), (416, 624, 832), 21, 832)


def all_axes(axes: ModelAxes) -> dict[str, list[int]]:
    return {"t": list(axes.grans), "w": list(axes.mat_dims), "l": list(range(1, axes.depth + 1))}


def _dedupe(xs: Iterable[int]) -> list[int]:
    out: list[int] = []
    for x in xs:
        if x not in out:
            out.append(x)
    return out


def default_axes(axes: ModelAxes) -> dict[str, list[int]]:
    """The default CPU subset: t in {first, middle, last gran}, w in {smallest, largest width},
    l in {depth/3, 2 depth/3, depth} (rounded, at least 1).

    For the released model: t in {32, 128, 256} x w in {416, 832} x l in {7, 14, 21}: 18 configs.
    """
    g, m, d = axes.grans, axes.mat_dims, axes.depth
    return {"t": _dedupe([g[0], g[len(g) // 2], g[-1]]),
            "w": _dedupe([m[0], m[-1]]),
            "l": _dedupe([max(1, round(d / 3)), max(1, round(2 * d / 3)), d])}


def _parse_values(axis: str, text: str, axes: ModelAxes) -> list[int]:
    name = _AXIS_NAMES[axis]
    if text in ("all", "*"):
        return all_axes(axes)[axis]
    if text == "default":
        return default_axes(axes)[axis]
    if not text.strip(","):
        raise GridError(f"--configs: {name} has no values ({axis}={text!r}); allowed: "
                        f"comma-separated ints, a range a-b, 'all' or 'default'")
    values: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)\s*(?:-|\.\.)\s*(-?\d+)", part)
        try:
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise GridError(f"--configs: {name} range {part!r} is empty (end < start)")
                values.extend(range(lo, hi + 1))
            else:
                values.append(int(part))
        except ValueError as e:
            if isinstance(e, GridError):
                raise
            raise GridError(f"--configs: {name} value {part!r} is not an int; allowed: "
                            f"comma-separated ints, a range a-b, 'all' or 'default'") from None
    return _dedupe(values)


def _check(axis: str, values: Sequence[int], axes: ModelAxes) -> None:
    name = _AXIS_NAMES[axis]
    if not values:
        raise GridError(f"--configs: {name} has no values")
    for v in values:
        if axis == "t":
            if not 1 <= v <= MAX_NUM_TOKENS:
                raise GridError(f"--configs: {name}={v} is not allowed; allowed: a positive "
                                f"int up to {MAX_NUM_TOKENS} (the model's granularities are "
                                f"{list(axes.grans)})")
            if v not in axes.grans:
                warnings.warn(f"--configs: t={v} is not one of the model's token granularities "
                              f"{list(axes.grans)}; it runs (the last mask group ends at t) "
                              "but the model was not trained at it", stacklevel=3)
        elif axis == "w":
            if not 1 <= v <= axes.embed_dim:
                raise GridError(f"--configs: {name}={v} is not allowed; allowed: 1..{axes.embed_dim}"
                                f" (embed_dim; trained widths {list(axes.mat_dims)})")
        elif not 1 <= v <= axes.depth:
            raise GridError(f"--configs: {name}={v} is not allowed; allowed: 1..{axes.depth} "
                            "(the model's depth)")


def parse_grid(spec, axes: ModelAxes = RELEASED) -> list[Config]:
    """The configurations named by ``spec`` (a string or a list of tokens; see module doc),
    sorted by (t, w, l). Raises :class:`GridError` (a ValueError) naming the bad axis/value."""
    if spec is None:
        spec = "default"
    if not isinstance(spec, str):
        spec = " ".join(str(s) for s in spec)
    tokens = spec.replace(";", " ").split()
    if not tokens:
        raise GridError("--configs is empty; allowed: 'all', 'default' or axes like "
                        "'t=32,256 w=all l=7,14,21'")
    chosen = default_axes(axes)
    if tokens == ["all"]:
        chosen = all_axes(axes)
    elif tokens != ["default"]:
        seen = set()
        for tok in tokens:
            key, eq, val = tok.partition("=")
            key = key.strip().lower()
            if not eq or key not in AXES:
                raise GridError(f"--configs: {tok!r} is not understood; allowed: 'all', "
                                "'default', or axes t=..., w=..., l=... (e.g. "
                                "'t=32,256 w=all l=7,14,21')")
            if key in seen:
                raise GridError(f"--configs: axis {key!r} is given twice")
            seen.add(key)
            chosen[key] = _parse_values(key, val.strip(), axes)
    for axis in AXES:
        _check(axis, chosen[axis], axes)
    grid = [Config(t, w, l) for t in chosen["t"] for w in chosen["w"] for l in chosen["l"]]
    if not grid:  # pragma: no cover - every axis is checked non-empty above
        raise GridError("--configs names no configuration")
    return sorted(grid)


def parse_grid_for(spec, cfg, log) -> list[Config]:
    """``parse_grid(spec)`` on the axes of model config ``cfg``, for a command line: its
    warnings (e.g. a token count above the model's largest) go to ``log`` as ``warning: ...``
    lines beside the progress output rather than through Python's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grid = parse_grid(spec, ModelAxes.from_config(cfg))
    for w in caught:
        log(f"warning: {w.message}")
    return grid
