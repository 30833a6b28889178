"""A-ViT (Yin et al., CVPR 2022, arXiv 2112.07658): adaptive token halting on a timm ViT/DeiT.

After block l every live token k gets a halting score h_k^l = sigmoid(gamma * x_k^l[0] + beta),
read from its first embedding channel. Scores accumulate over layers; a token halts after the
first block where its cumulative score reaches 1 - eps, and no later block sees it (neither as a
query nor as a key). As in ACT, the token's output is sum_{l < halt} h^l x^l + R x^halt with the
remainder R = 1 - sum_{l < halt} h^l; the last block halts every token still live. The class
token never halts (its score is taken as 0), so the classifier reads its last-block state (the
released code scores the class token like the others; here it never halts, as issue #10 asks).

Two forms of one computation:
- ``mode="masked"``: all N tokens stay in the (B, N, C) tensor; halted tokens are dropped from
  attention by a boolean key mask passed to timm's own blocks and their rows are discarded. It is
  differentiable (training) and is the reference for tests.
- ``mode="compact"``: inference that really drops halted tokens. Live tokens of all samples are
  packed as rows (T, C) for LayerNorm, linears and MLP; attention scatters them into a
  (B, n_max) buffer and runs :func:`adaperceiver.ops.block_masked_attention` with per-sample
  ``seq_lens`` (the C++ kernel skips keys and queries past each sample's length). Halted rows
  leave the packed set; their ACT outputs are written to the (B, N, C) result as they halt.

Hyper-parameters (the paper's values, and where the authors' released code,
github.com/NVlabs/A-ViT, differs):
- gate: the paper states gamma=5, beta=-10 (our defaults, GAMMA/BETA). The released training
  commands use other values: ``--gate_scale 10 --gate_center 30`` (A-ViT-T) and ``--gate_center
  75`` (A-ViT-S), i.e. gamma=10, beta=-30/-75 on pretrained DeiT features.
- eps = 0.01 (``self.eps = 0.01`` in the released model).
- ponder loss weight alpha_p = 5e-4 (paper and ``--ponder_token_scale 0.0005``); the ponder
  cost of a token is its depth plus its remainder R at halting, averaged over tokens.
- distributional prior weight alpha_d = 0.1 as the paper states (the released commands pass
  ``--distr_prior_alpha 0.001``). The loss is KL(prior || q) where q is the per-layer mean
  halting score (over batch and patch tokens, halted tokens counting 0), normalised to sum 1 and
  clamped to [0.01, 0.99] (released code: ``nn.KLDivLoss(reduction="batchmean")``, which divides
  the sum by the number of layers; we do the same).
- prior: the released ``get_distribution_target`` is a Gaussian pdf over 0-based layer indices
  0..11 with mean 8 and std 1 (not layer 10 with std 2), rescaled so that its first 8 entries sum
  to 0.98 (it then does not sum to 1). We keep mean = 2/3 of the depth (8 of 12) and std 1 but
  normalise the prior to sum 1, so the KL is a proper divergence.

FLOPs per image (multiply-add = 2, the convention of ``adaperceiver.count_flops`` and torch's
FlopCounterMode): patch-embedding convolution + per block 2 n (4 C^2 + 2 C H) for the linears on
n live tokens + 4 n^2 C for the two attention matmuls + the head; they depend on the input.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GAMMA", "BETA", "EPS", "PONDER_WEIGHT", "DISTR_PRIOR_WEIGHT", "PRIOR_STD",
           "AVIT_MODELS", "AViT", "AViTOutput", "halting_depths", "depth_prior", "avit_losses",
           "avit_flops", "create_avit", "calibrate_beta", "build_avit_baseline",
           "avit_baseline_flops", "benchmark_images", "train_avit_digits"]

GAMMA, BETA = 5.0, -10.0          # paper's gate (released commands: 10, -30 / -75)
EPS = 0.01                        # halting at cumulative score >= 1 - EPS
PONDER_WEIGHT = 5e-4              # alpha_p
DISTR_PRIOR_WEIGHT = 0.1          # alpha_d (paper; released commands 0.001)
PRIOR_STD = 1.0                   # std of the Gaussian depth prior, in layers (released code)
PRIOR_MEAN_FRACTION = 8 / 12      # prior mean as a 0-based layer index over depth (released: 8)

# A-ViT baselines: timm backbone and the compute of the paper's trained model relative to it
# (A-ViT-T 0.8 vs DeiT-T 1.3 GFLOPs; A-ViT-S 3.6 vs 4.6), used to calibrate random weights.
AVIT_MODELS = {
    "avit_tiny_patch16_224": ("deit_tiny_patch16_224", 0.8 / 1.3),
    "avit_small_patch16_224": ("deit_small_patch16_224", 3.6 / 4.6),
}


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < 1.0:
        raise ValueError(f"eps={eps!r} is not allowed; allowed: a float in (0, 1)")
    return float(eps)


@dataclass
class AViTOutput:
    logits: torch.Tensor                    # (B, num_classes)
    depths: torch.Tensor                    # (B, N) int64: blocks each token ran
    features: torch.Tensor                  # (B, N, C): final norm of the ACT outputs
    ponder: Optional[torch.Tensor] = None   # (B, N) ponder cost (depth + remainder), masked mode
    layer_halting: Optional[torch.Tensor] = None  # (L,) mean halting score of patch tokens
    scores: Optional[torch.Tensor] = None   # (B, N, L) halting scores of live tokens, else 0

    @property
    def token_layers(self) -> torch.Tensor:
        """(B,) token-blocks each sample ran."""
        return self.depths.sum(1)


def halting_depths(scores: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The cumulative rule on scores (..., L): the 1-based first layer whose running sum reaches
    1 - eps, or L when none does."""
    eps = _check_eps(eps)
    reached = scores.cumsum(-1) >= 1.0 - eps
    reached[..., -1] = True
    return reached.float().argmax(-1) + 1


