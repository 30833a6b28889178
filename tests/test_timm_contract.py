"""timm's generic per-model contract, run against every model ``adaperceiver.timm`` registers.

The checks are those of timm's own ``tests/test_models.py`` (huggingface/pytorch-image-models,
Apache-2.0; read at commit aa4b585 of its main branch): test_model_forward, test_model_backward,
test_model_default_cfgs_non_std (the variant timm applies to transformers, whose features are
token sequences), test_model_forward_intermediates and
test_model_forward_intermediates_features, test_model_load_pretrained, and the TorchScript / FX
tests. That file is not in timm's wheel, so its checks are restated here, adapted where our
model differs, each adaptation said where it is made:
- small model kwargs (the released config has 144M parameters), at the input size timm's test
  helper derives from the model's pretrained cfg;
- forward_intermediates in the NLC layout (the latents are learned tokens, not a patch grid:
  NCHW is refused, checked below);
- TorchScript and torch.fx are refused with a message naming torch.compile / torch.export (our
  forward packs samples by their per-call (t, w, l)); both of those are checked to work instead.
Everything else goes through timm's own machinery (create_model, build_model_with_cfg,
FeatureGetterNet, FeatureInfo, resolve_data_config, feature_take_indices, the optimizer
factory), so a timm upgrade that changes the contract fails here.
"""
import math

import pytest
import torch

timm = pytest.importorskip("timm")

import adaperceiver  # noqa: E402
import adaperceiver.timm  # noqa: E402,F401  (registers the models)
from adaperceiver.model.perceiver import take_indices  # noqa: E402
from timm.layers import get_channel_dim  # noqa: E402
from timm.models import FeatureInfo  # noqa: E402
from timm.models._features import FeatureGetterNet, feature_take_indices  # noqa: E402
import timm.optim  # noqa: E402

from helpers import randomize_  # noqa: E402

pytestmark = pytest.mark.usefixtures("reference_backend")

MODELS = timm.list_models("adaperceiver*")
# small configs of each registered model (the contract does not depend on the size)
SMALL = dict(embed_dim=48, num_heads=2, depth=3, img_size=32, patch_size=16,
             mask_token_grans=[8, 16], max_latent_tokens=16, mat_dims=[24, 48])
# timm's size targets (test_models.py)
TARGET_FWD_SIZE, TARGET_BWD_SIZE, TARGET_FFEAT_SIZE = 384, 128, 96


def create(name, **kwargs):
    return timm.create_model(name, pretrained=False, **{**SMALL, **kwargs})


def get_input_size(model, target=None):
    """timm's _get_input_size(model=..., target=...)."""
    cfg = model.default_cfg
    input_size = cfg["input_size"]
    if cfg.get("fixed_input_size", None):
        return input_size
    if target and max(input_size) > target:
        input_size = tuple(min(x, target) for x in input_size)
    return input_size


def test_registered():
    assert MODELS == ["adaperceiver_v1_in1k"]
    # listed as pretrained: the cfg names the authors' released weights on the Hub
    assert timm.list_models("adaperceiver*", pretrained=True) == MODELS
    assert timm.models.get_pretrained_cfg_value(MODELS[0], "hf_hub_id") == \
        "pjajal/adaperceiver-v1-in1k-ft"


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward(model_name, batch_size):
    model = randomize_(create(model_name)).eval()
    input_size = get_input_size(model, TARGET_FWD_SIZE)
    inputs = torch.randn((batch_size, *input_size))
    outputs = model(inputs)
    assert outputs.shape == (batch_size, model.num_classes)
    assert not torch.isnan(outputs).any(), "Output included NaNs"
    # grad checkpointing is supported and does not change the output
    model.set_grad_checkpointing()
    assert model.grad_checkpointing
    outputs2 = model(inputs)
    assert torch.allclose(outputs, outputs2, rtol=1e-4, atol=1e-5), "Output does not match"


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [2])
@pytest.mark.parametrize("num_classes", [42, 0])
def test_model_backward(model_name, batch_size, num_classes):
    input_size = get_input_size(create(model_name), TARGET_BWD_SIZE)
    model = randomize_(create(model_name, num_classes=num_classes))
    encoder_only = model.num_classes == 0
    num_params = sum(x.numel() for x in model.parameters())
    model.train()
    inputs = torch.randn((batch_size, *input_size))
    outputs = model(inputs)
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    num_grad = sum(x.grad.numel() for x in model.parameters() if x.grad is not None)
    if encoder_only:
        feat_axis = get_channel_dim(getattr(model, "output_fmt", "NCHW"))
        assert outputs.shape[feat_axis] == model.num_features
    else:
        assert outputs.shape[-1] == 42
    assert num_params == num_grad, "Some parameters are missing gradients"
    assert not torch.isnan(outputs).any(), "Output included NaNs"

    # adaptation: the same gradients with grad checkpointing (timm checks only the forward)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    model(inputs).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [1])
