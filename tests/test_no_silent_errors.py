"""Nothing silently wrong: no state kept between calls, mixed or meta devices, the lse output's
gradient, config.json values, and inputs whose errors must name what is wrong.

Each case here once returned a plausible wrong answer or an error that named nothing; the
class of fault is what is tested (every way a weight can change, every config key type, ...).
"""
import json
import math

import pytest
import torch
from helpers import TINY, randomize_, tiny_model

import adaperceiver
from adaperceiver import ops
from adaperceiver.config import AdaPerceiverConfig

X = dict(num_tokens=64, mat_dim=[48, 96], depth=3)


def _logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **{**X, **kw}).logits


def _twin(model):
    """A separately built model with ``model``'s current weights (nothing shared)."""
    twin = adaperceiver.create_model("adaperceiver_v1_in1k", **TINY).eval()
    twin.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    return twin.to(next(model.parameters()).dtype)


# ----------------------------------------------------------------------------- no state
WEIGHT_EDITS = {
    # every way a user or a library changes a weight between two calls (q, k, v are the row
    # thirds of one ``qkv`` Linear; the state dict's q/k/v tensors are views of it)
    "data_inplace": lambda m: m.blocks[0].attn.qkv.weight.data[96:192].mul_(3.0),
    "no_grad_inplace": lambda m: m.read_head.cattn.qkv.bias[192:].add_(0.3),
    "set_data": lambda m: setattr(m.blocks[1].attn.qkv.weight, "data",
                                  torch.randn_like(m.blocks[1].attn.qkv.weight)),
    "load_state_dict": lambda m: m.load_state_dict(randomize_(tiny_model()).state_dict()),
    "released_k_only": lambda m: m.load_state_dict(
        {"blocks.2.attn.k.weight": torch.randn(96, 96) * 0.1}, strict=False),
    "state_dict_view": lambda m: m.state_dict()["blocks.1.attn.v.weight"].mul_(-2.0),
    "requires_grad_": lambda m: (m.requires_grad_(False),
                                 m.blocks[0].attn.qkv.weight.data[192:].mul_(-1.0)),
    "parametrization": lambda m: torch.nn.utils.parametrize.register_parametrization(
        m.blocks[0].attn.qkv, "weight", _Scale(2.0)),
}


class _Scale(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, w):
        return w * self.s


@pytest.mark.parametrize("edit", list(WEIGHT_EDITS))
def test_a_weight_change_is_seen_by_the_next_call(edit):
    """The same inputs give what a freshly built model with the current weights gives, whatever
    ran before (a kept copy of the weights would return the old logits)."""
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    before = _logits(model, x)
    with torch.no_grad():
        WEIGHT_EDITS[edit](model)
    after = _logits(model, x)
    if edit == "parametrization":
        with torch.no_grad():
            torch.nn.utils.parametrize.remove_parametrizations(model.blocks[0].attn.qkv, "weight")
    want = _logits(_twin(model), x)
    assert (after - before).abs().max() > 1e-6, "the edit changed nothing: a useless case"
    torch.testing.assert_close(after, want, rtol=0, atol=0)


