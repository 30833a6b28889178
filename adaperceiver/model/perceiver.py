"""AdaPerceiver: image -> patch embedding -> read into latents -> blocks -> write -> head.

One implementation; which kernels run is decided under ``adaperceiver.ops``. The model also has
timm's model API (``num_features``, ``reset_classifier``, ``forward_intermediates``,
``set_grad_checkpointing``, ``group_matcher``, ``no_weight_decay``); ``adaperceiver.timm`` adds
timm's calling convention on top (a tensor out of ``forward``, ``forward_head(x, pre_logits)``).
An empty batch (B = 0) gives empty outputs of the usual shapes, as torch modules do.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import AdaPerceiverConfig, CallConfig, resolve_call
from ..ops.inputs import Rope
from ..ops.reference import rope_tables
from ..ops.schedule import to_device
from .layers import (Block, CrossAttentionHead, FeatureAdapter, LearnedToken, OutputAdapter,
                     PatchEmbed, PatchQueries, resample_pos_embed)
from .ragged import Layout, seq_lens_of

__all__ = ["AdaPerceiverClassifier", "AdaPerceiverDistill", "AdaPerceiverOutput", "model_class",
           "take_indices"]

_NOT_TRACEABLE = (
    "AdaPerceiver cannot be {what}: its forward validates the per-call (t, w, l) on the host, "
    "orders and packs the samples by their token counts and widths, and calls custom ops "
    "(adaperceiver::*), none of which TorchScript or torch.fx symbolic tracing can capture. "
    "Use torch.compile(model) (fullgraph for a fixed (t, w, l)) or "
    "torch.export.export(model, (x,)) instead; both trace the custom ops through their fake "
    "kernels.")


def take_indices(num_blocks: int, indices) -> tuple[list[int], int]:
    """timm's ``indices`` contract of forward_intermediates: None -> every block, an int n ->
    the last n blocks, a sequence -> those block indices (negative count from the end). Returns
    (sorted absolute indices, the largest)."""
    what = (f"None (all), an int n in 1..{num_blocks} (the last n blocks) or a sequence of block "
            f"indices in -{num_blocks}..{num_blocks - 1}")
    if indices is None:
        indices = num_blocks
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    if isinstance(indices, bool) or not isinstance(indices, (int, Sequence)) or isinstance(
            indices, str):
        raise TypeError(f"indices={indices!r} is not allowed; allowed: {what}")
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices={indices} is out of range; allowed: {what}")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"indices={list(indices)!r} holds {i!r}; allowed: {what}")
            if not -num_blocks <= i < num_blocks:
                raise ValueError(f"indices={list(indices)!r} holds {i}, out of range; allowed: "
                                 f"{what}")
            take.append(i % num_blocks)
        if not take:
            raise ValueError(f"indices={list(indices)!r} is empty; allowed: {what}")
        take = sorted(set(take))
    return take, take[-1]


def _check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes={num_classes!r} is not allowed; allowed: an int >= 0 (0: "
                         "no classifier, the head returns the pre-logits features)")
    return num_classes


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



class _Exits:
    """What each sample leaves the block loop with (depth, latents, logits, distilled per-patch
    features and readout), recorded as samples reach their exit layer, in the batch's order."""

    def __init__(self, batch: int, logits: bool, features: bool):
        self.depths = [0] * batch
        self.latents = [None] * batch
        self.logits = [None] * batch if logits else None
        self.features = [None] * batch if features else None
        self.patch_tokens = [None] * batch if features else None

    def record(self, samples, depth: int, latents, logits=None, features=None,
               patch_tokens=None) -> None:
        """Samples ``samples`` (original indices) leave at ``depth``; row n of each tensor is
        samples[n]'s."""
        for n, b in enumerate(samples):
            self.depths[b], self.latents[b] = depth, latents[n]
            if self.logits is not None:
                self.logits[b] = logits[n]
            if self.features is not None:
                self.features[b], self.patch_tokens[b] = features[n], patch_tokens[n]

    def output(self, tokens, latents_out) -> "AdaPerceiverOutput":
        """The forward's output; ``latents_out`` (B, N, C) zeros receives each sample's first
        tokens[b] latents."""
        for b, t in enumerate(tokens):
            latents_out[b, :t] = self.latents[b][:t]

        def stack(xs):
            return torch.stack(xs) if xs is not None else None
        return AdaPerceiverOutput(
            logits=stack(self.logits), exit_depth=max(self.depths), latents=latents_out,
            depths=torch.tensor(self.depths), features=stack(self.features),
            patch_tokens=stack(self.patch_tokens))


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
        # num_classes=0: no classifier, the head's output is the written-out token (timm's rule)
        self.output_adapter = (OutputAdapter(C, cfg.num_classes) if cfg.num_classes
                               else nn.Identity())
        if cfg.distilled:   # per-patch readout (docs/design.md, "The distilled backbone")
            self.output_latents_feat = PatchQueries(C)
            self.write_head_feat = CrossAttentionHead(C, cfg.num_heads, cfg.qkv_bias,
                                                      cfg.proj_bias)
            self.output_adapter_feat = FeatureAdapter(C, hid, cfg.output_feat_dim)
        self.grad_checkpointing = False
        # timm's feature metadata: one entry per block, the latents (B, N, C); a latent is not a
        # patch, the reduction is the patch size the latents read from
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=C, reduction=cfg.patch_size)
                             for i in range(cfg.depth)]
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

    # -------------------------------------------------------------------------- timm's API
    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def num_features(self) -> int:
        """Width of forward_features' latents (B, N, num_features)."""
        return self.config.embed_dim

    @property
    def head_hidden_size(self) -> int:
        """Width of the pre-logits features (the written-out token)."""
        return self.config.embed_dim

    def get_classifier(self) -> nn.Module:
        """The classifier's nn.Linear (timm's convention: ``.in_features``, ``.weight``), or
        nn.Identity when there is none (num_classes=0)."""
        head = self.output_adapter
        return head.ffn if isinstance(head, OutputAdapter) else head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new classifier of ``num_classes`` outputs (freshly initialised), or none for 0 (the
        head then returns the pre-logits features). ``global_pool``: None or 'map' (the write
        head, a learned query attending to the latents, is this model's pooling)."""
        num_classes = _check_num_classes(num_classes)
        if global_pool not in (None, "map"):
            raise ValueError(f"global_pool={global_pool!r} is not allowed for "
                             f"{type(self).__name__}; allowed: None or 'map' (the write head)")
        p = self.patch_embed.pos_embed
        if num_classes:
            head = OutputAdapter(self.config.embed_dim, num_classes).to(p.device, p.dtype)
            nn.init.trunc_normal_(head.ffn.weight, std=0.02)
            nn.init.zeros_(head.ffn.bias)
        else:
            head = nn.Identity()
        self.output_adapter = head.train(self.training)
        # a copy: the old config object may be shared; save_pretrained writes the new head's size
        self.config = copy.deepcopy(self.config)
        self.config.num_classes = num_classes

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's resize: the position embedding resampled to ``img_size`` (an int or a square
        (h, w)) as forward resamples it for inputs of that size, and config.img_size with it.
        Inputs of any multiple of the patch size are accepted without this; it sets the size the
        parameter is stored at (and the data config). The patch size cannot change."""
        cfg = self.config
        if patch_size is not None and tuple(patch_size if isinstance(patch_size, (tuple, list))
                                            else (patch_size, patch_size)) != (cfg.patch_size,) * 2:
            raise ValueError(f"patch_size={patch_size!r} is not allowed; allowed: None or "
                             f"{cfg.patch_size} (the patch embedding is not resampled)")
        if img_size is None:
            return
        size = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        if (len(size) != 2 or size[0] != size[1] or isinstance(size[0], bool)
                or not isinstance(size[0], int) or size[0] < 1 or size[0] % cfg.patch_size):
            raise ValueError(f"img_size={img_size!r} is not allowed; allowed: a positive "
                             f"multiple of patch_size={cfg.patch_size} (square)")
        grid = size[0] // cfg.patch_size
        pos = self.patch_embed.pos_embed
        with torch.no_grad():
            new = resample_pos_embed(pos.detach(), (grid, grid))
        self.patch_embed.pos_embed = nn.Parameter(new.clone(), requires_grad=pos.requires_grad)
        self.config = copy.deepcopy(cfg)
        self.config.img_size = size[0]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations."""
        self.grad_checkpointing = bool(enable)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise LR decay: the stem (patch embedding and read),
        one group per block; the rest (write heads, classifier) is unmatched, which timm makes
        the last group."""
        return dict(stem=r"^patch_embed|^process_latents|^read_head",
                    blocks=[(r"^blocks\.(\d+)", None)])

    def no_weight_decay(self) -> set:
        """Learned embeddings that timm's optimizer factory keeps out of weight decay."""
        return {"patch_embed.pos_embed", "process_latents.token", "output_latents.token"}

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: refuse with the reason and the alternatives
        raise RuntimeError(_NOT_TRACEABLE.format(what="scripted with TorchScript "
                                                      "(torch.jit.script)"))

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
        """The validated call. For an empty batch (B = 0) it is the call of a one-image batch
        (per-sample arguments must then have 0 entries): forward checks ``x.shape[0]`` and
        returns empty outputs of that call's shapes."""
        if isinstance(x, torch.fx.Proxy):
            raise RuntimeError(_NOT_TRACEABLE.format(what="traced with torch.fx "
                                                          "(symbolic_trace)"))
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[0] == 0:
            per_sample = {}
            for name, value in (("num_tokens", num_tokens), ("mat_dim", mat_dim),
                                ("depth", depth)):
                if isinstance(value, torch.Tensor) and value.dim() > 0 or isinstance(
                        value, (list, tuple)):
                    if len(value) != 0:
                        raise ValueError(f"{name} has {len(value)} entries but the batch has 0 "
                                         "samples; allowed: an int or a length-0 sequence")
                    value = None
                per_sample[name] = value
            if x.shape[1] != self.config.in_channels:   # (the stand-in would show B = 1)
                raise ValueError(f"x has shape {tuple(x.shape)}; allowed: (B, "
                                 f"{self.config.in_channels}, H, W)")
            one = torch.empty((1, *x.shape[1:]), dtype=x.dtype, device="meta")
            call = resolve_call(self.config, one, per_sample["num_tokens"],
                                per_sample["mat_dim"], per_sample["depth"], depth_tau,
                                token_grans, exit)
        else:
            call = resolve_call(self.config, x, num_tokens, mat_dim, depth, depth_tau,
                                token_grans, exit)
        self._check_input(x)
        return call

    def _empty(self, x, call: CallConfig, with_logits: bool = True) -> AdaPerceiverOutput:
        """The outputs of an empty batch, of the shapes a B-sample batch would have; made from
        the parameters that produce them, so they are part of the autograd graph as the
        outputs of torch modules on an empty batch are."""
        C, N = self.config.embed_dim, call.num_tokens
        latents = self.process_latents.token.expand(0, N, C).clone()
        logits = self._empty_readout() if with_logits else None
        feats = ptoks = None
        if self.config.distilled and with_logits:
            ptoks, feats = self._empty_patch_outputs(x, call)
        return AdaPerceiverOutput(logits=logits, exit_depth=call.depth, latents=latents,
                                  depths=torch.zeros(0, dtype=torch.long), features=feats,
                                  patch_tokens=ptoks)

    def _empty_patch_outputs(self, x, call: CallConfig):
        """Distilled backbone, empty batch: per-patch tokens (0, P, C) and features (0, P, F)."""
        P, C = call.grid[0] * call.grid[1], self.config.embed_dim
        ptoks = self.output_latents_feat.proj.bias.expand(0, P, C).clone()
        fc2 = self.output_adapter_feat.ffn.fc2
        return ptoks, F.linear(x.new_zeros(0, P, fc2.in_features), fc2.weight, fc2.bias)

    def _empty_readout(self, pre_logits: bool = False) -> torch.Tensor:
        """(0, 1, K) logits, or (0, 1, C) pre-logits, of an empty batch."""
        pre = self.output_latents.token.expand(0, 1, -1).clone()
        if pre_logits or not isinstance(self.output_adapter, OutputAdapter):
            return pre
        return F.linear(pre, self.output_adapter.ffn.weight, self.output_adapter.ffn.bias)

    def _block(self, i: int, rows, layout, grans, rope):
        blk = self.blocks[i]
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, rows, layout, grans, rope, use_reentrant=False)
        return blk(rows, layout, grans, rope)

    @staticmethod
    def _order(call: CallConfig) -> list[int]:
        """Samples deepest first, widest first among equal depths (the FFN's width bands then
        read rows in place; samples that reach their depth leave from the end)."""
        return sorted(range(call.batch), key=lambda b: (-call.depths[b], -call.hidden[b]))

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
        return self._rope(n, latents.device) if rope is None else Rope(*rope).rows(n)

    def readout(self, latents: torch.Tensor, rope=None, seq_lens=None,
                pre_logits: bool = False) -> torch.Tensor:
        """Logits (B, 1, num_classes) from latents (B, N, C) taken at any exit layer, or with
        ``pre_logits`` the written-out token (B, 1, C) before the classifier; sample b reads its
        first seq_lens[b] latents (all when None). latents[:, :g] is the g-token model's readout
        (the block mask makes it so)."""
        if latents.shape[0] == 0:
            return self._empty_readout(pre_logits)
        out_tok = self.output_latents.token.expand(latents.shape[0], 1, -1).clone(
            memory_format=torch.contiguous_format)
        pre = self.write_head(out_tok, latents, k_rope=self._write_rope(latents, rope),
                              seq_lens=seq_lens)
        return pre if pre_logits else self.output_adapter(pre)

    def forward_head(self, latents: torch.Tensor, rope=None, seq_lens=None,
                     pre_logits: bool = False) -> torch.Tensor:
        """:meth:`readout` (``adaperceiver.timm`` gives this name timm's signature)."""
        return self.readout(latents, rope, seq_lens, pre_logits)

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
        compacts by gathering. Each sample leaves with the latents of its own exit layer; with
        exit depths fixed up front the logits of all are one readout of those after the loop."""
        B, dev = call.batch, x.device
        order = self._order(call)
        if order != list(range(B)):
            x = x[to_device(order, dev)]
        rope = self._rope(call.num_tokens, dev)
        layout = Layout.build([call.tokens[b] for b in order], [call.hidden[b] for b in order],
                              dev)
        patches = self.patch_embed(x, call.grid)    # in `order`
        rows = layout.pack(self.read_latents(patches, call.num_tokens, rope))
        position = {b: i for i, b in enumerate(order)}
        running = list(order)                       # original index of each running sample
        with_feats = self.config.distilled and with_logits
        # exit depths fixed up front: every sample's logits come from one readout of the
        # latents it left with, after the loop (one write-out for the batch, not one per exit
        # layer); confidence exit reads out at every layer, and the distilled backbone writes
        # its per-patch features out at each exit
        one_readout = with_logits and call.depth_tau is None and not with_feats
        exits = _Exits(B, with_logits and not one_readout, with_feats)
        run_rope = rope
        for i in range(call.depth):
            rows = self._block(i, rows, layout, call.grans, run_rope)
            leave = [j for j, b in enumerate(running) if call.depths[b] == i + 1]
            lg = None
            if call.depth_tau is not None:
                lg = self.readout(layout.pad(rows), rope, layout.seq_lens)
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
            elif with_logits and not one_readout:
                lg = self.readout(padded, rope, out_layout.seq_lens)
            pt = pf = None
            if with_feats:
                idx = to_device([position[running[j]] for j in leave], dev)
                pt = self.forward_patch_tokens(padded, patches[idx], rope, out_layout.tokens)
                pf = self.output_adapter_feat(pt)
            exits.record([running[j] for j in leave], i + 1, padded, lg, pf, pt)
            left = set(leave)
            stay = [j for j in range(len(running)) if j not in left]
            if not stay:
                break
            layout, rows = layout.select(stay, rows)
            running = [running[j] for j in stay]
            # positions 0..n-1 (n <= max_latent_tokens when samples differ): a prefix of the table
            run_rope = rope.rows(layout.max_len)
        out = exits.output(call.tokens, rows.new_zeros(B, call.num_tokens, rows.shape[-1]))
        if one_readout:   # sample b reads its first tokens[b] latents, as at its exit
            out.logits = self.readout(out.latents, rope, seq_lens_of(call.tokens, dev))
        return out

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
        if x.shape[0] == 0:
            feat = self._empty_patch_outputs(x, call)[1] if features else None
            return {(e, g): (self._empty_readout(), feat) for e in exits for g in counts}
        rope = self._rope(n, x.device)
        layout = Layout.build(call.tokens, call.hidden, x.device)
        patches = self.patch_embed(x, call.grid)
        rows = layout.pack(self.read_latents(patches, n, rope))
        out = {}
        for i in range(exits[-1]):
            rows = self._block(i, rows, layout, call.grans, rope)
            if i + 1 not in exits:
                continue
            latents = layout.pad(rows)
            for g in counts:
                lat = latents[:, :g]
                feat = self.forward_patch_features(lat, patches, rope) if features else None
                out[(i + 1, g)] = (self.readout(lat, rope), feat)
        return out

    # -------------------------------------------------------------------------- public
    def forward(self, x, num_tokens=None, mat_dim=None, depth=None, depth_tau=None,
                token_grans=None, exit: str = "batch") -> AdaPerceiverOutput:
        call = self.resolve(x, num_tokens, mat_dim, depth, depth_tau, token_grans, exit)
        if x.shape[0] == 0:
            return self._empty(x, call)
        return self._run(x, call)

    def forward_features(self, x, num_tokens=None, mat_dim=None, depth=None, depth_tau=None,
                         token_grans=None, exit: str = "batch") -> torch.Tensor:
        """The latents (B, N, C) after each sample's last executed block (zero past its t)."""
        call = self.resolve(x, num_tokens, mat_dim, depth, depth_tau, token_grans, exit)
        if x.shape[0] == 0:
            return self._empty(x, call, with_logits=False).latents
        return self._run(x, call, with_logits=False).latents

    def forward_intermediates(self, x, indices=None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NLC",
                              intermediates_only: bool = False, output_dict: bool = False,
                              num_tokens=None, mat_dim=None, depth=None, token_grans=None):
        """timm's per-block features: the latents (B, N, C) after the blocks ``indices`` picks
        (None: all; an int n: the last n; a sequence: those, negative from the end) among the
        ``depth`` blocks run, zero past each sample's t. ``norm`` applies the write head's input
        LayerNorm (the norm every readout applies to the latents, this model's final norm);
        ``stop_early`` runs no block past the last one taken.

        Returns (final latents, as forward_features gives them, list of intermediates), the list
        alone with ``intermediates_only``, or with ``output_dict`` a dict with
        'image_intermediates' (and 'image_features'). ``output_fmt`` is 'NLC' only: the latents
        are learned tokens, not a patch grid, so there is no NCHW map. ``num_tokens`` and
        ``mat_dim`` may be per sample; ``depth`` is one int (the blocks the indices refer to).
        """
        fmt = str(getattr(output_fmt, "value", output_fmt))
        if fmt != "NLC":
            raise ValueError(f"output_fmt={fmt!r} is not allowed for AdaPerceiver; allowed: "
                             "'NLC'. Its features are N latent tokens (B, N, C) read from the "
                             "patches by cross-attention, not a patch grid, so they have no "
                             "NCHW layout")
        if isinstance(depth, (list, tuple)) or isinstance(depth, torch.Tensor) and depth.dim():
            raise ValueError(f"depth={depth!r} is not allowed in forward_intermediates; allowed: "
                             "one int for the whole batch (the intermediates are per block)")
        call = self.resolve(x, num_tokens, mat_dim, depth, None, token_grans)
        take, last = take_indices(call.depth, indices)
        if x.shape[0] == 0:
            final = self._empty(x, call, with_logits=False).latents
            inter = [final.clone() for _ in take]
        else:
            final, inter = self._intermediates(x, call, take, last + 1 if stop_early
                                               else call.depth, norm)
        if output_dict:
            out = {"image_intermediates": inter}
            if not intermediates_only:
                out["image_features"] = final
            return out
        return inter if intermediates_only else (final, inter)

    def _intermediates(self, x, call: CallConfig, take: list[int], run: int, norm: bool):
        """Blocks 0..run-1 over the batch (in _run's sample order, so the final latents equal
        forward_features' exactly), the latents after each block of ``take`` kept."""
        dev = x.device
        order = self._order(call)
        permuted = order != list(range(call.batch))
        if permuted:
            x = x[to_device(order, dev)]
        rope = self._rope(call.num_tokens, dev)
        layout = Layout.build([call.tokens[b] for b in order], [call.hidden[b] for b in order],
                              dev)
        rows = layout.pack(self.read(x, call.num_tokens, call.grid, rope))
        inter = []
        for i in range(run):
            rows = self._block(i, rows, layout, call.grans, rope)
            if i in take:   # normed before padding: rows past a sample's t stay zero
                inter.append(layout.pad(self.write_head.src_norm(rows) if norm else rows))
        final = layout.pad(rows)
        if permuted:
            back = to_device(sorted(range(call.batch), key=order.__getitem__), dev)
            final, inter = final[back], [t[back] for t in inter]
        return final, inter

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Keep only the blocks up to the last of ``indices`` (timm's contract; config.depth
        follows) and, with ``prune_head``, drop the classifier. The write head's norm is what
        ``norm=True`` applies, so ``prune_norm`` removes nothing. Returns the absolute
        indices."""
        take, last = take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        self.feature_info = self.feature_info[:last + 1]
        self.config = copy.deepcopy(self.config)
        self.config.depth = last + 1
        if prune_head:
            self.reset_classifier(0)
        return take

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
