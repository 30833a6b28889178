"""Training (issue #8): the once-for-all objective from one forward equals separate runs, a step
on every backend equals the reference's, 2-process gloo DDP equals 1 process, resume is exact,
distillation losses and fine-tune freezing."""
import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

import adaperceiver
from adaperceiver.ops import dispatch
from adaperceiver.ops.inputs import AttentionInputs
from adaperceiver.train import (OnceForAll, Trainer, depth_weights, feature_loss, freeze_backbone,
                                kd_loss)

from helpers import randomize_, hard_exit

SMALL = dict(embed_dim=64, num_heads=2, depth=3, img_size=32, patch_size=8, num_classes=7,
             mask_token_grans=[4, 8, 12], max_latent_tokens=12, mat_dims=[16, 32, 64])


def small(name="adaperceiver_v1_in1k", **kw):
    return randomize_(adaperceiver.create_model(name, **{**SMALL, **kw}))


def batch(n=6, classes=7):
    return torch.randn(n, 3, 32, 32), torch.randint(0, classes, (n,))


def _backend(name):
    q = torch.randn(1, 1, 4, 32)
    why = dispatch._why_not(name, "attention", AttentionInputs.build(q, q, q))
    return pytest.param(name, marks=pytest.mark.skipif(bool(why), reason="; ".join(why)))


def test_readouts_equal_separate_runs():
    model = small("adaperceiver_v1", output_feat_dim=20)
    x, _ = batch()
    widths = torch.tensor([16, 64, 32, 20, 64, 16])
    with torch.no_grad():
        outs = model.forward_readouts(x, [1, 3], mat_dim=widths, features=True)
        assert sorted(outs) == [(l, g) for l in (1, 3) for g in (4, 8, 12)]
        for (l, g), (logits, feats) in outs.items():
            alone = model(x, num_tokens=g, depth=l, mat_dim=widths)
            torch.testing.assert_close(logits, alone.logits, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(feats, alone.features, rtol=1e-5, atol=1e-6)


def test_readouts_reject_token_counts_off_the_grans():
    model = small()
    with pytest.raises(ValueError, match="token_counts"):
        model.forward_readouts(batch()[0], [2], token_counts=[5, 12])
    with pytest.raises(ValueError, match="exits"):
        model.forward_readouts(batch()[0], [4])


def test_token_and_depth_loss_equal_separate_runs():
    """The loss from one forward equals the depth-weighted mean over exits of the mean over
    granularities of separate runs' cross entropy at (g, w_b, l)."""
    model = small()
    x, y = batch()
    obj = OnceForAll(model.config, num_exits=1, seed=3)
    prepared = obj.prepare((x, y), step=5)
    widths = prepared[2]
    assert set(widths.tolist()) <= {16, 32, 64}
    loss, _ = obj(model, prepared, 5)
    exits = obj.exits(5)
    assert exits[-1] == 3 and len(exits) == 2
    want = 0.0
    for l, wl in depth_weights(exits, 3).items():
        per = [F.cross_entropy(model(x, num_tokens=g, depth=l, mat_dim=widths).logits[:, 0], y)
               for g in (4, 8, 12)]
        want = want + wl * sum(per) / len(per)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    w = depth_weights([1, 3], 3)
    assert w[1] == pytest.approx(0.25) and w[3] == pytest.approx(0.75)


def test_widths_and_exits_depend_on_step_not_on_batch_split():
    model = small()
    obj = OnceForAll(model.config, num_exits=2, seed=1)
    x, y = batch(8)
    a = obj.prepare((x, y), 4)[2]
    assert torch.equal(a, obj.prepare((x, y), 4)[2])
    assert len({tuple(obj.prepare((x, y), s)[2].tolist()) for s in range(6)}) > 1
    assert obj.exits(2) == obj.exits(2) and all(1 <= e <= 3 for e in obj.exits(2))


def _grads_of_step(model, backend, prepared):
    model.zero_grad(set_to_none=True)
    obj = OnceForAll(model.config, num_exits=1, seed=0)
    with adaperceiver.use_backend(backend):
        loss, _ = obj(model, prepared, 0)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("backend", [_backend("cpp"), _backend("triton")])
def test_training_step_on_backend_equals_reference(backend):
    """Loss and gradients of one once-for-all step (mixed widths, a tail width) within 1e-4
    relative of the reference backend's, the reference run in float64 (exact for this
    purpose). All gradients together (global norm) must be within 1e-4; each parameter's
    within 1e-4 or, where float32 itself cannot get that close (q/k gradients of a peaky
    attention reach ~1e-4 on the float32 reference too), within 3x the float32 reference's
    own error."""
    model = small()
    x, y = batch(4)
    widths = torch.tensor([16, 64, 32, 20])
    ref_loss, ref = _grads_of_step(copy.deepcopy(model).double(), "reference",
                                   (x.double(), y, widths))
    _, ref32 = _grads_of_step(model, "reference", (x, y, widths))
    loss, got = _grads_of_step(model, backend, (x, y, widths))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=0)
    assert set(got) == set(ref) and len(ref) > 20
    rel = lambda g, n: float((g[n].double() - ref[n]).norm() / ref[n].norm().clamp_min(1e-30))  # noqa: E731
    names = [n for n in ref if not n.endswith("k.bias")]
    flat = lambda g: torch.cat([g[n].double().flatten() for n in names])  # noqa: E731
    total = float((flat(got) - flat(ref)).norm() / flat(ref).norm())
    assert total < 1e-4, f"{backend}: gradients differ by {total:.2e} (relative global norm)"
    for n in names:
        err, floor = rel(got, n), rel(ref32, n)
        assert err < max(1e-4, 3 * floor), (f"{backend}: gradient of {n} differs by {err:.2e} "
                                             f"(float32 reference: {floor:.2e})")
    scale = max(float(g.abs().max()) for g in ref.values())
    for n in ref:
        if n.endswith("k.bias"):
            # exactly zero in exact arithmetic (a shift of every key leaves each softmax row
            # unchanged): float32 gives rounding noise, so compare to the gradient scale
            assert float((got[n].double() - ref[n]).abs().max()) < 1e-5 * scale, n


