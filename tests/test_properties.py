"""Property-based tests (hypothesis) of both ops on every backend available here: shapes with
tails, random grans, seq_lens, RoPE, cross-attention, per-sample widths, fp32 and fp16.

Profiles: "ci" (default; derandomized, few examples, sized for CI) and "dev" (more examples):
    HYPOTHESIS_PROFILE=dev pytest tests/test_properties.py
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adaperceiver
from adaperceiver import ops
from adaperceiver.ops import dispatch
from adaperceiver.ops.inputs import AttentionInputs, FfnInputs
from adaperceiver.ops.reference import rope_tables
from adaperceiver.testing import AttentionCase, FfnCase, assert_close_to_reference

settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _available(name, op):
    q = torch.randn(1, 1, 4, 32)
    inputs = (AttentionInputs.build(q, q, q) if op == "attention" else
              FfnInputs.build(torch.randn(1, 2, 4), torch.randn(3, 4), torch.randn(3),
                              torch.randn(4, 3), torch.randn(4), [3]))
    why = dispatch._why_not(name, op, inputs)
    return pytest.param(name, marks=pytest.mark.skipif(bool(why), reason="; ".join(why)))


# the interpreter is slow: Triton gets fewer, smaller examples
_LIMITS = {"reference": (96, None), "cpp": (96, None), "triton": (40, 6)}


@st.composite
def attention_cases(draw, max_n, dtype):
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    D = draw(st.sampled_from([32, 64]))
    cross = draw(st.booleans())
    nq = draw(st.integers(1, max_n))
    nk = draw(st.integers(1, max_n)) if cross else nq
    grans = None
    if not cross and draw(st.booleans()):
        grans = sorted(draw(st.sets(st.integers(1, nq), min_size=1, max_size=6)))
    seq = None
    if not cross and draw(st.booleans()):
        seq = torch.tensor(draw(st.lists(st.integers(1, nq), min_size=B, max_size=B)),
                           dtype=torch.int32)
    q_rope = rope_tables(nq, D) if draw(st.booleans()) else None
    k_rope = rope_tables(nk, D) if draw(st.booleans()) else None
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype) for n in (nq, nk, nk))
    return AttentionCase(q, k, v, grans, seq, q_rope, k_rope,
                         f"B={B} H={H} Nq={nq} Nk={nk} D={D} grans={grans} seq="
                         f"{None if seq is None else seq.tolist()} seed={seed} {dtype}")


@st.composite
def ffn_cases(draw, dtype):
    B, N = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    C, hmax = draw(st.integers(1, 48)), draw(st.integers(1, 80))
    hidden = draw(st.lists(st.integers(1, hmax), min_size=B, max_size=B))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    r = (lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(dtype))
    return FfnCase(r(B, N, C), r(hmax, C, scale=C ** -0.5), r(hmax, scale=0.1),
                   r(C, hmax, scale=hmax ** -0.5), r(C, scale=0.1), hidden,
                   f"B={B} N={N} C={C} Hmax={hmax} hidden={hidden} seed={seed} {dtype}")


def _attention(backend):
    def run(q, k, v, token_grans, **kw):
        with adaperceiver.use_backend(backend):
            return ops.block_masked_attention(q, k, v, token_grans, **kw)
    return run


def _ffn(backend):
    def run(*args):
        with adaperceiver.use_backend(backend):
            return ops.matryoshka_ffn(*args)
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", [_available(b, "attention")
                                     for b in ("reference", "cpp", "triton")])
def test_attention_property(backend, dtype):
    max_n, examples = _LIMITS[backend]

    @settings(max_examples=examples or settings().max_examples)
    @given(attention_cases(max_n, dtype))
    def check(case):
        assert_close_to_reference(_attention(backend), case)

    check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", [_available(b, "ffn") for b in ("reference", "cpp",
                                                                      "triton")])
def test_ffn_property(backend, dtype):
    _, examples = _LIMITS[backend]

    @settings(max_examples=examples or settings().max_examples)
    @given(ffn_cases(dtype))
    def check(case):
        assert_close_to_reference(_ffn(backend), case)

    check()
