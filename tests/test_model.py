"""The reference model: the structure of docs/design.md ("Data flow"), the prefix property,
widths, depth, no hidden state."""
import pytest
import torch
import torch.nn.functional as F

import adaperceiver
from adaperceiver.ops import block_mask
from adaperceiver.ops.reference import rope_tables

from helpers import tiny_model

pytestmark = pytest.mark.usefixtures("reference_backend")

GRANS = [32, 64, 96, 128, 192, 256]


def _spec_shapes(C=832, P=196, p=16, hid=2138, classes=1000, L=21):
    """The classifier's keys and shapes, written out from docs/design.md's list ("Checkpoint
    format")."""
    s = {
        "process_latents.token": (C,), "output_latents.token": (1, C),
        "patch_embed.pos_embed": (1, P, C), "patch_embed.embed.proj.weight": (C, 3, p, p),
        "patch_embed.embed.proj.bias": (C,), "patch_embed.norm.weight": (C,),
        "patch_embed.norm.bias": (C,), "patch_embed.ffn.fc1.weight": (hid, C),
        "patch_embed.ffn.fc1.bias": (hid,), "patch_embed.ffn.fc2.weight": (C, hid),
        "patch_embed.ffn.fc2.bias": (C,),
        "output_adapter.ffn.weight": (classes, C), "output_adapter.ffn.bias": (classes,),
    }
    for head in ("read_head", "write_head"):
        for n in ("src_norm", "snk_norm"):
            s[f"{head}.{n}.weight"] = s[f"{head}.{n}.bias"] = (C,)
        for n in "qkv":
            s[f"{head}.cattn.{n}.weight"], s[f"{head}.cattn.{n}.bias"] = (C, C), (C,)
        s[f"{head}.cattn.proj.weight"], s[f"{head}.cattn.proj.bias"] = (C, C), (C,)
    for i in range(L):
        b = f"blocks.{i}"
        for n in ("norm1", "norm2"):
            s[f"{b}.{n}.weight"] = s[f"{b}.{n}.bias"] = (C,)
        for n in ("q", "k", "v", "proj"):
            s[f"{b}.attn.{n}.weight"], s[f"{b}.attn.{n}.bias"] = (C, C), (C,)
        s[f"{b}.ls1.gamma"] = s[f"{b}.ls2.gamma"] = (C,)
        s[f"{b}.ffn.fc1.weight"], s[f"{b}.ffn.fc1.bias"] = (hid, C), (hid,)
        s[f"{b}.ffn.fc2.weight"], s[f"{b}.ffn.fc2.bias"] = (C, hid), (C,)
    return s


def test_state_dict_matches_spec(released_model):
    model = released_model
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = _spec_shapes()
    assert sorted(got) == sorted(want)
    assert got == want
    cfg = model.config.to_dict()
    assert cfg["mask_token_grans"] == GRANS and cfg["mat_dims"] == [416, 624, 832]
    assert model.config.ffn_hidden == 2138
    assert [adaperceiver.config.hidden_size(w, 2.57) for w in (416, 624, 832)] == [1069, 1603,
                                                                                    2138]


def test_prefix_property():
    """num_tokens=g gives the first g latents of a 256-token run, at several depths."""
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for depth in (1, 2, 4):
            full = model.forward_features(x, num_tokens=256, depth=depth)
            assert full.abs().max() > 0.1
            for g in GRANS:
                part = model.forward_features(x, num_tokens=g, depth=depth)
                assert part.shape == (2, g, 96)
                assert (part - full[:, :g]).abs().max().item() <= 1e-6, (depth, g)


def test_prefix_property_needs_the_mask():
    """Control: with no mask (attn_layer='full') the prefix property fails, so the test above
    can fail."""
    with pytest.warns(UserWarning, match="prefix property"):
        model = tiny_model(attn_layer="full").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = model.forward_features(x, num_tokens=256, depth=2)
        part = model.forward_features(x, num_tokens=64, depth=2)
    assert (part - full[:, :64]).abs().max().item() > 1e-3


def test_per_sample_widths_equal_single_width_runs():
    model = tiny_model().eval()
    x = torch.randn(4, 3, 64, 64)
    widths = [48, 96, 72, 48]
    with torch.no_grad():
        mixed = model(x, num_tokens=64, mat_dim=widths, depth=3).logits
        mixed_t = model(x, num_tokens=64, mat_dim=torch.tensor(widths), depth=3).logits
        for b, w in enumerate(widths):
            alone = model(x[b:b + 1], num_tokens=64, mat_dim=w, depth=3).logits
            assert (mixed[b:b + 1] - alone).abs().max().item() <= 1e-5
        # widths really change the result (so the comparison above can fail)
        other = model(x[:1], num_tokens=64, mat_dim=96, depth=3).logits
        assert (other - model(x[:1], num_tokens=64, mat_dim=48, depth=3).logits).abs().max() > 1e-3
    assert torch.equal(mixed, mixed_t)
    assert mixed.shape == (4, 1, 17)


