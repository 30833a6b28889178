"""Every Triton kernel compiles for a GPU (sm_80, sm_90; fp16, bf16, fp32) at its default tile
sizes, and the forward at every autotuning candidate, without register spills, on this GPU-less
machine (adaperceiver.kernels.compile).

The compiles run in subprocesses with TRITON_INTERPRET unset (helpers.py sets it for this process,
and interpreted @triton.jit functions cannot be compiled). One batch for the whole file.
"""
import pytest
import torch

from adaperceiver.kernels import attention as A
from adaperceiver.kernels import compile as C

# the kernels that are launched (the other @triton.jit functions are inlined helpers)
ATTENTION_KERNELS = {"_attn_fwd", "_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq",
                     "_rope_rows"}


@pytest.fixture(scope="module")
def compiled():
    # the "rope+lens" variant of each attention kernel is a superset of the plain one in code
    # and registers; compiling it (and every spec of the other modules) keeps this file fast.
    # The committed benchmarks/triton_resources.md holds every variant.
    specs, _ = C.collect_specs()
    select = [(s["module"], s["name"]) for s in specs
              if s["module"] != "adaperceiver.kernels.attention" or "rope" in s["name"]
              or s["kernel"] == "_attn_bwd_delta"]
    return C.compile_all(select=select)


def test_specs_cover_every_attention_kernel():
    kernels = {s["kernel"] for s in A.COMPILE_SPECS}
    assert kernels == ATTENTION_KERNELS
    for s in A.COMPILE_SPECS:
        fn = getattr(A, s["kernel"])
        names = getattr(fn, "arg_names", None) or getattr(getattr(fn, "fn", None), "arg_names",
                                                          None)
        if names is not None:   # the interpreter's wrapper may not expose them
            assert set(s["signature"]) == set(names), s["name"]
        assert set(s["constexprs"]) == {k for k, v in s["signature"].items()
                                        if v == "constexpr"}, s["name"]
    for d in A.HEAD_DIMS:   # every head_dim, with and without the optional features
        for dtypes in (("fp16", "bf16"), ("fp32",)):
            base = [s for s in A.COMPILE_SPECS if f"D={d}" in s["name"] and " cand " not in
                    s["name"] and s["dtypes"] == dtypes]
            assert len(base) == 10, (d, dtypes)   # + the packed fwd, delta, rope_rows x 2
            cands = [s for s in A.COMPILE_SPECS if f"D={d}" in s["name"] and " cand " in
                     s["name"] and s["dtypes"] == dtypes]
            dtype = torch.float32 if dtypes == ("fp32",) else torch.float16
            assert len(cands) == len(A.fwd_candidates(d, dtype)) - 1   # the default is base


def test_every_kernel_compiles_without_spills(compiled):
    rows, notes = compiled
    seen = {(r["module"], r["kernel"], r["arch"], r["dtype"]) for r in rows}
    for kernel in ATTENTION_KERNELS:
        for arch in (80, 90):
            for dtype in ("fp16", "bf16", "fp32"):
                assert ("adaperceiver.kernels.attention", kernel, arch, dtype) in seen
    failed = [f"{r['module']} {r['name']} sm_{r['arch']} {r['dtype']}: {r['error']}"
              for r in rows if r["error"]]
    assert not failed, "\n".join(failed)
    spilled = [f"{r['module']} {r['name']} sm_{r['arch']} {r['dtype']}: {r['spill_stores']} B"
               for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "register spills at default tiles:\n" + "\n".join(spilled)
    for r in rows:
        assert 0 < r["registers"] <= 255
        # what an sm_80 block may use (163 KB, opt-in above 48 KB)
        assert r["shared"] <= 166912, r


def test_table_format():
    row = {"module": "m.attention", "name": "k D=64", "kernel": "_k", "arch": 90, "dtype": "fp16",
           "num_warps": 4, "num_stages": 3, "registers": 100, "spill_stores": 0,
           "spill_loads": 0, "shared": 1024, "error": None}
    table = C.format_table([row, {**row, "error": "boom | x"}], ["m.other: not importable"])
    assert "| attention | k D=64 | sm_90 | fp16 | 4 | 3 | 100 | 0 | 0 | 1024 | ok |" in table
    assert "FAILED: boom / x" in table and "Note: m.other" in table


def test_bad_arguments():
    with pytest.raises(ValueError, match="dtype='fp8'"):
        C.compile_all(dtypes=["fp8"])
    with pytest.raises(ValueError, match="arch=7"):
        C.compile_all(archs=[7])
