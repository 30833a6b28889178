"""The drop-in hub classes: ClassificationAdaPerceiver / DistillAdaPerceiver.from_pretrained load
local snapshot folders and repository ids from a (fake) Hugging Face cache with the network off,
give outputs identical to the saved model, and fail clearly for what they cannot load."""
import json
import os
import socket

import pytest
import torch

import adaperceiver
from adaperceiver import ClassificationAdaPerceiver, DistillAdaPerceiver
from adaperceiver.hub import hf_cache_dir, resolve_pretrained
from helpers import randomize_

SMALL = dict(depth=2, embed_dim=64, num_heads=2, mask_token_grans=[8, 16], max_latent_tokens=16,
             img_size=32, patch_size=16, mat_dims=[32, 64])
SMALL_DISTILL = dict(SMALL, patch_size=8, num_classes=11, output_feat_dim=24)

# the constructor keywords of the authors' hub ClassificationAdaPerceiver (its config.json)
REFERENCE_KEYS = {
    "embed_dim", "num_heads", "depth", "max_latent_tokens", "rope_theta", "ffn_ratio", "qkv_bias",
    "proj_bias", "ls_init_values", "proj_drop", "attn_drop", "drop_path", "head_drop",
    "act_layer", "norm_layer", "ffn_layer", "attn_layer", "process_token_init", "block_mask",
    "mask_token_grans", "mat_dims", "img_size", "in_channels", "patch_size", "num_classes",
    "use_embed_ffn", "use_output_ffn"}
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection or name lookup fails."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def offline(monkeypatch, no_network, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "hf_home" / "hub"


def small_classifier():
    return randomize_(adaperceiver.create_model("adaperceiver_v1_in1k", **SMALL)).eval()


def small_distill():
    return randomize_(adaperceiver.create_model("adaperceiver_v1", **SMALL_DISTILL)).eval()


