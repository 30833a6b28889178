"""Plain-PyTorch references of the two ops: the truth every backend is tested against.

They follow the authors' semantics literally: an explicit dense boolean mask for attention
(math form: matmul, masked softmax, matmul, so FlopCounterMode sees every score, masked or not)
and a full-width FFN multiplied by a per-sample 0/1 mask for Matryoshka widths. They work in
any float dtype, float64 included, on any device.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .inputs import Rope, default_scale
from .schedule import block_mask, to_device

__all__ = ["rope_tables", "apply_rope", "attention", "attention_forward", "attention_backward",
           "matryoshka_ffn", "ffn_forward", "ffn_backward", "hidden_mask"]


def rope_tables(n: int, head_dim: int, theta: float = 10000.0, max_tokens: int = 256,
                device=None) -> Rope:
    """Rope(cos, sin), each float32 (n, head_dim // 2), for positions 0..n-1 (docs/design.md,
    "RoPE").

    freqs_i = 1 / theta^(2i / head_dim); when n > max_tokens every freq is divided by
    n / max_tokens.
    """
    # built on the target device: a table made on the host and copied over would be a
    # pageable host-to-device copy, which waits for the GPU's queued work, in every forward
    pos = torch.arange(n, dtype=torch.float32, device=device)
    i2 = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)[: head_dim // 2]
    freqs = 1.0 / (theta ** (i2 / head_dim))
    if n > max_tokens:
        freqs = freqs / (n / max_tokens)
    angles = torch.outer(pos, freqs)
    return Rope(angles.cos(), angles.sin())


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (..., N, D) by the angles of (cos, sin).

    Computed in float32 (float64 stays float64), cast back to x's dtype.
    """
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xp = x.to(work).unflatten(-1, (-1, 2))
    x0, x1 = xp[..., 0], xp[..., 1]
    c, s = cos.to(work), sin.to(work)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


def _valid(seq_lens: Optional[torch.Tensor], n: int, device) -> Optional[torch.Tensor]:
    """(B, n) bool: position < seq_lens[b]."""
    if seq_lens is None:
        return None
    return torch.arange(n, device=device)[None, :] < seq_lens.to(device).long()[:, None]


def _mask_scores(s, token_grans, seq_lens):
    """Scores (B, H, Nq, Nk) with disallowed entries at -inf, ``seen`` (B, H, Nq, 1): rows
    that see at least one key, and ``allowed`` (B, H, Nq, Nk). Rows that see none (past a
    sample's length) keep their scores unmasked so that no NaN reaches the gradients; their
    probabilities are zeroed by :func:`_probs`."""
    B, H, Nq, Nk = s.shape
    allowed = block_mask(Nq, token_grans, Nk, device=s.device)[None, None]
    vq, vk = _valid(seq_lens, Nq, s.device), _valid(seq_lens, Nk, s.device)
    if vk is not None:
        allowed = allowed & vk[:, None, None, :] & vq[:, None, :, None]
    allowed = allowed.expand(B, H, Nq, Nk)
    seen = allowed.any(-1, keepdim=True)
    return s.masked_fill(~allowed & seen, float("-inf")), seen, allowed


def _probs(s, allowed):
    """softmax over the allowed keys, exactly 0 elsewhere (also where the softmax of a row
    holding NaN or +inf is NaN: a key a row does not read leaves no trace in it)."""
    return torch.softmax(s, dim=-1).masked_fill(~allowed, 0.0)