def test_model_default_cfgs_non_std(model_name, batch_size):
    model = randomize_(create(model_name)).eval()
    assert getattr(model, "num_classes") >= 0
    assert getattr(model, "num_features") > 0
    assert getattr(model, "head_hidden_size") > 0
    state_dict = model.state_dict()
    cfg = model.default_cfg

    input_size = get_input_size(model)
    assert max(input_size) <= 320
    input_tensor = torch.randn((batch_size, *input_size))
    feat_dim = getattr(model, "feature_dim", None)

    outputs = model.forward_features(input_tensor)
    outputs_pre = model.forward_head(outputs, pre_logits=True)
    if feat_dim is None:
        feat_dim = -1 if outputs.ndim == 3 else 1
    assert outputs.shape[feat_dim] == model.num_features
    assert outputs_pre.shape[1] == model.head_hidden_size
    # adaptation: the head of forward_features' output is forward's output
    torch.testing.assert_close(model.forward_head(outputs), model(input_tensor))

    # forward after deleting the classifier: pooled features, size(-1) == num_features
    model.reset_classifier(0)
    assert model.num_classes == 0
    outputs = model.forward(input_tensor)
    assert outputs.shape[feat_dim] == model.head_hidden_size, "pooled num_features != config"
    assert outputs.shape == outputs_pre.shape
    torch.testing.assert_close(outputs, outputs_pre)   # adaptation: the very same features

    model = create(model_name, num_classes=0).eval()
    outputs = model.forward(input_tensor)
    assert outputs.shape[feat_dim] == model.num_features

    # classifier and first conv names of the cfg are in the state dict
    if cfg.get("num_classes", None):
        classifier = cfg["classifier"]
        for c in (classifier,) if not isinstance(classifier, (tuple, list)) else classifier:
            assert c + ".weight" in state_dict.keys(), f"{c} not in model params"
    first_conv = cfg["first_conv"]
    for fc in (first_conv,) if isinstance(first_conv, str) else first_conv:
        assert fc + ".weight" in state_dict.keys(), f"{fc} not in model params"


@pytest.mark.parametrize("model_name", MODELS)
def test_global_pool_and_reset_classifier(model_name):
    """timm's num_classes=0 / global_pool='' habits and reset_classifier."""
    x = torch.randn(2, *get_input_size(create(model_name)))
    model = randomize_(create(model_name, num_classes=0, global_pool="")).eval()
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, model.forward_features(x))   # no readout: the latents
        model.reset_classifier(7, "map")
        assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
        assert model.get_classifier().in_features == model.num_features
        assert model.config.num_classes == 7 and model.pretrained_cfg["num_classes"] == 0
    model.train()
    model.reset_classifier(3)
    assert model.get_classifier().training    # the new head follows the model's mode
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    for bad, match in ((dict(num_classes=-1), "num_classes=-1"),
                       (dict(num_classes=2, global_pool="avg"), "global_pool='avg'")):
        with pytest.raises(ValueError, match=match):
            model.reset_classifier(**bad)
    with pytest.raises(ValueError, match="global_pool='token'"):
        create(model_name, global_pool="token")


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_intermediates(model_name, batch_size):
    model = randomize_(create(model_name)).eval()
    feature_info = FeatureInfo(model.feature_info, len(model.feature_info))
    expected_channels = feature_info.channels()
    expected_reduction = feature_info.reduction()
    assert len(expected_channels) >= 3
    input_size = get_input_size(model, TARGET_FFEAT_SIZE)
    output_fmt = "NLC"   # adaptation: timm asks NCHW of patch-grid models
    feat_axis = get_channel_dim(output_fmt)
    inpt = torch.randn((batch_size, *input_size))
    output, intermediates = model.forward_intermediates(inpt, output_fmt=output_fmt)
    assert len(expected_channels) == len(intermediates)
    spatial = math.prod(input_size[-2:])
    for e, r, o in zip(expected_channels, expected_reduction, intermediates):
        assert e == o.shape[feat_axis]
        assert o.shape[0] == batch_size
        assert r == model.config.patch_size and o.shape[1] == model.config.max_latent_tokens
        assert spatial // r ** 2 == model.config.num_patches   # the patches the latents read
        assert not torch.isnan(o).any()
    output2 = model.forward_features(inpt)
    assert torch.allclose(output, output2)
    model.set_grad_checkpointing()
    output3, _ = model.forward_intermediates(inpt, output_fmt=output_fmt)
    assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5), "Output does not match"


