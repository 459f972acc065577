r"""Numba CPU kernels: BatchNorm statistics, the fused BatchNorm -> activation -> Dropout forward
and backward, and Dropout.

Every kernel works on the tensor's memory as a flat array, in memory order, without copies.
Two layouts cover the BatchNorm inputs (``C`` channels, ``S`` values per (sample, channel)):

* planar: ``(N, C, S)`` in memory, S fastest: contiguous ``(N, C, L)``, NCHW, NCDHW.
  Element ``i`` is in plane ``i // S`` and channel ``(i // S) % C``.
* rows: ``(M, C)`` in memory, C fastest: ``(N, C)``, channels_last NHWC and NDHWC.
  Element ``i`` is in channel ``i % C``.

The math is :mod:`normdrop.functional`'s; with ``z = (x - mean) * scale + shift`` (``scale =
invstd * weight``, ``shift = bias``), ``a = act(z)`` and the dropout factor ``f`` (``1 / (1 - p)``
or 0)::

    forward:   y  = a * f
    backward:  g  = (dy * f) * act'(z)                        (the gradient reaching z)
               sum_g = sum(g),  sum_gxhat = invstd * sum(g * (x - mean))   per channel
               dx = ((g - sum_g / m) - xhat * sum_gxhat / m) * scale      (training)
               dx = g * scale                                            (inference)

Determinism: work is cut into fixed blocks of ``BLOCK`` elements (a multiple of the generator's
``GROUP``, so a block's dropout words are generated once, none wasted). A reduction stores one
partial result per (block, plane) piece (planar) or per (block, channel) (rows) and merges them
per channel in memory order, so the result does not depend on how many threads ran the blocks.
Statistics are exact for data with a large offset: values are shifted by one value of their
channel, then within a piece two passes (mean, then squared deviations from it, in float64),
across pieces Chan's pairwise merge.

Specialization: the activation and whether dropout is on are constants of each compiled kernel
(the ``*_kernel`` factories build one per combination, on first use), so the inner loops carry
no branch but the per-element selects and vectorize.

Floating point: the kernels are compiled with ``fastmath=False``; only the in-cache summation
helpers (``_sum*``) allow ``reassoc``, so that LLVM can vectorize a float64 sum. Their order is
fixed at compile time, so results are reproducible and thread-count independent, and NaN/Inf
propagate (no ``nnan``/``ninf``).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit, prange

from normdrop.kernels.philox import GROUP, fold31, stream_words

__all__ = [
    "ACTIVATIONS",
    "BLOCK",
    "apply_kernel",
    "batch_stats_planar",
    "batch_stats_rows",
    "dropout_flat",
    "forward_kernel",
    "make_params",
    "reduce_kernel",
]

BLOCK = 64 * GROUP  # 16384 elements: a block's input, output and words sit in L2
_CHUNK = 1024  # scratch length for the backward's per-plane sums (L1)

IDENTITY, RELU, LEAKY_RELU, GELU = 0, 1, 2, 3
# Codes of normdrop.kernels.activations.ACTIVATION_NAMES; the formulas below follow torch's.
ACTIVATIONS = {"identity": IDENTITY, "relu": RELU, "leaky_relu": LEAKY_RELU, "gelu": GELU}
PLANAR, ROWS = "planar", "rows"

# Scalar parameters travel in one small array of the input's dtype (float32 math stays
# float32) and are unpacked into a tuple at the top of each kernel (registers, not loads).
_SLOPE, _DROP_SCALE, _ZERO, _HALF, _ONE, _SQRT1_2, _GELU_BETA = range(7)

_KERNEL = {"parallel": True, "cache": True, "fastmath": False}
_INLINE = {"inline": "always", "cache": True}
_SUM = {"cache": True, "fastmath": {"reassoc"}}


def make_params(dtype: np.dtype, negative_slope: float, drop_scale: float) -> np.ndarray:
    """The kernels' scalar parameters in ``dtype`` (see the ``_SLOPE ...`` indices)."""
    values = [
        negative_slope,
        drop_scale,
        0.0,
        0.5,
        1.0,
        math.sqrt(0.5),
        math.sqrt(0.5) / math.sqrt(math.pi),  # M_2_SQRTPI * M_SQRT1_2 / 2, as ATen's GELU
    ]
    return np.array(values, dtype=dtype)