def test_no_state_between_calls():
    torch.manual_seed(1)
    model = tiny_model().eval()
    fresh = tiny_model().eval()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x, num_tokens=64, token_grans=[16, 64])
        model(x, num_tokens=64)
        after = model(x, num_tokens=256).logits
        want = fresh(x, num_tokens=256).logits
    assert torch.equal(after, want)


def _manual_run(model, x, n, l, width):
    """Run the pieces by hand: read, exactly l blocks, write, head."""
    cfg = model.config
    call = model.resolve(x, n, width, l)
    rope = rope_tables(n, cfg.head_dim, cfg.rope_theta, cfg.max_latent_tokens)
    lat = model.read(x, n, call.grid, rope)
    for blk in model.blocks[:l]:
        h = blk.norm1(lat)
        lat = lat + blk.ls1(blk.attn(h, h, tuple(GRANS), rope, rope))
        h, f = call.hidden[0], blk.ffn
        act = F.gelu(F.linear(blk.norm2(lat), f.fc1.weight[:h], f.fc1.bias[:h]))
        lat = lat + blk.ls2(F.linear(act, f.fc2.weight[:, :h], f.fc2.bias))
    return model.forward_head(lat, rope), lat


def test_depth_runs_exactly_l_blocks():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = {}
        for l in (1, 3, 4):
            out = model(x, num_tokens=96, mat_dim=72, depth=l)
            want, _ = _manual_run(model, x, 96, l, 72)
            assert out.exit_depth == l
            # the model fuses LayerScale and residual (addcmul): equal up to rounding
            assert (out.logits - want).abs().max() <= 1e-6 * want.abs().max()
            outs[l] = out.logits
        assert (outs[1] - outs[4]).abs().max() > 1e-3


def test_depth_tau_batch_mean_rule():
    model = tiny_model().eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        confs, logits = [], []
        for l in range(1, 5):
            lg = model(x, num_tokens=64, depth=l).logits   # = the manual run (test above)
            logits.append(lg)
            confs.append(lg.softmax(-1).amax(-1).mean().item())
        for tau in sorted(confs) + [max(confs) + 1e-3]:
            tau = min(tau, 1.0)
            want = next((i for i, c in enumerate(confs) if c >= tau), 3)
            out = model(x, num_tokens=64, depth_tau=tau)
            assert out.exit_depth == want + 1, (tau, confs)
            assert (out.logits - logits[want]).abs().max() <= 1e-6 * logits[want].abs().max()


def test_block_mask_modes():
    model = tiny_model(block_mask="causal").eval()
    call = model.resolve(torch.randn(1, 3, 64, 64), 40)
    assert call.grans == tuple(range(1, 41))
    m = block_mask(40, call.grans)
    assert torch.equal(m, torch.ones(40, 40, dtype=torch.bool).tril())
    assert tiny_model(block_mask="none").resolve(torch.randn(1, 3, 64, 64), 40).grans is None


def test_other_image_sizes_resample_pos_embed():
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 80), num_tokens=32, depth=2).logits
    assert out.shape == (2, 1, 17) and torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(num_tokens=0), r"num_tokens=0 .*1\.\.4096"),
    (dict(num_tokens=4097), r"num_tokens=4097 .*1\.\.4096"),
    (dict(mat_dim=0), r"mat_dim=0 .*1\.\.96"),
    (dict(mat_dim=97), r"mat_dim=97 .*1\.\.96"),
    (dict(mat_dim=[48, 96, 72]), r"mat_dim has 3 entries .*2 samples"),
    (dict(mat_dim=[48, 200]), r"mat_dim=200 .*1\.\.96"),
    (dict(depth=0), r"depth=0 .*1\.\.4"),
    (dict(depth=5), r"depth=5 .*1\.\.4"),
    (dict(token_grans=[32, 16]), r"token_grans=\[32, 16\] .*strictly increasing"),
    (dict(token_grans=[0, 16]), r"token_grans=\[0, 16\] .*positive"),
    (dict(depth_tau=1.5), r"depth_tau=1.5 .*\[0, 1\]"),
])
def test_bad_arguments_name_parameter_value_and_allowed(kwargs, pattern):
    model = tiny_model()
    with pytest.raises((ValueError, TypeError), match=pattern):
        model(torch.randn(2, 3, 64, 64), **kwargs)


def test_bad_images():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"image size 64x70 .*multiples of patch_size=16"):
        model(torch.randn(1, 3, 64, 70))
    with pytest.raises(TypeError, match=r"x.dtype=torch.int64 .*float"):
        model(torch.randint(0, 255, (1, 3, 64, 64)))
    with pytest.raises(TypeError, match=r"x.dtype=torch.float64 differs .*torch.float32"):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(1, 4, 64, 64\).*\(B, 3, H, W\)"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"model name 'vit_nope' .*adaperceiver_v1_in1k"):
        adaperceiver.create_model("vit_nope")


