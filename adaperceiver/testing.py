"""Tools for kernel authors: test an attention or Matryoshka-FFN kernel against the reference in
three lines.

    from adaperceiver.testing import random_attention_case, assert_close_to_reference
    case = random_attention_case(seed=0, dtype=torch.float16)
    assert_close_to_reference(my_kernel, case)     # my_kernel(q, k, v, token_grans, seq_lens=...,
                                                   #           q_rope=..., k_rope=...) -> out

``reference_attention`` computes in float64 with an explicit dense mask (the truth every backend
of this package is tested against); ``block_mask`` / ``tile_schedule`` describe the group-causal
mask (docs/design.md, "The block mask") and the key tiles a query tile must visit. Cases come
with tails (lengths that are not tile multiples), random grans, seq_lens and RoPE; outputs are
poisoned before the kernel runs (kernels that allocate their own output are checked for NaN/inf
and every element compared), and tolerances follow the dtype.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .ops import reference as _ref
from .ops.schedule import block_mask, tile_schedule  # noqa: F401  (public re-exports)

__all__ = ["reference_attention", "reference_ffn", "block_mask", "tile_schedule",
           "AttentionCase", "FfnCase", "random_attention_case", "random_ffn_case",
           "assert_close_to_reference", "TOLERANCES"]

# (atol, rtol) relative to the largest reference value: a few rounding units of the dtype
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
              torch.float16: (4 * 2.0 ** -11, 4 * 2.0 ** -11),
              torch.bfloat16: (4 * 2.0 ** -8, 4 * 2.0 ** -8)}


def reference_attention(q, k, v, token_grans=None, seq_lens=None, q_rope=None, k_rope=None,
                        scale=None) -> torch.Tensor:
    """Group-causal attention in float64 with an explicit mask; returns float64 (B, H, Nq, D).

    Rows past ``seq_lens[b]`` are zero; RoPE tables are (cos, sin) of shape (N, D/2)."""
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    qr = None if q_rope is None else tuple(t.double() for t in q_rope)
    kr = None if k_rope is None else tuple(t.double() for t in k_rope)
    return _ref.attention(q64, k64, v64, token_grans, scale=scale, seq_lens=seq_lens,
                          q_rope=qr, k_rope=kr)


def reference_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden) -> torch.Tensor:
    """The authors' Matryoshka FFN (full width, per-sample 0/1 mask) in float64."""
    hidden = [hidden] * x.shape[0] if isinstance(hidden, int) else [int(h) for h in hidden]
    args = (t.detach().double() for t in (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias))
    return _ref.matryoshka_ffn(*args, hidden)


@dataclass
class AttentionCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    token_grans: Optional[list[int]]
    seq_lens: Optional[torch.Tensor]
    q_rope: Optional[tuple[torch.Tensor, torch.Tensor]]
    k_rope: Optional[tuple[torch.Tensor, torch.Tensor]]
    description: str = ""

    def args(self):
        return (self.q, self.k, self.v, self.token_grans)

    def kwargs(self):
        return dict(seq_lens=self.seq_lens, q_rope=self.q_rope, k_rope=self.k_rope)

    def reference(self) -> torch.Tensor:
        return reference_attention(*self.args(), **self.kwargs())


@dataclass
class FfnCase:
    x: torch.Tensor
    fc1_weight: torch.Tensor
    fc1_bias: torch.Tensor
    fc2_weight: torch.Tensor
    fc2_bias: torch.Tensor
    hidden: list[int] = field(default_factory=list)
    description: str = ""

    def args(self):
        return (self.x, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias,
                self.hidden)

    def kwargs(self):
        return {}

    def reference(self) -> torch.Tensor:
        return reference_ffn(*self.args())