def fake_cache(cache: os.PathLike, repo_id: str, model, ref="main", sha=SHA) -> str:
    """Lay ``model`` out as huggingface_hub caches a repository download."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", sha)
    model.save_pretrained(snapshot)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", ref), "w") as f:
        f.write(sha)
    return snapshot


def assert_same_outputs(a, b, img_size, **call):
    x = torch.randn(3, 3, img_size, img_size)
    with torch.no_grad():
        oa, ob = a(x, **call), b(x, **call)
    assert torch.equal(oa.logits, ob.logits)
    if oa.features is not None or ob.features is not None:
        assert torch.equal(oa.features, ob.features)


def test_local_snapshot_folder_loads_offline_with_identical_outputs(tmp_path, offline):
    model = small_classifier()
    folder = tmp_path / "adaperceiver-v1-in1k-ft"
    model.save_pretrained(folder)
    loaded = ClassificationAdaPerceiver.from_pretrained(folder)
    assert type(loaded) is ClassificationAdaPerceiver
    assert isinstance(loaded, adaperceiver.AdaPerceiverClassifier)
    assert not loaded.training
    assert_same_outputs(model, loaded, 32)
    assert_same_outputs(model, loaded, 32, num_tokens=8, mat_dim=32, depth=1)
    loaded2 = ClassificationAdaPerceiver.from_pretrained(str(folder / "model.safetensors"))
    assert_same_outputs(model, loaded2, 32, num_tokens=16)


def test_repo_id_loads_from_the_local_cache_offline(offline):
    model = small_classifier()
    fake_cache(offline, ClassificationAdaPerceiver.REPO_ID, model)
    assert hf_cache_dir() == str(offline)
    loaded = ClassificationAdaPerceiver.from_pretrained("pjajal/adaperceiver-v1-in1k-ft")
    assert_same_outputs(model, loaded, 32)
    # a commit hash selects that snapshot; an explicit cache_dir overrides the environment
    loaded = ClassificationAdaPerceiver.from_pretrained(
        ClassificationAdaPerceiver.REPO_ID, revision=SHA, cache_dir=offline)
    assert_same_outputs(model, loaded, 32)


def test_hf_hub_cache_variable_and_named_revision(monkeypatch, no_network, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    old, new = small_classifier(), small_classifier()
    fake_cache(tmp_path / "cache", "pjajal/adaperceiver-v1-in1k-ft", old, ref="main", sha="a" * 40)
    fake_cache(tmp_path / "cache", "pjajal/adaperceiver-v1-in1k-ft", new, ref="v2", sha="b" * 40)
    assert_same_outputs(old, ClassificationAdaPerceiver.from_pretrained(
        "pjajal/adaperceiver-v1-in1k-ft"), 32)
    assert_same_outputs(new, ClassificationAdaPerceiver.from_pretrained(
        "pjajal/adaperceiver-v1-in1k-ft", revision="v2"), 32)


def test_unknown_repo_offline_names_the_id_and_the_setting(offline):
    with pytest.raises(FileNotFoundError) as info:
        ClassificationAdaPerceiver.from_pretrained("nobody/not-a-model")
    msg = str(info.value)
    assert "'nobody/not-a-model'" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "local snapshot folder" in msg and str(offline) in msg


def test_local_files_only_names_the_setting(monkeypatch, no_network, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(FileNotFoundError, match=r"'x/y'.*local_files_only=True"):
        ClassificationAdaPerceiver.from_pretrained("x/y", local_files_only=True,
                                                   cache_dir=tmp_path)


def test_network_error_online_is_clear(monkeypatch, no_network, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    with pytest.raises(ConnectionError) as info:
        resolve_pretrained("pjajal/adaperceiver-v1-in1k-ft", cache_dir=tmp_path)
    msg = str(info.value)
    assert "'pjajal/adaperceiver-v1-in1k-ft'" in msg and "HF_HUB_OFFLINE is not set" in msg


def test_not_a_path_nor_a_repo_id(offline, tmp_path):
    bad = str(tmp_path / "missing" / "dir")
    with pytest.raises(FileNotFoundError, match="neither an existing local path nor"):
        ClassificationAdaPerceiver.from_pretrained(bad)
    with pytest.raises(TypeError, match="repo_id_or_path=3"):
        ClassificationAdaPerceiver.from_pretrained(3)


def test_distill_round_trip_features_equal(tmp_path, offline):
    model = small_distill()
    fake_cache(offline, DistillAdaPerceiver.REPO_ID, model)
    loaded = DistillAdaPerceiver.from_pretrained("pjajal/adaperceiver-v1")
    assert type(loaded) is DistillAdaPerceiver
    assert isinstance(loaded, adaperceiver.AdaPerceiverDistill)
    assert_same_outputs(model, loaded, 32)
    assert_same_outputs(model, loaded, 32, num_tokens=8, mat_dim=32, depth=2)
    # and back out through save_pretrained of the drop-in class
    loaded.save_pretrained(tmp_path / "again")
    assert_same_outputs(model, DistillAdaPerceiver.from_pretrained(tmp_path / "again"), 32)


def test_wrong_class_for_the_checkpoint_errors(tmp_path, offline):
    small_distill().save_pretrained(tmp_path / "distill")
    small_classifier().save_pretrained(tmp_path / "cls")
    with pytest.raises(ValueError, match=r"distilled backbone.*output_feat_dim=24.*"
                                         r"DistillAdaPerceiver\.from_pretrained"):
        ClassificationAdaPerceiver.from_pretrained(tmp_path / "distill")
    with pytest.raises(ValueError, match=r"a classifier.*ClassificationAdaPerceiver"):
        DistillAdaPerceiver.from_pretrained(tmp_path / "cls")


def test_save_pretrained_writes_the_reference_format(tmp_path, offline):
    model = small_classifier()
    model.save_pretrained(tmp_path / "a")
    loaded = ClassificationAdaPerceiver.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    assert sorted(os.listdir(tmp_path / "b")) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert set(cfg) == REFERENCE_KEYS
    assert cfg == json.loads((tmp_path / "a" / "config.json").read_text())
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" /
                                                                      "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    small_distill().save_pretrained(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert set(cfg) == REFERENCE_KEYS | {"output_feat_dim"} and cfg["output_feat_dim"] == 24


def test_config_overrides_and_strict_weights(tmp_path, offline):
    model = small_classifier()
    model.save_pretrained(tmp_path / "m")
    loaded = ClassificationAdaPerceiver.from_pretrained(tmp_path / "m", block_mask="causal",
                                                        map_location="cpu")
    assert loaded.config.block_mask == "causal"
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(loaded(x).logits, model(x).logits)   # the override took effect
    with pytest.raises(ValueError, match="drop_path=0.1 is not supported"):
        ClassificationAdaPerceiver.from_pretrained(tmp_path / "m", drop_path=0.1)
    with pytest.raises(KeyError, match=r"missing keys: \['blocks\.2\."):
        ClassificationAdaPerceiver.from_pretrained(tmp_path / "m", depth=3)
    with pytest.raises(TypeError, match="unknown config keys"):
        ClassificationAdaPerceiver.from_pretrained(tmp_path / "m", bogus=1)


def test_create_model_pretrained_true_reads_the_authors_repo_offline(offline):
    """adaperceiver.create_model(name, pretrained=True): the authors' checkpoint of that name
    (registry.HUB_IDS) from the Hugging Face cache, as from_pretrained loads it."""
    from adaperceiver.registry import HUB_IDS
    assert HUB_IDS == {"adaperceiver_v1_in1k": ClassificationAdaPerceiver.REPO_ID,
                       "adaperceiver_v1": DistillAdaPerceiver.REPO_ID}
    cls, dist = small_classifier(), small_distill()
    fake_cache(offline, ClassificationAdaPerceiver.REPO_ID, cls)
    fake_cache(offline, DistillAdaPerceiver.REPO_ID, dist)
    got = adaperceiver.create_model("adaperceiver_v1_in1k", pretrained=True).eval()
    assert type(got) is adaperceiver.AdaPerceiverClassifier
    assert_same_outputs(cls, got, 32, num_tokens=8)
    got = adaperceiver.create_model("adaperceiver_v1", pretrained=True).eval()
    assert type(got) is adaperceiver.AdaPerceiverDistill
    assert_same_outputs(dist, got, 32)
    # a repository id works as pretrained= too; config overrides still apply
    got = adaperceiver.create_model("adaperceiver_v1_in1k",
                                    pretrained=ClassificationAdaPerceiver.REPO_ID,
                                    block_mask="causal")
    assert got.config.block_mask == "causal"


def test_create_model_pretrained_true_offline_miss_is_from_pretrained_error(offline):
    with pytest.raises(FileNotFoundError) as ours:
        adaperceiver.create_model("adaperceiver_v1", pretrained=True)
    with pytest.raises(FileNotFoundError) as hub:
        DistillAdaPerceiver.from_pretrained(DistillAdaPerceiver.REPO_ID)
    assert str(ours.value) == str(hub.value) and "'pjajal/adaperceiver-v1'" in str(ours.value)
    with pytest.raises(TypeError, match=r"pretrained=3 is not allowed"):
        adaperceiver.create_model("adaperceiver_v1", pretrained=3)


@pytest.mark.parametrize("num_classes", [5, 0])
def test_reset_classifier_round_trips_through_save_pretrained(tmp_path, offline, num_classes):
    """reset_classifier changes config.num_classes with the head, so the saved checkpoint
    describes it (0: no classifier keys, the head returns the written-out token)."""
    model = small_classifier()
    model.reset_classifier(num_classes)
    randomize_(model)
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["num_classes"] == num_classes
    loaded = adaperceiver.from_pretrained(tmp_path / "m")
    assert loaded.num_classes == num_classes
    assert any(k.startswith("output_adapter.") for k in loaded.state_dict()) == bool(num_classes)
    assert_same_outputs(model, loaded, 32, num_tokens=8)
    out = loaded(torch.randn(2, 3, 32, 32)).logits
    assert out.shape == (2, 1, num_classes or 64)