# --------------------------------------------------------------------------------------------
# Element-wise pieces (act, drop, training: compile-time constants in the kernels)
# --------------------------------------------------------------------------------------------


@njit(**_INLINE)
def _unpack(params):
    return (params[0], params[1], params[2], params[3], params[4], params[5], params[6])


@njit(**_INLINE)
def _activate(z, act, cs):
    if act == RELU:
        return cs[_ZERO] if z < cs[_ZERO] else z  # NaN stays NaN, as torch.relu
    if act == LEAKY_RELU:
        return z if z > cs[_ZERO] else z * cs[_SLOPE]
    if act == GELU:  # exact GELU: z * Phi(z)
        return z * (cs[_HALF] * (cs[_ONE] + math.erf(z * cs[_SQRT1_2])))
    return z


@njit(**_INLINE)
def _activate_grad(d, z, act, cs):
    """``d * act'(z)``, with the conventions of torch's backward formulas."""
    if act == RELU:
        return d if z > cs[_ZERO] else cs[_ZERO]
    if act == LEAKY_RELU:
        return d if z > cs[_ZERO] else d * cs[_SLOPE]
    if act == GELU:
        cdf = cs[_HALF] * (cs[_ONE] + math.erf(z * cs[_SQRT1_2]))
        pdf = cs[_GELU_BETA] * math.exp(z * z * -cs[_HALF])
        return d * (cdf + z * pdf)
    return d


@njit(**_INLINE)
def _drop_factor(word, threshold, cs):
    return cs[_DROP_SCALE] if fold31(word) > threshold else cs[_ZERO]


@njit(**_INLINE)
def _forward_value(x, words, k, mu, sc, sh, threshold, cs, act, drop):
    """The output at element ``k`` of a segment; ``words[k]`` is read only when ``drop``."""
    a = _activate((x - mu) * sc + sh, act, cs)
    return a * _drop_factor(words[k], threshold, cs) if drop else a


@njit(**_INLINE)
def _grad_at_z(dy, x, words, k, mu, sc, sh, threshold, cs, act, drop):
    """The gradient reaching ``z`` at element ``k`` of a segment."""
    d = dy * _drop_factor(words[k], threshold, cs) if drop else dy
    return _activate_grad(d, (x - mu) * sc + sh, act, cs)


@njit(**_INLINE)
def _block_words(start, stop, offset, key0, key1, drop):
    """The dropout words of elements ``[start, stop)``, and where element 0 would sit."""
    if drop:
        words, base = stream_words(offset + start, offset + stop, key0, key1)
        return words, offset - base
    return np.empty(0, np.uint32), 0  # never read: the loops only index it when drop


@njit(**_INLINE)
def _key(key0, key1, threshold):
    return np.uint32(key0), np.uint32(key1), np.uint32(max(threshold, 0))


# --------------------------------------------------------------------------------------------
# Block geometry
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def _plane_pieces(numel, plane):
    """Index of each block's first (block, plane) piece; the last entry is the piece count."""
    n_blocks = (numel + BLOCK - 1) // BLOCK
    first_piece = np.empty(n_blocks + 1, np.int64)
    total = 0
    for b in range(n_blocks):
        start = b * BLOCK
        stop = min(start + BLOCK, numel)
        first_piece[b] = total
        total += (stop - 1) // plane - start // plane + 1
    first_piece[n_blocks] = total
    return first_piece