def _allowed_matmul(a, b, allowed):
    """``a @ b`` summed over the allowed pairs only: out[i, d] = sum over j with allowed[i, j]
    of a[i, j] * b[j, d], with IEEE semantics for NaN and inf in those terms (a NaN term, inf
    times 0 or +inf plus -inf give NaN; an inf term gives inf). A dense ``a @ b`` would also
    multiply the zeros at disallowed pairs by b, and 0 * NaN would leak a value the row never
    reads into it: kernels skip those pairs, and so does the truth. ``a`` is 0 where not
    allowed. All finite (checked on the CPU only: on a GPU the check would be a host sync):
    the plain product, which then has the same value."""
    if a.device.type == "cpu" and bool(torch.isfinite(a).all()) and bool(
            torch.isfinite(b).all()):
        return torch.matmul(a, b)
    f = a.dtype

    def ind(t):
        return t.to(f)

    A_ok = allowed
    a_fin, b_fin = torch.isfinite(a), torch.isfinite(b)
    clean = torch.matmul(torch.where(a_fin, a, 0.0), torch.where(b_fin, b, 0.0))
    a_nan, b_nan = ind(a.isnan() & A_ok), ind(b.isnan())
    a_pinf, a_ninf = ind((a == math.inf) & A_ok), ind((a == -math.inf) & A_ok)
    b_pinf, b_ninf = ind(b == math.inf), ind(b == -math.inf)
    a_zero, b_zero = ind((a == 0) & A_ok), ind(b == 0)
    a_pos, a_neg = ind((a > 0) & a_fin & A_ok), ind((a < 0) & a_fin & A_ok)
    b_pos, b_neg = ind((b > 0) & b_fin), ind((b < 0) & b_fin)
    ones = torch.ones_like(b)
    nan = (torch.matmul(a_nan, ones) + torch.matmul(ind(A_ok), b_nan)
           + torch.matmul(a_zero, b_pinf + b_ninf) + torch.matmul(a_pinf + a_ninf, b_zero))
    pos = (torch.matmul(a_pinf, b_pos + b_pinf) + torch.matmul(a_ninf, b_neg + b_ninf)
           + torch.matmul(a_pos, b_pinf) + torch.matmul(a_neg, b_ninf))
    neg = (torch.matmul(a_pinf, b_neg + b_ninf) + torch.matmul(a_ninf, b_pos + b_pinf)
           + torch.matmul(a_pos, b_ninf) + torch.matmul(a_neg, b_pinf))
    out = torch.where(pos > 0, math.inf, torch.where(neg > 0, -math.inf, clean))
    return torch.where((nan > 0) | ((pos > 0) & (neg > 0)), math.nan, out)


def attention_forward(q, k, v, token_grans=None, scale=None, seq_lens=None,
                      q_rope=None, k_rope=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, lse): out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) float32 (natural log,
    -inf on rows that see no key)."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    if q_rope is not None:
        q = apply_rope(q, *q_rope)
    if k_rope is not None:
        k = apply_rope(k, *k_rope)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s, seen, allowed = _mask_scores(s, token_grans, seq_lens)
    lse = torch.logsumexp(s.float() if s.dtype != torch.float64 else s, dim=-1)
    lse = lse.masked_fill(~seen[..., 0], float("-inf"))
    p = _probs(s, allowed)
    out = _allowed_matmul(p.to(v.dtype), v, allowed)
    return out.to(q.dtype), lse.float()


def attention(q, k, v, token_grans=None, *, scale=None, seq_lens=None, q_rope=None,
              k_rope=None) -> torch.Tensor:
    """Group-causal attention (docs/design.md, "The block mask") with an explicit dense boolean
    mask (differentiable)."""
    return attention_forward(q, k, v, token_grans, scale, seq_lens, q_rope, k_rope)[0]


def _rope_backward(g, cos, sin):
    """Gradient through :func:`apply_rope`: the rotation by the opposite angle."""
    return apply_rope(g, cos, -sin)