def _act_step(h, c, r, last: bool, thresh: float):
    """One ACT step on live tokens: weight of this layer's state in the output, which tokens
    halt, new cumulative score and remainder."""
    c = c + h
    halted = torch.ones_like(c, dtype=torch.bool) if last else c >= thresh
    w = torch.where(halted, r, h)
    return w, halted, c, torch.where(halted, r, r - h)


class AViT(nn.Module):
    """A-ViT around a timm ``VisionTransformer`` (its weights are used, not copied).

    ``forward(images)`` returns logits: the masked form in training mode, the compacted form in
    eval mode. ``forward_halting(images, mode)`` returns an :class:`AViTOutput`. ``gamma``,
    ``beta``, ``eps`` and ``halting`` are plain attributes and may be changed between calls
    (``halting=False``: no token halts, the plain ViT).
    """

    def __init__(self, vit: nn.Module, gamma: float = GAMMA, beta: float = BETA,
                 eps: float = EPS, halting: bool = True):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"vit must be a timm VisionTransformer, got {type(vit).__name__}")
        if not vit.has_class_token or vit.num_prefix_tokens != 1 or vit.global_pool != "token":
            raise ValueError("vit must have one class token, no register tokens and "
                             f"global_pool='token'; got has_class_token={vit.has_class_token}, "
                             f"num_prefix_tokens={vit.num_prefix_tokens}, "
                             f"global_pool={vit.global_pool!r}")
        for i, blk in enumerate(vit.blocks):
            a = blk.attn
            plain = all(isinstance(m, nn.Identity) for m in (a.q_norm, a.k_norm, a.norm))
            if not plain or getattr(a, "gate", None) is not None:
                raise ValueError(f"block {i}: q_norm/k_norm/norm must be Identity and no gate "
                                 "(plain ViT/DeiT blocks only)")
        self.vit = vit
        self.gamma, self.beta, self.eps = float(gamma), float(beta), _check_eps(eps)
        self.halting = bool(halting)

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        v = self.vit
        return v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(images))))

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        """Halting scores of tokens x (..., C), read from channel 0 (zero when halting is off)."""
        if not self.halting:
            return x.new_zeros(x.shape[:-1])
        return torch.sigmoid(self.gamma * x[..., 0] + self.beta)

    def _head(self, out: torch.Tensor):
        feats = self.vit.norm(out)
        return self.vit.forward_head(feats), feats

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_halting(images, "masked" if self.training else "compact").logits

    def forward_halting(self, images: torch.Tensor, mode: str = "compact") -> AViTOutput:
        if mode not in ("masked", "compact"):
            raise ValueError(f"mode={mode!r} is not allowed; allowed: 'masked', 'compact'")
        x = self.embed(images)
        return self._masked(x) if mode == "masked" else self._compact(x)

    # ------------------------------------------------------------------ masked (reference)
    def _masked(self, x: torch.Tensor) -> AViTOutput:
        B, N, _ = x.shape
        L, thresh = self.depth, 1.0 - _check_eps(self.eps)
        alive = torch.ones(B, N, dtype=torch.bool, device=x.device)
        patch = torch.ones_like(alive)
        patch[:, 0] = False
        c = x.new_zeros(B, N)
        r = x.new_ones(B, N)
        out = torch.zeros_like(x)
        rho = x.new_zeros(B, N)
        depths = torch.zeros(B, N, dtype=torch.long, device=x.device)
        scores, layer_h = [], []
        for l, blk in enumerate(self.vit.blocks):
            y = blk(x, attn_mask=alive[:, None, None, :])
            x = torch.where(alive[..., None], y, x)
            depths = depths + alive
            h = self._scores(x) * (alive & patch)
            scores.append(h)
            layer_h.append(h[:, 1:].mean())
            w, halted, c_new, r_new = _act_step(h, c, r, l == L - 1, thresh)
            w, halted = w * alive, halted & alive
            rho = rho + alive + torch.where(halted, r, torch.zeros_like(r))
            out = out + w[..., None] * x
            c, r = torch.where(alive, c_new, c), torch.where(alive, r_new, r)
            alive = alive & ~halted
        logits, feats = self._head(out)
        return AViTOutput(logits, depths, feats, rho, torch.stack(layer_h),
                          torch.stack(scores, -1))

    # ------------------------------------------------------------------ compacted inference
    def _compact(self, x: torch.Tensor) -> AViTOutput:
        from adaperceiver.model.ragged import Layout
        from adaperceiver.ops import block_masked_attention
        B, N, C = x.shape
        L, thresh = self.depth, 1.0 - _check_eps(self.eps)
        dev = x.device
        rows = x.reshape(B * N, C)
        pos = torch.arange(B * N, device=dev)          # flat (b * N + n) index of each row
        c = x.new_zeros(B * N)
        r = x.new_ones(B * N)
        out = torch.zeros_like(rows)                    # ACT outputs, written at halting
        acc = torch.zeros_like(rows)                    # ACT sums of the live rows
        depths = torch.full((B * N,), L, dtype=torch.long, device=dev)   # set at halting
        is_cls = pos % N == 0
        # the live rows, packed sample by sample as the model's ragged latents (no FFN widths)
        layout = Layout.build([N] * B, [0] * B, dev)
        for l, blk in enumerate(self.vit.blocks):
            a = blk.attn
            H, n = a.num_heads, layout.max_len
            qkv = layout.pad(a.qkv(blk.norm1(rows)))
            q, k, v = qkv.view(B, n, 3, H, C // H).unbind(2)
            o = block_masked_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       seq_lens=layout.seq_lens, heads_last=True)
            rows = rows + blk.ls1(a.proj(layout.pack(o.reshape(B, n, C))))
            rows = rows + blk.ls2(blk.mlp(blk.norm2(rows)))
            h = self._scores(rows).masked_fill(is_cls, 0.0)
            w, halted, c, r = _act_step(h, c, r, l == L - 1, thresh)
            acc = acc + w[:, None] * rows
            if l == L - 1:
                out.index_copy_(0, pos, acc)
                break
            if not bool(halted.any()):
                continue
            gone = halted.nonzero().squeeze(1)
            gone_pos = pos.index_select(0, gone)
            out.index_copy_(0, gone_pos, acc.index_select(0, gone))
            depths.index_fill_(0, gone_pos, l + 1)
            keep = (~halted).nonzero().squeeze(1)
            rows, acc, pos, c, r, is_cls = (
                t.index_select(0, keep) for t in (rows, acc, pos, c, r, is_cls))
            counts = torch.bincount(torch.div(pos, N, rounding_mode="floor"), minlength=B)
            layout = Layout.build(counts.tolist(), [0] * B, dev)
        logits, feats = self._head(out.view(B, N, C))
        return AViTOutput(logits, depths.view(B, N), feats)

    # ------------------------------------------------------------------ cost
    def flops(self, depths: torch.Tensor) -> torch.Tensor:
        """FLOPs per image (B,) of the compacted forward whose tokens ran ``depths`` (B, N)."""
        return avit_flops(self.vit, depths)


