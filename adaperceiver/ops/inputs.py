"""One call of an op as one value: its inputs, validated once at the public entry.

In the manner of xformers' fmha ``Inputs``: the public entries (attention.py, ffn.py) build one
object per call with ``build``, which checks the user's arguments (errors name the argument, its
value and what is allowed) and resolves what has a default (the scale, the grans, the lengths)
once. The dispatcher hands the object to each backend's ``why_not_*``, which says only what that
backend cannot take, and the chosen backend runs it. The custom ops' schemas (and the compiled
ops of csrc/ops.cpp) take flat arguments, RoPE as four optional tensors: ``flat()`` gives them in
the schemas' order and ``from_flat`` rebuilds the object inside an op.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch

from ._common import check_float_tensor
from .schedule import check_grans, to_device

__all__ = ["Rope", "AttentionInputs", "PackedAttentionInputs", "FfnInputs", "default_scale"]


class Rope(NamedTuple):
    """Interleaved-pair RoPE of one operand: float tables ``cos``, ``sin`` of shape (N, D/2)
    for positions 0..N-1 (``reference.rope_tables`` builds them; a (cos, sin) pair is one)."""
    cos: torch.Tensor
    sin: torch.Tensor

    def rows(self, n: int) -> "Rope":
        """The tables of positions 0..n-1."""
        return Rope(self.cos[:n], self.sin[:n])


def default_scale(head_dim: int) -> float:
    """The softmax scale when none is given: 1 / sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim)


class _OpInputs:
    """What the inputs classes share: the device (their first tensor's), and the custom ops'
    flat arguments, which are the fields in order with each RoPE field (``*_rope``) as its two
    optional tables. Built once per call and never changed after (not frozen only because a
    frozen dataclass costs microseconds per construction, and the op builds two per call)."""
    __slots__ = ()

    @property
    def device(self) -> torch.device:
        """The device of the first tensor (written by _inputs_class)."""
        raise NotImplementedError

    def flat(self) -> tuple:
        """The custom ops' arguments, in their schemas' order (written by _inputs_class)."""
        raise NotImplementedError

    @classmethod
    def from_flat(cls, *args):
        """The object whose ``flat()`` is ``args``, inside a custom op (written by
        _inputs_class)."""
        raise NotImplementedError


def _rope_tables(rope: Optional["Rope"]) -> tuple:
    return (None, None) if rope is None else (rope.cos, rope.sin)


def _rope_value(cos, sin) -> Optional["Rope"]:
    return None if cos is None else Rope(cos, sin)


def _inputs_class(cls):
    """An inputs class: a slotted dataclass with ``device``, ``flat`` and ``from_flat`` written
    out for its fields, as ``dataclasses`` writes ``__init__``: they run twice per op call,
    where a loop over the fields cost microseconds, and torch.compile traces them as plain
    attribute reads (it cannot trace ``dataclasses.fields``)."""
    cls = dataclass(slots=True)(cls)
    names = [f.name for f in fields(cls)]
    flat, args, values = [], [], []
    for name in names:
        if name.endswith("_rope"):
            flat.append(f"*_rope_tables(self.{name})")
            args += [f"{name}_cos", f"{name}_sin"]
            values.append(f"_rope_value({name}_cos, {name}_sin)")
        else:
            flat.append(f"self.{name}")
            args.append(name)
            values.append(name)
    source = (f"def device(self):\n    return self.{names[0]}.device\n"
              f"def flat(self):\n    return ({', '.join(flat)},)\n"
              f"def from_flat(cls, {', '.join(args)}):\n    return cls({', '.join(values)})\n")
    scope = {"_rope_tables": _rope_tables, "_rope_value": _rope_value}
    exec(source, scope)
    for name in ("flat", "from_flat"):
        scope[name].__doc__ = getattr(_OpInputs, name).__doc__
    cls.device = property(scope["device"], doc=_OpInputs.device.__doc__)
    cls.flat = scope["flat"]
    cls.from_flat = classmethod(scope["from_flat"])
    return cls