def _trainer(model, seed=0, **kw):
    obj = OnceForAll(model.config, num_exits=1, seed=seed)
    return Trainer(model, obj, prepare=obj.prepare, lr=1e-3, warmup_steps=2, total_steps=10,
                   **kw)


def _sgd(model):
    # SGD for the DDP comparison: AdamW maps rounding-level gradient differences (the
    # all-reduce sums in another order) of near-zero gradients to lr-sized steps
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def test_resume_gives_the_same_next_loss(tmp_path):
    torch.manual_seed(0)
    data = [batch(4) for _ in range(4)]
    model = small()
    tr = _trainer(model)
    for b in data[:2]:
        tr.step(b)
    tr.save(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "model.safetensors",
                                                   "trainer_state.pt"]
    torch.manual_seed(123)                       # resume must restore the RNG state too
    want = [tr.step(b)["loss"] for b in data[2:]]
    fresh = small()                              # different weights: all come from the save
    tr2 = Trainer.resume(tmp_path / "ck", fresh, tr.loss_fn, prepare=tr.prepare, lr=1e-3,
                         warmup_steps=2, total_steps=10)
    assert tr2.step_count == 2
    got = [tr2.step(b)["loss"] for b in data[2:]]
    assert got == want
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    loaded = adaperceiver.from_pretrained(tmp_path / "ck")     # the released format
    assert loaded.config == model.config


@hard_exit
def _ddp_worker(rank, world, init_file, out_file, steps):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        model = small()
        tr = _trainer(model, optimizer=_sgd(model))
        g = torch.Generator().manual_seed(5)
        losses = []
        for _ in range(steps):
            losses.append(tr.step((torch.randn(8, 3, 32, 32, generator=g),
                                   torch.randint(0, 7, (8,), generator=g)))["loss"])
        if rank == 0:
            torch.save({"losses": losses, "state": model.state_dict()}, out_file)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_ddp_equals_one_process(tmp_path):
    import torch.multiprocessing as mp
    steps = 3
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp.pt"), steps),
             nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt")
    torch.manual_seed(0)
    model = small()
    tr = _trainer(model, optimizer=_sgd(model))
    g = torch.Generator().manual_seed(5)
    losses = [tr.step((torch.randn(8, 3, 32, 32, generator=g),
                       torch.randint(0, 7, (8,), generator=g)))["loss"] for _ in range(steps)]
    assert losses == pytest.approx(ddp["losses"], rel=1e-5)
    moved = 0.0
    for n, p in model.state_dict().items():
        torch.testing.assert_close(ddp["state"][n], p, rtol=1e-4, atol=1e-6, msg=n)
        moved = max(moved, float((p - small().state_dict()[n]).abs().max()))
    assert moved > 0


