"""Latents of a batch whose samples have their own token counts, packed row-wise.

The running latents are kept as packed rows (R, C), R = sum of t_b over the samples still
running, so every per-token op (LayerNorm, projections, FFN, residuals) costs what the samples
need, and so does self-attention (``ops.block_masked_attention_varlen`` on the packed rows). Only
the write-out (at a sample's exit, and at every layer under confidence exit) sees the padded
(B, N, C) form, N = max t_b, with ``seq_lens``.
When every sample has the same t, packing and padding are views.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..ops.schedule import ranges, to_device

__all__ = ["Layout", "seq_lens_of"]


def seq_lens_of(tokens: Sequence[int], device) -> Optional[torch.Tensor]:
    """The (B,) int32 ``seq_lens`` of samples of ``tokens`` rows padded to max(tokens); None
    when all have that many (no sample is padded)."""
    n = max(tokens)
    return None if all(t == n for t in tokens) else to_device(tokens, device, torch.int32)


@dataclass(frozen=True)
class Layout:
    tokens: tuple[int, ...]       # t_b of each running sample
    hidden: tuple[int, ...]       # FFN hidden units of each running sample
    rows: Optional[torch.Tensor]  # flat row indices into (B * N) of the packed rows; None: all
    seq_lens: Optional[torch.Tensor]  # (B,) int32, None when all t_b == N

    @classmethod
    def build(cls, tokens: Sequence[int], hidden: Sequence[int], device) -> "Layout":
        tokens, hidden = tuple(int(t) for t in tokens), tuple(int(h) for h in hidden)
        seq = seq_lens_of(tokens, device)
        if seq is None:
            return cls(tokens, hidden, None, None)
        n = max(tokens)
        rows = ranges([b * n for b in range(len(tokens))], tokens, device)
        return cls(tokens, hidden, rows, seq)

    @property
    def batch(self) -> int:
        return len(self.tokens)

    @property
    def max_len(self) -> int:
        return max(self.tokens)

    @property
    def ragged(self) -> bool:
        return self.rows is not None

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """(R, F) packed rows -> (B, N, F), zeros past each sample's length."""
        B, N, F = self.batch, self.max_len, packed.shape[-1]
        if self.rows is None:
            return packed.view(B, N, F)
        out = packed.new_zeros(B * N, F)
        return out.index_copy_(0, self.rows, packed).view(B, N, F)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, N, F) -> (R, F) packed rows."""
        flat = padded.reshape(-1, padded.shape[-1])
        return flat if self.rows is None else flat.index_select(0, self.rows)

    def ffn_input(self, packed: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The (B', N', C) view and per-sample hidden list the Matryoshka FFN op takes. When
        lengths differ, the rows go in groups of g = gcd(t_b) (every sample is a whole number
        of groups; the released token counts are multiples of 32), one hidden width per group,
        so the op's width bands take rows of any width with a short list."""
        if self.rows is None:
            return packed.view(self.batch, self.max_len, -1), list(self.hidden)
        if len(set(self.hidden)) == 1:
            return packed[None], [self.hidden[0]]
        g = math.gcd(*self.tokens)
        per_group = [h for h, t in zip(self.hidden, self.tokens) for _ in range(t // g)]
        return packed.reshape(-1, g, packed.shape[-1]), per_group

    def select(self, keep: Sequence[int], packed: torch.Tensor) -> tuple["Layout", torch.Tensor]:
        """Keep the samples at positions ``keep`` (in that order): the compacted layout and
        rows."""
        keep = list(keep)
        starts = [0]
        for t in self.tokens:
            starts.append(starts[-1] + t)
        if keep == list(range(len(keep))):
            rows = packed[:starts[len(keep)]]          # a prefix of the samples: a slice
        else:
            idx = ranges([starts[i] for i in keep], [self.tokens[i] for i in keep],
                         packed.device)
            rows = packed.index_select(0, idx)
        layout = Layout.build([self.tokens[i] for i in keep], [self.hidden[i] for i in keep],
                              packed.device)
        return layout, rows
