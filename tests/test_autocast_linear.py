"""ops.linear under CPU autocast (operands cast per call, the bf16 oneDNN path) and the float32 ->
bfloat16 conversion it casts with (``to_dtype`` / ``torch.ops.adaperceiver.to_bfloat16``)."""
import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from adaperceiver import _ext, ops

from helpers import flash_rule, tiny_model
from test_ops_linear import _flash_rule, _native, two_threads  # noqa: F401 (fixture)

linear_mod = importlib.import_module("adaperceiver.ops.linear")

pytestmark = pytest.mark.skipif(not _ext.available(),
                                reason=f"adaperceiver._C not loaded: {_ext.load_error()}")


def _bits(t):
    return t.view(torch.int16)


# ----------------------------------------------------------------------------- to_bfloat16
SPECIAL = [0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 1e-45, -1e-45, 1e-40, 1.1754942e-38,
           3.4028235e38, -3.4028235e38, 3.3961776e38,       # the largest floats round to inf
           1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20,   # ties to even, above
           -(1.0 + 2 ** -8), 65504.0, 2 ** -126, 0.1, -7.3]


@pytest.mark.parametrize("n", [1, 15, 16, 17, 40, 100_003])
def test_to_bfloat16_is_tensor_to_bit_for_bit(n):
    """Every length (vector tails, several parallel chunks), exponents across the whole range,
    ties, denormals, inf and NaN: the same bits as Tensor.to."""
    g = torch.Generator().manual_seed(n)
    mant = torch.rand(n, generator=g) + 1.0
    expo = torch.randint(-140, 128, (n,), generator=g).float()
    x = (mant * torch.exp2(expo) * torch.sign(torch.randn(n, generator=g))).float()
    special = torch.tensor(SPECIAL, dtype=torch.float32)
    x[:min(n, len(special))] = special[:min(n, len(special))]
    # raw bit patterns too (NaN payloads, every mantissa tail)
    raw = torch.randint(-2 ** 31, 2 ** 31 - 1, (n,), generator=g, dtype=torch.int64)
    for src in (x, raw.to(torch.int32).view(torch.float32)):
        got = torch.ops.adaperceiver.to_bfloat16(src)
        want = src.to(torch.bfloat16)
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(_bits(got)[~nan], _bits(want)[~nan])
        assert got.shape == src.shape


@pytest.mark.parametrize("cols", [1, 15, 17, 1069])
def test_to_bfloat16_column_slice_bit_for_bit(cols):
    """A column slice (unit column stride, row stride of the full matrix: a Matryoshka width of
    fc2's weight) converts row by row to the same bits as Tensor.to, specials included."""
    g = torch.Generator().manual_seed(cols)
    full = torch.randn(37, 2138, generator=g) * torch.exp2(torch.randint(-60, 60, (37, 1),
                                                                          generator=g).float())
    special = torch.tensor(SPECIAL, dtype=torch.float32)
    full[3, :len(special)] = special
    src = full[:, :cols]
    assert not src.is_contiguous() and src.stride(1) == 1
    got = torch.ops.adaperceiver.to_bfloat16(src)
    want = src.to(torch.bfloat16)
    nan = want.isnan()
    assert got.shape == src.shape and got.is_contiguous()
    assert torch.equal(got.isnan(), nan) and torch.equal(_bits(got)[~nan], _bits(want)[~nan])


# ----------------------------------------------------------------------------- the FFN
ffn_mod = importlib.import_module("adaperceiver.ops.ffn")


