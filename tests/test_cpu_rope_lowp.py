"""RoPE of bfloat16 / float16 rows in the CPU attention's 16-bit path (rope_row_lowp in
csrc/cpu/microkernel.cpp: one vectorised pass per row, in float32 with every product and sum
rounded, rounded once to the input type).

That is the reference's rotation (ops/reference.py apply_rope) bit for bit, so the attention
with RoPE tables must equal, bit for bit, the attention without tables on inputs rotated by
apply_rope, at head dims whose pairs are and are not a multiple of the 8-pair step (D = 2, 30,
64, 66, 130), for cross attention and heads-last strided inputs. Also flash-attn's accuracy rule
with RoPE at those head dims, and NaN / inf in q or k rows reaching exactly the outputs the
reference's reach. The helper's own paths (AVX-512 and portable) are checked value by value,
NaN / inf and tails included, by the ctest csrc/tests/test_cpu_kernels.cpp (rope_lowp_cases).
"""
import math

import pytest
import torch

from adaperceiver import _ext
from adaperceiver.ops import reference as R

from helpers import flash_rule

pytestmark = pytest.mark.skipif(not _ext.available(),
                                reason=f"adaperceiver._C not loaded: {_ext.load_error()}")

LOWP = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
HEAD_DIMS = [2, 30, 64, 66, 130]


def _need_tiles(dtype):
    tag = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if _ext.build_info()[f"cpu_attention_{tag}"] == "float32":
        pytest.skip(f"{tag} attention runs in float32 here (no 16-bit products for it)")


def _tables(n, D, g):
    """(cos, sin) of random angles, float32 (n, D/2): every pair rotated by a different angle."""
    ang = torch.rand(n, D // 2, generator=g, dtype=torch.float64) * 2 * math.pi
    return ang.cos().float(), ang.sin().float()


def _inputs(B, H, Nq, Nk, D, dtype, g, heads_last=False):
    """q, k, v of magnitudes over a wide range (rounding boundaries at many exponents)."""
    def rand(n):
        x = torch.randn(B, n, H, D, generator=g) * torch.exp(2 * torch.randn(B, n, H, D, generator=g))
        x = x.to(dtype)
        return x.transpose(1, 2) if heads_last else x.transpose(1, 2).contiguous()
    return rand(Nq), rand(Nk), torch.randn(B, H, Nk, D, generator=g).to(dtype)


def _fwd(q, k, v, grans, qr=None, kr=None):
    pair = (lambda r: (None, None) if r is None else r)
    return torch.ops.adaperceiver.block_masked_attention_fwd(
        q, k, v, grans, 1.0 / math.sqrt(q.shape[-1]), None, *pair(qr), *pair(kr))


@pytest.mark.parametrize("heads_last", [False, True], ids=["contiguous", "heads_last"])
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", LOWP)
def test_rope_on_tiles_is_the_reference_rotation(dtype, D, heads_last):
    """out, lse with RoPE tables == out, lse without tables on apply_rope(q), apply_rope(k), bit
    for bit: the rows the tiles multiply are the reference's rotated rows exactly."""
    _need_tiles(dtype)
    g = torch.Generator().manual_seed(D)
    # self-attention with grans (several query tiles per head), then cross attention
    for Nq, Nk, grans in ((150, 150, [5, 20, 64, 150]), (33, 97, None)):
        q, k, v = _inputs(4, 16, Nq, Nk, D, dtype, g, heads_last)
        qr, kr = _tables(Nq, D, g), _tables(Nk, D, g)
        out, lse = _fwd(q, k, v, grans, qr, kr)
        want, want_lse = _fwd(R.apply_rope(q, *qr), R.apply_rope(k, *kr), v, grans)
        assert out.isfinite().all() and not torch.equal(out, _fwd(q, k, v, grans)[0])
        diff = (out != want).sum().item()
        assert torch.equal(out, want), f"Nq={Nq} Nk={Nk}: {diff} of {out.numel()} outputs differ"
        assert torch.equal(lse, want_lse)


@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("dtype", LOWP)
def test_rope_on_tiles_meets_the_rule(dtype, D):
    """flash-attn's rule with RoPE (the released tables, q and k of different lengths): error
    vs float64 <= 2x the plain reference's in dtype, plus a tiny floor."""
    _need_tiles(dtype)
    g = torch.Generator().manual_seed(100 + D)
    B, H, Nq, Nk, grans = 2, 2, 77, 300, None  # cross attention: grans need Nq == Nk
    q, k, v = (torch.randn(B, H, n, D, generator=g).to(dtype) for n in (Nq, Nk, Nk))
    qr, kr = R.rope_tables(Nq, D), R.rope_tables(Nk, D)
    out, _ = _fwd(q, k, v, grans, qr, kr)
    scale = 1.0 / math.sqrt(D)
    plain, _ = R.attention_forward(q, k, v, grans, scale, None, qr, kr)
    d64 = (lambda r: tuple(t.double() for t in r))
    truth, _ = R.attention_forward(q.double(), k.double(), v.double(), grans, scale, None,
                                   d64(qr), d64(kr))
    err, bound = flash_rule(out, plain, truth)
    assert err <= bound, f"error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("D", [30, 66])
@pytest.mark.parametrize("dtype", LOWP)
def test_rope_on_tiles_propagates_nan_and_inf(dtype, D):
    """A NaN in a q row, +-inf in k rows (one at position 0, where sin is 0 and inf * 0 is NaN),
    in the last, partial step of a row: NaN exactly where the float64 reference has it, the
    rest within the rule's reach of it, and equal (NaN for NaN) to the run on rows rotated by
    apply_rope."""
    _need_tiles(dtype)
    g = torch.Generator().manual_seed(7 + D)
    B, H, N, grans = 1, 2, 70, [16, 40, 70]
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype) for _ in range(3))
    q[0, 0, 20, D - 1] = math.nan      # row 20 of head 0
    k[0, 1, 0, D - 2] = math.inf       # key 0 of head 1: every row of head 1 sees it
    k[0, 0, 45, D - 1] = -math.inf     # key 45 of head 0: rows 40.. see it
    tables = R.rope_tables(N, D)
    out, lse = _fwd(q, k, v, grans, tables, tables)
    truth, truth_lse = R.attention_forward(
        q.double(), k.double(), v.double(), grans, 1.0 / math.sqrt(D), None,
        *[tuple(t.double() for t in tables)] * 2)
    assert truth.isnan().any() and not truth.isnan().all()  # the poison reaches some rows only
    assert torch.equal(out.isnan(), truth.isnan())
    assert torch.equal(lse.isnan(), truth_lse.isnan())
    fin = ~truth.isnan()
    assert (out[fin].double() - truth[fin]).abs().max().item() < 0.1
    want, want_lse = _fwd(R.apply_rope(q, *tables), R.apply_rope(k, *tables), v, grans)
    torch.testing.assert_close(out, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0, equal_nan=True)