@pytest.mark.parametrize("model_name", MODELS)
def test_forward_intermediates_contract(model_name):
    """indices / norm / stop_early / intermediates_only / output_dict, as timm's ViT defines
    them; the (t, w, l) keywords per sample; NCHW refused."""
    model = randomize_(create(model_name)).eval()
    L = model.config.depth
    x = torch.randn(3, *get_input_size(model))
    call = dict(num_tokens=[16, 8, 16], mat_dim=[48, 24, 36])
    with torch.no_grad():
        final, every = model.forward_intermediates(x, **call)
        assert torch.equal(final, model.forward_features(x, **call))
        assert len(every) == L and torch.equal(every[-1], final)
        assert every[0][1, 8:].abs().max() == 0      # zero past a sample's t
        for indices in (1, 2, [0], [-1], [0, -1], (1,), torch.tensor([0, 2])):
            take, _ = feature_take_indices(L, indices.tolist()
                                           if isinstance(indices, torch.Tensor) else indices)
            got = model.forward_intermediates(x, indices=indices, intermediates_only=True,
                                              **call)
            assert len(got) == len(take)
            for t, g in zip(sorted(take), got):
                assert torch.equal(g, every[t]), (indices, t)
        # stop_early: the same intermediates, the final latents are the last block run's
        f2, early = model.forward_intermediates(x, indices=[0], stop_early=True, **call)
        assert torch.equal(early[0], every[0]) and torch.equal(f2, every[0])
        # norm: the write head's input norm on each sample's own latents, zero past t
        normed = model.forward_intermediates(x, indices=[1], norm=True, intermediates_only=True,
                                             **call)[0]
        for b, t in enumerate(call["num_tokens"]):
            torch.testing.assert_close(normed[b, :t], model.write_head.src_norm(every[1][b, :t]))
            assert normed[b, t:].abs().max() == 0 if t < normed.shape[1] else True
        d = model.forward_intermediates(x, indices=2, output_dict=True, **call)
        assert set(d) == {"image_intermediates", "image_features"}
        assert torch.equal(d["image_features"], final)
        # depth: indices count among the blocks run
        d2 = model.forward_intermediates(x, depth=2, intermediates_only=True)
        assert len(d2) == 2
        assert torch.equal(d2[-1], model.forward_features(x, depth=2))
    with pytest.raises(ValueError, match="output_fmt='NCHW' is not allowed"):
        model.forward_intermediates(x, output_fmt="NCHW")
    with pytest.raises(ValueError, match=r"indices=\[3\] holds 3, out of range"):
        model.forward_intermediates(x, indices=[3])
    with pytest.raises(ValueError, match="indices=4 is out of range"):
        model.forward_intermediates(x, indices=4)
    with pytest.raises(ValueError, match="depth=.* one int for the whole batch"):
        model.forward_intermediates(x, depth=[1, 2, 3])


@pytest.mark.parametrize("num_blocks", [1, 3, 7])
def test_take_indices_matches_timm(num_blocks):
    """Our indices rule is timm's feature_take_indices (sorted; ours adds clear errors)."""
    cases = [None, 1, num_blocks, [0], [-1], list(range(num_blocks)), [-num_blocks, 0]]
    for indices in cases:
        want, want_max = feature_take_indices(num_blocks, indices)
        got, got_max = take_indices(num_blocks, indices)
        assert got == sorted(set(want)) and got_max == want_max, indices
    for bad in (0, num_blocks + 1, [num_blocks], [-num_blocks - 1]):
        with pytest.raises(ValueError, match="indices="):
            take_indices(num_blocks, bad)
    with pytest.raises(TypeError, match="indices="):
        take_indices(num_blocks, "all")


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("batch_size", [1])
@pytest.mark.parametrize("feature_cls", [None, "getter"])
def test_model_forward_intermediates_features(model_name, batch_size, feature_cls):
    kw = {} if feature_cls is None else dict(feature_cls=feature_cls)
    model = create(model_name, features_only=True, **kw).eval()
    assert isinstance(model, FeatureGetterNet)
    expected_channels = model.feature_info.channels()
    input_size = get_input_size(model, TARGET_FFEAT_SIZE)
    outputs = model(torch.randn((batch_size, *input_size)))
    assert len(expected_channels) == len(outputs) == 3       # out_indices default: last 3
    for e, o in zip(expected_channels, outputs):
        assert e == o.shape[-1] and o.shape[0] == batch_size and not torch.isnan(o).any()
    # pruned to the blocks needed, head dropped (timm's FeatureGetterNet prune)
    inner = model.model
    assert len(inner.blocks) == SMALL["depth"] and inner.num_classes == 0
    sel = create(model_name, features_only=True, out_indices=[0]).eval()
    assert len(sel.model.blocks) == 1 and len(sel(torch.randn(1, *input_size))) == 1
    with pytest.raises(ValueError, match="feature_cls='hook' is not allowed"):
        create(model_name, features_only=True, feature_cls="hook")


