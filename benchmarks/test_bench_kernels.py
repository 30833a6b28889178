"""Kernel microbenchmarks of the two ops against what else could run them.

Attention (group "attention B=.. H=13 N=.. D=64"), float32, the released token grans
[32, 64, 96, 128, 192, 256] clipped to N, no RoPE:
  adaperceiver-auto         adaperceiver.ops.block_masked_attention, fastest available backend
  adaperceiver-reference    the same op forced to the reference backend (dense mask, math)
  sdpa-dense-mask           torch SDPA with a dense boolean mask
  flex-eager                FlexAttention with a BlockMask, eager (materialises the scores)
  flex-compiled             torch.compile(flex_attention) (skipped, with reason, if it cannot
                            compile here; compile time falls in an untimed warm-up)
  flash-attn                flash_attn_func, no mask (flash-attn has no group-causal mask: a
                            dense lower bound); only on a CUDA GPU with flash-attn installed
Matryoshka FFN (group "ffn w=.."), x (4, 256, 832), hidden int(w * 2.57) of 2138:
  adaperceiver-auto         adaperceiver.ops.matryoshka_ffn, fastest available backend
  reference-masked          adaperceiver.ops.reference.matryoshka_ffn: full width x 0/1 mask
  torch-sliced              F.linear on the sliced weights, one call per distinct width
Default: N = 256 and w in {416, 624, 832, mixed}; --full adds N in {32, 64, 128, 192} and
batch 1. Every contender's output is checked against the reference before it is timed.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import adaperceiver
from adaperceiver import ops
from adaperceiver.ops import reference

GRANS = [32, 64, 96, 128, 192, 256]
H, D, C = 13, 64, 832
HMAX = int(C * 2.57)
ATTN = ["adaperceiver-auto", "adaperceiver-reference", "sdpa-dense-mask", "flex-eager",
        "flex-compiled", "flash-attn"]
FFN = ["adaperceiver-auto", "reference-masked", "torch-sliced"]
WIDTHS = {"w416": [416] * 4, "w624": [624] * 4, "w832": [832] * 4,
          "mixed": [416, 624, 832, 416]}


def pytest_generate_tests(metafunc):
    full = metafunc.config.getoption("--full")
    if "attn_shape" in metafunc.fixturenames:
        shapes = [(4, 256)] + ([(4, n) for n in (32, 64, 128, 192)] + [(1, 256)] if full else [])
        metafunc.parametrize("attn_shape", shapes, ids=[f"B{b}-N{n}" for b, n in shapes],
                             scope="module")


def _rounds(full):
    return 30 if full else 10


def _grans(n):
    return [g for g in GRANS if g <= n] or [n]


@pytest.fixture(scope="module")
def attn_inputs(attn_shape, device):
    b, n = attn_shape
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(b, H, n, D, generator=g).to(device) for _ in range(3))
    grans = _grans(n)
    with adaperceiver.use_backend("reference"):
        expected = ops.block_masked_attention(q, k, v, grans)
    return q, k, v, grans, expected


_compiled_flex = {}


def _flex_block_mask(n, grans, device):
    from torch.nn.attention.flex_attention import create_block_mask
    row_end = ops.row_end(n, grans).to(device)

    def mask_mod(b, h, qi, ki):
        return ki < row_end[qi]
    return create_block_mask(mask_mod, None, None, n, n, device=str(device))


def _attention_fn(name, q, k, v, grans, device):
    n = q.shape[2]
    if name == "adaperceiver-auto":
        return lambda: ops.block_masked_attention(q, k, v, grans)
    if name == "adaperceiver-reference":
        def ref():
            with adaperceiver.use_backend("reference"):
                return ops.block_masked_attention(q, k, v, grans)
        return ref
    if name == "sdpa-dense-mask":
        mask = ops.block_mask(n, grans, device=q.device)
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if name in ("flex-eager", "flex-compiled"):
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError as e:
            pytest.skip(f"FlexAttention is not in this torch: {e}")
        bm = _flex_block_mask(n, grans, device)
        if name == "flex-eager":
            def eager():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return flex_attention(q, k, v, block_mask=bm)
            return eager
        key = (tuple(q.shape), str(device))
        if key not in _compiled_flex:
            try:
                fn = torch.compile(flex_attention, dynamic=False)
                fn(q, k, v, block_mask=bm)   # compile outside the timing
                _compiled_flex[key] = fn
            except Exception as e:  # noqa: BLE001 - the reason is the skip message
                _compiled_flex[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        fn = _compiled_flex[key]
        if isinstance(fn, str):
            pytest.skip(f"torch.compile(flex_attention) does not run here: {fn}")
        return lambda: fn(q, k, v, block_mask=bm)
    if name == "flash-attn":
        if device.type != "cuda":
            pytest.skip("flash-attn runs only on a CUDA GPU; this run is on the CPU")
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            pytest.skip("flash-attn is not installed (pip install flash-attn)")
        qh, kh, vh = (t.transpose(1, 2).contiguous().half() for t in (q, k, v))
        return lambda: flash_attn_func(qh, kh, vh, causal=False).transpose(1, 2)
    raise AssertionError(name)


@pytest.mark.parametrize("impl", ATTN)
def test_attention(benchmark, run_pedantic, full, device, attn_shape, attn_inputs, impl):
    q, k, v, grans, expected = attn_inputs
    b, n = attn_shape
    benchmark.group = f"attention B={b} H={H} N={n} D={D}"
    fn = _attention_fn(impl, q, k, v, grans, device)
    allowed = int(ops.row_end(n, grans).long().sum())
    benchmark.extra_info.update({"impl": impl, "grans": grans, "masked_fraction":
                                 1 - allowed / (n * n),
                                 "gflops_dense": 4 * b * H * n * n * D / 1e9})
    out = run_pedantic(fn, _rounds(full), warmup=2)
    if impl == "flash-attn":    # no mask: a speed reference only
        assert out.shape == expected.shape and torch.isfinite(out).all()
    else:
        torch.testing.assert_close(out.float(), expected.float(), rtol=2e-4, atol=2e-4)


@pytest.fixture(scope="module")
def ffn_weights(device):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 256, C, generator=g)
    w1 = torch.randn(HMAX, C, generator=g) / math.sqrt(C)
    b1 = torch.randn(HMAX, generator=g) * 0.02
    w2 = torch.randn(C, HMAX, generator=g) / math.sqrt(HMAX)
    b2 = torch.randn(C, generator=g) * 0.02
    return tuple(t.to(device) for t in (x, w1, b1, w2, b2))


def _sliced(x, w1, b1, w2, b2, hidden):
    out = torch.empty(*x.shape[:-1], w2.shape[0], device=x.device, dtype=x.dtype)
    for h in sorted(set(hidden)):
        idx = [i for i, hb in enumerate(hidden) if hb == h]
        xs = x[idx] if len(idx) < x.shape[0] else x
        y = F.linear(F.gelu(F.linear(xs, w1[:h], b1[:h])), w2[:, :h], b2)
        if len(idx) < x.shape[0]:
            out[idx] = y
        else:
            out = y
    return out


@pytest.mark.parametrize("impl", FFN)
@pytest.mark.parametrize("widths", list(WIDTHS), ids=list(WIDTHS))
def test_matryoshka_ffn(benchmark, run_pedantic, full, ffn_weights, widths, impl):
    x, w1, b1, w2, b2 = ffn_weights
    hidden = [int(w * 2.57) for w in WIDTHS[widths]]
    benchmark.group = f"ffn {widths} (x 4x256x{C}, hidden {sorted(set(hidden))} of {HMAX})"
    fns = {
        "adaperceiver-auto": lambda: ops.matryoshka_ffn(x, w1, b1, w2, b2, hidden),
        "reference-masked": lambda: reference.matryoshka_ffn(x, w1, b1, w2, b2, hidden),
        "torch-sliced": lambda: _sliced(x, w1, b1, w2, b2, hidden),
    }
    needed = sum(4 * x.shape[1] * C * h for h in hidden)
    benchmark.extra_info.update({"impl": impl, "hidden": hidden, "gflops_needed": needed / 1e9,
                                 "gflops_full_width": 4 * x.numel() * HMAX / 1e9})
    out = run_pedantic(fns[impl], _rounds(full), warmup=2)
    with torch.inference_mode():
        expected = reference.matryoshka_ffn(x.double(), w1.double(), b1.double(), w2.double(),
                                            b2.double(), hidden)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
