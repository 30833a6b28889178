"""adaperceiver.testing: the kernel authors' toolkit catches wrong kernels and passes right ones."""
import pytest
import torch

import adaperceiver
from adaperceiver import ops
from adaperceiver.testing import (assert_close_to_reference, random_attention_case,
                                  random_ffn_case, reference_attention)


def _ref_backend_attention(q, k, v, token_grans, **kw):
    with adaperceiver.use_backend("reference"):
        return ops.block_masked_attention(q, k, v, token_grans, **kw)


def _ref_backend_ffn(*args):
    with adaperceiver.use_backend("reference"):
        return ops.matryoshka_ffn(*args)


@pytest.mark.parametrize("seed", range(12))
def test_cases_pass_for_a_correct_kernel(seed):
    for dtype in (torch.float32, torch.float64):
        assert_close_to_reference(_ref_backend_attention, random_attention_case(seed, dtype=dtype))
        assert_close_to_reference(_ref_backend_ffn, random_ffn_case(seed, dtype=dtype))


def test_planted_bugs_fail_naming_the_first_wrong_position():
    """Three classic kernel bugs, each caught with the first wrong (b, h, row, col) named."""
    case = random_attention_case(11, masked=True, cross=False, with_seq_lens=True, max_n=70)
    grans, n = case.token_grans, case.q.shape[2]
    assert case.seq_lens is not None and any(int(s) < n for s in case.seq_lens)

    def group_off_by_one(q, k, v, token_grans, **kw):   # every group ends one key late
        return _ref_backend_attention(q, k, v, sorted({min(g + 1, n) for g in token_grans}),
                                      **kw)

    def ignores_seq_lens(q, k, v, token_grans, **kw):
        return _ref_backend_attention(q, k, v, token_grans, **{**kw, "seq_lens": None})

    def drops_last_partial_tile(q, k, v, token_grans, block=32, **kw):
        out = _ref_backend_attention(q, k, v, token_grans, **kw).clone()
        tail = n - (n % block or block)                # first row of the last partial tile
        out[:, :, tail:] = 0.0
        return out

    for bad in (group_off_by_one, ignores_seq_lens, drops_last_partial_tile):
        with pytest.raises(AssertionError, match=r"first wrong element at \[\d+, \d+, \d+, "
                                                 r"\d+\]"):
            assert_close_to_reference(bad, case)


def test_wrong_kernels_are_caught():
    case = random_attention_case(3, masked=True, with_seq_lens=False, cross=False, max_n=60)
    assert case.token_grans is not None

    def off_by_one(q, k, v, token_grans, **kw):       # a mask one key too wide
        return _ref_backend_attention(q, k, v, [g + 1 for g in token_grans[:-1]]
                                      + token_grans[-1:], **kw)

    def unwritten_tail(q, k, v, token_grans, **kw):  # last query row never written
        out = _ref_backend_attention(q, k, v, token_grans, **kw).clone()
        out[:, :, -1] = float("nan")
        return out

    for bad in (off_by_one, unwritten_tail):
        with pytest.raises(AssertionError):
            assert_close_to_reference(bad, case)
    ffn = random_ffn_case(5)

    def full_width(x, w1, b1, w2, b2, hidden):         # ignores the widths
        return _ref_backend_ffn(x, w1, b1, w2, b2, [w1.shape[0]] * x.shape[0])

    with pytest.raises(AssertionError, match="max abs error"):
        assert_close_to_reference(full_width, ffn)


def test_reference_attention_is_float64_and_zero_past_lengths():
    case = random_attention_case(1, dtype=torch.float16, with_seq_lens=True, cross=False)
    ref = reference_attention(*case.args(), **case.kwargs())
    assert ref.dtype == torch.float64
    for b, n in enumerate(case.seq_lens.tolist()):
        assert ref[b, :, n:].abs().max() == 0 if n < ref.shape[2] else True
