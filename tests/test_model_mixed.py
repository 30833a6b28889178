"""Batches where every sample has its own (t, w, l), per-sample exit, torch.compile."""
import random

import pytest
import torch

import adaperceiver
from adaperceiver.ops import dispatch
from adaperceiver.ops.inputs import AttentionInputs

from helpers import tiny_model

GRANS = [32, 64, 96, 128, 192, 256]


def _backends():
    out = [pytest.param("reference")]
    q = torch.randn(1, 1, 4, 32)
    why = dispatch._why_not("cpp", "attention", AttentionInputs.build(q, q, q))
    out.append(pytest.param("cpp", marks=pytest.mark.skipif(bool(why), reason="; ".join(why))))
    return out


def _random_configs(model, B, rng, any_tokens=True):
    cfg = model.config
    t = [rng.choice(GRANS + ([rng.randint(1, 256)] if any_tokens else [])) for _ in range(B)]
    w = [rng.choice(cfg.mat_dims + [rng.randint(1, cfg.embed_dim)]) for _ in range(B)]
    l = [rng.randint(1, cfg.depth) for _ in range(B)]
    return t, w, l


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# token counts: any in 1..256 (the FFN takes one row per group, gcd 1 most draws) or mask grans
# only (multiples of 32: groups of 32 rows or more)
@pytest.mark.parametrize("any_tokens", [True, False], ids=["any_t", "gran_t"])
@pytest.mark.parametrize("backend", _backends())
def test_mixed_batch_equals_each_sample_alone(backend, any_tokens):
    rng = random.Random(torch.initial_seed())
    model = tiny_model().eval()
    B = 7
    x = torch.randn(B, 3, 64, 64)
    t, w, l = _random_configs(model, B, rng, any_tokens)
    t[0], l[1] = 256, model.config.depth           # the largest of each axis is present
    with adaperceiver.use_backend(backend), torch.no_grad():
        out = model(x, num_tokens=torch.tensor(t), mat_dim=w, depth=torch.tensor(l))
        feats = model.forward_features(x, num_tokens=t, mat_dim=w, depth=l)
        assert out.depths.tolist() == l and out.exit_depth == max(l)
        for b in range(B):
            alone = model(x[b:b + 1], num_tokens=t[b], mat_dim=w[b], depth=l[b])
            assert _rel(out.logits[b], alone.logits[0]) <= 1e-5, (b, t[b], w[b], l[b])
            assert _rel(feats[b, :t[b]], alone.latents[0]) <= 1e-5
            assert feats[b, t[b]:].abs().max() == 0 if t[b] < 256 else True


def test_ffn_rows_go_in_whole_sample_groups():
    """Layout.ffn_input: rows of ragged samples in groups of gcd(t_b) rows, each group with its
    sample's width, in the packed order; one row per group when the gcd is 1."""
    from adaperceiver.model.ragged import Layout
    packed = torch.randn(96 + 128 + 64, 5)
    lay = Layout.build([96, 128, 64], [7, 3, 5], "cpu")
    h, hidden = lay.ffn_input(packed)
    assert h.shape == (9, 32, 5) and hidden == [7] * 3 + [3] * 4 + [5] * 2
    assert torch.equal(h.reshape(-1, 5), packed)
    lay = Layout.build([3, 2], [4, 6], "cpu")
    h, hidden = lay.ffn_input(packed[:5])
    assert h.shape == (5, 1, 5) and hidden == [4, 4, 4, 6, 6]


def test_mixed_batch_is_not_the_padded_batch():
    """Control: giving every sample the batch's largest (t, w, l) changes the result, so the
    comparison above can fail."""
    model = tiny_model().eval()
    x = torch.randn(3, 3, 64, 64)
    with adaperceiver.use_backend("reference"), torch.no_grad():
        mixed = model(x, num_tokens=[32, 256, 64], mat_dim=[48, 96, 72], depth=[1, 4, 2]).logits
        padded = model(x, num_tokens=256, mat_dim=96, depth=4).logits
    assert _rel(mixed[0], padded[0]) > 1e-3 and _rel(mixed[1], padded[1]) <= 1e-5