def random_attention_case(seed: int = 0, *, dtype=torch.float32, device="cpu",
                          head_dim: Optional[int] = None, max_n: int = 100,
                          cross: Optional[bool] = None, masked: Optional[bool] = None,
                          with_seq_lens: Optional[bool] = None,
                          with_rope: Optional[bool] = None) -> AttentionCase:
    """A random attention case: shapes with tails, random strictly increasing grans, optional
    seq_lens, RoPE, cross-attention (Nq != Nk, including Nq = 1). Unset choices are drawn."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pick = (lambda flag, p: rng.random() < p if flag is None else flag)
    D = head_dim or rng.choice([32, 64])
    B, H = rng.randint(1, 3), rng.randint(1, 3)
    cross, masked = pick(cross, 0.25), pick(masked, 0.8)
    nq = rng.choice([1, rng.randint(2, max_n)]) if cross else rng.randint(1, max_n)
    nk = rng.randint(1, max_n) if cross else nq
    grans = None
    if masked and not cross:
        grans = sorted(rng.sample(range(1, nq + 1), rng.randint(1, min(6, nq))))
    seq = None
    if pick(with_seq_lens, 0.4) and not cross:
        seq = torch.tensor([rng.randint(1, nq) for _ in range(B)], dtype=torch.int32)
    q_rope = k_rope = None
    if pick(with_rope, 0.5):
        if not cross or rng.random() < 0.5:
            q_rope = _ref.rope_tables(nq, D)
        if not cross or q_rope is None:
            k_rope = _ref.rope_tables(nk, D)

    def draw(n):
        return torch.randn(B, H, n, D, generator=gen).to(device=device, dtype=dtype)

    move = (lambda r: None if r is None else tuple(t.to(device) for t in r))
    desc = (f"B={B} H={H} Nq={nq} Nk={nk} D={D} grans={grans} seq_lens="
            f"{None if seq is None else seq.tolist()} rope=q:{q_rope is not None},"
            f"k:{k_rope is not None} {dtype}")
    return AttentionCase(draw(nq), draw(nk), draw(nk), grans,
                         None if seq is None else seq.to(device), move(q_rope), move(k_rope),
                         desc)


def random_ffn_case(seed: int = 0, *, dtype=torch.float32, device="cpu", max_c: int = 80,
                    max_hidden: int = 200) -> FfnCase:
    """A random Matryoshka FFN case: odd C and Hmax, per-sample widths including 1 and Hmax."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    B, N = rng.randint(2, 5), rng.randint(1, 20)
    C, hmax = rng.randint(3, max_c), rng.randint(3, max_hidden)
    hidden = [rng.randint(1, hmax) for _ in range(B)]
    hidden[0], hidden[-1] = 1, hmax

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device=device, dtype=dtype)

    return FfnCase(draw(B, N, C), draw(hmax, C, scale=C ** -0.5), draw(hmax, scale=0.1),
                   draw(C, hmax, scale=hmax ** -0.5), draw(C, scale=0.1), hidden,
                   f"B={B} N={N} C={C} Hmax={hmax} hidden={hidden} {dtype}")


def assert_close_to_reference(fn: Callable, case, *, atol: Optional[float] = None,
                              rtol: Optional[float] = None, out: Optional[torch.Tensor] = None):
    """Run ``fn(*case.args(), **case.kwargs())`` and compare every element with the float64
    reference, with a tolerance for the inputs' dtype scaled by the largest reference value.

    If ``out`` is given it is poisoned with NaN first and passed as ``out=`` (for kernels that
    write into a buffer); otherwise the returned tensor is checked for NaN/inf, so a kernel that
    leaves elements unwritten in an ``empty`` buffer is caught on the first non-finite value.
    Returns the maximum absolute error."""
    dtype = case.args()[0].dtype
    d_atol, d_rtol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    want = case.reference()
    kwargs = dict(case.kwargs())
    if out is not None:
        out.fill_(float("nan"))
        kwargs["out"] = out
    got = fn(*case.args(), **kwargs)
    got = out if got is None else got
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"shape {tuple(got.shape)} != reference {tuple(want.shape)} "
                             f"({case.description})")
    got64 = got.detach().double().cpu()
    want = want.cpu()
    if not torch.isfinite(got64).all():
        bad = (~torch.isfinite(got64)).nonzero()[:5].tolist()
        raise AssertionError(f"non-finite outputs at {bad} ({case.description})")
    scale = want.abs().max().item() or 1.0
    err = (got64 - want).abs()
    limit = atol * scale + rtol * want.abs()
    bad = err > limit
    if bad.any():
        first = [int(i) for i in bad.nonzero()[0]]
        worst = [int(i) for i in torch.unravel_index(err.argmax(), err.shape)]
        raise AssertionError(
            f"first wrong element at {first}: got {got64[tuple(first)].item():.6g}, want "
            f"{want[tuple(first)].item():.6g}; {int(bad.sum())} of {bad.numel()} elements off, "
            f"max abs error {err.max().item():.3g} at {worst}; allowed {atol:.2g} x "
            f"{scale:.3g} + {rtol:.2g} x |ref| ({case.description})")
    return err.max().item()
