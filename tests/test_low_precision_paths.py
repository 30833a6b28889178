"""bf16 / fp16 on a CPU without native low-precision GEMMs, emulated in a child process:
ADAPERCEIVER_CPU_ISA=avx2 turns our native paths off, ATEN_CPU_CAPABILITY=avx2 and
ONEDNN_MAX_CPU_ISA=AVX2 make torch and oneDNN behave as on an AVX2-only CPU. No layer of the
model falls onto torch's slow reference kernels, and each computes in float32 rounded once."""
import os
import subprocess
import sys

import pytest
import torch

_CHILD = r"""
import torch, torch.nn.functional as F
from torch.profiler import profile
import adaperceiver
from adaperceiver.ops.linear import native_low_precision
assert native_low_precision(torch.bfloat16) is False and native_low_precision(torch.float16) is False
torch.manual_seed(0)
cfg = dict(embed_dim=64, num_heads=4, depth=2, mat_dims=[32, 64], mask_token_grans=[4, 8], max_latent_tokens=8, img_size=32,
           patch_size=8, num_classes=10)
for dt in (torch.bfloat16, torch.float16):
    m = adaperceiver.create_model("adaperceiver_v1_in1k", **cfg).eval()
    m.to(dt)
    x = torch.randn(3, 3, 32, 32).to(dt)
    conv = m.patch_embed.embed
    w, b = conv.proj.weight, conv.proj.bias
    # float32 sums rounded once: within one rounding of the float32 convolution's
    want = F.conv2d(x.float(), w.float(), b.float(), stride=8).flatten(2).transpose(1, 2)
    with torch.inference_mode(), profile() as prof:
        got = conv(x)
        logits = m(x).logits
    ulp = torch.finfo(dt).eps * want.abs().clamp_min(torch.finfo(dt).tiny)
    assert got.dtype == dt and ((got.float() - want).abs() <= ulp).all(), dt
    assert torch.isfinite(logits.float()).all()
    slow = [e.key for e in prof.key_averages() if "slow_conv" in e.key]
    assert not slow, slow
    # autocast keeps its own choice (the GEMM in the autocast dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        assert conv(x.float()).dtype == torch.bfloat16
print("ok")
"""


def test_patch_embedding_without_native_low_precision_runs_float32():
    if not torch._C._cpu._get_cpu_capability().get("avx2"):
        pytest.skip("this CPU has no AVX2")
    env = dict(os.environ, ADAPERCEIVER_CPU_ISA="avx2", ATEN_CPU_CAPABILITY="avx2",
               ONEDNN_MAX_CPU_ISA="AVX2")
    res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