def attention_backward(grad_out, q, k, v, out, lse, token_grans=None, scale=None,
                       seq_lens=None, q_rope=None, k_rope=None):
    """(dq, dk, dv) of :func:`attention`, written out (custom-op implementations run below
    autograd); ``out``/``lse`` are recomputed in the working precision instead of read."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qr = apply_rope(q, *q_rope) if q_rope is not None else q
    kr = apply_rope(k, *k_rope) if k_rope is not None else k
    qr, kr, vw, go = (t.to(work) for t in (qr, kr, v, grad_out))
    s = torch.matmul(qr, kr.transpose(-1, -2)) * scale
    s, seen, allowed = _mask_scores(s, token_grans, seq_lens)
    p = _probs(s, allowed)
    at = allowed.transpose(-1, -2)
    # every product sums over the allowed (query, key) pairs only, as the forward's
    dv = _allowed_matmul(p.transpose(-1, -2), go, at)
    # dp sums over the head dim; pairs not allowed are never read (their NaN is dropped)
    dp = torch.matmul(go, vw.transpose(-1, -2)).masked_fill(~allowed, 0.0)
    ds = (p * (dp - (dp * p).sum(-1, keepdim=True)) * scale).masked_fill(~allowed, 0.0)
    dq = _allowed_matmul(ds, kr, allowed)
    dk = _allowed_matmul(ds.transpose(-1, -2), qr, at)
    if q_rope is not None:
        dq = _rope_backward(dq, *q_rope)
    if k_rope is not None:
        dk = _rope_backward(dk, *k_rope)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def hidden_mask(hidden: Sequence[int], hmax: int, device, dtype) -> torch.Tensor:
    """(B, 1, Hmax) 0/1 mask: unit j of sample b is on when j < hidden[b]."""
    h = to_device(list(hidden), device)
    return (torch.arange(hmax, device=device)[None, :] < h[:, None]).to(dtype)[:, None, :]


def matryoshka_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden) -> torch.Tensor:
    """The authors' semantics (differentiable): one width for the batch slices the weights;
    per-sample widths compute the full FFN and multiply by a per-sample 0/1 mask.

    ``hidden``: a list of B hidden sizes (or one int for all samples).
    """
    hmax = fc1_weight.shape[0]
    if isinstance(hidden, int):
        hidden = [hidden] * x.shape[0]
    if len(set(hidden)) == 1:
        # one width for the batch: the authors slice the weights
        h = int(hidden[0])
        act = F.gelu(F.linear(x, fc1_weight[:h], fc1_bias[:h]))
        return F.linear(act, fc2_weight[:, :h], fc2_bias)
    act = F.gelu(F.linear(x, fc1_weight, fc1_bias))
    act = act * hidden_mask(hidden, hmax, x.device, act.dtype)
    return F.linear(act, fc2_weight, fc2_bias)


def ffn_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden):
    return matryoshka_ffn(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden)


def ffn_backward(grad_out, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden):
    """(dx, dW1, db1, dW2, db2) of :func:`matryoshka_ffn`, written out: units past a sample's
    width get no gradient."""
    hmax = fc1_weight.shape[0]
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    xw, w1, b1, w2, go = (t.to(work) for t in (x, fc1_weight, fc1_bias, fc2_weight, grad_out))
    pre = F.linear(xw, w1, b1)
    mask = hidden_mask([hidden] * x.shape[0] if isinstance(hidden, int) else hidden, hmax,
                       x.device, work)
    act = F.gelu(pre) * mask
    cdf = 0.5 * (1.0 + torch.erf(pre * (0.5 ** 0.5)))
    pdf = torch.exp(-0.5 * pre * pre) / math.sqrt(2.0 * math.pi)
    dpre = torch.matmul(go, w2) * mask * (cdf + pre * pdf)
    dx = torch.matmul(dpre, w1)
    dw1 = dpre.flatten(0, -2).T @ xw.flatten(0, -2)
    db1 = dpre.flatten(0, -2).sum(0)
    dw2 = go.flatten(0, -2).T @ act.flatten(0, -2)
    db2 = go.flatten(0, -2).sum(0)
    return (dx.to(x.dtype), dw1.to(fc1_weight.dtype), db1.to(fc1_bias.dtype),
            dw2.to(fc2_weight.dtype), db2.to(fc2_bias.dtype))
