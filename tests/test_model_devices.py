"""The whole model on every device present, on the backend the dispatcher picks there (cpp on
the CPU; Triton, then the CUDA extension, on a GPU), against the float64 reference model: a
fixed configuration and a mixed batch (per-sample t, w, l), forward and gradients, in float32
and in each low precision the device runs natively (held to flash-attn's rule: the error
against float64 at most 2x the plain reference's in the same precision)."""
import pytest
import torch

import adaperceiver
from helpers import device_params, flash_rule, tiny_model

CALLS = {"fixed": dict(num_tokens=64, mat_dim=72, depth=3),
         "mixed": dict(num_tokens=[64, 32, 50], mat_dim=[48, 96, 72], depth=[4, 2, 3])}


def _low_dtypes(device: str) -> list:
    if device == "cuda":
        return [torch.bfloat16, torch.float16]
    info = adaperceiver.build_info()
    return [d for d, native in ((torch.bfloat16, info.get("cpu_native_bf16")),
                                (torch.float16, info.get("cpu_native_fp16"))) if native]


def _run(model, x, call, backend=None, grad=False):
    model.zero_grad(set_to_none=True)
    ctx = adaperceiver.use_backend(backend) if backend else adaperceiver.use_backend("auto")
    with ctx:
        out = model(x, **call).logits
        if not grad:
            return out.detach(), None
        out.float().square().mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.grad is not None}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("device", device_params())
def test_model_on_device_matches_float64_reference(device, call):
    torch.manual_seed(0)
    base = tiny_model().train()
    x = torch.randn(3, 3, 64, 64)
    truth, truth_g = _run(base.double(), x.double(), CALLS[call], "reference", grad=True)
    model = tiny_model().train()
    model.load_state_dict(base.float().state_dict())
    model.to(device)
    got, got_g = _run(model, x.to(device), CALLS[call], grad=True)
    assert got.device.type == device
    scale = truth.abs().max().item()
    assert (got.double().cpu() - truth).abs().max().item() <= 2e-4 * scale
    for name, g in truth_g.items():
        err = (got_g[name].double().cpu() - g).abs().max().item()
        assert err <= 2e-3 * max(g.abs().max().item(), 1e-6), name
    for dtype in _low_dtypes(device):
        low = tiny_model().eval()
        low.load_state_dict(base.float().state_dict())
        with torch.no_grad():
            ours = _run(low.to(device=device, dtype=dtype), x.to(device, dtype), CALLS[call])[0]
            plain = _run(low, x.to(device, dtype), CALLS[call], "reference")[0]
        err, bound = flash_rule(ours.cpu(), plain.cpu(), truth)
        assert err <= bound, (dtype, err, bound)