# ----------------------------------------------------------------------------- attention
@_inputs_class
class AttentionInputs(_OpInputs):
    """One call of ``block_masked_attention``: q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv)
    of one float dtype and device; ``token_grans`` None (no mask) or strictly increasing ints;
    ``scale`` a float; ``seq_lens`` None or (B,) int32 on q's device; ``q_rope`` / ``k_rope``
    None or :class:`Rope` tables (Nq, D/2) / (Nk, D/2) on q's device. ``flat()``: (q, k, v,
    token_grans, scale, seq_lens, q_cos, q_sin, k_cos, k_sin)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    token_grans: Optional[list[int]]
    scale: float
    seq_lens: Optional[torch.Tensor]
    q_rope: Optional[Rope]
    k_rope: Optional[Rope]

    @classmethod
    def build(cls, q, k, v, token_grans=None, *, scale=None, seq_lens=None, q_rope=None,
              k_rope=None) -> "AttentionInputs":
        """The user's arguments checked, defaults resolved (see ``block_masked_attention``)."""
        _check_qkv(q, k, v, "(B, H, N, D)")
        B, H, Nq, D = q.shape
        Nk = k.shape[2]
        if k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
            raise ValueError(f"shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} do "
                             "not fit: need q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv)")
        _check_head_dims(D, v.shape[3])
        return cls(q, k, v, _check_token_grans(token_grans, Nq, Nk), _check_scale(scale, D),
                   _check_seq_lens(seq_lens, B, max(Nq, Nk), q.device),
                   _check_rope("q_rope", q_rope, Nq, D, q.device),
                   _check_rope("k_rope", k_rope, Nk, D, q.device))

    def backward_flat(self, grad_out, out, lse) -> tuple:
        """The backward ops' arguments: (grad_out, q, k, v, out, lse, token_grans, ...)."""
        q, k, v, *rest = self.flat()
        return (grad_out, q, k, v, out, lse, *rest)


