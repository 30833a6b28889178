"""Every (t, l) of one width from one forward: the grid readout behind ``adaperceiver.eval``.

The block mask's prefix property (``AdaPerceiverClassifier.forward_readouts``): in a forward at n
latents, latents[:, :g] after block l are the g-token model's latents at depth l whenever g ends
a mask group (a mask granularity, or every g under the causal mask). So one forward at the
largest token count, read out at every requested exit layer and granularity, gives the logits
of every (t, w, l) of that width.

What differs from ``forward_readouts``: the write-out. Each readout is the write head's
cross-attention of ONE query (the output token, the same for every image, layer and g) over
src_norm(latents[:, :g]), keys rotated by RoPE. Projecting keys and values of all n latents
at every exit layer would cost a third of a block per layer (about 0.6 full passes for the
released 'all' grid); instead the query is folded into the projections once per forward:

    score[b, h, j] = (R_j^T q_h / sqrt(D)) . (W_k,h y_bj + b_k,h) = U[h, j] . y_bj + c[h, j]
    out[b, h]      = sum_{j<g} p_g[b,h,j] (W_v,h y_bj + b_v,h) = W_v,h (sum_{j<g} p_g y_bj) + b_v,h

(y = src_norm(latents), p_g the softmax over the first g scores; the second line uses
sum_j p = 1); the output projection, the output token's residual and the classifier are one
affine map after W_v. Per exit layer that is one (H, n, C) dot per image for the scores, a
g-row weighted sum per granularity, then one GEMM for W_v and one for the logits over all
granularities' rows; the exit layers' latents are written out several layers per call. The
result equals the separate forward up to rounding (the sums are reassociated), so it is
computed in float32 (float64 for float64 models) whatever the model's precision; each readout
reads rows j < g only, so a NaN in a later latent reaches none of the shorter readouts, as in
the separate forward.
Token counts that are not a prefix of a larger run (not a granularity, above
``max_latent_tokens``, or any t when the model has no block mask) get a forward of their own.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import ops
from ..model.ragged import Layout
from ..ops.reference import apply_rope

__all__ = ["plan_forwards", "prefix_token_counts", "grid_logits", "grid_readouts"]

_WRITE_CHUNK_BYTES = 256 << 20     # latents of several exit layers written out in one call


def prefix_token_counts(cfg, n: int) -> set:
    """Token counts g < n whose latents are a prefix of an n-token forward (the mask ends a
    group at g): the granularities below n, every g under the causal mask, none without a
    mask or above max_latent_tokens (where RoPE is rescaled by n)."""
    if n > cfg.max_latent_tokens or cfg.attn_layer == "full" or cfg.block_mask == "none":
        return set()
    if cfg.block_mask == "causal":
        return set(range(1, n))
    return {int(g) for g in cfg.mask_token_grans if g < n}


def plan_forwards(cfg, token_counts: Sequence[int]) -> list[tuple[int, list[int]]]:
    """The forwards that read out every token count: [(n, [t read out of the n-token run])],
    largest first. Each t is read exactly once, from the largest run it is a prefix of."""
    todo = sorted({int(t) for t in token_counts}, reverse=True)
    plan = []
    while todo:
        n = todo.pop(0)
        ok = prefix_token_counts(cfg, n)
        served = [t for t in todo if t in ok]
        todo = [t for t in todo if t not in ok]
        plan.append((n, sorted([n, *served])))
    return plan


class _FoldedWrite:
    """The write head with its query folded into the key and value projections (module doc),
    for the first n latent positions; built once per forward from the current weights (nothing
    is kept between calls)."""

    def __init__(self, model, n: int, rope, work: torch.dtype):
        head = model.write_head
        attn = head.cattn
        H, D = attn.num_heads, attn.head_dim
        C = H * D
        token = model.output_latents.token.reshape(1, C)
        q = attn._project(head.snk_norm(token), "q")[0].to(work).view(H, 1, D)
        # R_j^T q_h: the query seen from key position j (RoPE rotates keys by R_j)
        qr = apply_rope(q.expand(H, n, D), rope[0][:n], -rope[1][:n]) / math.sqrt(D)
        (k_w, k_b), (v_w, v_b) = attn.part("k"), attn.part("v")
        w_k = k_w.to(work).view(H, D, C)
        self.u = torch.bmm(qr, w_k).permute(1, 2, 0).contiguous()          # (n, C, H)
        c = (torch.zeros(H, n, dtype=work, device=q.device) if k_b is None else
             (qr * k_b.to(work).view(H, 1, D)).sum(-1))
        self.c = c.t().reshape(n, 1, H)                                     # (n, 1, H)
        self.w_v = v_w.to(work).view(H, D, C).transpose(1, 2)             # (H, C, D)
        # after the values: logits = W_cls (token + W_p (W_v s + b_v) + b_p) + b_cls, one
        # affine map of W_v s (the classifier is the identity when num_classes=0)
        w_p = attn.proj.weight.to(work)
        bias = token[0].to(work)
        if attn.proj.bias is not None:
            bias = bias + attn.proj.bias.to(work)
        if v_b is not None:
            bias = bias + w_p @ v_b.to(work)
        cls = model.get_classifier()
        if isinstance(cls, torch.nn.Linear):
            self.w_out = cls.weight.to(work) @ w_p                           # (K, C)
            self.b_out = cls.weight.to(work) @ bias
            if cls.bias is not None:
                self.b_out = self.b_out + cls.bias.to(work)
        else:
            self.w_out, self.b_out = w_p, bias
        self.norm, self.H, self.work = head.src_norm, H, work

    def logits(self, latents: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """(len(counts) * B, K) logits of the write-out over latents[:, :g] for each g of
        ``counts`` (g-major rows) from latents (B, n, C) taken at exit layers."""
        B, n, C = latents.shape
        G = len(counts)
        y = self.norm(latents).to(self.work)                                # (B, n, C)
        scores = torch.baddbmm(self.c, y.transpose(0, 1), self.u)          # (n, B, H)
        scores = scores.permute(1, 2, 0)                                    # (B, H, n)
        sums = y.new_empty(G, B, self.H, C)
        for i, g in enumerate(counts):      # each g reads its first g rows only
            torch.bmm(torch.softmax(scores[..., :g], -1), y[:, :g], out=sums[i])
        o = torch.bmm(sums.view(G * B, self.H, C).transpose(0, 1), self.w_v)   # (H, G*B, D)
        o = o.transpose(0, 1).reshape(G * B, C)
        return ops.linear(o, self.w_out, self.b_out).to(latents.dtype)


@torch.no_grad()
def grid_readouts(model, x: torch.Tensor, widths: Sequence[int], token_counts: Sequence[int],
                  exits: Sequence[int]) -> tuple[list, torch.Tensor]:
    """([(t, w, l)] keys, logits (R, B, num_classes)): row r holds
    ``model(x, num_tokens=t, mat_dim=w, depth=l).logits[:, 0]`` of keys[r], for every t of
    ``token_counts``, w of ``widths`` and l of ``exits``. Per entry of :func:`plan_forwards`
    (one for the mask granularities of a trained model) the patch embedding, the read and the
    folded write head are computed once, and the blocks run once per width."""
    cfg = model.config
    exits = sorted({int(e) for e in exits})
    if not exits or exits[0] < 1 or exits[-1] > cfg.depth:
        raise ValueError(f"exits={exits} is not allowed; allowed: a non-empty set of layers in "
                         f"1..{cfg.depth}")
    widths = sorted({int(w) for w in widths}, reverse=True)
    if not widths:
        raise ValueError("widths=[] is not allowed; allowed: one or more Matryoshka widths")
    B, dev = x.shape[0], x.device
    keys, parts = [], []
    for n, counts in plan_forwards(cfg, token_counts):
        rope = model._rope(n, dev)
        read = write = None
        for w in widths:
            call = model.resolve(x, num_tokens=n, mat_dim=w, depth=exits[-1])
            layout = Layout.build(call.tokens, call.hidden, dev)
            if read is None:            # the same for every width
                read = model.read(x, n, call.grid, rope)
                work = torch.float64 if read.dtype == torch.float64 else torch.float32
                with torch.autocast(dev.type, enabled=False):
                    write = _FoldedWrite(model, n, rope, work)
            rows = layout.pack(read)
            # the exit layers' latents are written out together, several layers per call (up
            # to _WRITE_CHUNK_BYTES of latents): the write-out's ~25 small ops then run once per
            # chunk instead of once per layer (on a busy CPU every small parallel region can
            # wait for a descheduled thread)
            per_layer = B * n * cfg.embed_dim * read.element_size()
            chunk = max(1, _WRITE_CHUNK_BYTES // max(1, per_layer))
            pending, layers = [], []
            for i in range(exits[-1]):
                rows = model.blocks[i](rows, layout, call.grans, rope)
                if i + 1 not in exits:
                    continue
                pending.append(layout.pad(rows))
                layers.append(i + 1)
                if len(pending) == chunk or i + 1 == exits[-1]:
                    latents = pending[0] if len(pending) == 1 else torch.cat(pending)
                    with torch.autocast(dev.type, enabled=False):
                        parts.append(write.logits(latents, counts))
                    keys += [(g, w, l) for g in counts for l in layers]
                    pending, layers = [], []
    return keys, torch.cat(parts).view(len(keys), B, -1)


def grid_logits(model, x: torch.Tensor, mat_dim: int, token_counts: Sequence[int],
                exits: Sequence[int]) -> dict:
    """{(t, l): logits (B, num_classes)} at one width (views of :func:`grid_readouts`'
    tensor): ``model(x, num_tokens=t, mat_dim=mat_dim, depth=l).logits[:, 0]`` for every t of
    ``token_counts`` and l of ``exits``."""
    keys, logits = grid_readouts(model, x, [mat_dim], token_counts, exits)
    return {(t, l): lg for (t, _, l), lg in zip(keys, logits.unbind(0))}