def avit_flops(vit: nn.Module, depths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FLOPs per image (multiply-add = 2) of a timm ViT whose tokens ran ``depths`` (B, N)
    blocks each (None: every token runs every block, the plain model; returns (1,))."""
    pe = vit.patch_embed.proj
    C, P = vit.embed_dim, vit.patch_embed.num_patches
    L, N = len(vit.blocks), P + vit.num_prefix_tokens
    if depths is None:
        depths = torch.full((1, N), L)
    live = torch.stack([(depths > l).sum(1) for l in range(L)], 1).double()   # (B, L)
    flops = 2.0 * P * C * pe.in_channels * math.prod(pe.kernel_size)      # patch embedding
    if isinstance(vit.head, nn.Linear):
        flops += 2.0 * vit.head.in_features * vit.head.out_features
    for l, blk in enumerate(vit.blocks):
        n = live[:, l]
        flops = flops + 2.0 * n * (4 * C * C + 2 * C * blk.mlp.fc1.out_features) + 4.0 * n * n * C
    return flops


# ---------------------------------------------------------------------------- losses
def depth_prior(depth: int, mean: Optional[float] = None, std: float = PRIOR_STD,
                device=None) -> torch.Tensor:
    """Gaussian prior over 0-based layer indices 0..depth-1, normalised to sum 1 (mean default:
    2/3 of the depth, the released code's 8 of 12)."""
    mean = PRIOR_MEAN_FRACTION * depth if mean is None else float(mean)
    if not std > 0:
        raise ValueError(f"std={std!r} is not allowed; allowed: a float > 0")
    idx = torch.arange(depth, dtype=torch.float32, device=device)
    p = torch.exp(-0.5 * ((idx - mean) / std) ** 2)
    return p / p.sum()


def avit_losses(out: AViTOutput, ponder_weight: float = PONDER_WEIGHT,
                distr_weight: float = DISTR_PRIOR_WEIGHT, prior: Optional[torch.Tensor] = None
                ) -> dict:
    """{"ponder", "distr"}: the weighted ponder loss (mean ponder cost of patch tokens) and the
    distributional prior KL(prior || q) of a masked-mode output (see the module docstring)."""
    if out.ponder is None or out.layer_halting is None:
        raise ValueError("avit_losses needs forward_halting(..., mode='masked') output")
    L = out.layer_halting.shape[0]
    prior = depth_prior(L, device=out.ponder.device) if prior is None else prior
    q = out.layer_halting / out.layer_halting.sum().clamp_min(1e-12)
    q = q.clamp(0.01, 0.99)
    kl = F.kl_div(q.log(), prior, reduction="batchmean")
    return {"ponder": ponder_weight * out.ponder[:, 1:].mean(), "distr": distr_weight * kl}


# ---------------------------------------------------------------------------- baselines
def create_avit(name: str, img_size: int = 224, num_classes: int = 1000, **kwargs) -> AViT:
    """A-ViT on a timm backbone built with ``pretrained=False``: ``name`` is an A-ViT name of
    AVIT_MODELS or one of their DeiT backbones. ``kwargs`` go to :class:`AViT`."""
    import timm
    backbones = {b for b, _ in AVIT_MODELS.values()}
    if name in AVIT_MODELS:
        name = AVIT_MODELS[name][0]
    elif name not in backbones:
        raise ValueError(f"name={name!r} is not allowed; allowed: "
                         f"{', '.join(sorted(AVIT_MODELS) + sorted(backbones))}")
    vit = timm.create_model(name, pretrained=False, img_size=img_size, num_classes=num_classes)
    return AViT(vit, **kwargs)


@torch.no_grad()
def calibrate_beta(model: AViT, images: torch.Tensor, flops_fraction: float,
                   iters: int = 40) -> float:
    """Set ``model.beta`` so that the FLOPs of the halting rule, applied to the scores the plain
    model (no halting) gives ``images``, are ``flops_fraction`` of full cost. Used to give random
    weights the compute profile of a trained A-ViT; the actual compacted run then drops tokens
    from attention, so its FLOPs come out close to, not exactly at, the target."""
    if not 0.0 < flops_fraction <= 1.0:
        raise ValueError(f"flops_fraction={flops_fraction!r} is not allowed; allowed: (0, 1]")
    x, xs = model.embed(images), []
    for blk in model.vit.blocks:     # the plain blocks: no halting is applied here
        x = blk(x)
        xs.append(x[..., 0])
    x0 = torch.stack(xs, -1)                                 # (B, N, L)
    full = float(avit_flops(model.vit).mean())

    def fraction(beta):
        d = halting_depths(torch.sigmoid(model.gamma * x0 + beta), model.eps)
        d[:, 0] = model.depth
        return float(avit_flops(model.vit, d).mean()) / full

    lo, hi = -200.0, 200.0                                   # fraction decreases with beta
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if fraction(mid) > flops_fraction else (lo, mid)
    model.beta = 0.5 * (lo + hi)
    return model.beta


def benchmark_images(img_size: int = 224, batch_size: int = 4, seed: int = 0) -> torch.Tensor:
    """The benchmark harness's inputs (randn, seed 0), float32 on the CPU."""
    from adaperceiver.bench.runner import RunSettings
    return RunSettings(batch_size=batch_size, img_size=img_size).images(seed)


def build_avit_baseline(name: str, img_size: int = 224, device="cpu",
                        dtype=torch.float32) -> AViT:
    """A benchmark A-ViT: random init from a fixed seed (``pretrained=False``), the paper's gate
    scale gamma, beta calibrated on images of seed 1 so that the FLOPs are those of the paper's
    trained model relative to DeiT (AVIT_MODELS); eval mode, compacted inference."""
    if name not in AVIT_MODELS:
        raise ValueError(f"name={name!r} is not allowed; allowed: {', '.join(AVIT_MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_avit(name, img_size).eval()
    calibrate_beta(model, benchmark_images(img_size, 4, seed=1), AVIT_MODELS[name][1])
    return model.to(device=device, dtype=dtype)


@torch.no_grad()
def avit_baseline_flops(name: str, img_size: int = 224, images: Optional[torch.Tensor] = None
                        ) -> tuple[float, int]:
    """(mean FLOPs per image over ``images``, parameters) of :func:`build_avit_baseline`;
    ``images`` default to the benchmark harness's (batch 4, seed 0). Its caller,
    ``bench.baselines.baseline_flops``, caches the result."""
    model = build_avit_baseline(name, img_size)
    x = benchmark_images(img_size) if images is None else images
    depths = model.forward_halting(x, "compact").depths
    return float(model.flops(depths).mean()), sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- digits
DIGITS_THRESHOLDS = (0.99, 0.75, 0.5, 0.25, 0.1)


def train_avit_digits(split, epochs: int = 30, seed: int = 0,
                      thresholds: Sequence[float] = DIGITS_THRESHOLDS,
                      log: Optional[Callable[[str], None]] = print, embed_dim: int = 64,
                      batch_size: int = 64, lr: float = 2e-3, gamma: float = GAMMA,
                      beta: float = -5.0, ponder_weight: float = 2e-3,
                      distr_weight: float = DISTR_PRIOR_WEIGHT) -> list[dict]:
    """Train A-ViT on the 8x8 scikit-learn digits and return its accuracy-FLOPs points.

    Backbone: timm ``VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10,
    embed_dim=64, depth=6, num_heads=4, class_token=True)``: 16 patches + the class token.
    Training: masked form, cross-entropy + ponder loss + distributional prior, AdamW (lr 2e-3,
    weight decay 0.05, one-cycle), batch 64, ``epochs`` epochs over ``split.x_train`` (1257
    images), from scratch, in well under a minute on a 2-core CPU (accuracy and FLOPs of a
    run: README, "A-ViT").

    Digits-specific gate and ponder weight (documented departures from the paper): from scratch
    the features are small, so the paper's beta=-10 gives sigmoid() ~ 5e-5 and no gradient to
    learn halting within this budget, hence beta=-5; the paper's ponder weight 5e-4 halts little
    here (90 of 102 token-layers after 30 epochs), 5e-3 collapses every token to one layer,
    hence 2e-3. gamma=5 and the prior (weight 0.1, mean at layer index 4 of 6, std 1) are the
    paper's / released code's. Trained with eps = 1 - thresholds[0].

    Points, on ``split.x_test`` with compacted inference: one per halting threshold 1 - eps in
    ``thresholds`` (a lower threshold halts earlier), then halting disabled (full cost). Each:
    ``name``, ``threshold`` (None for full cost), ``flops`` (mean per image, multiply-add = 2),
    ``accuracy`` (fraction of ``split.y_test``), ``token_layers`` (mean per image).
    """
    from timm.models.vision_transformer import VisionTransformer
    thresholds = [float(t) for t in thresholds]
    for t in thresholds:
        if not 0.0 < t < 1.0:
            raise ValueError(f"thresholds contains {t!r}; allowed: floats in (0, 1)")
    if not thresholds:
        raise ValueError("thresholds is empty; allowed: one or more floats in (0, 1)")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} is not allowed; allowed: an int >= 1")
    say = log or (lambda s: None)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10,
                                embed_dim=embed_dim, depth=6, num_heads=4, class_token=True,
                                global_pool="token")
        model = AViT(vit, gamma=gamma, beta=beta, eps=1.0 - thresholds[0])
        n_tokens = vit.patch_embed.num_patches + 1      # the patches and the class token
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        x, y = split.x_train, split.y_train
        steps = epochs * math.ceil(len(y) / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                    pct_start=0.1)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for ep in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            tot = {"ce": 0.0, "ponder": 0.0, "distr": 0.0, "tl": 0.0}
            for i in range(0, len(y), batch_size):
                idx = perm[i:i + batch_size]
                out = model.forward_halting(x[idx], "masked")
                ce = F.cross_entropy(out.logits, y[idx])
                aux = avit_losses(out, ponder_weight, distr_weight)
                loss = ce + aux["ponder"] + aux["distr"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                n = len(idx)
                tot["ce"] += float(ce.detach()) * n
                tot["ponder"] += float(aux["ponder"].detach()) * n
                tot["distr"] += float(aux["distr"].detach()) * n
                tot["tl"] += float(out.token_layers.float().sum())
            if ep == epochs - 1 or ep % 10 == 0:
                say(f"avit digits epoch {ep + 1}/{epochs}: ce {tot['ce'] / len(y):.3f} ponder "
                    f"{tot['ponder'] / len(y):.4f} distr {tot['distr'] / len(y):.4f} "
                    f"token-layers {tot['tl'] / len(y):.1f}/{model.depth * n_tokens}")
    model.eval()
    points = []
    settings = [(f"avit thr={t:g}", t, True) for t in thresholds] + [("avit full", None, False)]
    with torch.inference_mode():
        for name, t, halting in settings:
            model.halting = halting
            model.eps = 1.0 - t if t is not None else EPS
            out = model.forward_halting(split.x_test, "compact")
            acc = float((out.logits.argmax(-1) == split.y_test).float().mean())
            points.append({"name": name, "threshold": t, "flops": float(model.flops(
                out.depths).mean()), "accuracy": acc,
                "token_layers": float(out.token_layers.float().mean())})
    model.halting, model.eps = True, 1.0 - thresholds[0]
    for p in points:
        say(f"{p['name']:16s} acc {p['accuracy']:.4f}  {p['flops'] / 1e6:.3f} MFLOPs  "
            f"token-layers {p['token_layers']:.1f}")
    say(f"avit digits: trained and evaluated in {time.perf_counter() - t0:.1f} s")
    return points
