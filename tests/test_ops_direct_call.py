"""When the public ops skip their torch.library custom op (ops/_common.py, needs_dispatcher).

A call that records no gradient, runs under no tracing, Python mode or functorch transform and
holds no tensor subclass runs the op's body itself; every other call goes through the custom op
(autograd, torch.compile / torch.export, FlopCounterMode, fake tensors). Both give the same bits.
Each test stands the custom op in by a function that records or refuses its calls."""
import copy
import importlib

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from adaperceiver import ops
from adaperceiver.ops._common import needs_dispatcher
from helpers import device_params

ffn_mod = importlib.import_module("adaperceiver.ops.ffn")
attn_mod = importlib.import_module("adaperceiver.ops.attention")

OPS = ("ffn", "attention", "attention_varlen")


def _inputs(op, device, dtype=torch.float32, requires_grad=False):
    """Fresh random inputs for ``op`` (tails: 37 rows, 19 hidden units, widths off the tiles),
    drawn from the test's seed (conftest)."""

    def r(*shape, s=1.0):
        t = (torch.randn(*shape) * s).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    if op == "ffn":
        return (r(3, 37, 24), r(19, 24, s=0.2), r(19), r(24, 19, s=0.2), r(24)), [19, 7, 12]
    if op == "attention":
        return (r(2, 3, 37, 16), r(2, 3, 37, 16), r(2, 3, 37, 16)), [5, 37]
    return (r(37, 3, 16), r(37, 3, 16), r(37, 3, 16)), [20, 17]


def _call(op, args, extra):
    if op == "ffn":
        return ops.matryoshka_ffn(*args, extra)
    if op == "attention":
        return ops.block_masked_attention(*args, extra)
    return ops.block_masked_attention_varlen(*args, extra, [4, 16])


def _custom_op(op):
    return {"ffn": (ffn_mod, "_ffn_op"), "attention": (attn_mod, "_attention_op"),
            "attention_varlen": (attn_mod, "_attention_varlen_op")}[op]


def _watch(monkeypatch, op, refuse=False):
    """Replace op's custom op by a recorder (or a refuser) that still runs it; returns the
    list of recorded calls."""
    mod, name = _custom_op(op)
    real, calls = getattr(mod, name), []

    def watched(*flat):
        calls.append(flat)
        if refuse:
            raise AssertionError(f"{name} was called")
        return real(*flat)

    monkeypatch.setattr(mod, name, watched)
    return calls


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device", device_params())
def test_inference_skips_the_custom_op_with_the_same_bits(monkeypatch, op, device):
    args, extra = _inputs(op, device)
    # the custom op's own result (the op torch.compile and autograd run): a dispatch mode
    # sends the call through it
    calls = _watch(monkeypatch, op)
    with FlopCounterMode(display=False):
        want = _call(op, args, extra)
    assert len(calls) == 1
    monkeypatch.undo()
    _watch(monkeypatch, op, refuse=True)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            got = _call(op, args, extra)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num())
    # parameters that require grad, with no gradient recorded: still the direct call
    args_rg = tuple(torch.nn.Parameter(a.clone()) for a in args)
    with torch.no_grad():
        assert torch.equal(_call(op, args_rg, extra), want)


@pytest.mark.parametrize("op", OPS)
def test_gradients_go_through_the_custom_op(monkeypatch, op):
    args, extra = _inputs(op, "cpu", requires_grad=True)
    calls = _watch(monkeypatch, op)
    out = _call(op, args, extra)
    assert len(calls) == 1 and out.requires_grad
    out.float().square().sum().backward()
    assert all(a.grad is not None and torch.isfinite(a.grad).all() for a in args)
    # one input that requires grad is enough
    plain, _ = _inputs(op, "cpu")
    mixed = (plain[0].clone().requires_grad_(True),) + tuple(plain[1:])
    _call(op, mixed, extra)
    assert len(calls) == 2


@pytest.mark.parametrize("op", OPS)
def test_flop_counter_sees_the_op(monkeypatch, op):
    """FlopCounterMode counts the custom ops' FLOP formulas: under it the custom op runs even
    with no gradient recorded, so the count is what it is for a call that records one."""
    args, extra = _inputs(op, "cpu")
    counts = []
    for ctx in (torch.no_grad, torch.enable_grad):
        with ctx(), FlopCounterMode(display=False) as fc:
            _call(op, args, extra)
        counts.append(fc.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_needs_dispatcher_cases():
    x = torch.randn(4, 5)
    with torch.no_grad():
        assert not needs_dispatcher((x, None, 3, [1, 2]))
        assert not needs_dispatcher((torch.nn.Parameter(x),))   # no gradient recorded
    assert not needs_dispatcher((x, torch.nn.Parameter(x, requires_grad=False)))
    assert needs_dispatcher((x, torch.nn.Parameter(x)))        # grad mode on, requires grad
    with torch.inference_mode():
        assert not needs_dispatcher((x, torch.nn.Parameter(torch.randn(3))))
    with torch.device("cpu"):                                   # a function mode
        assert needs_dispatcher((x,))
    with FlopCounterMode(display=False):                        # a dispatch mode
        assert needs_dispatcher((x,))

    class Sub(torch.Tensor):
        pass

    assert needs_dispatcher((x.as_subclass(Sub),))
    # under a functorch transform
    seen = []
    torch.func.vmap(lambda t: seen.append(needs_dispatcher((t,))) or t)(x)
    assert seen == [True]


def test_model_gives_the_same_bits_either_way(monkeypatch, released_model):
    """The model in inference (the ops' bodies called directly) against the same forward sent
    through the custom ops (under FlopCounterMode), fp32 and bf16, a fixed and a mixed batch;
    and the direct calls are the ones made."""
    calls = []
    for op in OPS:
        calls.append(_watch(monkeypatch, op))
    x = torch.randn(2, 3, 224, 224)
    cases = [dict(num_tokens=64, mat_dim=416, depth=3),
             dict(num_tokens=[32, 96], mat_dim=[832, 416], depth=[2, 4])]
    for dtype in (torch.float32, torch.bfloat16):
        # the session's model is shared: the bf16 one is a copy
        model = (released_model if dtype == torch.float32
                 else copy.deepcopy(released_model).to(dtype))
        for cfg in cases:
            with torch.inference_mode():
                n0 = sum(map(len, calls))
                direct = model(x.to(dtype), **cfg).logits
                assert sum(map(len, calls)) == n0          # no custom op called
                with FlopCounterMode(display=False):
                    through = model(x.to(dtype), **cfg).logits
                assert sum(map(len, calls)) > n0
            assert torch.isfinite(direct).all()
            assert torch.equal(direct, through)
