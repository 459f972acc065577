r"""Philox4x32-10, the counter-based generator behind normdrop's dropout masks.

Philox (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011;
the Random123 library) maps a 128-bit *counter* and a 64-bit *key* to 128 random bits through
ten rounds of a keyed bijection. Nothing is stateful: the bits of counter ``c`` can be computed
by any thread, in any order, any number of times. That is what lets the dropout backward
regenerate the forward's mask from the seed alone, and what makes the masks independent of
the number of threads.

One round, on 32-bit words ``(c0, c1, c2, c3)`` and key ``(k0, k1)``, with the multipliers
``M0 = 0xD2511F53``, ``M1 = 0xCD9E8D57`` (``hi``/``lo``: the two halves of a 64-bit product)::

    c0, c1, c2, c3 <- hi(M1 * c2) ^ c1 ^ k0,  lo(M1 * c2),  hi(M0 * c0) ^ c3 ^ k1,  lo(M0 * c0)
    k0, k1         <- k0 + 0x9E3779B9,  k1 + 0xBB67AE85            (Weyl key schedule, mod 2^32)

Conventions, chosen to be those of Triton's ``tl.randint4x`` / ``tl.rand`` (and so of a future
GPU kernel, which can reproduce every CPU mask bit for bit):

* ``seed`` is a 64-bit integer; the key is ``(seed mod 2^32, seed >> 32)``.
* The counter of integer ``q`` is ``(q mod 2^32, q >> 32, 0, 0)``; ``randint4x(seed, q)`` is
  the four output words of that counter.
* A word ``w`` becomes a uniform float32 in ``[0, 1)`` as in ``tl.rand``: read ``w`` as an
  int32, fold negatives with ``x -> -x - 1`` (a 31-bit integer ``f``), and multiply by
  ``4.6566127342e-10`` in float32.

Element ``j`` of a stream (``j = offset + i`` for element ``i`` of a tensor, in memory order)
takes one word. Four consecutive counters' worth of work would waste three words per element,
so elements go in groups of ``GROUP = 4 * LANES = 256``: element ``j`` reads word
``(j // LANES) % 4`` of counter ``(j // GROUP) * LANES + j % LANES``. In Triton::

    q    = (j // 256) * 64 + j % 64
    w    = tl.randint4x(seed, q)[(j // 64) % 4]          # pick with tl.where
    keep = uint_to_uniform_float(w) > p                   # == tl.rand semantics

Dropout keeps element ``j`` when that uniform is ``> p``. Because the float conversion is
monotone, the test is done on the folded integer: ``keep <=> f > keep_threshold(p)``, the
threshold being found once per call by bisection with exact float32 arithmetic. The uniforms
are float32, so near 1 they step by ``2^-24``, and the threshold rounds ``p`` to float32: the
keep probability is ``1 - p`` within about two such steps, 1.2e-7 absolute (see
``masks.MIN_KEEP`` for where that stops being small next to ``1 - p``).
"""

from __future__ import annotations

import functools

import numpy as np
from numba import njit

from normdrop.errors import InputError

__all__ = [
    "GROUP",
    "LANES",
    "ROUNDS",
    "UNIFORM_SCALE",
    "fill_words",
    "fold31",
    "keep_threshold",
    "philox",
    "philox4x32",
    "randint4x",
    "split_seed",
    "stream_words",
    "words",
]

ROUNDS = 10
LANES = 64
GROUP = 4 * LANES

_M0 = np.uint64(0xD2511F53)  # Random123 PHILOX_M4x32_0, Triton PHILOX_ROUND_A
_M1 = np.uint64(0xCD9E8D57)  # Random123 PHILOX_M4x32_1, Triton PHILOX_ROUND_B
_W0 = np.uint32(0x9E3779B9)  # golden ratio, Random123 PHILOX_W32_0
_W1 = np.uint32(0xBB67AE85)  # sqrt(3) - 1, Random123 PHILOX_W32_1
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_SIGN = np.uint32(31)
_MAGNITUDE = np.uint32(0x7FFFFFFF)
UNIFORM_SCALE = np.float32(4.6566127342e-10)  # Triton's uint_to_uniform_float for 32 bits