@pytest.mark.parametrize("hidden", [[5, 17, 9], [40, 3], [23]])
def test_autocast_ffn_casts_the_units_in_use(monkeypatch, hidden):
    """Under autocast the FFN casts fc1's first max(hidden) rows and fc2's first max(hidden)
    columns only (all of them when a sample is at full width), and gives bit for bit what it
    gives on those units cast by hand, within flash-attn's rule of the float64 reference."""
    from adaperceiver.ops import reference as R
    _native(torch.bfloat16)
    g = torch.Generator().manual_seed(len(hidden))
    B, N, C, H, Cout = len(hidden), 6, 24, 40, 19
    x = torch.randn(B, N, C, generator=g)
    w1, b1 = torch.randn(H, C, generator=g) / 4, torch.randn(H, generator=g)
    w2, b2 = torch.randn(Cout, H, generator=g) / 6, torch.randn(Cout, generator=g)
    cast_shapes = []
    real = linear_mod.to_dtype

    def recording(t, dtype):
        if t is not None and t.dtype != dtype:
            cast_shapes.append(tuple(t.shape))
        return real(t, dtype)

    monkeypatch.setattr(linear_mod, "to_dtype", recording)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.matryoshka_ffn(x, w1, b1, w2, b2, hidden)
    h = max(hidden)
    assert sorted(cast_shapes) == sorted([(B, N, C), (h, C), (h,), (Cout, h), (Cout,)])
    assert out.dtype == torch.bfloat16
    bf = lambda t: t.contiguous().bfloat16()  # noqa: E731
    with torch.inference_mode():
        by_hand = ops.matryoshka_ffn(bf(x), bf(w1[:h]), bf(b1[:h]), bf(w2[:, :h]), bf(b2), hidden)
        plain = R.ffn_forward(*(bf(t) for t in (x, w1, b1, w2, b2)), hidden)
    assert torch.equal(out, by_hand)
    truth = R.ffn_forward(*(t.double() for t in (x, w1, b1, w2, b2)), hidden)
    assert truth.abs().max().item() >= 1.0     # so the helper's floor is 1e-4 * max|truth|
    err, bound = flash_rule(out, plain, truth)
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("bad", ["fc1_bias", "fc2_weight", "x"])
def test_autocast_ffn_errors_name_the_shapes_given(bad):
    """A shape that does not fit raises under autocast as without it, naming the shapes the
    caller gave (the units in use are sliced only when every shape fits)."""
    g = torch.Generator().manual_seed(3)
    t = {"x": torch.randn(2, 3, 8, generator=g), "fc1_weight": torch.randn(10, 8, generator=g),
         "fc1_bias": torch.randn(10, generator=g), "fc2_weight": torch.randn(8, 10, generator=g),
         "fc2_bias": torch.randn(8, generator=g)}
    wrong = {"fc1_bias": (12,), "fc2_weight": (8, 11), "x": (2, 3, 9)}[bad]
    t[bad] = torch.randn(wrong, generator=g)
    messages = []
    for amp in (False, True):
        with pytest.raises(ValueError) as e, \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            ops.matryoshka_ffn(*t.values(), [4, 6])
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    assert f"{bad}{tuple(t[bad].shape)}" in messages[1], messages[1]


def test_autocast_ffn_gradients_reach_the_full_weights():
    """Training under autocast: the gradients of fc1's rows and fc2's columns past the widest
    width are zero (never used), the others those of the float64 reference (bf16 tolerance)."""
    from adaperceiver.ops import reference as R
    g = torch.Generator().manual_seed(7)
    hidden, N, C, H, Cout = [9, 21, 4], 5, 16, 32, 12
    leaves = [torch.randn(len(hidden), N, C, generator=g), torch.randn(H, C, generator=g) / 4,
              torch.randn(H, generator=g), torch.randn(Cout, H, generator=g) / 6,
              torch.randn(Cout, generator=g)]
    leaves = [t.requires_grad_() for t in leaves]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.matryoshka_ffn(*leaves, hidden)
    gout = torch.randn(out.shape, generator=g)
    out.float().backward(gout)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    R.ffn_forward(*ref, hidden).backward(gout.double())
    h = max(hidden)
    assert torch.equal(leaves[1].grad[h:], torch.zeros_like(leaves[1].grad[h:]))
    assert torch.equal(leaves[3].grad[:, h:], torch.zeros_like(leaves[3].grad[:, h:]))
    for got, want in zip(leaves, ref):
        assert got.grad.shape == got.shape and got.grad.dtype == torch.float32
        torch.testing.assert_close(got.grad.double(), want.grad, atol=0.1, rtol=0.05)


def test_to_dtype_shapes_and_fallbacks():
    x = torch.randn(6, 9, 5)[:, 2:7].transpose(0, 2)          # not contiguous
    got = linear_mod.to_dtype(x, torch.bfloat16)
    assert got.shape == x.shape and torch.equal(_bits(got), _bits(x.to(torch.bfloat16)))
    assert linear_mod.to_dtype(None, torch.bfloat16) is None
    y = torch.randn(3).bfloat16()
    assert linear_mod.to_dtype(y, torch.bfloat16) is y
    h = linear_mod.to_dtype(x, torch.float16)
    assert h.dtype == torch.float16 and torch.equal(h, x.half())
    w = torch.randn(4, 4, requires_grad=True)                 # a recorded cast: Tensor.to
    c = linear_mod.to_dtype(w, torch.bfloat16)
    c.float().sum().backward()
    assert w.grad is not None and torch.equal(w.grad, torch.ones(4, 4))
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        torch.ops.adaperceiver.to_bfloat16(torch.randn(3).double())


# ----------------------------------------------------------------------------- autocast
SHAPES = [(3, 37, 40, 19), (1024, 1, 832, 832), (9, 1, 130, 2496)]   # the second: column blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.usefixtures("two_threads")
def test_autocast_projection_is_the_cast_models(dtype, shape):
    """Under autocast a projection gives what the model cast to the dtype gives (bit for bit:
    the same casts, the same GEMM), within flash-attn's rule against float64 as torch's own
    autocast F.linear is, and the same on a second call."""
    _native(dtype)
    B, N, K, n = shape
    x = torch.randn(B, N, K)
    w, b = torch.randn(n, K) / math.sqrt(K), torch.randn(n)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=dtype):
            got = ops.linear(x, w, b)
            plain = F.linear(x, w, b)
        cast = ops.linear(x.to(dtype), w.to(dtype), b.to(dtype))
        with torch.autocast("cpu", dtype=dtype):
            again = ops.linear(x, w, b)
    assert got.dtype == dtype and got.shape == (B, N, n)
    assert torch.equal(_bits(got), _bits(cast)) and torch.equal(_bits(again), _bits(cast))
    _flash_rule(got, plain, x, w, b)


