"""The whole model on every fast backend equals the reference model: forward and gradients,
one width per batch and one per sample, and mixed (t, w, l) batches."""
import pytest
import torch

import adaperceiver
from adaperceiver.ops import dispatch
from adaperceiver.ops.inputs import AttentionInputs

from helpers import tiny_model


def _backend(name):
    q = torch.randn(1, 1, 4, 32)
    why = dispatch._why_not(name, "attention", AttentionInputs.build(q, q, q))
    return pytest.param(name, marks=pytest.mark.skipif(bool(why), reason="; ".join(why)))


BACKENDS = [_backend("triton"), _backend("cpp")]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _run(model, backend, x, **kw):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with adaperceiver.use_backend(backend):
        out = model(x, **kw).logits
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
    out.backward(g)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mat_dim,num_tokens", [(72, 70), ([48, 96, 61], 70),
                                                ([48, 96, 61], [70, 33, 50])],
                         ids=["one_width", "widths", "widths_tokens"])
def test_model_forward_and_gradients_equal_reference(backend, mat_dim, num_tokens):
    model = tiny_model(depth=2).train()
    x = torch.randn(3, 3, 64, 64)
    kw = dict(num_tokens=num_tokens, mat_dim=mat_dim, token_grans=[16, 32, 50])
    ref_out, ref_dx, ref_g = _run(model, "reference", x, **kw)
    out, dx, g = _run(model, backend, x, **kw)
    assert _rel(out, ref_out) <= 1e-4
    assert _rel(dx, ref_dx) <= 1e-4
    assert ref_g.keys() == g.keys() and len(g) == len(list(model.parameters()))
    # some gradients vanish mathematically (the read's key bias: softmax ignores a per-row
    # constant), leaving rounding noise; those are compared against the largest gradient
    floor = 1e-6 * max(r.abs().max().item() for r in ref_g.values())
    for name in ref_g:
        err = (g[name] - ref_g[name]).abs().max().item()
        assert err <= 1e-4 * ref_g[name].abs().max().item() + floor, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_batch_on_backend_equals_reference(backend):
    model = tiny_model(depth=3).eval()
    x = torch.randn(4, 3, 64, 64)
    kw = dict(num_tokens=[40, 96, 17, 96], mat_dim=[48, 96, 61, 48], depth=[3, 1, 2, 3])
    with torch.no_grad():
        with adaperceiver.use_backend("reference"):
            ref = model(x, **kw)
        with adaperceiver.use_backend(backend):
            got = model(x, **kw)
    assert torch.equal(got.depths, ref.depths)
    assert _rel(got.logits, ref.logits) <= 1e-5