@njit(inline="always", cache=True)
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counter ``(c0, c1, c2, c3)`` under key ``(k0, k1)``: 4 uint32 words."""
    for _ in range(ROUNDS):
        product0 = _M0 * np.uint64(c0)
        product1 = _M1 * np.uint64(c2)
        c0, c1, c2, c3 = (
            np.uint32(product1 >> _SHIFT32) ^ c1 ^ k0,
            np.uint32(product1 & _LOW32),
            np.uint32(product0 >> _SHIFT32) ^ c3 ^ k1,
            np.uint32(product0 & _LOW32),
        )
        k0 = np.uint32(k0 + _W0)
        k1 = np.uint32(k1 + _W1)
    return c0, c1, c2, c3


@njit(inline="always", cache=True)
def fold31(word):
    """The 31-bit integer that ``tl.rand`` scales to [0, 1): ``x`` or ``-x - 1`` for int32 ``x``."""
    return np.uint32((word ^ (np.uint32(0) - (word >> _SIGN))) & _MAGNITUDE)


@njit(inline="always", cache=True)
def fill_words(words, first_group, n_groups, k0, k1):
    """Write the words of stream elements ``first_group * GROUP ...`` into ``words``.

    ``words[r]`` is the word of element ``first_group * GROUP + r``, for
    ``r < n_groups * GROUP``. The inner loop runs over counters and stores each output word
    contiguously, so it vectorizes.
    """
    zero = np.uint32(0)
    for g in range(n_groups):
        counter0 = (first_group + g) * LANES
        out = words[g * GROUP : (g + 1) * GROUP]
        for lane in range(LANES):
            counter = counter0 + lane
            w0, w1, w2, w3 = philox4x32(
                np.uint32(counter & 0xFFFFFFFF), np.uint32(counter >> 32), zero, zero, k0, k1
            )
            out[lane] = w0
            out[LANES + lane] = w1
            out[2 * LANES + lane] = w2
            out[3 * LANES + lane] = w3


@njit(cache=True)
def fill_stream(words, first, stop, k0, k1):
    """Write the words of stream elements ``[first, stop)`` into ``words``; return ``base``.

    Element ``j`` lands at ``words[j - base]``. Whole groups are generated, so ``words`` needs
    ``stop - first + 2 * GROUP`` entries at most (``stop - first + GROUP`` when
    ``first`` is a multiple of ``GROUP``).
    """
    first_group = first // GROUP
    n_groups = (stop + GROUP - 1) // GROUP - first_group
    fill_words(words, first_group, n_groups, k0, k1)
    return first_group * GROUP


@njit(cache=True)
def stream_words(first, stop, k0, k1):
    """Words of stream elements ``[first, stop)``: ``(words, base)``; ``j`` is at ``j - base``."""
    n_groups = (stop + GROUP - 1) // GROUP - first // GROUP
    words = np.empty(n_groups * GROUP, np.uint32)
    base = fill_stream(words, first, stop, k0, k1)
    return words, base


@njit(cache=True)
def _philox_kernel(counters, keys, out):
    for i in range(counters.shape[0]):
        c, k = counters[i], keys[i]
        out[i, 0], out[i, 1], out[i, 2], out[i, 3] = philox4x32(c[0], c[1], c[2], c[3], k[0], k[1])


@njit(cache=True)
def _stream_kernel(seed_lo, seed_hi, offset, out):
    words, base = stream_words(offset, offset + out.size, np.uint32(seed_lo), np.uint32(seed_hi))
    for i in range(out.size):
        out[i] = words[offset + i - base]


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key ``(k0, k1)`` of a 64-bit seed: its low and high 32 bits."""
    seed = int(seed) % 2**64
    return seed & 0xFFFFFFFF, seed >> 32


def _check_stream(offset: int, n: int) -> None:
    if not (0 <= int(offset) < 2**62 and 0 <= int(n) < 2**62):
        raise InputError(
            f"philox: offset and n must be integers in [0, 2**62), got offset={offset}, n={n}"
        )


def philox(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox4x32-10 of one 128-bit counter (4 words) under one 64-bit key (2 words)."""
    out = np.empty((1, 4), np.uint32)
    _philox_kernel(np.array([counter], np.uint32), np.array([key], np.uint32), out)
    return tuple(int(word) for word in out[0])


def randint4x(seed: int, counters: np.ndarray | list[int]) -> np.ndarray:
    """``(n, 4)`` uint32: Philox4x32-10 of counters ``(q mod 2^32, q >> 32, 0, 0)``, key ``seed``.

    Same values as Triton's ``tl.randint4x(seed, q)`` for 64-bit ``q``.
    """
    q = np.asarray(counters, dtype=np.uint64).reshape(-1)
    blocks = np.stack([q & 0xFFFFFFFF, q >> 32, 0 * q, 0 * q], axis=1).astype(np.uint32)
    keys = np.tile(np.array(split_seed(seed), np.uint32), (q.size, 1))
    out = np.empty((q.size, 4), np.uint32)
    _philox_kernel(blocks, keys, out)
    return out


def words(seed: int, offset: int, n: int) -> np.ndarray:
    """The raw uint32 words of stream elements ``offset ... offset + n - 1``."""
    _check_stream(offset, n)
    out = np.empty(int(n), np.uint32)
    _stream_kernel(*split_seed(seed), int(offset), out)
    return out


@functools.lru_cache(maxsize=256)  # a bisection of ~31 steps: once per p, not per call
def keep_threshold(p: float) -> int:
    """The largest folded word ``f`` whose uniform is ``<= p`` (float32 math, as on a GPU).

    Dropout keeps an element iff ``f > keep_threshold(p)``, which equals ``tl.rand(...) > p``
    because ``f -> float32(f) * scale`` is non-decreasing. For p >= the largest uniform
    (p = 1) it is ``2^31 - 1``: nothing is kept.
    """
    limit = np.float32(p)
    low, high = -1, 2**31 - 1  # invariant: uniform(low) <= limit < uniform(high + 1)
    if np.float32(high) * UNIFORM_SCALE <= limit:
        return high
    while high - low > 1:
        middle = (low + high) // 2
        if np.float32(middle) * UNIFORM_SCALE <= limit:
            low = middle
        else:
            high = middle
    return low