@pytest.mark.parametrize("model_name", MODELS)
def test_run_config_through_every_entry_point(model_name):
    """(t, w, l) as constructor kwargs and per call, per sample, through forward,
    forward_features, forward_head and forward_intermediates: the base model's results."""
    model = randomize_(create(model_name, num_tokens=8, mat_dim=36, exit_depth=2)).eval()
    base = adaperceiver.AdaPerceiverClassifier.forward
    x = torch.randn(3, *get_input_size(model))
    with torch.no_grad():
        want = base(model, x, num_tokens=8, mat_dim=36, depth=2).logits[:, 0]
        assert torch.equal(model(x), want)
        feats = model.forward_features(x)
        assert feats.shape == (3, 8, 48) and torch.equal(model.forward_head(feats), want)
        assert len(model.forward_intermediates(x, intermediates_only=True)) == 2
        mixed = dict(num_tokens=[16, 8, 12], mat_dim=[48, 24, 36], depth=[3, 1, 2])
        want = base(model, x, **mixed).logits[:, 0]
        assert torch.equal(model(x, **mixed), want)
        feats = model.forward_features(x, **mixed)
        torch.testing.assert_close(model.forward_head(feats, num_tokens=mixed["num_tokens"]),
                                   want, rtol=1e-4, atol=1e-5)
        one = base(model, x[1:2], num_tokens=8, mat_dim=24, depth=1).logits[:, 0]
        torch.testing.assert_close(model(x, **mixed)[1:2], one, rtol=1e-4, atol=1e-5)
    for kw, match in ((dict(exit_depth=9), "model kwarg exit_depth: depth=9 is out of range"),
                      (dict(num_tokens=[8, 16]), "num_tokens=.* per-sample values"),
                      (dict(mat_dim=0), "model kwarg mat_dim")):
        with pytest.raises(ValueError, match=match):
            create(model_name, **kw)
    with pytest.raises(ValueError, match=r"num_tokens=\[4, 8\] is not allowed for latents"):
        model.forward_head(torch.randn(3, 8, 48), num_tokens=[4, 8])
    # per-sample latents read without their token counts would read the zero padding
    with pytest.raises(ValueError, match=r"latents of samples \[1, 2\] end in all-zero rows"):
        model.forward_head(feats)


@pytest.mark.parametrize("model_name", MODELS)
def test_timm_data_config_and_optimizer_factory(model_name):
    """resolve_data_config follows the model built; layer decay and no_weight_decay work through
    timm's optimizer factory (group_matcher: stem, one group per block, head)."""
    model = create(model_name, in_chans=1)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (1, 32, 32) and cfg["interpolation"] == "bicubic"
    opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05,
                                         layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) == SMALL["depth"] + 2          # stem, blocks, head
    named = dict(model.named_parameters())
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in named.values()}
    no_wd = {id(named[n]) for n in model.no_weight_decay()}
    for g in opt.param_groups:
        if any(id(p) in no_wd for p in g["params"]):
            assert g["weight_decay"] == 0.0