def test_per_sample_exit_equals_each_sample_at_its_confidence_depth():
    model = tiny_model().eval()
    B = 6
    x = torch.randn(B, 3, 64, 64)
    with adaperceiver.use_backend("reference"), torch.no_grad():
        per_depth = [model(x, num_tokens=64, depth=d).logits for d in range(1, 5)]
        conf = torch.stack([p.softmax(-1).amax(-1)[:, 0] for p in per_depth])   # (L, B)
        # a threshold among the depth-1 confidences: some samples leave at depth 1, others
        # later, whatever the random weights
        tau = conf[0].median().item()
        out = model(x, num_tokens=64, depth_tau=tau, exit="sample")
        for b in range(B):
            hit = (conf[:, b] >= tau).nonzero()
            d = int(hit[0]) + 1 if len(hit) else 4
            assert out.depths[b].item() == d
            assert _rel(out.logits[b], per_depth[d - 1][b]) <= 1e-5
        assert len(set(out.depths.tolist())) > 1     # the samples really left at different depths
        batch = model(x, num_tokens=64, depth_tau=tau, exit="batch")
        assert len(set(batch.depths.tolist())) == 1


def test_fixed_exit_depths_read_out_once(monkeypatch):
    """Samples leaving at different fixed depths are written out in one readout after the
    block loop, each from the latents it left with (its first t_b of them), not one readout
    per exit layer; confidence exit still reads out at every layer."""
    model = tiny_model().eval()
    x = torch.randn(5, 3, 64, 64)
    t, l = [64, 256, 96, 64, 160], [2, 4, 1, 4, 3]
    calls = []
    readout = model.readout
    monkeypatch.setattr(model, "readout", lambda lat, *a, **k: (calls.append(lat.shape),
                                                                readout(lat, *a, **k))[1])
    with adaperceiver.use_backend("reference"), torch.no_grad():
        out = model(x, num_tokens=t, depth=l)
        assert calls == [(5, 256, model.config.embed_dim)], calls
        for d in sorted(set(l)):     # each exit layer's samples read out on their own
            idx = [b for b in range(5) if l[b] == d]
            n = max(t[b] for b in idx)
            seq = torch.tensor([t[b] for b in idx], dtype=torch.int32)
            alone = readout(out.latents[idx, :n], seq_lens=seq)
            assert _rel(out.logits[idx], alone) <= 1e-5, d
        calls.clear()
        model(x, num_tokens=64, depth_tau=1.0, exit="sample")   # no sample is ever sure
        assert len(calls) == model.config.depth, calls


def test_mixed_arguments_errors():
    model = tiny_model()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match=r"num_tokens has 3 entries but the batch has 2"):
        model(x, num_tokens=[32, 64, 96])
    with pytest.raises(ValueError, match=r"depth=9 is out of range; allowed: an int in 1\.\.4"):
        model(x, depth=[1, 9])
    with pytest.raises(ValueError, match=r"num_tokens=\[300, 64\] .*max_latent_tokens=256"):
        model(x, num_tokens=[300, 64])
    with pytest.raises(ValueError, match=r"exit='layer' .*'batch'.*'sample'"):
        model(x, depth_tau=0.5, exit="layer")


@pytest.mark.parametrize("backend", _backends())
def test_torch_compile_matches_eager_without_graph_breaks(backend):
    model = tiny_model(depth=2).eval()
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    with adaperceiver.use_backend(backend), torch.no_grad():
        eager = model(x, num_tokens=64, mat_dim=[48, 96]).logits
        compiled = torch.compile(model, fullgraph=True)      # fullgraph: a break is an error
        got = compiled(x, num_tokens=64, mat_dim=[48, 96]).logits
    assert _rel(got, eager) <= 1e-5
