"""The op layer: mask and tile schedule against the definition in docs/design.md ("The block
mask"), the reference ops against independent formulas, custom-op registration, and backend
dispatch errors."""
import importlib
import random

import pytest
import torch
import torch.nn.functional as F

import adaperceiver
from adaperceiver import ops
from adaperceiver.ops import reference as R
from adaperceiver.ops.inputs import AttentionInputs


def _random_grans(n, rng):
    k = rng.randint(1, min(6, n))
    return sorted(rng.sample(range(1, n + 1), k))


def _spec_allowed(i, k, n, grans):
    """docs/design.md, "The block mask": grans <= n, then n appended; query i sees keys below
    the smallest end > i."""
    ends = [g for g in grans if g <= n]
    if not ends or ends[-1] < n:
        ends.append(n)
    return k < min(g for g in ends if g > i)


def test_block_mask_follows_spec_definition():
    rng = random.Random(torch.initial_seed())
    for _ in range(20):
        n = rng.randint(1, 70)
        grans = _random_grans(n + 10, rng)
        want = torch.tensor([[_spec_allowed(i, k, n, grans) for k in range(n)] for i in range(n)])
        assert torch.equal(ops.block_mask(n, grans), want), (n, grans)
    assert torch.equal(ops.block_mask(9, list(range(1, 10))), torch.ones(9, 9).tril().bool())
    assert ops.block_mask(9, [9]).all()
    assert ops.block_mask(4, None, 7).all() and ops.block_mask(4, None, 7).shape == (4, 7)


def test_ranges_and_to_device():
    """ops.schedule.ranges (the packed-row indices, built from B starts and lengths) against a
    loop, empty ranges included; to_device converts on the host and refuses device sources."""
    from adaperceiver.ops.schedule import ranges, to_device
    rng = random.Random(torch.initial_seed())
    for _ in range(20):
        B = rng.randint(1, 7)
        starts = [rng.randint(0, 500) for _ in range(B)]
        lengths = [rng.choice([0, rng.randint(1, 40)]) for _ in range(B)]
        want = [s + i for s, n in zip(starts, lengths) for i in range(n)]
        for dtype in (torch.int64, torch.int32):
            got = ranges(starts, lengths, "cpu", dtype)
            assert got.dtype == dtype and got.tolist() == want
    got = to_device(torch.tensor([3.0, 7.0]), "cpu", torch.int32)
    assert got.dtype == torch.int32 and got.tolist() == [3, 7]
    with pytest.raises(ValueError, match="host values; got a tensor on meta"):
        to_device(torch.empty(2, device="meta"), "cpu")


def test_tile_schedule_counts_exactly_the_tiles_with_allowed_scores():
    rng = random.Random(torch.initial_seed())
    for _ in range(30):
        n = rng.randint(1, 150)
        grans = _random_grans(n, rng) if rng.random() < 0.8 else None
        bm, bn = rng.choice([16, 32, 64]), rng.choice([16, 32, 64])
        seq = rng.randint(1, n) if rng.random() < 0.5 else None
        sched = ops.tile_schedule(n, grans, bm, bn, seq_len=seq)
        allowed = ops.block_mask(n, grans)
        if seq is not None:
            allowed[seq:] = False
            allowed[:, seq:] = False
        for t, m0 in enumerate(range(0, n, bm)):
            rows = allowed[m0:m0 + bm]
            tiles = [rows[:, j:j + bn] for j in range(0, n, bn)]
            need = [bool(tl.any()) for tl in tiles]
            # visited tiles are exactly those holding an allowed score (a prefix, as row_end
            # is monotone), and tiles run without mask are fully allowed on the valid rows
            assert need == [j < sched.end[t] for j in range(len(tiles))], (n, grans, bm, bn)
            valid = rows.any(1) if seq is None else torch.arange(m0, m0 + rows.shape[0]) < seq
            for j in range(sched.full[t]):
                assert tiles[j][valid].all()


def _dense_attention(q, k, v, allowed, scale):
    """Per-row softmax written with loops: an independent check of the reference."""
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                keys = allowed[b, i].nonzero().flatten()
                if len(keys) == 0:
                    continue
                s = (k[b, h, keys] @ q[b, h, i]) * scale
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h, keys]
    return out


def _rotate(x, n):
    """RoPE as complex multiplication (docs/design.md, "RoPE"), independent of apply_rope."""
    D = x.shape[-1]
    freqs = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = torch.arange(n, dtype=torch.float64)[:, None] * freqs
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], D // 2, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)).flatten(-2)


def test_reference_attention_against_loops_with_rope_and_seq_lens():
    B, H, N, D = 3, 2, 23, 8
    q, k, v = (torch.randn(B, H, N, D, dtype=torch.float64) for _ in range(3))
    grans, seq = [5, 11, 17], torch.tensor([23, 9, 1])
    cos, sin = R.rope_tables(N, D)
    with adaperceiver.use_backend("reference"):
        got = ops.block_masked_attention(q, k, v, grans, seq_lens=seq, q_rope=(cos, sin),
                                         k_rope=(cos, sin))
    allowed = ops.block_mask(N, grans)[None].repeat(B, 1, 1)
    for b, n in enumerate(seq.tolist()):
        allowed[b, n:] = False
        allowed[b, :, n:] = False
    want = _dense_attention(_rotate(q, N), _rotate(k, N), v, allowed, D ** -0.5)
    assert (got - want).abs().max() < 1e-6
    assert got[1, :, 9:].abs().max() == 0 and got[2, :, 1:].abs().max() == 0