@pytest.mark.parametrize("model_name", MODELS)
def test_torchscript_and_fx_refused_compile_and_export_work(model_name):
    """timm's torchscript / fx tests: refused with the reason and the alternatives, and the
    alternatives named (torch.export, torch.compile with fullgraph) give the eager result."""
    model = randomize_(create(model_name, num_tokens=8)).eval()
    with pytest.raises(RuntimeError, match=r"TorchScript \(torch.jit.script\).*torch.compile"
                                           r".*torch.export"):
        torch.jit.script(model)
    with pytest.raises(RuntimeError, match=r"torch.fx.*torch.compile.*torch.export"):
        torch.fx.symbolic_trace(model)
    fe = pytest.importorskip("torchvision.models.feature_extraction")
    with pytest.raises(RuntimeError, match="torch.fx"):
        fe.create_feature_extractor(model, return_nodes=["blocks.0"])
    x = torch.randn(2, *get_input_size(model))
    program = torch.export.export(model, (x,))
    # the custom ops are in the graph (traced through their fake kernels), not decomposed away
    ops = {str(n.target) for n in program.graph.nodes if "adaperceiver" in str(n.target)}
    assert {"adaperceiver.block_masked_attention.default",
            "adaperceiver.matryoshka_ffn.default"} <= ops, ops
    exported = program.module()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(exported(x), want)
        torch.testing.assert_close(compiled(x), want)


# timm's own functions, unchanged, when its test file is at hand (it is not in timm's wheel):
# TIMM_TEST_MODELS=<pytorch-image-models>/tests/test_models.py. They build the released config
# (144M parameters), hence slow. Run in a subprocess: importing that file changes TorchScript's
# global executor settings. test_model_default_cfgs (the patch-grid variant) and the
# TorchScript / FX / NCHW-intermediates tests do not apply (see the module docstring).
TIMM_OWN = ["test_model_forward", "test_model_backward", "test_model_default_cfgs_non_std"]
_RUN_TIMM_OWN = """
import importlib.util, sys
import adaperceiver.timm
spec = importlib.util.spec_from_file_location("timm_test_models", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
with adaperceiver.use_backend("reference"):
    getattr(mod, sys.argv[2])(sys.argv[3], int(sys.argv[4]))
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("fn", TIMM_OWN)
def test_timm_own_test_function(model_name, fn):
    import os
    import subprocess
    import sys
    path = os.environ.get("TIMM_TEST_MODELS")
    if not path:
        pytest.skip("set TIMM_TEST_MODELS=<pytorch-image-models>/tests/test_models.py to run "
                    "timm's own test functions on our models")
    batch = 2 if fn == "test_model_backward" else 1
    res = subprocess.run([sys.executable, "-c", _RUN_TIMM_OWN, path, fn, model_name, str(batch)],
                         capture_output=True, text=True, timeout=900,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-4000:]


@pytest.mark.parametrize("model_name", MODELS)
def test_grad_checkpointing_in_every_block_loop(model_name):
    """set_grad_checkpointing covers the once-for-all readouts (training) and
    forward_intermediates too: the same gradients, with mixed per-sample widths."""
    model = randomize_(create(model_name)).train()
    x = torch.randn(3, *get_input_size(model))
    mat = [24, 48, 36]

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def readouts():
        outs = model.forward_readouts(x, exits=[2, 3], token_counts=[8, 16], mat_dim=mat)
        return sum(lg.square().mean() for lg, _ in outs.values())

    def intermediates():
        return sum(t.square().mean() for t in model.forward_intermediates(
            x, indices=[0, 2], intermediates_only=True, mat_dim=mat, num_tokens=[8, 16, 16]))

    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    for fn in (readouts, intermediates):
        model.set_grad_checkpointing(False)
        calls.clear()
        want = grads(fn)
        plain = len(calls)
        model.set_grad_checkpointing(True)
        calls.clear()
        got = grads(fn)
        assert len(calls) == 2 * plain       # block 0 ran again in the backward: checkpointed
        assert got.keys() == want.keys() and len(got) > 0
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("model_name", MODELS)
def test_set_input_size(model_name):
    """timm's set_input_size: the stored position embedding resampled to the new size, as the
    model resamples it for inputs of that size, so outputs there do not change; the data
    config follows."""
    model = randomize_(create(model_name)).eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        want = model(x)
        model.set_input_size(img_size=48)
        assert model.patch_embed.pos_embed.shape == (1, 9, 48)
        assert torch.equal(model(x), want)
    assert model.config.img_size == 48
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 48, 48)
    assert model.patch_embed.pos_embed.requires_grad
    for kw, match in ((dict(img_size=40), "img_size=40 is not allowed"),
                      (dict(img_size=(32, 48)), r"img_size=\(32, 48\) is not allowed"),
                      (dict(patch_size=8), "patch_size=8 is not allowed")):
        with pytest.raises(ValueError, match=match):
            model.set_input_size(**kw)
