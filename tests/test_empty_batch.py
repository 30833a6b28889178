"""A batch of 0 images gives empty outputs of the shapes a B-image batch would have, as torch
modules do (nn.Linear on a (0, F) input returns (0, K), part of the autograd graph), through
every entry point: forward, forward_features, forward_readouts, forward_intermediates, the
distilled backbone's per-patch outputs, and timm's forward / forward_head / features_only. The
call's arguments are still validated: per-sample values must have 0 entries, scalars must be
in range, the image must fit the patch size."""
import pytest
import torch

import adaperceiver
from helpers import randomize_

SMALL = dict(depth=3, embed_dim=48, num_heads=2, mask_token_grans=[8, 16], max_latent_tokens=16,
             img_size=32, patch_size=16, mat_dims=[24, 48], num_classes=7)
DISTILL = dict(SMALL, patch_size=8, output_feat_dim=20)


@pytest.fixture(params=["reference", "cpp"])
def backend(request):
    with adaperceiver.use_backend(request.param):
        yield request.param


def classifier():
    return randomize_(adaperceiver.create_model("adaperceiver_v1_in1k", **SMALL))


def empty(img=32):
    return torch.randn(0, 3, img, img)


@pytest.mark.parametrize("call, n, depth", [
    (dict(), 16, 3),
    (dict(num_tokens=8, mat_dim=24, depth=2), 8, 2),
    (dict(num_tokens=[], mat_dim=[], depth=[]), 16, 3),
    (dict(num_tokens=torch.tensor([], dtype=torch.long), mat_dim=36, depth=[]), 16, 3),
    (dict(num_tokens=8, depth_tau=0.5), 8, 3),
    (dict(depth=2, depth_tau=0.9, exit="sample"), 16, 2),
    (dict(token_grans=[4, 8, 16]), 16, 3),
])
def test_forward_and_features_of_an_empty_batch(backend, call, n, depth):
    model = classifier()
    out = model(empty(), **call)
    assert out.logits.shape == (0, 1, 7) and out.latents.shape == (0, n, 48)
    assert out.exit_depth == depth and out.depths.shape == (0,)
    assert out.features is None and out.patch_tokens is None
    assert out.logits.dtype == torch.float32
    # part of the autograd graph, as a torch module's output on an empty batch
    assert out.logits.requires_grad and out.latents.requires_grad
    (out.logits.sum() + out.latents.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.abs().max() == 0 for g in grads)
    with torch.no_grad():
        feats = model.forward_features(empty(), **call)
    assert feats.shape == (0, n, 48) and not feats.requires_grad
    # the same shapes a batch of two gives
    full = model(torch.randn(2, 3, 32, 32), **{k: v for k, v in call.items()
                                                if not isinstance(v, (list, torch.Tensor))
                                                or k == "token_grans"})
    assert full.logits.shape[1:] == out.logits.shape[1:]
    assert full.latents.shape[1:] == out.latents.shape[1:]


def test_empty_batch_other_sizes_and_dtype(backend):
    model = classifier().to(torch.float64)
    out = model(torch.randn(0, 3, 48, 64, dtype=torch.float64), num_tokens=4)
    assert out.logits.dtype == torch.float64 and out.latents.shape == (0, 4, 48)
    with torch.inference_mode():
        assert model(torch.randn(0, 3, 32, 32, dtype=torch.float64)).logits.shape == (0, 1, 7)


def test_empty_batch_arguments_still_validated():
    model = classifier()
    with pytest.raises(ValueError, match="num_tokens has 2 entries but the batch has 0 samples"):
        model(empty(), num_tokens=[8, 16])
    with pytest.raises(ValueError, match="mat_dim has 1 entries but the batch has 0 samples"):
        model.forward_features(empty(), mat_dim=torch.tensor([24]))
    with pytest.raises(ValueError, match="depth=4 is out of range"):
        model(empty(), depth=4)
    with pytest.raises(ValueError, match="num_tokens=0 is out of range"):
        model(empty(), num_tokens=0)
    with pytest.raises(ValueError, match="depth_tau=2"):
        model(empty(), depth_tau=2)
    with pytest.raises(ValueError, match="image size 30x30 is not allowed"):
        model(torch.randn(0, 3, 30, 30))
    with pytest.raises(ValueError, match=r"x has shape \(0, 1, 32, 32\)"):
        model(torch.randn(0, 1, 32, 32))
    with pytest.raises(TypeError, match="x.dtype=torch.float64 differs"):
        model(torch.randn(0, 3, 32, 32, dtype=torch.float64))


def test_readouts_and_intermediates_of_an_empty_batch(backend):
    model = classifier()
    outs = model.forward_readouts(empty(), exits=[1, 3], token_counts=[8, 16], mat_dim=[])
    assert sorted(outs) == [(1, 8), (1, 16), (3, 8), (3, 16)]
    for logits, feats in outs.values():
        assert logits.shape == (0, 1, 7) and feats is None
    final, inter = model.forward_intermediates(empty(), num_tokens=8)
    assert final.shape == (0, 8, 48) and [t.shape for t in inter] == [(0, 8, 48)] * 3
    assert len(model.forward_intermediates(empty(), indices=[0, -1], norm=True,
                                           intermediates_only=True)) == 2
    assert model.forward_head(torch.randn(0, 16, 48)).shape == (0, 1, 7)
    assert model.forward_head(torch.randn(0, 16, 48), pre_logits=True).shape == (0, 1, 48)


def test_distilled_backbone_empty_batch(backend):
    model = randomize_(adaperceiver.create_model("adaperceiver_v1", **DISTILL))
    out = model(empty(), num_tokens=[], mat_dim=24, depth=2)
    P = (32 // 8) ** 2
    assert out.logits.shape == (0, 1, 7) and out.features.shape == (0, P, 20)
    assert out.patch_tokens.shape == (0, P, 48) and out.exit_depth == 2
    out.features.sum().backward()
    outs = model.forward_readouts(empty(), exits=[2], features=True)
    (logits, feats), = [outs[k] for k in outs if k[1] == 16]
    assert logits.shape == (0, 1, 7) and feats.shape == (0, P, 20)
    full = model(torch.randn(1, 3, 32, 32))
    assert full.features.shape[1:] == out.features.shape[1:]


def test_timm_entry_points_empty_batch(backend):
    timm = pytest.importorskip("timm")
    import adaperceiver.timm  # noqa: F401
    kw = {k: v for k, v in SMALL.items() if k != "num_classes"}
    model = randomize_(timm.create_model("adaperceiver_v1_in1k", num_classes=7, num_tokens=8,
                                         **kw))
    out = model(empty())
    assert out.shape == (0, 7) and out.requires_grad
    out.sum().backward()
    assert model(empty(), num_tokens=[], mat_dim=[], depth=[]).shape == (0, 7)
    feats = model.forward_features(empty())
    assert feats.shape == (0, 8, 48)
    assert model.forward_head(feats).shape == (0, 7)
    assert model.forward_head(feats, pre_logits=True).shape == (0, 48)
    assert model.forward_head(feats, num_tokens=[]).shape == (0, 7)
    assert [t.shape for t in model.forward_intermediates(empty(), intermediates_only=True)] \
        == [(0, 8, 48)] * 3
    model.reset_classifier(0)
    assert model(empty()).shape == (0, 48)
    model.reset_classifier(0, "")
    assert model(empty()).shape == (0, 8, 48)
    fmodel = timm.create_model("adaperceiver_v1_in1k", features_only=True, out_indices=2, **kw)
    assert [t.shape for t in fmodel(empty())] == [(0, 16, 48)] * 2
