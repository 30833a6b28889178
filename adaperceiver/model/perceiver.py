"""AdaPerceiver: image -> patch embedding -> read into latents -> blocks -> write -> head.

One implementation; which kernels run is decided under ``adaperceiver.ops``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import AdaPerceiverConfig, CallConfig, resolve_call
from ..ops.reference import rope_tables
from .layers import Block, CrossAttentionHead, LearnedToken, OutputAdapter, PatchEmbed

__all__ = ["AdaPerceiverClassifier", "AdaPerceiverOutput"]


@dataclass
class AdaPerceiverOutput:
    logits: torch.Tensor            # (B, 1, num_classes)
    exit_depth: int                 # blocks executed
    latents: Optional[torch.Tensor] = None  # (B, N, C) after the last executed block

    def __getitem__(self, key):     # dict-style access, as HF-style outputs allow
        return getattr(self, key)


class AdaPerceiverClassifier(nn.Module):
    """The released AdaPerceiver classifier (``adaperceiver_v1_in1k``).

    ``forward(x, num_tokens=None, mat_dim=None, depth=None, depth_tau=None, token_grans=None)``:
    t = num_tokens latents (1..4096, default max_latent_tokens), Matryoshka width mat_dim (an int
    or one per sample, 1..embed_dim, default embed_dim), depth l blocks (1..depth), optional
    confidence exit ``depth_tau`` (batch-mean rule of the reference), optional mask grans.
    """

    def __init__(self, **config):
        super().__init__()
        cfg = config.pop("config", None) or AdaPerceiverConfig.from_dict(config)
        self.config = cfg
        C, hid = cfg.embed_dim, cfg.ffn_hidden
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_channels, C, hid,
                                      cfg.use_embed_ffn)
        self.process_latents = LearnedToken((C,))
        self.output_latents = LearnedToken((1, C))
        self.read_head = CrossAttentionHead(C, cfg.num_heads, cfg.qkv_bias, cfg.proj_bias)
        self.blocks = nn.ModuleList(
            Block(C, cfg.num_heads, hid, cfg.qkv_bias, cfg.proj_bias, cfg.ls_init_values)
            for _ in range(cfg.depth))
        self.write_head = CrossAttentionHead(C, cfg.num_heads, cfg.qkv_bias, cfg.proj_bias)
        self.output_adapter = OutputAdapter(C, cfg.num_classes)
        self.reset_parameters()

    def reset_parameters(self):
        """Initialise as the reference does: truncated-normal linear weights, zero biases,
        LayerScale at ls_init_values, small random tokens and position embedding."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.patch_embed.pos_embed, self.process_latents.token,
                  self.output_latents.token):
            nn.init.trunc_normal_(p, std=0.02)

    # -------------------------------------------------------------------------- pieces
    def _check_input(self, x: torch.Tensor):
        p = self.patch_embed.pos_embed
        if x.device != p.device:
            raise ValueError(f"x is on {x.device}; the model is on {p.device}: allowed device "
                             f"{p.device}")
        if x.is_floating_point() and x.dtype != p.dtype:
            raise TypeError(f"x.dtype={x.dtype} differs from the model's {p.dtype}; allowed: "
                            f"{p.dtype} (cast the input or the model, or use autocast)")

    def resolve(self, x, num_tokens=None, mat_dim=None, depth=None, depth_tau=None,
                token_grans=None) -> CallConfig:
        call = resolve_call(self.config, x, num_tokens, mat_dim, depth, depth_tau, token_grans)
        self._check_input(x)
        return call

    def _rope(self, n: int, device):
        cfg = self.config
        return rope_tables(n, cfg.head_dim, cfg.rope_theta, cfg.max_latent_tokens, device)

    def read(self, x: torch.Tensor, call: CallConfig, rope):
        """Patch embedding and read: the (B, N, C) latents before the first block."""
        patches = self.patch_embed(x, call.grid)
        B, C = x.shape[0], self.config.embed_dim
        # a contiguous copy, not a view: a view of a parameter made under no_grad confuses
        # module hooks (FlopCounterMode's module tracker fails on it)
        latents = self.process_latents.token.expand(B, call.num_tokens, C).clone(
            memory_format=torch.contiguous_format)
        return self.read_head(latents, patches, q_rope=rope)

    def write(self, latents: torch.Tensor, rope) -> torch.Tensor:
        """Write the latents out through the output token: (B, 1, C)."""
        out_tok = self.output_latents.token.expand(latents.shape[0], 1, -1).clone(
            memory_format=torch.contiguous_format)
        return self.write_head(out_tok, latents, k_rope=rope)

    def forward_head(self, latents: torch.Tensor, rope=None) -> torch.Tensor:
        """Logits (B, 1, num_classes) from latents (B, N, C) taken at any exit layer."""
        if rope is None:
            rope = self._rope(latents.shape[1], latents.device)
        return self.output_adapter(self.write(latents, rope))

    def _run(self, x, call: CallConfig, with_logits: bool = True) -> AdaPerceiverOutput:
        rope = self._rope(call.num_tokens, x.device)
        latents = self.read(x, call, rope)
        for i in range(call.depth):
            latents = self.blocks[i](latents, call.hidden, call.grans, rope)
            if call.depth_tau is not None:
                logits = self.forward_head(latents, rope)
                conf = logits.float().softmax(-1).amax(-1).mean()
                # the reference's batch-mean rule: one host sync per layer
                if conf.item() >= call.depth_tau or i + 1 == call.depth:
                    return AdaPerceiverOutput(logits, i + 1, latents)
        logits = self.forward_head(latents, rope) if with_logits else None
        return AdaPerceiverOutput(logits, call.depth, latents)

    # -------------------------------------------------------------------------- public
    def forward(self, x, num_tokens=None, mat_dim=None, depth=None, depth_tau=None,
                token_grans=None) -> AdaPerceiverOutput:
        call = self.resolve(x, num_tokens, mat_dim, depth, depth_tau, token_grans)
        return self._run(x, call)

    def forward_features(self, x, num_tokens=None, mat_dim=None, depth=None, depth_tau=None,
                         token_grans=None) -> torch.Tensor:
        """The latents (B, N, C) after the last executed block."""
        call = self.resolve(x, num_tokens, mat_dim, depth, depth_tau, token_grans)
        return self._run(x, call, with_logits=False).latents

    def save_pretrained(self, path):
        from ..checkpoint import save_pretrained
        save_pretrained(self, path)
