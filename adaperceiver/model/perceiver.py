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
from ..ops.schedule import to_device
from .layers import (Block, CrossAttentionHead, FeatureAdapter, LearnedToken, OutputAdapter,
                     PatchEmbed, PatchQueries)
from .ragged import Layout

__all__ = ["AdaPerceiverClassifier", "AdaPerceiverDistill", "AdaPerceiverOutput", "model_class"]


@dataclass
class AdaPerceiverOutput:
    logits: Optional[torch.Tensor]   # (B, 1, num_classes)
    exit_depth: int                  # blocks executed (the most any sample ran)
    latents: Optional[torch.Tensor] = None  # (B, N, C) at each sample's exit, zero past its t
    depths: Optional[torch.Tensor] = None   # (B,) blocks each sample ran
    # distilled backbone only, written out from each sample's exit layer:
    features: Optional[torch.Tensor] = None      # (B, P, output_feat_dim) per-patch features
    patch_tokens: Optional[torch.Tensor] = None  # (B, P, C) per-patch readout before the adapter

    def __getitem__(self, key):      # dict-style access, as HF-style outputs allow
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
        if cfg.distilled:   # per-patch readout of the distilled backbone (SPEC.md)
            self.output_latents_feat = PatchQueries(C)
            self.write_head_feat = CrossAttentionHead(C, cfg.num_heads, cfg.qkv_bias,
                                                      cfg.proj_bias)
            self.output_adapter_feat = FeatureAdapter(C, hid, cfg.output_feat_dim)
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
                token_grans=None, exit: str = "batch") -> CallConfig:
        call = resolve_call(self.config, x, num_tokens, mat_dim, depth, depth_tau, token_grans,
                            exit)
        self._check_input(x)
        return call

    def _rope(self, n: int, device):
        cfg = self.config
        return rope_tables(n, cfg.head_dim, cfg.rope_theta, cfg.max_latent_tokens, device)

    def read_latents(self, patches: torch.Tensor, num_tokens: int, rope):
        """Read the patches (B, P, C) into N = num_tokens latents: (B, N, C) before block 1."""
        B, C = patches.shape[0], self.config.embed_dim
        # a contiguous copy, not a view: a view of a parameter made under no_grad confuses
        # module hooks (FlopCounterMode's module tracker fails on it)
        latents = self.process_latents.token.expand(B, num_tokens, C).clone(
            memory_format=torch.contiguous_format)
        return self.read_head(latents, patches, q_rope=rope)

    def read(self, x: torch.Tensor, num_tokens: int, grid, rope):
        """Patch embedding and read: the (B, N, C) latents before the first block."""
        return self.read_latents(self.patch_embed(x, grid), num_tokens, rope)

    def _write_rope(self, latents, rope):
        n = latents.shape[1]
        return self._rope(n, latents.device) if rope is None else (rope[0][:n], rope[1][:n])

    def forward_head(self, latents: torch.Tensor, rope=None, seq_lens=None) -> torch.Tensor:
        """Logits (B, 1, num_classes) from latents (B, N, C) taken at any exit layer; sample b
        reads its first seq_lens[b] latents (all when None). latents[:, :g] is the g-token
        model's readout (the block mask makes it so)."""
        out_tok = self.output_latents.token.expand(latents.shape[0], 1, -1).clone(
            memory_format=torch.contiguous_format)
        return self.output_adapter(self.write_head(out_tok, latents,
                                                   k_rope=self._write_rope(latents, rope),
                                                   seq_lens=seq_lens))

    def forward_patch_tokens(self, latents: torch.Tensor, patches: torch.Tensor, rope=None,
                             tokens=None) -> torch.Tensor:
        """Distilled backbone: per-patch readout (B, P, C), one query per patch made from the
        patch embeddings, written out of latents (B, N, C) taken at any exit layer; sample b
        reads its first tokens[b] latents (all when None). The attention op's seq_lens bound
        queries and keys alike (it serves self-attention), so samples of each length are
        written out together on latents[:, :t] instead."""
        if not self.config.distilled:
            raise ValueError("per-patch readout needs the distilled backbone (output_feat_dim "
                             "set, e.g. create_model('adaperceiver_v1')); this model has "
                             "output_feat_dim=None")
        queries = self.output_latents_feat(patches)
        n = latents.shape[1]
        if tokens is None or all(int(t) == n for t in tokens):
            return self.write_head_feat(queries, latents, k_rope=self._write_rope(latents, rope))
        tokens = [int(t) for t in tokens]
        out = queries.new_empty(queries.shape)
        for t in sorted(set(tokens)):
            idx = to_device([b for b, tb in enumerate(tokens) if tb == t], latents.device)
            lat = latents[idx, :t]
            out[idx] = self.write_head_feat(queries[idx], lat, k_rope=self._write_rope(lat, rope))
        return out

    def forward_patch_features(self, latents, patches, rope=None, tokens=None):
        """Distilled backbone: per-patch features (B, P, output_feat_dim)."""
        return self.output_adapter_feat(self.forward_patch_tokens(latents, patches, rope,
                                                                  tokens))

    def _run(self, x, call: CallConfig, with_logits: bool = True) -> AdaPerceiverOutput:
        """Blocks over the running samples. Samples are ordered deepest first, so those that
        reach their depth leave from the end of the batch (a slice); per-sample confidence exit
        compacts by gathering. Each sample is written out at its own exit layer."""
        B, dev = call.batch, x.device
        # widest first among equal depths: the FFN's width bands then read rows in place
        order = sorted(range(B), key=lambda b: (-call.depths[b], -call.hidden[b]))
        if order != list(range(B)):
            x = x[to_device(order, dev)]
        rope = self._rope(call.num_tokens, dev)
        layout = Layout.build([call.tokens[b] for b in order], [call.hidden[b] for b in order],
                              dev)
        patches = self.patch_embed(x, call.grid)    # in `order`
        rows = layout.pack(self.read_latents(patches, call.num_tokens, rope))
        position = {b: i for i, b in enumerate(order)}
        running = list(order)                       # original index of each running sample
        logits, latents, depths = [None] * B, [None] * B, [0] * B
        feats = [None] * B if self.config.distilled and with_logits else None
        ptoks = [None] * B if feats is not None else None
        run_rope = rope
        for i in range(call.depth):
            rows = self.blocks[i](rows, layout, call.grans, run_rope)
            leave = [j for j, b in enumerate(running) if call.depths[b] == i + 1]
            lg = None
            if call.depth_tau is not None:
                lg = self.forward_head(layout.pad(rows), rope, layout.seq_lens)
                conf = lg.float().softmax(-1).amax(-1)[:, 0]
                if call.exit == "batch":
                    # the reference's rule: one host sync per layer on the batch mean
                    if conf.mean().item() >= call.depth_tau:
                        leave = list(range(len(running)))
                else:
                    sure = (conf >= call.depth_tau).tolist()
                    leave = [j for j in range(len(running)) if sure[j] or j in leave]
            if not leave:
                continue
            out_layout, out_rows = layout.select(leave, rows)
            padded = out_layout.pad(out_rows)
            if lg is not None:
                lg = lg[to_device(leave, dev)]
            elif with_logits:
                lg = self.forward_head(padded, rope, out_layout.seq_lens)
            if feats is not None:
                idx = to_device([position[running[j]] for j in leave], dev)
                pt = self.forward_patch_tokens(padded, patches[idx], rope, out_layout.tokens)
                pf = self.output_adapter_feat(pt)
            for n, j in enumerate(leave):
                b = running[j]
                depths[b], latents[b] = i + 1, padded[n]
                if lg is not None:
                    logits[b] = lg[n]
                if feats is not None:
                    feats[b], ptoks[b] = pf[n], pt[n]
            left = set(leave)
            stay = [j for j in range(len(running)) if j not in left]
            if not stay:
                break
            layout, rows = layout.select(stay, rows)
            running = [running[j] for j in stay]
            # positions 0..n-1 (n <= max_latent_tokens when samples differ): a prefix of the table
            run_rope = (rope[0][:layout.max_len], rope[1][:layout.max_len])
        out = rows.new_zeros(B, call.num_tokens, rows.shape[-1])
        for b, t in enumerate(call.tokens):
            out[b, :t] = latents[b][:t]
        return AdaPerceiverOutput(
            logits=torch.stack(logits) if with_logits else None, exit_depth=max(depths),
            latents=out, depths=torch.tensor(depths),
            features=torch.stack(feats) if feats is not None else None,
            patch_tokens=torch.stack(ptoks) if ptoks is not None else None)

    def forward_readouts(self, x, exits, token_counts=None, mat_dim=None,
                         features: bool = False) -> dict:
        """Once-for-all training: ONE forward at N = max(token_counts) latents with the block
        mask, read out at every layer of ``exits`` and every token count g of
        ``token_counts`` (default: the mask grans) from latents[:, :g]. The mask makes that
        prefix the g-token model's latents, so each readout equals a separate run at
        (g, mat_dim, layer). ``mat_dim`` is an int or one width per sample.

        Returns {(layer, g): (logits (B, 1, K), per-patch features (B, P, F) or None)}.
        """
        cfg = self.config
        grans = list(cfg.mask_token_grans)
        counts = sorted({int(g) for g in (token_counts or grans)})
        exits = sorted({int(e) for e in exits})
        if not exits or exits[0] < 1 or exits[-1] > cfg.depth:
            raise ValueError(f"exits={exits} is not allowed; allowed: a non-empty set of "
                             f"layers in 1..{cfg.depth}")
        n = counts[-1]
        call = self.resolve(x, num_tokens=n, mat_dim=mat_dim, depth=exits[-1])
        bad = [g for g in counts[:-1] if call.grans is not None and g not in call.grans]
        if bad or (len(counts) > 1 and n > cfg.max_latent_tokens):
            raise ValueError(f"token_counts={counts} is not allowed: a prefix of the {n}-token "
                             "run equals a g-token run only when g is a mask granularity "
                             f"({list(call.grans or [])}) and n <= max_latent_tokens="
                             f"{cfg.max_latent_tokens}")
        if features and not cfg.distilled:
            raise ValueError("features=True needs the distilled backbone (output_feat_dim set)")
        rope = self._rope(n, x.device)
        layout = Layout.build(call.tokens, call.hidden, x.device)
        patches = self.patch_embed(x, call.grid)
        rows = layout.pack(self.read_latents(patches, n, rope))
        out = {}
        for i in range(exits[-1]):
            rows = self.blocks[i](rows, layout, call.grans, rope)
            if i + 1 not in exits:
                continue
            latents = layout.pad(rows)
            for g in counts:
                lat = latents[:, :g]
                feat = self.forward_patch_features(lat, patches, rope) if features else None
                out[(i + 1, g)] = (self.forward_head(lat, rope), feat)
        return out

    # -------------------------------------------------------------------------- public
    def forward(self, x, num_tokens=None, mat_dim=None, depth=None, depth_tau=None,
                token_grans=None, exit: str = "batch") -> AdaPerceiverOutput:
        call = self.resolve(x, num_tokens, mat_dim, depth, depth_tau, token_grans, exit)
        return self._run(x, call)

    def forward_features(self, x, num_tokens=None, mat_dim=None, depth=None, depth_tau=None,
                         token_grans=None, exit: str = "batch") -> torch.Tensor:
        """The latents (B, N, C) after each sample's last executed block (zero past its t)."""
        call = self.resolve(x, num_tokens, mat_dim, depth, depth_tau, token_grans, exit)
        return self._run(x, call, with_logits=False).latents

    def save_pretrained(self, path):
        from ..checkpoint import save_pretrained
        save_pretrained(self, path)


class AdaPerceiverDistill(AdaPerceiverClassifier):
    """The distilled AdaPerceiver backbone (``adaperceiver_v1``: patch 14, 11821 ImageNet-12k
    classes, 1280-wide per-patch features). The same model as the classifier plus the
    per-patch readout (``output_latents_feat``, ``write_head_feat``, ``output_adapter_feat``);
    ``forward`` returns ``logits`` and ``features`` (B, P, output_feat_dim)."""

    def __init__(self, **config):
        if "config" not in config:   # defaults: the registry's adaperceiver_v1 entry
            from ..registry import MODEL_CONFIGS
            config = {**MODEL_CONFIGS["adaperceiver_v1"], **config}
        super().__init__(**config)
        if not self.config.distilled:
            raise ValueError("AdaPerceiverDistill needs output_feat_dim (a positive int); got "
                             "None")


def model_class(config) -> type:
    """The class a config.json builds: the distilled backbone when it has output_feat_dim."""
    d = config.to_dict() if isinstance(config, AdaPerceiverConfig) else config
    return AdaPerceiverDistill if d.get("output_feat_dim") else AdaPerceiverClassifier
