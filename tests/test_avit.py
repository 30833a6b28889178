"""A-ViT baseline (adaperceiver.baselines.avit): the halting rule, compacted inference against the
masked reference, the plain timm model with halting off, FLOPs, losses, bad input, the bench
names and a 1-epoch smoke run of the digits recipe. Small models only (depth 4, width 64)."""
from __future__ import annotations

import math

import pytest
import torch

timm = pytest.importorskip("timm")

from adaperceiver.baselines.avit import (AViT, avit_flops, avit_losses,  # noqa: E402
                                         calibrate_beta, create_avit, depth_prior,
                                         halting_depths)

SMALL = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
N_TOKENS = 17


def small_vit():
    """A small ViT from timm (pretrained=False), its parameters randomized at order 1 so every
    block changes the tokens."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL).eval()
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5 if "pos_embed" not in name else 0.5)
            elif name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return vit


@pytest.fixture
def images():
    # samples of different contrast, so that they halt different tokens at different layers
    return torch.randn(4, 3, 32, 32) * torch.tensor([0.5, 1.0, 1.5, 2.0])[:, None, None, None]


@pytest.fixture
def halting_model(images):
    """A small A-ViT whose gate is calibrated to half the full cost on other images."""
    model = AViT(small_vit()).eval()
    calibrate_beta(model, torch.randn_like(images), 0.55)
    return model


# ----------------------------------------------------------------------------- the rule
def test_halting_depths_on_hand_built_scores():
    scores = torch.tensor([[0.995, 0.0, 0.0, 0.0],       # halts at once
                           [0.5, 0.5, 0.9, 0.9],          # 1.0 >= 0.99 at layer 2
                           [0.3, 0.3, 0.3, 0.3],          # 1.2 at layer 4
                           [0.3, 0.3, 0.385, 0.9],        # 0.985 < 0.99 at layer 3: 4
                           [0.3, 0.3, 0.395, 0.0],        # 0.995 at layer 3
                           [0.1, 0.1, 0.1, 0.1]])         # never: the last layer
    assert halting_depths(scores).tolist() == [1, 2, 4, 4, 3, 4]
    assert halting_depths(scores, eps=0.2).tolist() == [1, 2, 3, 3, 3, 4]


def identity_vit(x0: torch.Tensor) -> torch.nn.Module:
    """A small ViT whose blocks add nothing (zero projections) and whose token n carries
    channel-0 value x0[n] at every layer (position embedding; patch weights of channel 0 zero)."""
    vit = small_vit()
    with torch.no_grad():
        for blk in vit.blocks:
            for lin in (blk.attn.proj, blk.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        vit.patch_embed.proj.weight[0].zero_()
        vit.patch_embed.proj.bias[0] = 0.0
        vit.cls_token[0, 0, 0] = 0.0
        vit.pos_embed[0, :, 0] = x0
    return vit


@pytest.mark.parametrize("mode", ["masked", "compact"])
def test_model_follows_the_cumulative_rule(mode, images):
    gamma, beta, L = 5.0, -10.0, SMALL["depth"]
    # per-token constant scores, hand-picked so that the depths are 1, 2, 3 and 4
    h = torch.tensor([0.995, 0.5, 0.34, 0.26, 0.2, 0.05, 0.6, 0.997, 0.45, 0.3, 0.36, 0.1,
                      0.52, 0.999, 0.25, 0.7])
    x0 = torch.cat([torch.zeros(1), (torch.logit(h.double()) - beta).float() / gamma])
    model = AViT(identity_vit(x0), gamma=gamma, beta=beta)
    with torch.no_grad():
        out = model.forward_halting(images, mode)
    expected = halting_depths(h[:, None].expand(-1, L))
    assert set(expected.tolist()) == {1, 2, 3, 4}
    assert (out.depths[:, 1:] == expected).all(), (out.depths, expected)
    assert (out.depths[:, 0] == L).all()                  # the class token never halts
    # blocks add nothing, so the ACT weights (scores, then the remainder) must sum to 1
    with torch.no_grad():
        torch.testing.assert_close(out.features, model.vit.norm(model.embed(images)),
                                   rtol=1e-5, atol=1e-5)
    if mode == "masked":                                  # scores of live tokens, else 0
        live = torch.arange(L)[None, :] < expected[:, None]
        ref = torch.where(live, h[:, None].expand(-1, L), torch.zeros(()))
        torch.testing.assert_close(out.scores[:, 1:], ref.expand(4, -1, -1), rtol=1e-5,
                                   atol=1e-6)


# ----------------------------------------------------------------------------- compacted
def test_compact_equals_masked_per_sample(halting_model, images):
    L = halting_model.depth
    with torch.no_grad():
        ref = halting_model.forward_halting(images, "masked")
        out = halting_model.forward_halting(images, "compact")
    # halting really differs: across tokens, across samples, and most layers are used
    d = ref.depths[:, 1:]
    assert len(d.unique()) >= 3, d
    assert len({tuple(r) for r in d.tolist()}) == len(d), "samples halt the same tokens"
    assert 0.2 < ref.token_layers.float().mean() / (N_TOKENS * L) < 0.9
    assert torch.equal(out.depths, ref.depths)
    for b in range(len(images)):
        torch.testing.assert_close(out.logits[b], ref.logits[b], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.features[b], ref.features[b], rtol=1e-5, atol=1e-5)
    # the ragged batch computes each sample as if alone
    with torch.no_grad():
        alone = torch.cat([halting_model.forward_halting(images[b:b + 1], "compact").logits
                           for b in range(len(images))])
    torch.testing.assert_close(out.logits, alone, rtol=1e-5, atol=1e-5)


def test_forward_switches_form_with_mode(halting_model, images):
    with torch.no_grad():
        eval_logits = halting_model(images)
        halting_model.train()
        train_logits = halting_model(images)
    torch.testing.assert_close(eval_logits, train_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["masked", "compact"])
def test_halting_disabled_is_the_plain_timm_model(mode, images):
    vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, **SMALL).eval()
    model = AViT(vit, gamma=50.0, beta=5.0, halting=False)   # would halt everything at once
    with torch.no_grad():
        out = model.forward_halting(images, mode)
        ref = vit(images)
    assert (out.depths == SMALL["depth"]).all()
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- FLOPs
def test_flops_match_flop_counter_without_halting():
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):                # meta: SDPA runs as matmuls the counter sees
        vit = timm.create_model("deit_tiny_patch16_224", pretrained=False, **SMALL)
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            vit(torch.empty(1, 3, 32, 32))
    full = avit_flops(vit)
    assert full.item() == fc.get_total_flops()
    assert torch.equal(avit_flops(vit, torch.full((2, N_TOKENS), 4)), full.expand(2))


def test_flops_follow_live_tokens(halting_model, images):
    with torch.no_grad():
        out = halting_model.forward_halting(images, "compact")
    f = halting_model.flops(out.depths)
    full = avit_flops(halting_model.vit).item()
    assert (f < full).all() and len(f.unique()) >= 2
    # by hand: per block 2 n (4 C^2 + 2 C H) + 4 n^2 C on its n live tokens
    C, H, P = 64, 256, 16
    live = [(out.depths[0] > l).sum().item() for l in range(4)]
    hand = (2 * P * C * 3 * 64 + 2 * C * 10
            + sum(2 * n * (4 * C * C + 2 * C * H) + 4 * n * n * C for n in live))
    assert f[0].item() == hand


# ----------------------------------------------------------------------------- losses
def test_losses_and_their_gradients(halting_model, images):
    halting_model.train()
    out = halting_model.forward_halting(images, "masked")
    losses = avit_losses(out)
    # ponder cost: depth + remainder at halting, so at least the depth
    assert (out.ponder >= out.depths - 1e-6).all() and (out.ponder <= out.depths + 1).all()
    assert losses["ponder"] > 0 and losses["distr"] > 0
    (losses["ponder"] + losses["distr"]).backward()
    g = halting_model.vit.blocks[0].mlp.fc2.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    with pytest.raises(ValueError, match="masked"):
        with torch.no_grad():
            avit_losses(halting_model.forward_halting(images, "compact"))


def test_depth_prior():
    p = depth_prior(12)
    assert math.isclose(p.sum().item(), 1.0, rel_tol=1e-6) and p.argmax().item() == 8
    assert depth_prior(6).argmax().item() == 4


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"eps=1\.5 .*\(0, 1\)"):
        AViT(small_vit(), eps=1.5)
    with pytest.raises(ValueError, match=r"eps=0\.0"):
        halting_depths(torch.rand(2, 4), eps=0.0)
    with pytest.raises(ValueError, match=r"name='deit_huge'.*allowed: avit_small"):
        create_avit("deit_huge")
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        AViT(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="global_pool"):
        AViT(timm.create_model("deit_tiny_patch16_224", pretrained=False, global_pool="avg",
                               **SMALL))
    with pytest.raises(ValueError, match=r"mode='ragged'"):
        AViT(small_vit()).forward_halting(torch.randn(1, 3, 32, 32), "ragged")
    from adaperceiver.baselines.avit import train_avit_digits
    with pytest.raises(ValueError, match=r"thresholds contains 1\.0"):
        train_avit_digits(None, thresholds=(0.9, 1.0))


# ----------------------------------------------------------------------------- bench names
def test_bench_baseline_names():
    from adaperceiver.bench.baselines import (baseline_flops, build_baseline,
                                              parse_baselines)
    assert parse_baselines(["avit_tiny_patch16_224,deit_tiny_patch16_224"]) == [
        "avit_tiny_patch16_224", "deit_tiny_patch16_224"]
    with pytest.raises(ValueError, match="avit_tiny_patch16_224"):
        parse_baselines(["avit_huge"])
    flops, params = baseline_flops("avit_tiny_patch16_224", 64)
    full, full_params = baseline_flops("deit_tiny_patch16_224", 64)
    assert 0.3 * full < flops < full and params == full_params
    net = build_baseline("avit_tiny_patch16_224", 64)
    with torch.inference_mode():
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


# ----------------------------------------------------------------------------- digits
def test_digits_recipe_smoke():
    pytest.importorskip("sklearn")
    from adaperceiver.baselines.avit import train_avit_digits
    from adaperceiver.data import digits_split
    points = train_avit_digits(digits_split(0), epochs=1, thresholds=(0.99, 0.2), log=None)
    assert [p["name"] for p in points] == ["avit thr=0.99", "avit thr=0.2", "avit full"]
    for p in points:
        assert {"name", "flops", "accuracy", "token_layers"} <= set(p)
        assert 0.0 <= p["accuracy"] <= 1.0 and p["flops"] > 0
    assert points[-1]["token_layers"] == N_TOKENS * 6
    assert points[-1]["flops"] > points[1]["flops"]