def test_config_rejects_unknown_and_unsupported():
    with pytest.raises(TypeError, match=r"unknown config keys \['bogus'\]"):
        adaperceiver.create_model(bogus=1)
    with pytest.raises(ValueError, match=r"block_mask='diagonal' .*'block'"):
        adaperceiver.create_model(block_mask="diagonal")


def test_gradients_flow_through_every_parameter():
    model = tiny_model().train()
    out = model(torch.randn(2, 3, 64, 64), num_tokens=64, mat_dim=[48, 96]).logits
    out.square().sum().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    # blocks past depth get no gradient only when depth < L; here depth = L
    assert dead == []


def test_autocast_runs_the_ops_in_the_autocast_dtype():
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x, num_tokens=64, mat_dim=[48, 96]).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x, num_tokens=64, mat_dim=[48, 96]).logits
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 5e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dim", [None, 40], ids=["C_out", "F_out"])
def test_mlp_is_fc2_gelu_fc1(monkeypatch, dtype, out_dim):
    """The patch embedding's Mlp (C -> H -> C) runs as the FFN op at full width, the feature
    adapter's (C -> H -> F) as two projections; both are fc2(GELU(fc1(x))), in bfloat16 within
    flash-attn's rule of the reference in that dtype against float64."""
    from adaperceiver import ops
    from adaperceiver.model.layers import Mlp
    mlp = Mlp(48, 131, out_dim).to(dtype)
    x = torch.randn(3, 37, 48).to(dtype)
    calls = []
    ffn = ops.matryoshka_ffn
    monkeypatch.setattr(ops, "matryoshka_ffn", lambda *a: (calls.append(a[-1]), ffn(*a))[1])

    def ref(t):
        w = [p.to(t) for p in (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)]
        return F.linear(F.gelu(F.linear(x.to(t), w[0], w[1])), w[2], w[3])
    with torch.no_grad():
        got = mlp(x)
        truth, plain = ref(torch.float64), ref(dtype)
    assert calls == ([131] if out_dim is None else []), calls
    assert got.dtype == dtype and got.shape == (3, 37, out_dim or 48)
    err = (got.double() - truth).abs().max().item()
    ref_err = (plain.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + 1e-5 * truth.abs().max().item(), (err, ref_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hw", [(32, 40), (37, 43)], ids=["whole", "remainder"])
def test_patchify_is_the_convolution(monkeypatch, dtype, hw):
    """The patchify convolution runs on the CPU as one GEMM of the flattened patches
    (``ops.linear``); it is ``conv2d`` with stride = kernel, within flash-attn's rule of the
    convolution in the dtype against float64, with pixels past the last whole patch unread (as
    conv2d), NaN confined to its patch, and under gradients and autocast too."""
    from adaperceiver import ops
    from adaperceiver.model.layers import _Conv
    conv = _Conv(3, 24, 8).to(dtype)
    with torch.no_grad():
        conv.proj.weight.normal_(0, 0.1)
        conv.proj.bias.normal_(0, 0.1)
    x = torch.randn(2, 3, *hw).to(dtype)
    calls = []
    linear = ops.linear
    monkeypatch.setattr(ops, "linear", lambda *a: (calls.append(a[0].shape), linear(*a))[1])

    def ref(t, img):
        y = F.conv2d(img.to(t), conv.proj.weight.to(t), conv.proj.bias.to(t), stride=8)
        return y.flatten(2).transpose(1, 2)
    with torch.no_grad():
        got = conv(x)
        truth, plain = ref(torch.float64, x), ref(dtype, x)
    P = (hw[0] // 8) * (hw[1] // 8)
    assert calls == [(2, P, 3 * 8 * 8)], calls
    assert got.dtype == dtype and got.shape == (2, P, 24)
    err = (got.double() - truth).abs().max().item()
    ref_err = (plain.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + 1e-6 * truth.abs().max().item(), (err, ref_err)
    # a NaN pixel poisons its own patch's outputs only; one past the last patch none
    bad = x.clone()
    bad[1, 2, 9, 17] = float("nan")       # patch (1, 2) of sample 1
    bad[0, 0, -1, -1] = float("nan")      # unread when the size leaves a remainder
    with torch.no_grad():
        y = conv(bad)
    nan_rows = y.isnan().any(-1).nonzero().tolist()
    want = [[1, 1 * (hw[1] // 8) + 2]]
    if hw[0] % 8 == 0 and hw[1] % 8 == 0:
        want = [[0, P - 1]] + want
    assert nan_rows == want, nan_rows
    assert y.isnan().all(-1)[1, want[-1][1]]
    if dtype == torch.float32:
        # gradients and autocast go through the same GEMM
        calls.clear()
        xg = x.clone().requires_grad_()
        conv(xg).square().sum().backward()
        xr = x.clone().requires_grad_()
        ref(torch.float32, xr).square().sum().backward()
        torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-4, atol=1e-5)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert conv(x).dtype == torch.bfloat16
        assert calls == [(2, P, 3 * 8 * 8)] * 2, calls