def test_autocast_projection_runs_onednn_and_keeps_autograd(monkeypatch):
    """No gradient recorded: oneDNN on the casts; gradients: F.linear (autocast's own casts),
    and they flow."""
    _native(torch.bfloat16)
    calls = []
    real = linear_mod._onednn_linear
    monkeypatch.setattr(linear_mod, "_onednn_linear",
                        lambda *a: calls.append((a[0].dtype, a[1].dtype)) or real(*a))
    # 300 rows: more than the tile GEMM takes (tests/test_ops_tile_linear.py)
    x, w = torch.randn(300, 24), torch.randn(7, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            ops.linear(x, w)
        assert calls == [(torch.bfloat16, torch.bfloat16)]
        out = ops.linear(x, w)
    out.float().sum().backward()
    assert len(calls) == 1 and out.dtype == torch.bfloat16 and w.grad is not None
    # float64 inputs: autocast's rules (F.linear in float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.linear(x.double(), w.double()).dtype == torch.float64
    assert len(calls) == 1


@pytest.mark.parametrize("amp", [False, True], ids=["bf16", "autocast"])
@pytest.mark.parametrize("rows", [37, 1024])          # one GEMM; column blocks
@pytest.mark.usefixtures("two_threads")
def test_in_place_weight_edits_are_seen(amp, rows):
    """Nothing is kept between calls: an in-place edit of the weight (through ``.data`` too,
    which bumps no version counter) or of the bias between two calls is seen by the second."""
    _native(torch.bfloat16)
    lin = torch.nn.Linear(832, 832)
    if not amp:
        lin = lin.to(torch.bfloat16)
    x = torch.randn(rows, 832).to(lin.weight.dtype)

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return ops.linear(x, lin.weight, lin.bias)

    def fresh():
        with torch.inference_mode():
            return ops.linear(x.bfloat16(), lin.weight.detach().bfloat16().clone(),
                              lin.bias.detach().bfloat16().clone())

    first = run()
    assert torch.equal(first, fresh())
    lin.weight.data[:, :400].mul_(-3.0)                 # through .data: no version bump
    second = run()
    assert not torch.equal(second, first) and torch.equal(second, fresh())
    with torch.no_grad():
        lin.weight.add_(0.5)
        lin.bias.mul_(2.0)
    third = run()
    assert not torch.equal(third, second) and torch.equal(third, fresh())


def test_autocast_model_within_the_rule(monkeypatch):
    """The whole model under autocast with ops.linear casting for itself and the norms written
    in the matmuls' dtype, against the same with every projection on torch's autocast F.linear
    and every norm float32, both against the float64 model."""
    _native(torch.bfloat16)
    torch.manual_seed(0)
    model = tiny_model().eval()
    x = torch.randn(3, 3, 64, 64)
    kw = dict(num_tokens=[70, 33, 50], mat_dim=[48, 96, 61], depth=[4, 1, 3])

    def logits():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, **kw).logits

    ours = logits()
    monkeypatch.setattr(linear_mod, "_autocast_dtype", lambda *a: None)
    monkeypatch.setattr(ops, "matmul_input_dtype", lambda x: None)   # norms in float32
    plain = logits()
    with torch.inference_mode():
        truth = copy.deepcopy(model).double()(x.double(), **kw).logits
    err, err_plain = ((t.double() - truth).abs().max().item() for t in (ours, plain))
    assert err <= 2 * err_plain + 1e-4 * truth.abs().max().item(), (err, err_plain)


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "autocast"])
def test_autocast_norms_are_written_in_the_matmul_dtype(monkeypatch, amp):
    """Under autocast every norm that only feeds matmuls (each block's norm1 and norm2, the read
    and write heads' norms) comes out in bfloat16, the dtype its matmuls cast it to, while the
    residual stream stays float32; without autocast all are float32. A second run gives the
    same logits (nothing kept between calls)."""
    _native(torch.bfloat16)
    torch.manual_seed(1)
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    seen, streams = [], []
    for name, mod in model.named_modules():
        if name.endswith(("norm1", "snk_norm", "src_norm")):
            mod.register_forward_hook(lambda m, a, out, name=name: seen.append((name, out.dtype)))
    real = ops.residual_layer_norm

    def spy(x, *args):
        r, h = real(x, *args)
        streams.append(r.dtype)
        seen.append(("norm2", h.dtype))
        return r, h
    monkeypatch.setattr(ops, "residual_layer_norm", spy)

    def logits():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return model(x, num_tokens=[40, 24], mat_dim=[96, 48], depth=[3, 2]).logits

    first = logits()
    want = torch.bfloat16 if amp else torch.float32
    names = {n.rsplit(".", 1)[-1] for n, _ in seen}
    assert names == {"norm1", "norm2", "snk_norm", "src_norm"}, names
    assert all(d == want for _, d in seen), seen
    assert streams and all(d == torch.float32 for d in streams)
    assert torch.equal(logits(), first)