@_inputs_class
class PackedAttentionInputs(_OpInputs):
    """One call of ``block_masked_attention_varlen``: packed rows q, k (R, H, D), v (R, H, Dv),
    sample b's ``seq_lens[b]`` rows (host ints) following those of samples 0..b-1; the rest as
    :class:`AttentionInputs`, RoPE tables (max seq_len, D/2). ``flat()``: (q, k, v, seq_lens,
    token_grans, scale, q_cos, q_sin, k_cos, k_sin)."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    seq_lens: list[int]
    token_grans: Optional[list[int]]
    scale: float
    q_rope: Optional[Rope]
    k_rope: Optional[Rope]

    @classmethod
    def build(cls, q, k, v, seq_lens, token_grans=None, *, scale=None, q_rope=None,
              k_rope=None) -> "PackedAttentionInputs":
        """The user's arguments checked, defaults resolved (see
        ``block_masked_attention_varlen``)."""
        _check_qkv(q, k, v, "(R, H, D)")
        seq_lens = _check_packed_lens(seq_lens, q.shape[0])
        R, H, D = q.shape
        if k.shape != q.shape or v.shape[:2] != (R, H):
            raise ValueError(f"shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} do "
                             "not fit: need q and k (R, H, D), v (R, H, Dv), the same packed rows "
                             "(self-attention)")
        _check_head_dims(D, v.shape[2])
        n = max(seq_lens, default=0)
        return cls(q, k, v, seq_lens, _check_token_grans(token_grans, R, R),
                   _check_scale(scale, D), _check_rope("q_rope", q_rope, n, D, q.device),
                   _check_rope("k_rope", k_rope, n, D, q.device))



def _check_qkv(q, k, v, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, layout)
        if t.device != q.device or t.dtype != q.dtype:
            raise ValueError(f"{name} is {t.dtype} on {t.device}; q is {q.dtype} on {q.device}:"
                             " q, k and v must share dtype and device")


def _check_head_dims(D: int, Dv: int) -> None:
    if D < 1 or Dv < 1:
        raise ValueError(f"head_dim D={D}, Dv={Dv} is not allowed; allowed: >= 1")


def _check_token_grans(token_grans, n_q: int, n_k: int) -> Optional[list[int]]:
    if token_grans is None:
        return None
    token_grans = check_grans(token_grans)
    if n_q != n_k:
        raise ValueError(f"token_grans needs self-attention (Nq == Nk); got Nq={n_q}, Nk={n_k}")
    return token_grans


def _check_rope(name: str, rope, n: int, D: int, device) -> Optional[Rope]:
    """``rope`` is None or (cos, sin) float tables of shape (n, D/2) on ``device``."""
    if rope is None:
        return None
    if D % 2:
        raise ValueError(f"{name} needs an even head_dim; got D={D}")
    if (not isinstance(rope, (tuple, list)) or len(rope) != 2
            or any(not isinstance(r, torch.Tensor) or tuple(r.shape) != (n, D // 2)
                   or not r.dtype.is_floating_point or r.device != device for r in rope)):
        got = ([(tuple(r.shape), r.dtype, str(r.device))
                if isinstance(r, torch.Tensor) else type(r).__name__ for r in rope]
               if isinstance(rope, (tuple, list)) else type(rope).__name__)
        raise ValueError(f"{name} must be (cos, sin) float tables of shape ({n}, {D // 2}) on "
                         f"{device}, got {got}")
    return rope if type(rope) is Rope else Rope(*rope)


def _check_scale(scale, D: int) -> float:
    """The softmax scale: 1/sqrt(D) by default, else a real number (NaN and inf are allowed:
    they propagate as in the reference)."""
    if scale is None:
        return default_scale(D)
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.device.type == "cpu":
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale={scale!r} is not allowed; allowed: a real number or None "
                        f"(1/sqrt(head_dim) = {default_scale(D):.4g})")
    return float(scale)


def _is_count(n, at_most=None) -> bool:
    """``n`` is an int (or an integral real) in 0..at_most."""
    return (not isinstance(n, bool) and isinstance(n, numbers.Real) and math.isfinite(n)
            and int(n) == n and 0 <= n and (at_most is None or n <= at_most))


def _check_seq_lens(seq_lens, batch: int, n_max: int, device) -> Optional[torch.Tensor]:
    """The padded op's ``seq_lens``: None, a sequence of ints or a 1-d int tensor with one
    length per sample, each in 0..n_max; as int32 on ``device``. Host values are checked; a
    tensor already on an accelerator is taken as it is (reading it would wait for the device)."""
    if seq_lens is None:
        return None
    what = (f"a sequence or 1-d int tensor of {batch} lengths in 0..{n_max} (one per sample, at "
            "most max(Nq, Nk))")
    if isinstance(seq_lens, torch.Tensor):
        if (seq_lens.shape != (batch,) or seq_lens.dtype.is_floating_point
                or seq_lens.dtype.is_complex or seq_lens.dtype == torch.bool):
            raise ValueError(f"seq_lens of dtype {seq_lens.dtype} and shape "
                             f"{tuple(seq_lens.shape)} is not allowed; allowed: {what}")
        if seq_lens.device.type != "cpu":
            return seq_lens.to(device=device, dtype=torch.int32)
        values = seq_lens.tolist()
    else:
        try:
            values = list(seq_lens)
        except TypeError:
            raise ValueError(f"seq_lens={seq_lens!r} is not allowed; allowed: {what}") from None
        if len(values) != batch:
            raise ValueError(f"seq_lens has {len(values)} entries, the batch {batch}; allowed: "
                             f"{what}")
    for n in values:
        if not _is_count(n, n_max):
            raise ValueError(f"seq_lens entry {n!r} is not allowed; allowed: {what}")
    return to_device([int(n) for n in values], device, torch.int32)


def _check_packed_lens(seq_lens, rows: int) -> list[int]:
    """The packed op's ``seq_lens``: host ints >= 0 that sum to the rows of q."""
    if isinstance(seq_lens, torch.Tensor):
        if seq_lens.dim() != 1 or seq_lens.device.type != "cpu" or seq_lens.is_floating_point():
            raise ValueError(f"seq_lens must be a sequence of ints or a 1-d CPU int tensor, got "
                             f"{seq_lens.dtype} shape {tuple(seq_lens.shape)} on "
                             f"{seq_lens.device}")
        seq_lens = seq_lens.tolist()
    try:
        seq_lens = list(seq_lens)
    except TypeError:
        raise ValueError(f"seq_lens={seq_lens!r} is not allowed; allowed: a sequence of ints >= 0 "
                         "(one per sample) or a 1-d CPU int tensor") from None
    for n in seq_lens:
        if not _is_count(n):
            raise ValueError(f"seq_lens entry {n!r} is not allowed; allowed: ints >= 0")
    seq_lens = [int(n) for n in seq_lens]
    if sum(seq_lens) != rows:
        raise ValueError(f"seq_lens={seq_lens} sum to {sum(seq_lens)} rows; q has {rows} rows "
                         "(allowed: lengths that sum to q.shape[0])")
    return seq_lens