def test_dtype_and_inference_mode_moves_are_seen():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    _logits(model, x)
    model.to(torch.bfloat16)
    got = _logits(model, x.bfloat16())
    want = _logits(_twin(model), x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    model.float()
    with torch.inference_mode():
        a = model(x, **X).logits
    with torch.no_grad():
        b = model(x, **X).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("how", ["built", "loaded"])
def test_a_model_made_under_inference_mode_runs(tmp_path, how):
    x = torch.randn(2, 3, 64, 64)
    src = tiny_model().eval()
    if how == "loaded":
        adaperceiver.save_pretrained(src, tmp_path)
    with torch.inference_mode():
        if how == "built":
            torch.manual_seed(0)
            model = randomize_(adaperceiver.create_model("adaperceiver_v1_in1k", **TINY)).eval()
        else:
            model = adaperceiver.from_pretrained(tmp_path).eval()
        got = model(x, **X).logits
    want = _logits(_twin(model) if how == "built" else src, x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_model_keeps_no_tensor_that_is_not_a_parameter_or_buffer():
    """What a forward leaves behind on the modules: nothing (no cache to go stale or to cost
    memory)."""
    model = tiny_model().eval()
    known = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    _logits(model, torch.randn(2, 3, 64, 64))
    for name, mod in model.named_modules():
        for attr, value in vars(mod).items():
            if attr in ("_parameters", "_buffers", "_modules"):
                continue
            vals = value if isinstance(value, (list, tuple)) else (value,)
            for v in vals:
                assert not (isinstance(v, torch.Tensor) and id(v) not in known), \
                    f"{name}.{attr} keeps a tensor between calls"


# ----------------------------------------------------------------------------- q, k, v
# Attention holds q, k and v as one ``qkv`` Linear; the state dict keeps the released names.
ATTENTIONS = ("blocks.1.attn", "read_head.cattn", "write_head.cattn")


def _released_layout(model) -> dict:
    """A state dict in the released layout with fresh values: separate q, k, v tensors, none a
    view of another, no ``qkv`` key."""
    state = {k: torch.randn_like(v) * 0.2 for k, v in model.state_dict().items()}
    assert not any(".qkv." in k for k in state)
    return state


def test_a_checkpoint_in_the_released_layout_loads_and_round_trips(tmp_path):
    from safetensors.torch import save_file
    model = tiny_model()
    state = _released_layout(model)
    d = tmp_path / "released"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(model.config.to_dict()))
    save_file(state, str(d / "model.safetensors"))
    loaded = adaperceiver.from_pretrained(d).eval()
    got = loaded.state_dict()
    assert list(got) == list(model.state_dict())          # the released names, in order
    assert all(torch.equal(got[k], state[k]) for k in state)
    x, C = torch.randn(5, 7, 96), 96
    for name in ATTENTIONS:
        attn = loaded.get_submodule(name)
        want = [torch.nn.functional.linear(x, state[f"{name}.{p}.weight"],
                                           state[f"{name}.{p}.bias"]) for p in "qkv"]
        with torch.no_grad():
            for names, outs in (("qkv", attn._project(x, "qkv")), ("q", attn._project(x, "q")),
                                ("kv", attn._project(x, "kv"))):
                for part, out in zip(names, outs):
                    torch.testing.assert_close(out, want["qkv".index(part)], rtol=1e-5,
                                               atol=1e-5)
        assert tuple(attn.qkv.weight.shape) == (3 * C, C)
    # written back out and read again: the same tensors
    adaperceiver.save_pretrained(loaded, tmp_path / "again")
    again = adaperceiver.from_pretrained(tmp_path / "again").state_dict()
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_a_missing_or_misshaped_part_is_named_by_its_released_key():
    model = tiny_model()
    state = dict(model.state_dict())
    del state["blocks.1.attn.k.bias"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: '
                                           r'"blocks.1.attn.k.bias"') as e:
        model.load_state_dict(state)
    assert "qkv" not in str(e.value)
    state = dict(model.state_dict())
    state["read_head.cattn.v.weight"] = torch.randn(95, 96)
    with pytest.raises(RuntimeError, match=r"size mismatch for read_head.cattn.v.weight"):
        model.load_state_dict(state)
    # strict=False: the parts given load, the others keep their values, missing by name
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    q = torch.randn(96, 96)
    res = model.load_state_dict({"blocks.0.attn.q.weight": q}, strict=False)
    assert "blocks.0.attn.k.weight" in res.missing_keys and not res.unexpected_keys
    assert not any("qkv" in k for k in res.missing_keys)
    w = model.blocks[0].attn.qkv.weight
    assert torch.equal(w[:96], q) and torch.equal(w[96:], before[96:])


def test_the_old_separate_modules_are_gone_with_a_message():
    attn = tiny_model().blocks[0].attn
    with pytest.raises(AttributeError, match=r"no 'k' module: q, k and v are one Linear, "
                                             r"``qkv``, whose rows \[1\*dim, 2\*dim\)"):
        attn.k
    with pytest.raises(AttributeError, match="no_such"):
        attn.no_such


# ----------------------------------------------------------------------------- devices
def _attention_args(B=2, H=2, N=12, D=8):
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    cos, sin = torch.randn(N, D // 2), torch.randn(N, D // 2)
    return q, k, v, (cos, sin)


@pytest.mark.parametrize("which", ["k", "v", "q_rope", "k_rope"])
def test_attention_inputs_on_mixed_devices_raise_naming_the_tensor(which):
    q, k, v, rope = _attention_args()
    args = dict(q=q, k=k, v=v, q_rope=rope, k_rope=rope)
    args[which] = (tuple(t.to("meta") for t in rope) if which.endswith("rope")
                   else args[which].to("meta"))
    with pytest.raises(ValueError, match=rf"{which}.*meta"):
        ops.block_masked_attention(args["q"], args["k"], args["v"], [4, 8, 12],
                                   q_rope=args["q_rope"], k_rope=args["k_rope"])


@pytest.mark.parametrize("which", ["fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"])
def test_ffn_weights_on_another_device_or_dtype_raise_naming_the_tensor(which):
    x = torch.randn(2, 5, 8)
    w = dict(fc1_weight=torch.randn(12, 8), fc1_bias=torch.randn(12),
             fc2_weight=torch.randn(8, 12), fc2_bias=torch.randn(8))
    for bad in (w[which].to("meta"), w[which].double()):
        ws = {**w, which: bad}
        with pytest.raises(ValueError, match=rf"{which} is torch\.\w+ on \w+; x is"):
            ops.matryoshka_ffn(x, ws["fc1_weight"], ws["fc1_bias"], ws["fc2_weight"],
                               ws["fc2_bias"], [6, 12])


def test_all_meta_inputs_give_meta_outputs_of_the_right_shape():
    q, k, v, rope = (t.to("meta") if isinstance(t, torch.Tensor) else
                     tuple(r.to("meta") for r in t) for t in _attention_args(N=12, D=8))
    out = ops.block_masked_attention(q, k, v, [4, 8, 12], q_rope=rope, k_rope=rope,
                                     seq_lens=[12, 7])
    assert out.device.type == "meta" and out.shape == (2, 2, 12, 8)
    packed = ops.block_masked_attention_varlen(*(torch.empty(19, 2, 8, device="meta")
                                                 for _ in range(3)), [12, 7], [4, 8, 12])
    assert packed.device.type == "meta" and packed.shape == (19, 2, 8)
    x = torch.empty(2, 5, 8, device="meta")
    y = ops.matryoshka_ffn(x, torch.empty(12, 8, device="meta"), torch.empty(12, device="meta"),
                           torch.empty(8, 12, device="meta"), torch.empty(8, device="meta"),
                           [6, 12])
    assert y.device.type == "meta" and y.shape == (2, 5, 8)


# ----------------------------------------------------------------------------- lse
def test_lse_of_the_raw_op_is_not_differentiable():
    """The raw op returns (out, lse); lse's gradient is not implemented, so autograd must say
    so (it once returned zeros)."""
    q, k, v, _ = _attention_args()
    q.requires_grad_(True)
    out, lse = torch.ops.adaperceiver.block_masked_attention(q, k, v, [4, 8, 12], 0.3, None,
                                                              None, None, None, None)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(lse.sum(), q)
    (g,) = torch.autograd.grad(out.sum(), q)
    assert g.abs().max() > 0
    qp = torch.randn(19, 2, 8, requires_grad=True)
    out, lse = torch.ops.adaperceiver.block_masked_attention_varlen(
        qp, qp.detach(), qp.detach(), [12, 7], None, 0.3, None, None, None, None)
    assert not lse.requires_grad


# ----------------------------------------------------------------------------- config.json
BAD_CONFIG = [
    ("depth", "21"), ("embed_dim", 832.0), ("num_heads", 0), ("num_heads", -13),
    ("patch_size", 0), ("max_latent_tokens", 0), ("max_latent_tokens", 5000),
    ("rope_theta", -1), ("rope_theta", float("nan")), ("ffn_ratio", "2.57"), ("ffn_ratio", 0),
    ("qkv_bias", "false"), ("proj_bias", 1), ("use_embed_ffn", None), ("num_classes", -1),
    ("img_size", 224.5), ("in_channels", True), ("mat_dims", [416.5]), ("mat_dims", "416"),
    ("mat_dims", []), ("mask_token_grans", ["a"]), ("output_feat_dim", 0),
    ("ls_init_values", "1e-6"), ("attn_layer", 3),
]


@pytest.mark.parametrize("key,value", BAD_CONFIG, ids=[f"{k}={v!r}" for k, v in BAD_CONFIG])
def test_bad_config_values_name_key_value_and_file(tmp_path, key, value):
    src = tiny_model()
    adaperceiver.save_pretrained(src, tmp_path)
    cfg_file = tmp_path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[key] = value
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises((ValueError, TypeError)) as e:
        adaperceiver.from_pretrained(tmp_path)
    msg = str(e.value)
    assert str(cfg_file) in msg and key in msg and "allowed" in msg, msg
    with pytest.raises((ValueError, TypeError), match=key):
        AdaPerceiverConfig(**{key: value})


def test_good_config_values_of_other_json_spellings_still_load():
    cfg = AdaPerceiverConfig(ffn_ratio=3, rope_theta=100, num_classes=0)
    assert cfg.ffn_ratio == 3.0 and isinstance(cfg.ffn_ratio, float) and cfg.num_classes == 0


def test_unreadable_weights_and_config_name_the_file(tmp_path):
    adaperceiver.save_pretrained(tiny_model(), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.* could not be read"):
        adaperceiver.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json.* is not valid JSON"):
        adaperceiver.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- count_flops
BAD_FLOPS_ARGS = [
    (dict(num_tokens=0), "num_tokens=0"), (dict(num_tokens=99999), "num_tokens=99999"),
    (dict(num_tokens=64.5), "num_tokens=64.5"), (dict(depth=0), "depth=0"),
    (dict(mat_dim=0), "mat_dim=0"), (dict(mat_dim=[]), "mat_dim=[]"),
    (dict(mat_dim="416"), "mat_dim='416'"), (dict(img_size=230), "img_size=230"),
    (dict(token_grans=[64, 32]), "token_grans"),
]


@pytest.mark.parametrize("kw,words", BAD_FLOPS_ARGS, ids=[w for _, w in BAD_FLOPS_ARGS])
def test_count_flops_validates_as_forward_does(kw, words):
    with pytest.raises((ValueError, TypeError)) as e:
        adaperceiver.count_flops(AdaPerceiverConfig(), **kw)
    assert words in str(e.value) and "allowed" in str(e.value)


# ----------------------------------------------------------------------------- op arguments
def test_padded_seq_lens_follow_one_rule_lists_and_tensors_alike():
    q, k, v, _ = _attention_args(N=12)
    from adaperceiver.ops import reference as R
    want = R.attention(q, k, v, [4, 8, 12], seq_lens=torch.tensor([12, 5]))
    with adaperceiver.use_backend("reference"):
        for lens in ([12, 5], (12, 5), torch.tensor([12, 5]), torch.tensor([12, 5],
                                                                          dtype=torch.int32)):
            got = ops.block_masked_attention(q, k, v, [4, 8, 12], seq_lens=lens)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    for bad in ([13, 5], [-1, 5], torch.tensor([12, 13]), [12, 5.5], [12, float("nan")],
                ["a", 1]):
        with pytest.raises(ValueError, match=r"seq_lens.* is not allowed; allowed: .* in "
                                             r"0\.\.12"):
            ops.block_masked_attention(q, k, v, [4, 8, 12], seq_lens=bad)
    # cross-attention: one query reads each sample's first seq_lens[b] keys (the model's head)
    out = ops.block_masked_attention(q[:, :, :1], k, v, seq_lens=[12, 5])
    want = R.attention(q[:, :, :1], k, v, seq_lens=torch.tensor([12, 5]))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call,words", [
    (lambda q: ops.block_masked_attention(q, q, q, ["a"]), r"token_grans=\['a'\] holds 'a'"),
    (lambda q: ops.block_masked_attention(q, q, q, 5), r"token_grans=5 is not allowed"),
    (lambda q: ops.block_masked_attention(q, q, q, scale="a"), r"scale='a' is not allowed"),
    (lambda q: ops.block_masked_attention(q[..., :0], q[..., :0], q[..., :0]),
     r"head_dim D=0, Dv=0 is not allowed; allowed: >= 1"),
    (lambda q: ops.matryoshka_ffn(torch.randn(2, 3, 4), torch.randn(6, 4), torch.randn(6),
                                  torch.randn(4, 6), torch.randn(4), 100.5),
     r"hidden=100\.5 is not allowed"),
    (lambda q: ops.matryoshka_ffn(torch.randn(2, 3, 4), torch.randn(6, 4), torch.randn(6),
                                  torch.randn(4, 6), torch.randn(4), "6"),
     r"hidden='6' is not allowed"),
    (lambda q: ops.matryoshka_ffn(torch.randn(2, 3, 4), torch.randn(6, 4), torch.randn(6),
                                  torch.randn(4, 6), torch.randn(4), [3, math.inf]),
     r"hidden=inf is not allowed"),
], ids=["grans-str", "grans-int", "scale-str", "head_dim-0", "hidden-float", "hidden-str",
        "hidden-inf"])
def test_op_messages_name_the_parameter(call, words):
    with pytest.raises((ValueError, TypeError), match=words):
        call(torch.randn(1, 2, 8, 4))


def test_nan_and_inf_scale_are_numbers_that_propagate_on_the_reference():
    q, k, v, _ = _attention_args()
    with adaperceiver.use_backend("reference"):
        assert ops.block_masked_attention(q, k, v, scale=float("nan")).isnan().all()


# ----------------------------------------------------------------------------- bench CLI
def _bench_error(capsys, argv):
    from adaperceiver.bench.__main__ import run
    with pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


SMALL = ["--model-kwargs", "embed_dim=32", "num_heads=2", "depth=2", "mat_dims=[16,32]",
         "mask_token_grans=[8,16]", "max_latent_tokens=16", "img_size=32", "--img-size", "32",
         "--baselines", "none", "--no-progress"]


def test_bench_cli_checks_outputs_and_rounds_before_any_work(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _bench_error(capsys, SMALL + ["--out-dir", str(blocker / "sub")])
    assert "--out-dir" in err and "cannot create directory" in err
    err = _bench_error(capsys, SMALL + ["--results-file", str(blocker / "r.json")])
    assert "--results-file" in err
    err = _bench_error(capsys, SMALL + ["--min-rounds", "10", "--rounds", "2"])
    assert "--min-rounds 10" in err and "--rounds 2" in err and "allowed" in err
    err = _bench_error(capsys, SMALL + ["--configs", "t=5000", "--warmup", "0"])
    assert "t (num_tokens)=5000" in err and "4096" in err
    err = _bench_error(capsys, ["--model-kwargs", "embed_dim=abc", "--baselines", "none"])
    assert "embed_dim='abc' is not allowed; allowed: an int >= 1" in err