def test_kd_and_feature_losses_by_hand():
    s, t = torch.randn(5, 11), torch.randn(5, 11)
    ps, pt = s.softmax(-1), t.softmax(-1)
    want = (pt * (pt.log() - ps.log())).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t), want, rtol=1e-5, atol=1e-7)
    assert float(kd_loss(s, s)) == pytest.approx(0.0, abs=1e-6)
    a, b = torch.randn(2, 9, 6), torch.randn(2, 9, 6)
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    d = (a - b).abs()
    sl1 = torch.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()
    torch.testing.assert_close(feature_loss(a, b), 0.9 * (1 - cos.mean()) + 0.1 * sl1)
    with pytest.raises(ValueError, match="output_feat_dim"):
        feature_loss(a, b[..., :5])


def test_distillation_from_a_timm_teacher_trains_the_feature_heads():
    timm = pytest.importorskip("timm")
    teacher = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=24, depth=1, num_heads=2, num_classes=7).eval()
    model = small("adaperceiver_v1", output_feat_dim=24)     # 4x4 patch grid vs teacher 2x2
    obj = OnceForAll(model.config, num_exits=1, teacher=teacher, ce_weight=0.0)
    tr = Trainer(model, obj, prepare=obj.prepare, lr=3e-3)
    x = torch.randn(6, 3, 32, 32)
    first = tr.step((x, None))
    assert first["kd"] > 0 and first["feat"] > 0 and first["ce"] == 0
    assert model.output_adapter_feat.ffn.fc2.weight.grad is not None
    for _ in range(8):
        last = tr.step((x, None))
    assert last["loss"] < first["loss"]


def test_freeze_backbone_trains_only_the_readout():
    model = small()
    names = freeze_backbone(model)
    assert names and all(n.split(".")[0] in ("output_latents", "write_head", "output_adapter")
                         for n in names)
    before = {n: p.clone() for n, p in model.named_parameters()}
    tr = _trainer(model)
    tr.step(batch(4))
    tr.step(batch(4))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in names), n


def test_trainer_errors_name_the_problem():
    model = small()
    with pytest.raises(ValueError, match="num_exits=3"):
        OnceForAll(model.config, num_exits=3)
    with pytest.raises(ValueError, match="mat_dims"):
        OnceForAll(model.config, mat_dims=[0, 16])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        Trainer(model, lambda *a: None)


def test_lr_schedule_warmup_then_cosine():
    model = small()
    tr = _trainer(model)
    f = [tr.lr_factor(s) for s in range(11)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0)
    assert f[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[10] == pytest.approx(0.0, abs=1e-12)


def test_distilled_backbone_has_the_released_key_layout():
    with torch.device("meta"):
        model = adaperceiver.create_model("adaperceiver_v1")
    assert type(model).__name__ == "AdaPerceiverDistill"
    cfg = model.config
    assert (cfg.patch_size, cfg.num_classes, cfg.output_feat_dim) == (14, 11821, 1280)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["patch_embed.pos_embed"] == (1, 256, 832)
    assert shapes["output_latents_feat.proj.weight"] == (832, 832)
    assert shapes["output_adapter_feat.norm.weight"] == (832,)
    assert shapes["output_adapter_feat.ffn.fc1.weight"] == (2138, 832)
    assert shapes["output_adapter_feat.ffn.fc2.weight"] == (1280, 2138)
    assert shapes["output_adapter.ffn.weight"] == (11821, 832)
    for part in ("src_norm.weight", "snk_norm.weight", "cattn.q.weight", "cattn.k.weight",
                 "cattn.v.weight", "cattn.proj.weight"):
        assert shapes[f"write_head_feat.{part}"] == shapes[f"write_head.{part}"]
    # the authors' patch adapter has its LayerNorm only together with the embedding FFN
    with torch.device("meta"):
        bare = adaperceiver.create_model("adaperceiver_v1", use_embed_ffn=False, depth=1)
    assert not any(k.startswith(("patch_embed.norm", "patch_embed.ffn"))
                   for k in bare.state_dict())
