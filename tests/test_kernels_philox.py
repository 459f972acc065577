"""The Philox4x32-10 generator of the dropout masks.

Oracles: Random123's known-answer vectors; a plain-Python Philox written here from the paper,
with Triton's (seed, offset) -> 4 x uint32 convention and its float conversion (``tl.rand``);
exact float32 arithmetic for the keep threshold. Statistics: binomial 99.9% intervals.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from normdrop.kernels import masks, philox

MASK32 = 0xFFFFFFFF
Z999 = 3.2905  # two-sided 99.9% normal quantile

# Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter, key, expected output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def python_philox(counter, key, rounds=10):
    """Philox4x32 from Salmon et al. (2011), Python integers only."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def triton_randint4x(seed, q):
    """Triton's randint4x(seed, q) for a 64-bit q: counter (lo, hi, 0, 0), key (lo, hi)."""
    return python_philox((q & MASK32, q >> 32, 0, 0), (seed & MASK32, (seed >> 32) & MASK32))


def triton_uniform(word):
    """Triton's uint_to_uniform_float for 32 bits, in float32."""
    x = word - 2**32 if word >= 2**31 else word
    x = -x - 1 if x < 0 else x
    return np.float32(x) * np.float32(4.6566127342e-10)


def element_word(seed, j):
    """The documented element -> word map: groups of 256 elements, 64 counters, 4 words."""
    return triton_randint4x(seed, (j // 256) * 64 + j % 64)[(j // 64) % 4]


@pytest.mark.parametrize(("counter", "key", "expected"), KNOWN_ANSWERS)
def test_known_answer_vectors(counter, key, expected):
    assert philox.philox(counter, key) == expected
    assert python_philox(counter, key) == expected


@given(
    seed=st.integers(0, 2**64 - 1),
    counters=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=8),
)
def test_randint4x_matches_triton_convention(seed, counters):
    got = philox.randint4x(seed, counters)
    expected = [triton_randint4x(seed, q) for q in counters]
    assert got.tolist() == [list(row) for row in expected]


@given(
    seed=st.integers(0, 2**63 - 1),
    offset=st.integers(0, 2**40),
    n=st.integers(1, 700),
)
def test_stream_words_follow_the_documented_element_map(seed, offset, n):
    got = philox.words(seed, offset, n)
    expected = [element_word(seed, offset + i) for i in range(n)]
    assert got.tolist() == expected


@given(seed=st.integers(0, 2**63 - 1), offset=st.integers(0, 2**33), n=st.integers(1, 300))
def test_uniform_is_triton_rand(seed, offset, n):
    got = masks.uniform(seed, offset, n).numpy()
    expected = np.array([triton_uniform(element_word(seed, offset + i)) for i in range(n)])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert got.min() >= 0 and got.max() < 1


def test_keep_rate_is_within_the_documented_bound_down_to_min_keep():
    """Folded words are uniform on [0, 2^31): the kernel keeps (2^31 - 1 - threshold) / 2^31
    exactly. docs/kernels.md and masks.MIN_KEEP promise 1.2e-7 absolute, 1.25e-4 relative."""
    grid = np.linspace(0.0, 1 - masks.MIN_KEEP, 4001)
    near_limit = 1 - masks.MIN_KEEP - np.linspace(0.0, 1e-3, 4001)
    for p in np.concatenate([grid, near_limit]):
        keep = (2**31 - 1 - philox.keep_threshold(float(p))) / 2**31
        assert abs(keep - (1 - p)) <= 1.2e-7
        assert abs(keep - (1 - p)) <= 1.25e-4 * (1 - p)


@given(p=st.floats(0.0, 1.0, allow_nan=False))
def test_keep_threshold_is_the_float32_boundary(p):
    threshold = philox.keep_threshold(p)
    limit = np.float32(p)
    scale = np.float32(4.6566127342e-10)
    assert np.float32(threshold) * scale <= limit
    if threshold < 2**31 - 1:
        assert np.float32(threshold + 1) * scale > limit


@given(seed=st.integers(0, 2**63 - 1), p=st.floats(0.01, 0.99), n=st.integers(1, 2000))
def test_keep_mask_is_uniform_above_p(seed, p, n):
    mask = masks.keep_mask(seed, 7, n, p)
    uniform = masks.uniform(seed, 7, n)
    assert torch.equal(mask, uniform > np.float32(p))


def _binomial_interval(n, q):
    half = Z999 * math.sqrt(n * q * (1 - q))
    return n * q - half, n * q + half


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_keep_rate_within_binomial_interval(p):
    n = 1 << 20
    kept = int(masks.keep_mask(12345, 0, n, p).sum())
    low, high = _binomial_interval(n, 1 - p)
    assert low <= kept <= high


@pytest.mark.parametrize("lag", [1, 64, 128, 192, 256])
def test_neighbours_are_independent(lag):
    # lag 1: next element (same word index, next counter); 64/128/192: the other words of the
    # same counter; 256: the next group. Joint keep rate must be (1 - p)^2.
    p, n = 0.5, 1 << 19
    mask = masks.keep_mask(99, 0, n + lag, p).numpy()
    both = int((mask[:n] & mask[lag:]).sum())
    low, high = _binomial_interval(n, (1 - p) ** 2)
    assert low <= both <= high


@pytest.mark.parametrize(("seed_b", "offset_b"), [(1, 0), (2**32, 0), (0, 1 << 20), (0, 256)])
def test_streams_of_other_seeds_and_offsets_are_uncorrelated(seed_b, offset_b):
    p, n = 0.5, 1 << 19
    a = masks.keep_mask(0, 0, n, p).numpy()
    b = masks.keep_mask(seed_b, offset_b, n, p).numpy()
    agree = int((a == b).sum())
    low, high = _binomial_interval(n, p * p + (1 - p) * (1 - p))
    assert low <= agree <= high


def test_bits_are_balanced():
    # Every one of the 32 bit positions is set in half of the words.
    n = 1 << 18
    words = philox.words(2024, 0, n)
    ones = np.unpackbits(words.view(np.uint8)).reshape(n, 32).sum(axis=0)
    low, high = _binomial_interval(n, 0.5)
    assert ((ones >= low) & (ones <= high)).all()


def test_seed_follows_torch_generator():
    torch.manual_seed(3)
    first = masks.draw_seed()
    torch.manual_seed(3)
    assert masks.draw_seed() == first
    generator = torch.Generator().manual_seed(3)
    assert masks.draw_seed(generator) == masks.draw_seed(torch.Generator().manual_seed(3))
    assert first.dtype == torch.int64 and first.dim() == 0 and int(first) >= 0


def test_bad_stream_arguments_are_rejected():
    with pytest.raises(ValueError, match="offset and n"):
        philox.words(0, -1, 4)