def test_rope_scaling_above_max_tokens():
    cos, sin = R.rope_tables(512, 64)
    cos2, sin2 = R.rope_tables(256, 64)
    # positions 2p at N=512 (freqs halved) equal positions p at N=256
    assert torch.allclose(cos[::2], cos2, atol=1e-5) and torch.allclose(sin[::2], sin2, atol=1e-5)


def test_reference_ffn_is_the_sliced_ffn_per_sample():
    x = torch.randn(4, 7, 12, dtype=torch.float64)
    w1, b1 = torch.randn(30, 12, dtype=torch.float64), torch.randn(30, dtype=torch.float64)
    w2, b2 = torch.randn(12, 30, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    hidden = [1, 30, 17, 17]
    with adaperceiver.use_backend("reference"):
        got = ops.matryoshka_ffn(x, w1, b1, w2, b2, torch.tensor(hidden))
    for b, h in enumerate(hidden):
        want = F.linear(F.gelu(F.linear(x[b], w1[:h], b1[:h])), w2[:, :h], b2)
        assert (got[b] - want).abs().max() < 1e-12


def test_custom_ops_pass_opcheck_on_the_reference():
    q, k, v = (torch.randn(2, 2, 13, 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    cos, sin = R.rope_tables(13, 8)
    with adaperceiver.use_backend("reference"):
        torch.library.opcheck(torch.ops.adaperceiver.block_masked_attention.default,
                              (q, k, v, [4, 9], 0.3, torch.tensor([13, 6], dtype=torch.int32),
                               cos, sin, cos, sin))
        x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
        ws = [torch.randn(*s, dtype=torch.float64, requires_grad=True)
              for s in [(10, 6), (10,), (6, 10), (6,)]]
        torch.library.opcheck(torch.ops.adaperceiver.matryoshka_ffn.default, (x, *ws, [1, 10, 7]))


def test_reference_backward_matches_autograd():
    q, k, v = (torch.randn(2, 3, 19, 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    cos, sin = R.rope_tables(19, 8)
    seq = torch.tensor([19, 7])
    with adaperceiver.use_backend("reference"):
        out = ops.block_masked_attention(q, k, v, [3, 10], seq_lens=seq, q_rope=(cos, sin),
                                         k_rope=(cos, sin))
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(R.attention(q, k, v, [3, 10], seq_lens=seq, q_rope=(cos, sin),
                                           k_rope=(cos, sin)), (q, k, v), g)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-10 and b.abs().max() > 0


def test_op_errors_name_parameter_value_and_allowed():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"token_grans=\[4, 2\] .*strictly increasing"):
        ops.block_masked_attention(q, q, q, [4, 2])
    with pytest.raises(TypeError, match=r"q.dtype=torch.int64"):
        ops.block_masked_attention(q.long(), q, q)
    with pytest.raises(ValueError, match=r"seq_lens of .*shape \(2,\) is not allowed; allowed:.* of "
                                         r"1 lengths in 0\.\.8"):
        ops.block_masked_attention(q, q, q, seq_lens=torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"token_grans needs self-attention .*Nq=8, Nk=5"):
        ops.block_masked_attention(q, q[:, :, :5], q[:, :, :5], [4])
    x, w1, b1, w2, b2 = torch.randn(2, 3, 4), torch.randn(6, 4), torch.randn(6), \
        torch.randn(4, 6), torch.randn(4)
    with pytest.raises(ValueError, match=r"hidden=7 is not allowed; allowed: ints in 1\.\.6"):
        ops.matryoshka_ffn(x, w1, b1, w2, b2, [1, 7])
    with pytest.raises(ValueError, match=r"hidden has 3 entries; the batch has 2"):
        ops.matryoshka_ffn(x, w1, b1, w2, b2, [1, 2, 3])


def test_dispatch_reasons_and_forcing(monkeypatch):
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"backend='nope' is not known; allowed: triton, cuda"):
        with adaperceiver.use_backend("nope"):
            pass
    # a forced backend that cannot take the input raises with its reasons. The Triton backend
    # is imported first, with the interpreter on: kernels jitted while TRITON_INTERPRET is unset
    # would stay compiled-mode kernels for every later test in this process
    importlib.import_module("adaperceiver.kernels.attention")
    importlib.import_module("adaperceiver.kernels.matryoshka")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with adaperceiver.use_backend("triton"):
        with pytest.raises(ops.NoBackendError, match=r"forced backend 'triton'.*\n.*triton: "):
            ops.block_masked_attention(q, q, q)
    with adaperceiver.use_backend("cuda"):
        with pytest.raises(ops.NoBackendError, match=r"cuda: "):
            ops.block_masked_attention(q, q, q)
    monkeypatch.setenv("ADAPERCEIVER_BACKEND", "reference")
    assert ops.forced_backend() == "reference"
    with adaperceiver.use_backend("auto"):
        assert ops.forced_backend() is None
    monkeypatch.setenv("ADAPERCEIVER_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"backend='bogus' is not known"):
        ops.forced_backend()
    reasons = ops.available_backends("attention", AttentionInputs.build(q, q, q))
    assert reasons["reference"] == [] and reasons["cuda"]
