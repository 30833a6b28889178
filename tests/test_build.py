"""What the extension build produced: build_info facts, and the CUDA objects when built with CUDA."""
import subprocess

import pytest
import torch

from adaperceiver import _ext
from adaperceiver.ops import cpp_backend, cuda_backend
from adaperceiver.ops.inputs import AttentionInputs, FfnInputs


def test_build_info_reports_cpp_compiled():
    info = _ext.build_info()
    assert info["load_error"] is None, info["load_error"]
    assert info["cpp_compiled"] is True
    assert info["cxx_compiler"] and info["torch_version_built"]
    # built against the torch that runs it (a mismatch would be an ABI hazard)
    assert torch.__version__.startswith(info["torch_version_built"])
    assert info["openmp"], "the CPU kernels are built with OpenMP"
    for key in ("cuda_compiled", "cuda_archs", "nvcc_version", "path"):
        assert key in info


def _child_build_info(env_isa):
    """build_info() of a fresh interpreter with ADAPERCEIVER_CPU_ISA=env_isa (read once)."""
    import json
    import os
    import sys
    env = dict(os.environ, ADAPERCEIVER_CPU_ISA=env_isa)
    code = ("import json; from adaperceiver import _ext; i = _ext.build_info(); "
            "print(json.dumps({k: i[k] for k in ('cpu_isa', 'cpu_native_bf16', "
            "'cpu_native_fp16', 'cpu_isa_error')}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_build_info_reports_the_cpu_paths():
    caps = torch._C._cpu._get_cpu_capability()
    info = _ext.build_info()
    assert info["cpu_isa_error"] is None
    want = "avx512" if caps.get("avx512_f") else "avx2" if caps.get("avx2") else "portable"
    assert info["cpu_isa"] == want
    assert info["cpu_native_bf16"] == (want == "avx512" and bool(
        caps.get("avx512_bf16") or caps.get("amx_bf16")))
    assert info["cpu_native_fp16"] == (want == "avx512" and bool(
        caps.get("avx512_fp16") or caps.get("amx_fp16")))
    # a lower instruction set on request: no native low precision below AVX-512
    child = _child_build_info("portable")
    assert child["cpu_isa"] == "portable" and child["cpu_isa_error"] is None
    assert not child["cpu_native_bf16"] and not child["cpu_native_fp16"]
    child = _child_build_info("sse9")
    assert child["cpu_isa"] is None
    assert "ADAPERCEIVER_CPU_ISA=sse9 is not allowed; allowed: amx, avx512, avx2, portable" in \
        child["cpu_isa_error"]


def test_build_info_cuda_facts_consistent():
    info = _ext.build_info()
    if not info["cuda_compiled"]:
        assert info["cuda_archs"] == [] and info["nvcc_version"] is None
        reasons = cuda_backend.why_not_ffn(FfnInputs(torch.ones(1, 1, 1), None, None, None,
                                                     None, [1]))
        assert any("without its CUDA part" in r for r in reasons), reasons
        pytest.skip("extension built without CUDA")
    assert info["cuda_archs"] == ["8.0", "9.0"], info["cuda_archs"]
    assert info["nvcc_version"].count(".") == 2


def test_cuda_objects_exist():
    if not _ext.build_info()["cuda_compiled"]:
        pytest.skip("extension built without CUDA")
    so = _ext.build_info()["path"]
    # the device code is embedded as a fat binary section
    sections = subprocess.run(["objdump", "-h", so], capture_output=True, text=True).stdout
    assert ".nv_fatbin" in sections
    syms = subprocess.run(["nm", "-C", so], capture_output=True, text=True).stdout
    for kernel in ("attn_fwd_kernel", "attn_bwd_dq_kernel", "attn_bwd_dkv_kernel",
                   "fc1_gelu_kernel", "fc2_kernel"):
        assert kernel in syms, f"{kernel} not in {so}"
    # pip's editable build deletes its temp object files, so the linked library is what we
    # inspect; the architectures come from nvcc's __CUDA_ARCH_LIST__ (build_info above)
    elf = subprocess.run(["readelf", "-S", so], capture_output=True, text=True).stdout
    assert ".nv_fatbin" in elf


def test_every_op_has_its_cpu_and_cuda_kernels_registered():
    """ops.cpp registers the CPU kernels, cuda/register.cpp the CUDA ones (when built)."""
    cuda = _ext.build_info()["cuda_compiled"]
    for op in ("block_masked_attention_fwd", "block_masked_attention_bwd",
               "block_masked_attention_varlen_fwd", "matryoshka_ffn_fwd", "matryoshka_ffn_bwd"):
        name = f"adaperceiver::{op}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == cuda, name


def test_cuda_backend_on_cpu_tensors_says_why():
    q = torch.randn(1, 1, 4, 48)
    reasons = cuda_backend.why_not_attention(AttentionInputs.build(q, q, q))
    assert reasons and all(isinstance(r, str) for r in reasons)
    if _ext.cuda_available():
        assert any("CUDA tensors only" in r for r in reasons)
        assert any("head_dim=48" in r for r in reasons)


def test_backends_import_without_extension(monkeypatch):
    # a missing _C must turn into reasons, never into an import error
    monkeypatch.setattr(_ext, "_tried", True)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", "ImportError: no module named adaperceiver._C")
    x = torch.randn(1, 2, 3)
    reasons = cpp_backend.why_not_ffn(FfnInputs(x, None, None, None, None, [1]))
    assert reasons == ["C++ extension adaperceiver._C failed to load: ImportError: no module "
                       "named adaperceiver._C"]
    assert cuda_backend.why_not_ffn(FfnInputs(x, None, None, None, None, [1]))[0].startswith(
        "C++/CUDA extension adaperceiver._C failed to load")
    assert _ext.build_info()["cpp_compiled"] is False
