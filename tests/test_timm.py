"""timm integration: timm.create_model builds our model, timm's data config and transforms
feed it, and pretrained=True loads the authors' weights by the cfg's hf_hub_id (here from a fake
Hugging Face cache, offline) or a local checkpoint through pretrained_cfg_overlay, adapting the
classifier and the input channels as timm does. timm's generic per-model contract is in
test_timm_contract.py."""
import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

import adaperceiver  # noqa: E402
import adaperceiver.timm  # noqa: E402,F401  (registers the models)
from adaperceiver.timm import AdaPerceiverTimm  # noqa: E402

from helpers import TINY, randomize_  # noqa: E402
from test_hub import fake_cache, no_network, offline  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.usefixtures("reference_backend")


def test_create_model_and_data_config_forward():
    assert "adaperceiver_v1_in1k" in timm.list_models("adaperceiver*")
    model = timm.create_model("adaperceiver_v1_in1k", pretrained=False, num_tokens=32,
                              mat_dim=72, exit_depth=2, **TINY).eval()
    assert isinstance(model, adaperceiver.AdaPerceiverClassifier)
    randomize_(model)
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 64, 64) and cfg["interpolation"] == "bicubic"
    transform = timm.data.create_transform(**cfg)
    from PIL import Image
    image = Image.fromarray(np.random.randint(0, 255, (80, 96, 3), dtype=np.uint8))
    x = transform(image)[None]
    assert x.shape == (1, 3, 64, 64)
    with torch.no_grad():
        got = model(x)
        want = adaperceiver.AdaPerceiverClassifier.forward(model, x, num_tokens=32, mat_dim=72,
                                                           depth=2).logits[:, 0]
    assert got.shape == (1, 17) and torch.equal(got, want)


def test_pretrained_loads_local_files(tmp_path):
    src = randomize_(adaperceiver.create_model(**TINY))
    src.save_pretrained(tmp_path / "ckpt")
    for where in ("ckpt", "ckpt/model.safetensors"):   # a checkpoint directory or its file
        model = timm.create_model("adaperceiver_v1_in1k", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / where)),
                                  **TINY)
        assert isinstance(model, AdaPerceiverTimm)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in src.state_dict().items())
    with pytest.raises(FileNotFoundError, match=r"pretrained_cfg file='.*nowhere' for "
                                                r"'adaperceiver_v1_in1k' does not exist"):
        timm.create_model("adaperceiver_v1_in1k", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "nowhere")), **TINY)
    # weights that do not fit the kwargs: every offending key named (timm alone would load
    # non-strictly once it drops a classifier)
    with pytest.raises(KeyError, match=r"missing keys: \['blocks\.4\..*"):
        timm.create_model("adaperceiver_v1_in1k", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "ckpt")),
                          **{**TINY, "depth": 5, "num_classes": 5})


def test_pretrained_adapts_classes_and_channels_as_timm_does(tmp_path):
    """timm's test_model_load_pretrained: in_chans=1 with num_classes=5, and num_classes=0."""
    src = randomize_(adaperceiver.create_model(**{**TINY, "num_classes": 1000}))
    src.save_pretrained(tmp_path / "ckpt")
    overlay = dict(file=str(tmp_path / "ckpt"))
    kw = {k: v for k, v in TINY.items() if k != "num_classes"}
    conv, head = "patch_embed.embed.proj.weight", "output_adapter.ffn."
    want = src.state_dict()
    model = timm.create_model("adaperceiver_v1_in1k", pretrained=True, in_chans=1,
                              num_classes=5, pretrained_cfg_overlay=overlay, **kw)
    got = model.state_dict()
    assert got[conv].shape == (96, 1, 16, 16) and got[head + "weight"].shape == (5, 96)
    # timm's adapt_input_conv for one channel: the sum over the RGB filters
    torch.testing.assert_close(got[conv], want[conv].sum(1, keepdim=True))
    assert all(torch.equal(got[k], v) for k, v in want.items()
               if k != conv and not k.startswith(head))
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    model = timm.create_model("adaperceiver_v1_in1k", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=overlay, **kw)
    assert not any(k.startswith(head) for k in model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items()
               if not k.startswith(head))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src.forward_head(src.forward_features(x),
                                                              pre_logits=True)[:, 0])


def test_pretrained_at_another_img_size_resamples_the_position_embedding(tmp_path):
    """timm's img_size= with pretrained weights: the model at 96 px gives, for 96 px images, what
    the 64 px source model gives for them (it resamples the same way at run time)."""
    src = randomize_(adaperceiver.create_model(**TINY)).eval()
    src.save_pretrained(tmp_path / "ckpt")
    model = timm.create_model("adaperceiver_v1_in1k", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "ckpt")),
                              **{**TINY, "img_size": 96}).eval()
    assert model.patch_embed.pos_embed.shape == (1, 36, 96)
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 96, 96)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(model(x), src(x).logits[:, 0])
    with pytest.raises(KeyError, match=r"mis-shaped keys: \['patch_embed\.embed\.proj"):
        timm.create_model("adaperceiver_v1_in1k", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "ckpt")),
                          **{**TINY, "patch_size": 32})


def test_pretrained_from_the_hub_id_offline_cache(offline):
    """pretrained=True: the cfg's hf_hub_id (the authors' classifier), read from the Hugging Face
    cache with the network off, gives the weights from_pretrained gives."""
    src = randomize_(adaperceiver.create_model(**TINY))
    fake_cache(offline, adaperceiver.ClassificationAdaPerceiver.REPO_ID, src)
    model = timm.create_model("adaperceiver_v1_in1k", pretrained=True, **TINY).eval()
    ref = adaperceiver.ClassificationAdaPerceiver.from_pretrained(
        adaperceiver.ClassificationAdaPerceiver.REPO_ID)
    assert model.pretrained_cfg["hf_hub_id"] == "pjajal/adaperceiver-v1-in1k-ft"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x).logits[:, 0])
    # cache_dir of timm.create_model is the Hugging Face cache to read
    other = offline.parent / "other_cache"
    fake_cache(other, adaperceiver.ClassificationAdaPerceiver.REPO_ID, src)
    timm.create_model("adaperceiver_v1_in1k", pretrained=True, cache_dir=str(other), **TINY)


def test_pretrained_offline_without_cache_fails_as_from_pretrained(offline):
    with pytest.raises(FileNotFoundError) as ours:
        timm.create_model("adaperceiver_v1_in1k", pretrained=True, **TINY)
    with pytest.raises(FileNotFoundError) as hub:
        adaperceiver.ClassificationAdaPerceiver.from_pretrained(
            adaperceiver.ClassificationAdaPerceiver.REPO_ID)
    assert str(ours.value) == str(hub.value)
    assert "'pjajal/adaperceiver-v1-in1k-ft'" in str(ours.value)
    assert "HF_HUB_OFFLINE=1" in str(ours.value)
