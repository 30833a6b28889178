"""Every (t, l) of one width from one forward: the grid readout behind ``adaperceiver.eval``.

The block mask's prefix property (``AdaPerceiverClassifier.forward_readouts``): in a forward at n
latents, latents[:, :g] after block l are the g-token model's latents at depth l whenever g ends
a mask group (a mask granularity, or every g under the causal mask). So one forward at the
largest token count, read out at every requested exit layer and granularity, gives the logits
of every (t, w, l) of that width.

What differs from ``forward_readouts``: the write-out. Each readout is the write head's
cross-attention of the one output token over latents[:, :g]; its key/value projections of the
prefix are the first g rows of the projections of all n latents, and its query is the same at
every layer. So per exit layer the keys and values of the n latents are projected once and each
granularity attends over its prefix (one GEMM of n rows per layer, instead of one per (l, g):
126 readouts of the released model's 'all' grid cost ~45 GFLOPs per image less, more than half
a full forward). Token counts that are not a prefix of a larger run (not a granularity, above
``max_latent_tokens``, or any t when the model has no block mask) get a forward of their own.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import ops
from ..model.ragged import Layout

__all__ = ["plan_forwards", "prefix_token_counts", "grid_logits"]


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


def _write_out(model, latents: torch.Tensor, counts: Sequence[int], rope, query) -> dict:
    """Logits (B, K) of the write head over latents[:, :g] for every g of ``counts``, the
    keys and values projected once for all n latents. ``query`` = (output token, its projected
    query), the same at every layer."""
    head = model.write_head
    attn = head.cattn
    sink, q = query
    k, v = attn._project(head.src_norm(latents), "kv")
    out = {}
    for g in counts:
        o = attn._attend(q, k[:, :g], v[:, :g], None, None, (rope[0][:g], rope[1][:g]), None)
        written = sink + ops.linear(o, attn.proj.weight, attn.proj.bias)
        out[g] = model.output_adapter(written)[:, 0]
    return out


@torch.no_grad()
def grid_logits(model, x: torch.Tensor, mat_dim: int, token_counts: Sequence[int],
                exits: Sequence[int]) -> dict:
    """Logits (B, num_classes) of ``model(x, num_tokens=t, mat_dim=mat_dim, depth=l).logits``
    for every t of ``token_counts`` and l of ``exits``: {(t, l): logits}, from one forward per
    entry of :func:`plan_forwards` (one for the mask granularities of a trained model)."""
    cfg = model.config
    exits = sorted({int(e) for e in exits})
    if not exits or exits[0] < 1 or exits[-1] > cfg.depth:
        raise ValueError(f"exits={exits} is not allowed; allowed: a non-empty set of layers in "
                         f"1..{cfg.depth}")
    out = {}
    for n, counts in plan_forwards(cfg, token_counts):
        call = model.resolve(x, num_tokens=n, mat_dim=int(mat_dim), depth=exits[-1])
        rope = model._rope(n, x.device)
        layout = Layout.build(call.tokens, call.hidden, x.device)
        rows = layout.pack(model.read(x, n, call.grid, rope))
        B, C = x.shape[0], cfg.embed_dim
        sink = model.output_latents.token.expand(B, 1, C).clone(
            memory_format=torch.contiguous_format)
        attn = model.write_head.cattn
        query = (sink, attn._project(model.write_head.snk_norm(sink), "q")[0])
        for i in range(exits[-1]):
            rows = model.blocks[i](rows, layout, call.grans, rope)
            if i + 1 in exits:
                for g, logits in _write_out(model, layout.pad(rows), counts, rope,
                                            query).items():
                    out[(g, i + 1)] = logits
    return out