# ----------------------------------------------------------------------------- FFN
@_inputs_class
class FfnInputs(_OpInputs):
    """One call of ``matryoshka_ffn``: x (B, N, C), fc1_weight (Hmax, C), fc1_bias (Hmax,),
    fc2_weight (Cout, Hmax), fc2_bias (Cout,) of x's dtype and device; ``hidden`` B ints in
    1..Hmax (sample b's width)."""
    x: torch.Tensor
    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor
    hidden: list[int]

    @classmethod
    def build(cls, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden) -> "FfnInputs":
        """The user's arguments checked, ``hidden`` as a list of B ints."""
        check_float_tensor("x", x, "(B, N, C)")
        for name, t, layout in (("fc1_weight", fc1_weight, "(Hmax, C)"),
                                ("fc1_bias", fc1_bias, "(Hmax)"),
                                ("fc2_weight", fc2_weight, "(C, Hmax)"),
                                ("fc2_bias", fc2_bias, "(C)")):
            check_float_tensor(name, t, layout)
            if t.device != x.device or t.dtype != x.dtype:
                raise ValueError(f"{name} is {t.dtype} on {t.device}; x is {x.dtype} on "
                                 f"{x.device}: x and the FFN weights must share dtype and device")
        if not ffn_shapes_fit(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
            raise ValueError(f"shapes x{tuple(x.shape)} fc1_weight{tuple(fc1_weight.shape)} "
                             f"fc1_bias{tuple(fc1_bias.shape)} "
                             f"fc2_weight{tuple(fc2_weight.shape)} "
                             f"fc2_bias{tuple(fc2_bias.shape)} do not fit")
        return cls(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                   _check_hidden(hidden, x.shape[0], fc1_weight.shape[0]))


def ffn_shapes_fit(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias) -> bool:
    """Whether the FFN's tensors (of the dims FfnInputs.build checks) agree on C and Hmax."""
    hmax, c = fc1_weight.shape
    return (x.shape[-1] == c and fc1_bias.shape == (hmax,) and fc2_weight.shape[1] == hmax
            and fc2_bias.shape == (fc2_weight.shape[0],))


def _check_hidden(hidden, batch: int, hmax: int) -> list[int]:
    """``hidden`` (an int, or a length-B sequence/tensor of ints in 1..hmax) as a list of B ints."""
    if isinstance(hidden, torch.Tensor):
        if hidden.dim() == 0:
            hidden = int(hidden)
        elif hidden.dim() != 1 or hidden.dtype.is_floating_point or hidden.dtype == torch.bool:
            raise ValueError(f"hidden must be an int or a 1-d int tensor, got dtype "
                             f"{hidden.dtype} shape {tuple(hidden.shape)}")
        else:
            hidden = hidden.tolist()
    what = f"an int in 1..{hmax} or a length-{batch} sequence of them"
    if isinstance(hidden, (bool, str, bytes)):
        raise TypeError(f"hidden={hidden!r} is not allowed; allowed: {what}")
    if isinstance(hidden, numbers.Real):
        hidden = [hidden] * batch
    try:
        hidden = list(hidden)
    except TypeError:
        raise TypeError(f"hidden={hidden!r} is not allowed; allowed: {what}") from None
    if len(hidden) != batch:
        raise ValueError(f"hidden has {len(hidden)} entries; the batch has {batch} samples")
    for h in hidden:
        if not _is_count(h, hmax) or h < 1:
            raise ValueError(f"hidden={h!r} is not allowed; allowed: ints in 1..{hmax}")
    return [int(h) for h in hidden]
