"""Dense heads on the distilled backbone (adaperceiver.dense): shapes at several (t, w, l), the
per-patch features against the backbone's own forward, the heads against a hand computation,
metrics against hand-computed values, head training on every CPU backend, save / load, errors,
and the encoder-FLOPs counts against analytic formulas."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import adaperceiver
from adaperceiver.dense import (AdaPerceiverDepth, AdaPerceiverSegmenter, DepthLoss,
                                DepthMetrics, MeanIoU, SegmentationLoss, confusion_matrix,
                                depth_metrics, load_dense, mean_iou, train_dense_head)
from adaperceiver.dense.heads import READOUT_MODULES, SegmentationHead, bin_centers
from adaperceiver.dense.train import silog_loss

from helpers import randomize_, hard_exit

TINY = dict(depth=2, embed_dim=64, num_heads=2, mask_token_grans=[8, 16], max_latent_tokens=16,
            img_size=56, patch_size=14, mat_dims=[32, 64], output_feat_dim=48, num_classes=10)
# (t, w, l): full, narrow/shallow, t above max_latent_tokens (RoPE scaling), per-sample lists
CONFIGS = [(None, None, None), (8, 32, 1), (32, 64, 2), ([8, 16], [32, 64], [1, 2])]


def tiny_backbone():
    return randomize_(adaperceiver.create_model("adaperceiver_v1", **TINY)).eval()


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    torch.manual_seed(1234)
    path = tmp_path_factory.mktemp("backbone")
    tiny_backbone().save_pretrained(path)
    return path


def cpu_backends():
    out = ["reference"]
    if adaperceiver.build_info().get("cpp_compiled"):
        out.append("cpp")
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models run on one thread: with other jobs on the machine, OpenMP's spin-waiting
    makes each small op of a 2-thread run up to 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------- models
@pytest.mark.parametrize("cfg", CONFIGS, ids=["full", "t8-w32-l1", "t32-ropescaled", "mixed"])
def test_shapes_at_several_configs(backbone_dir, cfg):
    seg = AdaPerceiverSegmenter(7, backbone_dir)
    dep = AdaPerceiverDepth(backbone_dir, min_depth=0.5, max_depth=8.0)
    x = torch.randn(2, 3, 56, 70)     # non-square: a 4 x 5 patch grid
    with torch.no_grad():
        logits = seg(x, *cfg)
        d = dep(x, *cfg)
    assert logits.shape == (2, 7, 56, 70) and torch.isfinite(logits).all()
    assert d.shape == (2, 1, 56, 70) and torch.isfinite(d).all()
    assert d.min() >= 0.5 and d.max() <= 8.0
    assert logits.std() > 0 and d.std() > 0


def test_features_equal_the_distilled_backbone(backbone_dir):
    """The dense model's features are AdaPerceiverDistill(...)(x, t, w, l).features of the same
    checkpoint, on the (h, w) grid in row-major patch order."""
    seg = AdaPerceiverSegmenter(5, backbone_dir)
    ref = adaperceiver.from_pretrained(backbone_dir).eval()
    assert isinstance(ref, adaperceiver.AdaPerceiverDistill)
    x = torch.randn(3, 3, 56, 42)
    for t, w, l in [(16, 64, 2), (8, 32, 1), (32, 64, 2), ([4, 8, 16], 32, [2, 1, 2])]:
        with torch.no_grad():
            out = ref(x, num_tokens=t, mat_dim=w, depth=l)
            feats = seg.patch_features(x, t, w, l)
            grid = seg.feature_map(x, t, w, l)
        torch.testing.assert_close(feats, out.features, rtol=0, atol=0)
        assert grid.shape == (3, 48, 4, 3)
        torch.testing.assert_close(grid[1, :, 2, 1], out.features[1, 2 * 3 + 1], rtol=0, atol=0)
    tok = AdaPerceiverSegmenter(5, backbone_dir, feature="patch_tokens")
    with torch.no_grad():
        torch.testing.assert_close(tok.patch_features(x, 8, 32, 1),
                                   ref(x, num_tokens=8, mat_dim=32, depth=1).patch_tokens,
                                   rtol=0, atol=0)
    assert tok.head.conv.in_channels == 64


def test_heads_equal_a_hand_computation(backbone_dir):
    """The authors' heads: seg = LayerNorm -> (dropout) -> 1x1 conv -> bilinear; depth = x4
    bilinear -> (dropout) -> 3x3 conv -> relu + 0.1 normalised -> linear bins -> bilinear."""
    seg = AdaPerceiverSegmenter(5, backbone_dir).eval()
    dep = AdaPerceiverDepth(backbone_dir, min_depth=1.0, max_depth=5.0, n_bins=16).eval()
    for m in (seg, dep):
        randomize_(m.head)
    x = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        f = seg.patch_features(x, 16, 64, 2)                     # (B, P, D), P = 3 * 4
        ln = F.layer_norm(f, (48,), seg.head.norm.weight, seg.head.norm.bias, eps=1e-6)
        lg = ln @ seg.head.conv.weight[:, :, 0, 0].T + seg.head.conv.bias   # (B, P, K)
        lg = lg.transpose(1, 2).reshape(2, 5, 3, 4)
        expect = F.interpolate(lg, size=(42, 56), mode="bilinear", align_corners=False)
        torch.testing.assert_close(seg(x, 16, 64, 2), expect, rtol=1e-5, atol=1e-5)

        grid = f.transpose(1, 2).reshape(2, 48, 3, 4)            # no LayerNorm in the depth head
        up = F.interpolate(grid, size=(12, 16), mode="bilinear", align_corners=False)
        pad = F.pad(up, (1, 1, 1, 1))
        wgt = dep.head.conv.weight                               # (16, 48, 3, 3)
        score = dep.head.conv.bias.view(1, 16, 1, 1).expand(2, 16, 12, 16).clone()
        for di in range(3):
            for dj in range(3):
                score += torch.einsum("bchw,kc->bkhw", pad[:, :, di:di + 12, dj:dj + 16],
                                      wgt[:, :, di, dj])
        wts = score.clamp_min(0) + 0.1
        p = wts / wts.sum(1, keepdim=True)
        centers = torch.tensor([1.0 + 4.0 * k / 15 for k in range(16)])
        dmap = (p * centers.view(1, 16, 1, 1)).sum(1, keepdim=True)
        assert dep.head.bin_probs(grid).shape == (2, 16, 12, 16)
        expect = F.interpolate(dmap, size=(42, 56), mode="bilinear", align_corners=False)
        torch.testing.assert_close(dep(x, 16, 64, 2), expect, rtol=1e-5, atol=1e-5)
        # flip test-time augmentation: mean with the mirrored prediction of the mirrored image
        flipped = dep(x.flip(-1), 16, 64, 2).flip(-1)
        torch.testing.assert_close(dep.predict(x, 16, 64, 2), (expect + flipped) / 2,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dep.predict(x, [16, 8], 64, [2, 1], flip=False),
                                   dep(x, [16, 8], 64, [2, 1]), rtol=0, atol=0)
        mixed = dep.predict(x, [16, 8], 64, [2, 1])
        torch.testing.assert_close(mixed[1:], dep.predict(x[1:], 8, 64, 1), rtol=1e-5,
                                   atol=1e-5)
    torch.testing.assert_close(bin_centers(3, 1.0, 100.0, "log"), torch.tensor([1.0, 10., 100.]))


def test_head_dropout_and_init(backbone_dir):
    seg = AdaPerceiverSegmenter(5, backbone_dir)
    assert seg.head_drop == 0.25 and isinstance(seg.head.dropout, torch.nn.Dropout2d)
    dep = AdaPerceiverDepth(backbone_dir)
    assert dep.head_drop == 0.0 and isinstance(dep.head.dropout, torch.nn.Identity)
    assert dep.head.conv.kernel_size == (3, 3) and dep.upsample == 4
    feats = torch.randn(2, 48, 4, 5)
    seg.head.train()
    with torch.no_grad():
        normed = seg.head.norm(feats)
        torch.manual_seed(0)
        out = seg.head(feats)
        # Dropout2d zeroes whole channels and scales the rest by 1 / (1 - p)
        torch.manual_seed(0)
        kept = seg.head.dropout(torch.ones(2, 48, 1, 1))
        expect = F.conv2d(normed * kept, seg.head.conv.weight, seg.head.conv.bias)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(kept.unique(), torch.tensor([0.0, 1 / 0.75]))
    seg.head.eval()
    with torch.no_grad():
        torch.testing.assert_close(seg.head(feats), F.conv2d(
            normed, seg.head.conv.weight, seg.head.conv.bias), rtol=1e-5, atol=1e-5)
    # LeCun normal truncated at 2 std: std 1 / sqrt(fan_in) overall, zero bias
    torch.manual_seed(1)
    w = SegmentationHead(256, 512).conv.weight.detach()
    s = 1 / math.sqrt(256)
    assert abs(float(w.std()) / s - 1) < 0.03 and float(w.abs().max()) <= 2 * s / 0.8796 + 1e-6
    assert float(w.abs().max()) > 1.8 * s
    with pytest.raises(ValueError, match=r"head_drop=1.0 .*\[0, 1\)"):
        AdaPerceiverSegmenter(3, backbone_dir, head_drop=1.0)


def test_save_load_roundtrip(backbone_dir, tmp_path):
    dep = AdaPerceiverDepth(backbone_dir, min_depth=0.1, max_depth=20.0, n_bins=32)
    randomize_(dep.head)
    dep.eval()
    dep.save_pretrained(tmp_path / "d")
    back = load_dense(tmp_path / "d").eval()
    assert isinstance(back, AdaPerceiverDepth) and back.n_bins == 32 and back.max_depth == 20.0
    seg = AdaPerceiverSegmenter(3, backbone_dir, head_drop=0.1)
    seg.save_pretrained(tmp_path / "s")
    assert load_dense(tmp_path / "s").head_drop == 0.1
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(back(x, 8, 32, 2), dep(x, 8, 32, 2), rtol=0, atol=0)


def test_errors(backbone_dir):
    with pytest.raises(ValueError, match=r"num_classes=0 .*allowed: an int >= 1"):
        AdaPerceiverSegmenter(0, backbone_dir)
    with pytest.raises(ValueError, match=r"min_depth=5.0, max_depth=5.0.*0 < min_depth"):
        AdaPerceiverDepth(backbone_dir, min_depth=5.0, max_depth=5.0)
    with pytest.raises(ValueError, match=r"n_bins=1 .*>= 2"):
        AdaPerceiverDepth(backbone_dir, n_bins=1)
    with pytest.raises(ValueError, match=r"feature='cls'.*'features', 'patch_tokens'"):
        AdaPerceiverSegmenter(3, backbone_dir, feature="cls")
    with pytest.raises(ValueError, match=r"output_feat_dim=None"):
        AdaPerceiverSegmenter(3, adaperceiver.create_model(
            "adaperceiver_v1_in1k", **{**TINY, "output_feat_dim": None}))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        AdaPerceiverSegmenter(3, "/nowhere/at/all")
    seg = AdaPerceiverSegmenter(3, backbone_dir)
    with pytest.raises(ValueError, match=r"image size 57x56 .*multiples of patch_size=14"):
        seg(torch.randn(1, 3, 57, 56))
    with pytest.raises(ValueError, match=r"labels have shape \(1, 28, 28\).*\(1, 56, 56\)"):
        SegmentationLoss()(seg, (torch.randn(1, 3, 56, 56), torch.zeros(1, 28, 28).long()), 0)
    with pytest.raises(ValueError, match=r"configs holds \(8, 32\)"):
        SegmentationLoss(configs=[(8, 32)])


# ------------------------------------------------------------------------------- metrics
def test_miou_by_hand():
    # 255 = ignore; class 3 only predicted on an ignored pixel: empty, left out of the mean
    target = torch.tensor([[[0, 0, 1, 255], [1, 2, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1, 3], [1, 2, 0, 0]]])
    conf = confusion_matrix(pred, target, 4)
    expect = torch.zeros(4, 4, dtype=torch.int64)
    expect[0, 0], expect[0, 1], expect[1, 1], expect[2, 2], expect[2, 0] = 1, 1, 2, 1, 1
    assert torch.equal(conf, expect)
    miou, iou = mean_iou(pred, target, 4)
    # class 0: 1 / (2 + 2 - 1); class 1: 2 / (2 + 3 - 2); class 2: 1 / (2 + 1 - 1)
    torch.testing.assert_close(iou[:3], torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=torch.float64))
    assert math.isnan(iou[3])
    assert abs(float(miou) - 0.5) < 1e-12
    # logits give the same; a class only predicted (never true) counts with IoU 0
    logits = torch.rand(1, 4, 2, 4) + 2 * F.one_hot(pred.clamp(max=3), 4).permute(0, 3, 1, 2)
    assert torch.equal(mean_iou(logits, target, 4)[1].nan_to_num(-1), iou.nan_to_num(-1))
    pred2 = pred.clone()
    pred2[0, 0, 0] = 3                  # a true 0 predicted as 3
    miou2, iou2 = mean_iou(pred2, target, 4)
    torch.testing.assert_close(iou2, torch.tensor([0.0, 2 / 3, 1 / 2, 0.0], dtype=torch.float64))
    assert abs(float(miou2) - (2 / 3 + 1 / 2) / 4) < 1e-12
    # no ignore index: the 255 labels are errors
    with pytest.raises(ValueError, match=r"target holds label 255; allowed: 0..3"):
        mean_iou(pred, target, 4, ignore_index=None)
    with pytest.raises(ValueError, match=r"pred holds label 7"):
        mean_iou(torch.full_like(pred, 7), target, 4)
    with pytest.raises(ValueError, match=r"num_classes=0"):
        mean_iou(pred, target, 0)
    everything_ignored = torch.full_like(target, 255)
    assert math.isnan(mean_iou(pred, everything_ignored, 4)[0])


def test_miou_random_against_a_loop():
    K = 5
    target = torch.randint(0, K, (3, 9, 11))
    target[torch.rand(target.shape) < 0.2] = 255
    pred = torch.randint(0, K - 1, (3, 9, 11))        # class 4 never predicted
    ious = []
    t, p = target.flatten().tolist(), pred.flatten().tolist()
    for k in range(K):
        inter = sum(1 for a, b in zip(t, p) if a == k and b == k)
        union = sum(1 for a, b in zip(t, p) if a != 255 and (a == k or b == k))
        ious.append(inter / union if union else float("nan"))
    miou, iou = mean_iou(pred, target, K)
    torch.testing.assert_close(iou, torch.tensor(ious, dtype=torch.float64), equal_nan=True)
    assert abs(float(miou) - sum(v for v in ious if v == v) / sum(v == v for v in ious)) < 1e-12
    acc = MeanIoU(K)
    acc.update(pred[:1], target[:1])
    acc.update(pred[1:], target[1:])
    out = acc.compute()
    torch.testing.assert_close(out["iou"], iou, equal_nan=True)
    valid = [(a, b) for a, b in zip(t, p) if a != 255]
    assert abs(float(out["pixel_acc"]) - sum(a == b for a, b in valid) / len(valid)) < 1e-12
    recalls = [sum(a == b for a, b in valid if a == k) / sum(a == k for a, _ in valid)
               for k in range(K) if any(a == k for a, _ in valid)]
    assert abs(float(out["mean_acc"]) - sum(recalls) / len(recalls)) < 1e-12


def test_depth_metrics_by_hand():
    pred = torch.tensor([[[2.0, 1.0], [4.0, 3.0]],
                         [[1.0, 2.0], [3.0, 6.0]],
                         [[1.0, 1.0], [1.0, 1.0]]]).unsqueeze(1)
    gt = torch.tensor([[[1.0, 1.0], [5.0, 0.0]],           # 0: invalid
                       [[1.0, 2.0], [2.0, float("nan")]],  # nan: invalid
                       [[0.0, 0.0], [-1.0, 0.0]]]).unsqueeze(1)  # no valid pixel: left out
    m = depth_metrics(pred, gt, reduction="image")
    # image 0: errors 1, 0, -1 on gt 1, 1, 5; ratios 2, 1, 1.25
    # image 1: errors 0, 0, 1 on gt 1, 2, 2; ratios 1, 1, 1.5
    expect = {"rmse": (math.sqrt(2 / 3) + math.sqrt(1 / 3)) / 2,
              "abs_rel": ((1 + 0 + 1 / 5) / 3 + (0 + 0 + 1 / 2) / 3) / 2,
              "delta1": (1 / 3 + 2 / 3) / 2, "delta2": (2 / 3 + 1) / 2,
              "delta3": (2 / 3 + 1) / 2}
    for k, v in expect.items():
        assert abs(float(m[k]) - v) < 1e-12, k
    p = depth_metrics(pred, gt)                       # default: pooled pixels (the authors')
    expect_p = {"rmse": math.sqrt(3 / 6), "abs_rel": (1.2 + 0.5) / 6, "delta1": 3 / 6,
                "delta2": 5 / 6, "delta3": 5 / 6}
    for k, v in expect_p.items():
        assert abs(float(p[k]) - v) < 1e-12, k
    # max_depth=4 drops gt 5; a valid mask drops image 1's first pixel
    valid = torch.ones_like(gt, dtype=torch.bool)
    valid[1, 0, 0, 0] = False
    q = depth_metrics(pred, gt, valid=valid, max_depth=4.0, reduction="image")
    assert abs(float(q["rmse"]) - (math.sqrt(1 / 2) + math.sqrt(1 / 2)) / 2) < 1e-12
    assert abs(float(q["abs_rel"]) - (1 / 2 + 1 / 4) / 2) < 1e-12
    assert math.isnan(float(depth_metrics(pred[2:], gt[2:])["rmse"]))
    with pytest.raises(ValueError, match=r"min_depth=3.0 >= max_depth=2.0"):
        depth_metrics(pred, gt, min_depth=3.0, max_depth=2.0)
    with pytest.raises(ValueError, match=r"pred has shape \(3, 1, 2, 2\), target \(3, 2, 2\)"):
        depth_metrics(pred, gt[:, 0])


@pytest.mark.parametrize("reduction", ["image", "pixel"])
def test_depth_metrics_accumulate(reduction):
    pred = torch.rand(5, 1, 6, 7) * 9 + 0.5
    gt = torch.rand(5, 1, 6, 7) * 9 + 0.5
    gt[torch.rand(gt.shape) < 0.3] = 0.0
    whole = depth_metrics(pred, gt, reduction=reduction)
    acc = DepthMetrics(reduction=reduction)
    acc.update(pred[:2], gt[:2])
    acc.update(pred[2:], gt[2:])
    got = acc.compute()
    for k, v in whole.items():
        assert abs(got[k] - float(v)) < 1e-9, k
    # rmse by a plain loop over the valid pixels of image 0
    g0, p0 = gt[0].flatten().tolist(), pred[0].flatten().tolist()
    sq = [(a - b) ** 2 for a, b in zip(p0, g0) if b > 0]
    assert abs(float(depth_metrics(pred[:1], gt[:1])["rmse"]) - math.sqrt(sum(sq) / len(sq))) \
        < 1e-6
    # default reduction pools pixels: the RMSE of all valid pixels of all images
    g, p = gt.flatten().tolist(), pred.flatten().tolist()
    sq = [(a - b) ** 2 for a, b in zip(p, g) if b > 0]
    assert DepthMetrics().reduction == "pixel"
    assert abs(float(depth_metrics(pred, gt)["rmse"]) - math.sqrt(sum(sq) / len(sq))) < 1e-6


# ------------------------------------------------------------------------------- training
TRAIN_CFG = (16, 64, 2)


def _synthetic(model, task: str, n: int = 2):
    """A fixed batch of random images whose targets a head can reach: a randomized copy of the
    model's head (the teacher) applied to the backbone's features at TRAIN_CFG."""
    import copy
    x = torch.randn(n, 3, 56, 56)
    teacher = copy.deepcopy(model).eval()
    randomize_(teacher.head, scale=3.0)
    with torch.no_grad():
        out = teacher(x, *TRAIN_CFG)
    if task == "segmentation":
        y = out.argmax(1)
        y[:, :20, :20] = 255                                     # some ignored pixels
        return {"image": x, "label": y}
    return {"image": x, "depth": out, "valid": torch.rand(n, 1, 56, 56) > 0.1}


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("task", ["segmentation", "depth"])
def test_head_training_lowers_the_loss(backbone_dir, backend, task):
    if backend == "triton" and not os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton on CPU tensors needs its interpreter (TRITON_INTERPRET=1)")
    if backend == "cpp" and "cpp" not in cpu_backends():
        pytest.skip("the C++ extension is not built here")
    # the Triton interpreter takes ~0.5 s per forward of the tiny model: one image, fewer and
    # larger steps, and a looser bound
    steps, lr, n, bound = (8, 0.01, 1, 0.9) if backend == "triton" else (30, 0.02, 2, 0.7)
    model = (AdaPerceiverSegmenter(4, backbone_dir) if task == "segmentation"
             else AdaPerceiverDepth(backbone_dir, min_depth=1.0, max_depth=8.0))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    batch = _synthetic(model, task, n)
    loss_fn = (SegmentationLoss(configs=[TRAIN_CFG]) if task == "segmentation"
               else DepthLoss(configs=[TRAIN_CFG]))
    readout = {n: v.detach().clone() for n, v in model.backbone.named_parameters()
               if n.split(".")[0] in READOUT_MODULES}
    assert readout
    with adaperceiver.use_backend(backend):
        with torch.no_grad():
            start = float(loss_fn(model.eval(), batch, 0)[0])
        logs = train_dense_head(model, [batch], steps, loss_fn, lr=lr)
        assert not model.backbone.training and model.training
        model.eval()
        with torch.no_grad():
            end = float(loss_fn(model, batch, 0)[0])
    assert len(logs) == steps and all(math.isfinite(l["loss"]) for l in logs)
    assert end < bound * start, (start, end, [round(l["loss"], 3) for l in logs])
    # the authors' protocol: head and per-patch readout trained, the trunk frozen
    for n, p in model.backbone.named_parameters():
        assert p.requires_grad == (n in readout), n
    assert all(p.requires_grad for p in model.head.parameters())
    for k, v in model.backbone.state_dict().items():   # (the released q/k/v names of qkv)
        if k.split(".")[0] in READOUT_MODULES:
            continue
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(model.backbone.get_parameter(n), v) for n, v in readout.items())


def test_depth_loss_by_hand():
    """The authors' SigLoss: weight * sqrt(Var(g) + 0.15 mean(g)^2) (biased Var here),
    g = log(pred + 1e-3) - log(target + 1e-3) over 0 < target <= max_depth; warm-up: the mean
    term alone."""
    torch.manual_seed(3)
    pred = torch.rand(2, 1, 5, 6) * 9 + 0.2
    gt = torch.rand(2, 1, 5, 6) * 12
    gt[0, 0, 0, :3] = 0.0
    valid = torch.rand(2, 1, 5, 6) > 0.2
    model = lambda x, num_tokens=None, mat_dim=None, depth=None: pred  # noqa: E731
    batch = {"image": torch.zeros(2, 3, 5, 6), "depth": gt, "valid": valid}
    keep = [(float(p), float(g)) for p, g, v in zip(pred.flatten(), gt.flatten(),
                                                  valid.flatten()) if v and 0 < g <= 10.0]
    g = [math.log(p + 1e-3) - math.log(t + 1e-3) for p, t in keep]
    mean = sum(g) / len(g)
    var = sum((v - mean) ** 2 for v in g) / len(g)
    loss_fn = DepthLoss(weight=2.0, max_depth=10.0, warmup_steps=2)
    warm = float(loss_fn(model, batch, 1)[0])
    full = float(loss_fn(model, batch, 2)[0])
    assert abs(full - 2 * math.sqrt(var + 0.15 * mean ** 2 + 1e-6)) < 1e-5
    assert abs(warm - 2 * math.sqrt(0.15 * mean ** 2 + 1e-6)) < 1e-5
    # silog_loss itself, and no max_depth: every positive target counts
    ok = valid & (gt > 0)
    torch.testing.assert_close(DepthLoss()(model, batch, 0)[0], silog_loss(pred, gt, ok))
    assert not torch.allclose(silog_loss(pred, gt, ok), silog_loss(pred, gt, ok & (gt <= 10)))
    assert DepthLoss().max_depth is None
    with pytest.raises(ValueError, match=r"warmup_steps=-1"):
        DepthLoss(warmup_steps=-1)


def test_default_depth_loss_masks_above_max_depth(backbone_dir):
    from adaperceiver.dense.train import default_loss
    dep = AdaPerceiverDepth(backbone_dir, min_depth=0.5, max_depth=6.0)
    loss_fn = default_loss(dep)
    assert isinstance(loss_fn, DepthLoss) and loss_fn.max_depth == 6.0


def test_loss_configs_cycle(backbone_dir):
    seen = []

    def fake(x, num_tokens=None, mat_dim=None, depth=None):
        seen.append((num_tokens, mat_dim, depth))
        return torch.randn(x.shape[0], 3, *x.shape[-2:])

    loss_fn = SegmentationLoss(configs=[(8, 32, 1), (32, 64, 2)])
    batch = (torch.randn(2, 3, 28, 28), torch.randint(0, 3, (2, 28, 28)))
    for step in range(3):
        loss, logs = loss_fn(fake, batch, step)
        assert loss > 0 and 0 <= logs["pixel_acc"] <= 1
    assert seen == [(8, 32, 1), (32, 64, 2), (8, 32, 1)]
    loss, logs = loss_fn(fake, (batch[0], torch.full((2, 28, 28), 255)), 0)
    assert float(loss) == 0.0 and math.isnan(logs["pixel_acc"])


def test_train_dense_head_saves_and_resumes(backbone_dir, one_thread, tmp_path):
    model = AdaPerceiverSegmenter(4, backbone_dir)
    batch = _synthetic(model, "segmentation")
    with adaperceiver.use_backend("reference"):
        train_dense_head(model, [batch], 2, lr=0.05, configs=[(8, 32, 1)], out_dir=tmp_path)
        back = load_dense(tmp_path)
        for k, v in model.head.state_dict().items():
            assert torch.equal(back.head.state_dict()[k], v)
        logs = train_dense_head(back, [batch], 1, lr=0.05, configs=[(8, 32, 1)],
                                out_dir=tmp_path, resume=True)
    assert len(logs) == 1
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3
    # the saved backbone carries the trained readout; resume restored it
    ref = adaperceiver.from_pretrained(tmp_path / "backbone")
    for name in READOUT_MODULES:
        for k, v in getattr(ref, name).state_dict().items():
            assert torch.equal(getattr(back.backbone, name).state_dict()[k], v), (name, k)
    # resuming into a model built on the original backbone restores the trained readout too
    fresh = AdaPerceiverSegmenter(4, backbone_dir)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.backbone.write_head_feat.parameters(),
                                                     ref.write_head_feat.parameters()))
    with adaperceiver.use_backend("reference"):
        train_dense_head(fresh, [batch], 0, lr=0.05, configs=[(8, 32, 1)], out_dir=tmp_path,
                         resume=True)
    for name in READOUT_MODULES:
        for k, v in getattr(ref, name).state_dict().items():
            assert torch.equal(getattr(fresh.backbone, name).state_dict()[k], v), (name, k)
    # head only: the whole backbone frozen and unchanged
    head_only = AdaPerceiverSegmenter(4, backbone_dir)
    before = {k: v.clone() for k, v in head_only.backbone.state_dict().items()}
    with adaperceiver.use_backend("reference"):
        train_dense_head(head_only, [batch], 2, lr=0.05, configs=[(8, 32, 1)],
                         train_readout=False)
    assert all(not p.requires_grad for p in head_only.backbone.parameters())
    for k, v in head_only.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match=r"steps=-1"):
        train_dense_head(model, [batch], -1)
    with pytest.raises(ValueError, match="batches ran out"):
        train_dense_head(model, iter([batch]), 2)


@hard_exit
def _ddp_worker(rank, world_size, backbone_dir, tmp):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world_size)
    try:
        model = AdaPerceiverSegmenter(4, backbone_dir, head_drop=0.0)   # no random masks
        model.head.load_state_dict(torch.load(f"{tmp}/head0.pt"))
        batch = torch.load(f"{tmp}/batch.pt")
        with adaperceiver.use_backend("reference"):
            train_dense_head(model, [batch], 3, lr=0.02, configs=[TRAIN_CFG])
        if rank == 0:
            torch.save(model.head.state_dict(), f"{tmp}/head_ddp.pt")
            torch.save(model.backbone.write_head_feat.state_dict(), f"{tmp}/write_ddp.pt")
    finally:
        dist.destroy_process_group()


def test_head_training_under_ddp_equals_one_process(backbone_dir, tmp_path):
    """Two gloo processes, each on its half of the global batch, take the same steps as one
    process on the whole batch (the Trainer's DDP path)."""
    import torch.multiprocessing as mp
    model = AdaPerceiverSegmenter(4, backbone_dir, head_drop=0.0)
    randomize_(model.head, scale=0.1)
    torch.save(model.head.state_dict(), tmp_path / "head0.pt")
    batch = _synthetic(model, "segmentation", 4)
    torch.save(batch, tmp_path / "batch.pt")
    with adaperceiver.use_backend("reference"):
        train_dense_head(model, [batch], 3, lr=0.02, configs=[TRAIN_CFG])
    mp.spawn(_ddp_worker, args=(2, str(backbone_dir), str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "head_ddp.pt")
    for k, v in model.head.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5)
    ddp_write = torch.load(tmp_path / "write_ddp.pt")
    # Adam's update of a near-zero gradient amplifies the all-reduce's rounding: looser atol
    init = AdaPerceiverSegmenter(4, backbone_dir).backbone.write_head_feat.state_dict()
    for k, v in model.backbone.write_head_feat.state_dict().items():
        torch.testing.assert_close(ddp_write[k], v, rtol=1e-4, atol=1e-4)
        assert (v - init[k]).abs().max() > 1e-2, k          # the readout was trained
    start = torch.load(tmp_path / "head0.pt")
    assert not torch.equal(start["conv.weight"], ddp["conv.weight"])


# ------------------------------------------------------------------------------- FLOPs
def test_encoder_flops_parts():
    from adaperceiver.dense.flops import ENCODER_PARTS, encoder_flops
    full = adaperceiver.count_flops(adaperceiver.create_model.__globals__["AdaPerceiverConfig"](
        patch_size=14, num_classes=11821, output_feat_dim=1280), 512, 624, 14, img_size=518)
    e = encoder_flops(None, 512, 624, 14, img_size=518)
    assert e.total == sum(full.parts[k] for k in ENCODER_PARTS)
    assert e.total == full.total - full.parts["write_proj"] - full.parts["write_attention"] \
        - full.parts["head"]
    # by hand: P = 37 * 37 patches, C = 832, t = 512, l = 14, FFN hidden int(624 * 2.57)
    P, C, n, l, h, H = 1369, 832, 512, 14, int(624 * 2.57), int(832 * 2.57)
    blocks = l * (8 * n * C * C + 4 * n * n * C + 4 * n * C * h)
    assert e.blocks == blocks
    assert e.readout == 6 * P * C * C + 4 * n * C * C + 4 * P * n * C + 2 * P * C * H \
        + 2 * P * H * 1280
    with pytest.raises(ValueError, match="output_feat_dim=None"):
        encoder_flops(adaperceiver.create_model("adaperceiver_v1_in1k", **{
            **TINY, "output_feat_dim": None}), 8, 32, 1, img_size=56)


def test_vit_flops_and_table():
    pytest.importorskip("timm")
    from adaperceiver.dense.flops import (closest_to_ratio, flops_table, format_table,
                                          vit_encoder_flops)
    f, params = vit_encoder_flops("vit_base_patch14_dinov2", 518)
    N, C = 37 * 37 + 1, 768   # + class token
    by_hand = 2 * 1369 * C * 3 * 14 * 14 + 12 * (24 * N * C * C + 4 * N * N * C)
    assert f == by_hand and 85e6 < params < 88e6
    rows = flops_table([(256, 832, 21)], 518, vits={"ViT-H/14": "vit_huge_patch14_224"})
    ada, vit_h = rows
    assert vit_h["ratio"] == 1.0
    assert 10 < ada["ratio"] < 40                       # the paper's order of magnitude
    assert "ViT-H/14" in format_table(rows)
    best = closest_to_ratio(26.0, tokens=(256,), widths=(832,))
    assert abs(best["ratio"] - 26.0) < 1.0