@njit(**_INLINE)
def _rows_per_block(channels):
    """Whole rows per block for the rows layout: >= BLOCK elements, >= 8 rows (so the
    per-block partial sums stay small next to the input)."""
    return max(8, (BLOCK + channels - 1) // channels)


# --------------------------------------------------------------------------------------------
# Reductions: fixed pieces, fixed merge order
# --------------------------------------------------------------------------------------------


@njit(**_SUM)
def _sum(values):
    total = 0.0
    for k in range(values.size):
        total += values[k]
    return total


@njit(**_SUM)
def _sum_shifted(values, shift):
    """``sum(values - shift)`` in float64."""
    total = 0.0
    for k in range(values.size):
        total += np.float64(values[k]) - shift
    return total


@njit(**_SUM)
def _sum_squared_deviations(values, shift, mean):
    """``sum(((values - shift) - mean)^2)`` in float64."""
    total = 0.0
    for k in range(values.size):
        deviation = (np.float64(values[k]) - shift) - mean
        total += deviation * deviation
    return total


@njit(cache=True)
def _channel_shifts(first_values):
    """One value of each channel (float64), subtracted before summing.

    Data with a large offset then sum as small numbers: the piece means, and so the differences
    of piece means in Chan's merge, keep their relative precision (a float64 mean of values
    near 1e6 would lose six digits of the deviations).
    """
    shift = np.empty(first_values.size)
    for c in range(first_values.size):
        value = np.float64(first_values[c])
        shift[c] = value if np.isfinite(value) else 0.0
    return shift


@njit(**_INLINE)
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Merge two (count, mean, sum of squared deviations) summaries (Chan et al. 1979)."""
    if count_b == 0:
        return count_a, mean_a, m2_a
    count = count_a + count_b
    delta = mean_b - mean_a
    weight_b = count_b / count
    return count, mean_a + delta * weight_b, m2_a + m2_b + delta * delta * count_a * weight_b


@njit(cache=True)
def _merge_plane_stats(first_piece, counts, means, m2s, channels, plane, samples):
    """Per-channel (mean, biased var) from the pieces, in memory order."""
    mean_out = np.empty(channels)
    var_out = np.empty(channels)
    for c in range(channels):
        count, mean, m2 = 0, 0.0, 0.0
        for n in range(samples):
            pl = n * channels + c
            for b in range(pl * plane // BLOCK, ((pl + 1) * plane - 1) // BLOCK + 1):
                k = first_piece[b] + pl - (b * BLOCK) // plane
                count, mean, m2 = _chan_merge(count, mean, m2, counts[k], means[k], m2s[k])
        mean_out[c] = mean
        var_out[c] = m2 / count
    return mean_out, var_out


@njit(cache=True)
def _merge_plane_sums(first_piece, piece_g, piece_h, channels, plane, samples):
    """Per-channel sums of the pieces, in memory order."""
    sum_g = np.zeros(channels)
    sum_h = np.zeros(channels)
    for c in range(channels):
        for n in range(samples):
            pl = n * channels + c
            for b in range(pl * plane // BLOCK, ((pl + 1) * plane - 1) // BLOCK + 1):
                k = first_piece[b] + pl - (b * BLOCK) // plane
                sum_g[c] += piece_g[k]
                sum_h[c] += piece_h[k]
    return sum_g, sum_h


@njit(**_KERNEL)
def batch_stats_planar(x, channels, plane):
    """Per-channel mean and biased variance (float64) of a planar ``(N, C, S)`` flat input."""
    numel = x.size
    shift = _channel_shifts(x[: channels * plane : plane])
    first_piece = _plane_pieces(numel, plane)
    n_blocks = first_piece.size - 1
    counts = np.empty(first_piece[n_blocks], np.int64)
    means = np.empty(first_piece[n_blocks])
    m2s = np.empty(first_piece[n_blocks])
    for b in prange(n_blocks):
        start = b * BLOCK
        stop = min(start + BLOCK, numel)
        first = start // plane
        for pl in range(first, (stop - 1) // plane + 1):
            lo = max(start, pl * plane)
            hi = min(stop, (pl + 1) * plane)
            k = first_piece[b] + pl - first
            c_shift = shift[pl % channels]
            mean = _sum_shifted(x[lo:hi], c_shift) / (hi - lo)
            counts[k] = hi - lo
            means[k] = mean
            m2s[k] = _sum_squared_deviations(x[lo:hi], c_shift, mean)
    samples = numel // (channels * plane)
    mean, var = _merge_plane_stats(first_piece, counts, means, m2s, channels, plane, samples)
    return mean + shift, var


@njit(**_KERNEL)
def batch_stats_rows(x, channels):
    """Per-channel mean and biased variance (float64) of a rows ``(M, C)`` flat input."""
    rows = x.size // channels
    shift = _channel_shifts(x[:channels])
    per_block = _rows_per_block(channels)
    n_blocks = (rows + per_block - 1) // per_block
    means = np.zeros((n_blocks, channels))
    m2s = np.zeros((n_blocks, channels))
    for b in prange(n_blocks):
        m0 = b * per_block
        m1 = min(m0 + per_block, rows)
        xs = x[m0 * channels : m1 * channels]
        mean, m2 = means[b], m2s[b]
        for r in range(m1 - m0):
            row = xs[r * channels : (r + 1) * channels]
            for c in range(channels):
                mean[c] += np.float64(row[c]) - shift[c]
        for c in range(channels):
            mean[c] /= m1 - m0
        for r in range(m1 - m0):
            row = xs[r * channels : (r + 1) * channels]
            for c in range(channels):
                deviation = (np.float64(row[c]) - shift[c]) - mean[c]
                m2[c] += deviation * deviation
    # Chan's merge (as _chan_merge), block by block: every channel has the same count here,
    # so the loop over channels is element-wise and vectorizes.
    mean_acc = np.zeros(channels)
    m2_acc = np.zeros(channels)
    count = 0
    for b in range(n_blocks):
        in_block = min(per_block, rows - b * per_block)
        weight_b = in_block / (count + in_block)
        block_mean, block_m2 = means[b], m2s[b]
        for c in range(channels):
            delta = block_mean[c] - mean_acc[c]
            mean_acc[c] = mean_acc[c] + delta * weight_b
            m2_acc[c] = m2_acc[c] + block_m2[c] + delta * delta * count * weight_b
        count += in_block
    return shift + mean_acc, m2_acc / count


# --------------------------------------------------------------------------------------------
# Fused forward: y = act((x - mean) * scale + shift) * f
# --------------------------------------------------------------------------------------------

# Per-channel vectors travel stacked in one (k, C) array ``coefs``. The planar kernels read them
# as scalars per plane; the rows kernels as 1-D rows, per row of the input (2-D indexing in the
# inner loop would stop LLVM from vectorizing it).
_MEAN, _SCALE, _SHIFT, _INVSTD, _COEF_G, _COEF_XHAT = range(6)


@functools.cache
def forward_kernel(layout: str, act: int, drop: bool):
    """The forward kernel ``(x, y, channels, plane, coefs, params, key0, key1, offset,
    threshold)`` for one layout, activation and dropout on/off; ``coefs`` stacks mean, scale,
    shift."""
    if layout == PLANAR:

        @njit(**_KERNEL)
        def planar(x, y, channels, plane, coefs, params, key0, key1, offset, thr):
            cs = _unpack(params)
            k0, k1, t = _key(key0, key1, thr)
            numel = x.size
            for b in prange((numel + BLOCK - 1) // BLOCK):
                start = b * BLOCK
                stop = min(start + BLOCK, numel)
                words, w0 = _block_words(start, stop, offset, k0, k1, drop)
                for pl in range(start // plane, (stop - 1) // plane + 1):
                    lo = max(start, pl * plane)
                    hi = min(stop, (pl + 1) * plane)
                    c = pl % channels
                    mu, sc, sh = coefs[_MEAN, c], coefs[_SCALE, c], coefs[_SHIFT, c]
                    xs, ys, ws = x[lo:hi], y[lo:hi], words[w0 + lo : w0 + hi]
                    for k in range(hi - lo):
                        ys[k] = _forward_value(xs[k], ws, k, mu, sc, sh, t, cs, act, drop)

        return planar

    @njit(**_KERNEL)
    def rows(x, y, channels, plane, coefs, params, key0, key1, offset, thr):
        cs = _unpack(params)
        k0, k1, t = _key(key0, key1, thr)
        per_block = _rows_per_block(channels) * channels
        mean, scale, shift = coefs[_MEAN], coefs[_SCALE], coefs[_SHIFT]
        for b in prange((x.size + per_block - 1) // per_block):
            lo = b * per_block
            hi = min(lo + per_block, x.size)
            words, w0 = _block_words(lo, hi, offset, k0, k1, drop)
            for start in range(lo, hi, channels):
                xs, ys = x[start : start + channels], y[start : start + channels]
                ws = words[w0 + start : w0 + start + channels]
                for c in range(channels):
                    ys[c] = _forward_value(xs[c], ws, c, mean[c], scale[c], shift[c], t, cs, act,
                                           drop)  # fmt: skip

    return rows


# --------------------------------------------------------------------------------------------
# Backward, pass 1: sum(g) and sum(g * (x - mean)) per channel
# --------------------------------------------------------------------------------------------


@functools.cache
def reduce_kernel(layout: str, act: int, drop: bool):
    """The kernel ``(dy, x, channels, plane, coefs, params, key0, key1, offset, threshold) ->
    (sum_g, sum_h)`` (float64, ``h = g * (x - mean)``); ``coefs`` stacks mean, scale, shift."""
    if layout == PLANAR:

        @njit(**_KERNEL)
        def planar(dy, x, channels, plane, coefs, params, key0, key1, offset, thr):
            cs = _unpack(params)
            k0, k1, t = _key(key0, key1, thr)
            numel = x.size
            first_piece = _plane_pieces(numel, plane)
            n_blocks = first_piece.size - 1
            piece_g = np.empty(first_piece[n_blocks])
            piece_h = np.empty(first_piece[n_blocks])
            for b in prange(n_blocks):
                start = b * BLOCK
                stop = min(start + BLOCK, numel)
                words, w0 = _block_words(start, stop, offset, k0, k1, drop)
                g_buf = np.empty(_CHUNK)
                h_buf = np.empty(_CHUNK)
                first = start // plane
                for pl in range(first, (stop - 1) // plane + 1):
                    c = pl % channels
                    mu, sc, sh = coefs[_MEAN, c], coefs[_SCALE, c], coefs[_SHIFT, c]
                    sum_g = 0.0
                    sum_h = 0.0
                    # Per plane piece, chunk by chunk: element-wise g into scratch, then sums.
                    for lo in range(max(start, pl * plane), min(stop, (pl + 1) * plane), _CHUNK):
                        hi = min(lo + _CHUNK, stop, (pl + 1) * plane)
                        dys, xs, ws = dy[lo:hi], x[lo:hi], words[w0 + lo : w0 + hi]
                        for k in range(hi - lo):
                            g = _grad_at_z(dys[k], xs[k], ws, k, mu, sc, sh, t, cs, act, drop)
                            g_buf[k] = g
                            h_buf[k] = np.float64(g) * np.float64(xs[k] - mu)
                        sum_g += _sum(g_buf[: hi - lo])
                        sum_h += _sum(h_buf[: hi - lo])
                    piece_g[first_piece[b] + pl - first] = sum_g
                    piece_h[first_piece[b] + pl - first] = sum_h
            samples = numel // (channels * plane)
            return _merge_plane_sums(first_piece, piece_g, piece_h, channels, plane, samples)

        return planar

    @njit(**_KERNEL)
    def rows(dy, x, channels, plane, coefs, params, key0, key1, offset, thr):
        cs = _unpack(params)
        k0, k1, t = _key(key0, key1, thr)
        per_block = _rows_per_block(channels) * channels
        n_blocks = (x.size + per_block - 1) // per_block
        mean, scale, shift = coefs[_MEAN], coefs[_SCALE], coefs[_SHIFT]
        partial = np.zeros((n_blocks, 2, channels))
        for b in prange(n_blocks):
            lo = b * per_block
            hi = min(lo + per_block, x.size)
            words, w0 = _block_words(lo, hi, offset, k0, k1, drop)
            acc_g, acc_h = partial[b, 0], partial[b, 1]
            for start in range(lo, hi, channels):
                dys, xs = dy[start : start + channels], x[start : start + channels]
                ws = words[w0 + start : w0 + start + channels]
                for c in range(channels):
                    mu = mean[c]
                    g = _grad_at_z(dys[c], xs[c], ws, c, mu, scale[c], shift[c], t, cs, act, drop)
                    acc_g[c] += g
                    acc_h[c] += np.float64(g) * np.float64(xs[c] - mu)
        sum_g = np.zeros(channels)
        sum_h = np.zeros(channels)
        for b in range(n_blocks):
            for c in range(channels):
                sum_g[c] += partial[b, 0, c]
                sum_h[c] += partial[b, 1, c]
        return sum_g, sum_h

    return rows


# --------------------------------------------------------------------------------------------
# Backward, pass 2: dx
# --------------------------------------------------------------------------------------------


@njit(**_INLINE)
def _apply_plane(dys, xs, dxs, ws, mu, sc, sh, inv, coef_g, coef_xhat, t, cs, act, drop, training):
    # The branch sits outside the loops: each loop is straight-line and vectorizes.
    if training:
        for k in range(xs.size):
            g = _grad_at_z(dys[k], xs[k], ws, k, mu, sc, sh, t, cs, act, drop)
            dxs[k] = ((g - coef_g) - ((xs[k] - mu) * inv) * coef_xhat) * sc
    else:
        for k in range(xs.size):
            dxs[k] = _grad_at_z(dys[k], xs[k], ws, k, mu, sc, sh, t, cs, act, drop) * sc


@njit(**_INLINE)
def _apply_row(dys, xs, dxs, ws, mean, scale, shift, invstd, coef_g, coef_xhat, t, cs, act, drop,
               training):  # fmt: skip
    if training:
        for c in range(xs.size):
            mu, sc = mean[c], scale[c]
            g = _grad_at_z(dys[c], xs[c], ws, c, mu, sc, shift[c], t, cs, act, drop)
            dxs[c] = ((g - coef_g[c]) - ((xs[c] - mu) * invstd[c]) * coef_xhat[c]) * sc
    else:
        for c in range(xs.size):
            g = _grad_at_z(dys[c], xs[c], ws, c, mean[c], scale[c], shift[c], t, cs, act, drop)
            dxs[c] = g * scale[c]


@functools.cache
def apply_kernel(layout: str, act: int, drop: bool):
    """The kernel ``(dy, x, dx, channels, plane, coefs, training, params, key0, key1, offset,
    threshold)``; ``coefs`` stacks mean, scale, shift, invstd, ``sum_g / m`` and
    ``sum_gxhat / m`` (the last two unused in inference)."""
    if layout == PLANAR:

        @njit(**_KERNEL)
        def planar(dy, x, dx, channels, plane, coefs, training, params, key0, key1, offset, thr):
            cs = _unpack(params)
            k0, k1, t = _key(key0, key1, thr)
            numel = x.size
            for b in prange((numel + BLOCK - 1) // BLOCK):
                start = b * BLOCK
                stop = min(start + BLOCK, numel)
                words, w0 = _block_words(start, stop, offset, k0, k1, drop)
                for pl in range(start // plane, (stop - 1) // plane + 1):
                    lo = max(start, pl * plane)
                    hi = min(stop, (pl + 1) * plane)
                    c = pl % channels
                    _apply_plane(
                        dy[lo:hi],
                        x[lo:hi],
                        dx[lo:hi],
                        words[w0 + lo : w0 + hi],
                        coefs[_MEAN, c],
                        coefs[_SCALE, c],
                        coefs[_SHIFT, c],
                        coefs[_INVSTD, c],
                        coefs[_COEF_G, c],
                        coefs[_COEF_XHAT, c],
                        t,
                        cs,
                        act,
                        drop,
                        training,
                    )

        return planar

    @njit(**_KERNEL)
    def rows(dy, x, dx, channels, plane, coefs, training, params, key0, key1, offset, thr):
        cs = _unpack(params)
        k0, k1, t = _key(key0, key1, thr)
        per_block = _rows_per_block(channels) * channels
        mean, scale, shift = coefs[_MEAN], coefs[_SCALE], coefs[_SHIFT]
        invstd, coef_g, coef_xhat = coefs[_INVSTD], coefs[_COEF_G], coefs[_COEF_XHAT]
        for b in prange((x.size + per_block - 1) // per_block):
            lo = b * per_block
            hi = min(lo + per_block, x.size)
            words, w0 = _block_words(lo, hi, offset, k0, k1, drop)
            for start in range(lo, hi, channels):
                stop = start + channels
                _apply_row(dy[start:stop], x[start:stop], dx[start:stop],
                           words[w0 + start : w0 + stop], mean, scale, shift, invstd, coef_g,
                           coef_xhat, t, cs, act, drop, training)  # fmt: skip

    return rows


# --------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------


@njit(**_KERNEL)
def dropout_flat(src, dst, params, key0, key1, offset, threshold):
    """``dst = src * f`` element-wise over flat memory (``dst`` may be ``src``)."""
    cs = _unpack(params)
    k0, k1, t = _key(key0, key1, threshold)
    numel = src.size
    for b in prange((numel + BLOCK - 1) // BLOCK):
        start = b * BLOCK
        stop = min(start + BLOCK, numel)
        words, w0 = _block_words(start, stop, offset, k0, k1, True)
        xs, ys, ws = src[start:stop], dst[start:stop], words[w0 + start : w0 + stop]
        for k in range(stop - start):
            ys[k] = xs[k] * _drop_factor(ws[k], t, cs)
