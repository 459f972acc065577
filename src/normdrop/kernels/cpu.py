r"""Numba CPU kernels: BatchNorm statistics (with the running averages), the fused BatchNorm ->
activation -> Dropout forward and backward, and Dropout.

Every kernel works on the tensor's memory as a flat array, in memory order, without copies.
Two layouts cover the BatchNorm inputs (``C`` channels, ``S`` values per (sample, channel)):

* planar: ``(N, C, S)`` in memory, S fastest: contiguous ``(N, C, L)``, NCHW, NCDHW.
  Element ``i`` is in plane ``i // S`` and channel ``(i // S) % C``.
* rows: ``(M, C)`` in memory, C fastest: ``(N, C)``, channels_last NHWC and NDHWC.
  Element ``i`` is in channel ``i % C``.

The math is :mod:`normdrop.functional`'s; with ``z = (x - mean) * scale + shift`` (``scale =
invstd * weight``, ``shift = bias``), ``a = act(z)`` and the dropout factor ``f`` (``1 / (1 - p)``
or 0)::

    statistics: mean, var (biased), invstd = 1 / sqrt(var + eps); running averages updated
    forward:    y  = a * f
    backward:   g  = (dy * f) * act'(z)                        (the gradient reaching z)
                sum_g = sum(g),  sum_gxhat = invstd * sum(g * (x - mean))   per channel
                dx = ((g - sum_g / m) - xhat * sum_gxhat / m) * scale      (training)
                dx = g * scale                                            (inference)

Plain BatchNorm on planar inputs has its own pair, the ``CHANNELS`` kernels (one task per
channel: its statistics then its output, its sums then its ``dx``, while the channel is in
cache; the same pieces merged in the same order as the blocked kernels, so the same bits);
:func:`kernel_layout` chooses.

Two kernels per layout, whatever the activation and whether dropout is on (runtime arguments):
the forward (statistics, running averages, normalize-activate-drop: any of them) and the
backward (the sums, the coefficients, ``dx``). Each is one call from Python. Without dropout
the loops read a buffer of always-kept words (factor exactly 1), so one loop serves both
cases; the activation branch sits outside the element loops, so every loop is straight-line
and vectorizes. Fewer, larger kernels compile faster than one per combination (JIT time is
mostly per kernel and per ``prange`` loop).

Determinism: work is cut into fixed blocks of ``BLOCK`` elements (a multiple of the generator's
``GROUP``; whole rows in the rows layout). A reduction stores one partial result per (block,
plane) piece (planar) or per (block, channel) (rows) and merges them per channel in memory
order, so the result does not depend on how many threads ran the blocks. Dropout words are
generated ``CHUNK`` elements at a time into a small scratch that stays in L1. Inputs under
``SERIAL_BELOW`` elements run their blocks in a plain loop: waking threads would cost more
than it saves (and the results are the same either way). The channel kernels always run their
parallel loop (a serial twin would compile the loop body again).

Statistics are exact for data with a large offset: values are summed about a center near the
mean (``m2 = sum(d^2) - sum(d)^2 / n``, ``d = x - center``), with a second pass about the mean
where the center turned out far from it (``_piece_moments``, ``_rows_statistics``); the sums
run in the input's dtype over short runs (``RUN`` values, ``RUN_ROWS`` rows) that add up in
float64; across pieces or blocks, Chan's pairwise merge. The backward's sums are built the same
way (runs in the dtype, float64 totals).

Floating point: the kernels are compiled with ``fastmath=False``; only the in-cache summation
helpers (``_run_*``) allow ``reassoc``, so that LLVM can vectorize a sum. Their order is
fixed at compile time, so results are reproducible and thread-count independent, and NaN/Inf
propagate (no ``nnan``/``ninf``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic, overload
from numba.np import numpy_support

from normdrop.kernels.philox import GROUP, fill_stream, fold31

__all__ = [
    "ACTIVATIONS",
    "APPLY",
    "APPLY_RUNNING",
    "BLOCK",
    "CHUNK",
    "RUN",
    "RUN_ROWS",
    "SERIAL_BELOW",
    "STATS",
    "STATS_APPLY",
    "backward_kernel",
    "backward_signature",
    "dropout_flat",
    "dropout_signature",
    "forward_kernel",
    "forward_signature",
    "make_params",
    "update_running_stats",
]

BLOCK = 64 * GROUP  # 16384 elements: one parallel task; its input and output sit in L2
CHUNK = 4 * GROUP  # 1024 elements: dropout words generated per step (4 KiB, L1)
SERIAL_BELOW = 1 << 16  # elements: smaller inputs run on the calling thread only
# Sums run in the input's dtype (full vector width) over at most RUN values, or RUN_ROWS rows in
# the rows layout, then add to float64 totals: each float32 partial sum has at most a few dozen
# terms, so its rounding stays near float32's unit roundoff (see "Sums" below).
RUN = 2048
RUN_ROWS = 32
# Statistics: one pass of sums about a center (the mean of a planar piece's CENTER_VALUES first
# values, or of CENTER_ROWS rows spread over the input); a second pass about the mean only where
# (mean - center)^2 > RECENTER * var (see _piece_moments and _rows_statistics).
CENTER_VALUES = 16
# 16 rows put the center within var / 16 of the mean (variance), so a second pass needs a
# 5.7-sigma deviation; 8 rows (4 sigma) would send about 1 in 4 steps of 4096 normal channels
# through a second pass. The center runs on one thread: more rows cost time on wide inputs.
CENTER_ROWS = 16
RECENTER = 2.0
_ROWS_PER_STEP = 4  # rows layout: rows handled together (coefficients loaded once for four)
_MIN_ROWS_PER_BLOCK = 32  # fewer blocks, smaller (C,)-per-block partial sums
# Rows layout: consecutive rows are handled as one "wide row" of up to WIDE_ROW elements (the
# (C,) coefficients repeated), so that a channels_last input with few channels still runs
# long vector loops; a loop's set-up (slices, LLVM's overlap checks) then costs little.
WIDE_ROW = 2048

IDENTITY, RELU, LEAKY_RELU, GELU = 0, 1, 2, 3
# Codes of normdrop.kernels.activations.ACTIVATION_NAMES; the formulas below follow torch's.
ACTIVATIONS = {"identity": IDENTITY, "relu": RELU, "leaky_relu": LEAKY_RELU, "gelu": GELU}
PLANAR, ROWS = "planar", "rows"
# Plain BatchNorm on planar inputs runs one task per channel: its statistics (the backward:
# its sums), then its output (dx), while its values are still in L2 or L3. In a training
# step, three passes over memory instead of five in the backward and two instead of three in
# the forward; the same (block, plane) pieces in the same order as the blocked passes, so the
# same bits. Large inputs with fewer channels (threads left idle) or shorter planes (short
# loops) keep the blocked kernels, as does everything with an activation or dropout (the
# words' generation, not memory, bounds it). These kernels hold no activation or dropout code,
# so they compile in about half the time: a model with plain BatchNorm compiles only them.
# See kernel_layout.
CHANNELS = "channels"
CHANNEL_MAJOR = 8
CHANNEL_MAJOR_PLANE = 16
# What a forward kernel call does: the batch statistics (and running averages) only, then the
# output too, the output from the statistics as given, or from the running buffers.
STATS, STATS_APPLY, APPLY, APPLY_RUNNING = 0, 1, 2, 3

# Scalar parameters travel in one small array of the input's dtype (float32 math stays
# float32) and are unpacked into a tuple at the top of each helper (registers, not loads).
_SLOPE, _DROP_SCALE, _ZERO, _HALF, _ONE, _SQRT1_2, _GELU_BETA = range(7)

# error_model="numpy": a float division by zero gives inf/NaN as in torch (rsqrt(0 + eps) with
# eps = 0 in eval), and no zero check blocks the vectorization of a loop that divides.
_HELPER = {"cache": True, "error_model": "numpy"}
_INLINE = {"inline": "always", "cache": True, "error_model": "numpy"}
_SUM = {"cache": True, "fastmath": {"reassoc"}, "error_model": "numpy"}
# Only prange loops run in parallel: no implicit parfors (np.zeros, array expressions), which
# would each cost a thread launch per call and compile time.
_PARALLEL = ("comprehension", "reduction", "inplace_binop", "setitem", "numpy", "stencil", "fusion")


def _kernel(function):
    """``njit`` for a kernel: parallel over its ``prange`` loops only, cached, no fastmath."""
    parallel = dict.fromkeys(_PARALLEL, False)  # a fresh dict: numba pops its keys
    return njit(parallel=parallel, cache=True, fastmath=False, error_model="numpy")(function)


@intrinsic
def _pointer(typingctx, address, like):
    """``address`` (an integer) as a pointer to elements of the array ``like``'s dtype."""
    pointer = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


@njit(inline="always", cache=True, error_model="numpy")
def _memory(address, size, like):
    """The ``size`` elements of ``like``'s dtype at ``address`` as a flat array, no copy.

    The big arrays reach the kernels as ``tensor.data_ptr()``: a tensor's numpy view costs
    about a microsecond to make, several per training step, which matters on small inputs. The
    caller guarantees dense memory of ``size`` elements there, alive for the call.
    """
    return carray(_pointer(address, like), size)


def make_params(dtype: np.dtype, negative_slope: float, drop_scale: float) -> np.ndarray:
    """The kernels' scalar parameters in ``dtype`` (see the ``_SLOPE ...`` indices).

    The slope slot is what the piecewise-linear activations multiply negative values by:
    ``negative_slope`` for leaky_relu, 1 for identity (relu ignores it).
    """
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
# Element-wise pieces
# --------------------------------------------------------------------------------------------


@njit(**_INLINE)
def _unpack(params):
    return (params[0], params[1], params[2], params[3], params[4], params[5], params[6])


@njit(**_INLINE)
def _piecewise(z, relu, cs):
    """relu, leaky_relu or identity (slope 1): ``z`` if ``z > 0`` else ``z * slope`` (relu:
    0), with torch's conventions (NaN stays NaN, relu(-inf) = 0)."""
    negative = cs[_ZERO] if relu else z * cs[_SLOPE]
    return negative if z <= cs[_ZERO] else z


@njit(**_INLINE)
def _piecewise_grad(d, z, relu, cs):
    """``d * act'(z)`` for relu (torch's threshold_backward: 0 where ``z <= 0``), leaky_relu
    and identity (``d * slope`` where ``not z > 0``)."""
    if relu:
        return cs[_ZERO] if z <= cs[_ZERO] else d
    return d if z > cs[_ZERO] else d * cs[_SLOPE]


@njit(**_INLINE)
def _gelu(z, cs):
    """Exact GELU: ``z * Phi(z)``."""
    return z * (cs[_HALF] * (cs[_ONE] + _erf(z * cs[_SQRT1_2])))


@njit(**_INLINE)
def _gelu_grad(d, z, cs):
    """``d * GELU'(z) = d * (Phi(z) + z * phi(z))``."""
    erf, gauss = _erf_gauss(z * cs[_SQRT1_2], z * z * -cs[_HALF])
    return d * (cs[_HALF] * (cs[_ONE] + erf) + z * (cs[_GELU_BETA] * gauss))


# --------------------------------------------------------------------------------------------
# erf and exp that vectorize (float32)
# --------------------------------------------------------------------------------------------
# math.erf and math.exp compile to scalar libm calls, which keep LLVM from vectorizing a loop:
# a GELU loop ran 10-15x slower than a ReLU loop, slower than torch's own vectorized GELU. In
# float32 the kernels use the formulas below instead, straight-line arithmetic that vectorizes;
# float64 keeps libm (gradcheck differentiates it numerically, which needs full accuracy).
# erf: its Maclaurin series below 1, Abramowitz & Stegun 7.1.26 above (|error| <= 1.5e-7 in
# exact arithmetic; tests/test_kernels_gelu.py measures it in float32). exp: Cody-Waite reduction
# x = n ln2 + r, |r| <= ln2 / 2, a degree-7 Taylor polynomial for e^r (relative error below
# float32's 6e-8 unit roundoff), and 2^n built from its exponent bits.

_F32 = np.float32
_ERF_P = _F32(0.3275911)
_ERF_A = tuple(_F32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429))
_LOG2E = _F32(1.4426950408889634)
_LN2_HI = _F32(0.693359375)  # ln 2 split: n * _LN2_HI is exact for |n| < 2^8
_LN2_LO = _F32(-2.12194440e-4)
_EXP_LO = _F32(-87.0)  # 2^n stays a normal float32 (n >= -126), e^x then below 1.7e-38
_EXP_HI = _F32(88.0)
# erf(x) = 2 / sqrt(pi) * sum_n (-1)^n x^(2n + 1) / (n! (2n + 1)); 11 terms: 1.5e-9 at 1
_MACLAURIN = tuple(
    _F32(2 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1))) for n in range(11)
)
_TAYLOR = tuple(_F32(1.0 / math.factorial(k)) for k in range(8))
_ONE32, _HALF32, _ZERO32 = _F32(1.0), _F32(0.5), _F32(0.0)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits``."""

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], context.get_value_type(types.int32))
        return builder.bitcast(low, context.get_value_type(types.float32))

    return types.float32(types.int64), codegen


@njit(**_INLINE)
def _exp32(x):
    """``e^x`` in float32 for ``x <= 0`` or moderate (clamped to [-87, 88]); NaN gives NaN."""
    x = min(max(x, _EXP_LO), _EXP_HI)  # NaN passes through, so the result is NaN
    finite = x if x == x else _EXP_LO  # but the exponent's integer conversion never sees it
    n = np.floor(finite * _LOG2E + _HALF32)  # np.floor keeps float32 (math.floor gives an int)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    c = _TAYLOR
    poly = ((((((c[7] * r + c[6]) * r + c[5]) * r + c[4]) * r + c[3]) * r + c[2]) * r + c[1]) * r
    scale = _float32_from_bits((np.int64(n) + 127) << 23)
    return (poly + c[0]) * scale


@njit(**_INLINE)
def _erf32_gauss(x):
    """``(erf(x), e^(-x^2))`` in float32 (GELU's backward needs both; A&S's branch computes
    the exponential anyway). erf: its Maclaurin series below 1 (A&S's ``1 - ...`` would lose
    the digits of small values), A&S 7.1.26 above; both are computed and one selected, so the
    loop stays branch-free. NaN gives NaN."""
    a = abs(x)
    s = a * a
    # 0 where e^(-s) is below float32's normal range (_exp32 would clamp it to ~1.7e-38,
    # which GELU's z * gauss would scale back up for huge z)
    gauss = _exp32(-s) if s <= -_EXP_LO else _ZERO32
    m = _MACLAURIN
    series = m[10]
    for k in range(9, -1, -1):
        series = series * s + m[k]
    series = a * series
    t = _ONE32 / (_ONE32 + _ERF_P * a)
    c = _ERF_A
    poly = (((c[4] * t + c[3]) * t + c[2]) * t + c[1]) * t + c[0]
    value = series if a < _ONE32 else _ONE32 - poly * t * gauss
    return (-value if x < _ZERO32 else value), gauss


@njit(**_INLINE)
def _erf32(x):
    """``erf(x)`` in float32: the first of :func:`_erf32_gauss`."""
    return _erf32_gauss(x)[0]


def _erf(x):
    """``erf(x)``: :func:`_erf32` for float32, libm otherwise (see above)."""
    return math.erf(x)


def _erf_gauss(x, y):
    """``(erf(x), e^y)`` for ``y = -x^2`` (as the caller rounds it): float32 shares the one
    exponential (:func:`_erf32_gauss`); float64 calls libm for each."""
    return math.erf(x), math.exp(y)


@overload(_erf, inline="always")
def _erf_by_type(x):
    if x == types.float32:
        return lambda x: _erf32(x)
    return lambda x: math.erf(x)


@overload(_erf_gauss, inline="always")
def _erf_gauss_by_type(x, y):
    if x == types.float32:
        return lambda x, y: _erf32_gauss(x)
    return lambda x, y: (math.erf(x), math.exp(y))


@njit(**_INLINE)
def _drop_factor(word, threshold, cs):
    return cs[_DROP_SCALE] if fold31(word) > threshold else cs[_ZERO]


@njit(**_INLINE)
def _key(key0, key1, threshold):
    return np.uint32(key0), np.uint32(key1), np.uint32(max(threshold, 0))


# A word kept at any threshold below 2^31 - 1. Without dropout the element loops read a buffer
# of these (factor 1, exact): one loop serves both cases, an L1 load and a select cost nothing
# next to the memory traffic, and half the loop variants halve the compile time.
_KEEP_ALL = np.uint32(0x7FFFFFFF)


@njit(**_INLINE)
def _word_buffer(size, drop):
    words = np.empty(size, np.uint32)
    if not drop:
        for k in range(size):
            words[k] = _KEEP_ALL
    return words


@njit(**_INLINE)
def _row_words(step, channels, drop):
    """Words buffer length for rows processed ``step`` elements at a time: without dropout one
    row of always-kept words serves every row (filling more would cost time for nothing)."""
    return step + 2 * GROUP if drop else channels


@njit(**_INLINE)
def _words(words, lo, hi, offset, k0, k1, drop):
    """Fill ``words`` for elements ``[lo, hi)`` (when ``drop``); return ``w`` such that
    element ``i`` reads ``words[w + i]``."""
    if drop:
        return offset - fill_stream(words, offset + lo, offset + hi, k0, k1)
    return -lo


@njit(**_INLINE)
def _scale_shift(invstd, weight, bias):
    """``scale = invstd * weight`` and ``shift = bias`` per channel (empty weight/bias: 1/0),
    rounded as :func:`normdrop.functional._normalize` rounds them."""
    # Plain loops: numba compiles slice assignment and array arithmetic slowly (seconds).
    scale = np.empty(invstd.size, invstd.dtype)
    shift = np.zeros(invstd.size, invstd.dtype)
    for c in range(invstd.size):
        scale[c] = _channel_scale(invstd, weight, c)
    for c in range(invstd.size):
        shift[c] = _channel_shift(bias, c, shift[c])
    return scale, shift


@njit(**_INLINE)
def _channel_scale(invstd, weight, c):
    """Channel ``c``'s ``scale``: ``invstd * weight`` (no weight: ``invstd``)."""
    return invstd[c] * weight[c] if weight.size else invstd[c]


@njit(**_INLINE)
def _channel_shift(bias, c, zero):
    """Channel ``c``'s ``shift``: its bias (no bias: ``zero``, a 0 of the dtype)."""
    return bias[c] if bias.size else zero


@njit(**_INLINE)
def _output_coefficients(stats_phase, invstd, weight, bias):
    """:func:`_scale_shift` for the output pass; empty arrays for the statistics pass."""
    if stats_phase:
        return np.empty(0, invstd.dtype), np.empty(0, invstd.dtype)
    return _scale_shift(invstd, weight, bias)


@njit(**_INLINE)
def _in_dtype(like, a, b, c):
    """``a, b, c`` rounded to the dtype of the array ``like`` (as torch rounds a Python scalar
    that multiplies a tensor)."""
    values = np.empty(3, like.dtype)
    values[0], values[1], values[2] = a, b, c
    return values[0], values[1], values[2]


@njit(**_INLINE)
def _rows_tiles(channels, rows):
    """Rows per wide row: the largest divisor of ``rows`` that keeps a wide row within
    ``WIDE_ROW`` elements (1 for rows of more than ``WIDE_ROW // 2`` channels). A divisor, so that
    every wide row is whole and each of its elements sits at the same channel in every one.
    Inputs under ``SERIAL_BELOW`` elements keep plain rows: there the tiled coefficients and
    the per-element sums cost more than the shorter loops save."""
    if rows * channels < SERIAL_BELOW:
        return 1
    tiles = min(max(1, WIDE_ROW // channels), rows)
    while rows % tiles:
        tiles -= 1
    return tiles


@njit(**_INLINE)
def _rows_blocks(channels, numel):
    """How the rows layout cuts ``numel`` elements of ``channels`` per row, forward and
    backward alike: ``(tiles, width, step, n_blocks)``, rows per wide row (:func:`_rows_tiles`),
    its elements, elements per block and blocks. A block is whole (wide) rows, >= BLOCK
    elements and >= _MIN_ROWS_PER_BLOCK rows (so the per-block partial sums stay small next to
    it); of wide rows, up to _MIN_ROWS_PER_BLOCK while that still leaves 4 blocks (so the
    per-element sums a block folds are small next to it, and an input of 64K elements still
    spreads over threads, as ATen's 32K-element grain does). A function of the input's size,
    never of the thread count."""
    tiles = _rows_tiles(channels, numel // channels)
    width = tiles * channels
    wide_rows = numel // width
    least = _MIN_ROWS_PER_BLOCK if tiles == 1 else min(_MIN_ROWS_PER_BLOCK, (wide_rows + 3) // 4)
    per_block = max(least, (BLOCK + width - 1) // width)
    return tiles, width, per_block * width, (wide_rows + per_block - 1) // per_block


@njit(**_INLINE)
def _lanes(out, width):
    """Zeroed float64 per-element sums of a wide row of ``width`` elements, for
    :func:`_fold_tiles` into the per-channel ``out``: ``out`` itself when rows are plain."""
    if width != out.size:
        return np.zeros(width)
    for c in range(width):
        out[c] = 0.0
    return out


@njit(**_INLINE)
def _tile(values, tiles):
    """``values`` repeated ``tiles`` times: per-channel coefficients for a wide row (``values``
    itself for one tile; callers only read it)."""
    if tiles == 1:
        return values
    tiled = np.empty(values.size * tiles, values.dtype)
    for j in range(tiles):
        row = tiled[j * values.size : (j + 1) * values.size]
        for c in range(values.size):
            row[c] = values[c]
    return tiled


@njit(**_INLINE)
def _fold_tiles(lanes, out):
    """``out[c] = sum_j lanes[j * C + c]`` (``C = out.size``), in ``j`` order: a wide row's
    per-element sums back to per-channel sums (nothing to do when ``lanes`` is ``out``)."""
    channels = out.size
    if lanes.size == channels:
        return
    for c in range(channels):
        out[c] = lanes[c]
    for j in range(1, lanes.size // channels):
        row = lanes[j * channels : (j + 1) * channels]
        for c in range(channels):
            out[c] += row[c]


# --------------------------------------------------------------------------------------------
# Sums: fixed pieces, fixed merge order
# --------------------------------------------------------------------------------------------


@njit(**_SUM)
def _run_sum(values, shift):
    """``sum(values - shift)`` in the values' dtype (vector lanes; at most ``RUN`` values)."""
    total = values.dtype.type(0.0)
    for k in range(values.size):
        total += values[k] - shift
    return total


@njit(**_SUM)
def _run_moments(values, center):
    """``(sum(d), sum(d * d))`` with ``d = values - center``, in the values' dtype."""
    total = values.dtype.type(0.0)
    squares = values.dtype.type(0.0)
    for k in range(values.size):
        deviation = values[k] - center
        total += deviation
        squares += deviation * deviation
    return total, squares


@njit(**_SUM)
def _run_products(gs, xs, mu):
    """``(sum(g), sum(g * (x - mu)))`` in the values' dtype."""
    total = gs.dtype.type(0.0)
    products = gs.dtype.type(0.0)
    for k in range(xs.size):
        total += gs[k]
        products += gs[k] * (xs[k] - mu)
    return total, products


@njit(**_INLINE)
def _sum64(values, shift):
    """``sum(values - shift)`` as a float64 total of ``RUN``-value runs."""
    total = 0.0
    for lo in range(0, values.size, RUN):
        total += _run_sum(values[lo : lo + RUN], shift)
    return total


@njit(**_INLINE)
def _moments64(values, center):
    """``(sum(d), sum(d * d))``, ``d = values - center``: float64 totals of runs."""
    total = 0.0
    squares = 0.0
    for lo in range(0, values.size, RUN):
        run_total, run_squares = _run_moments(values[lo : lo + RUN], center)
        total += run_total
        squares += run_squares
    return total, squares


@njit(**_INLINE)
def _products64(gs, xs, mu):
    """``(sum(g), sum(g * (x - mu)))``: float64 totals of runs."""
    total = 0.0
    products = 0.0
    for lo in range(0, xs.size, RUN):
        run_total, run_products = _run_products(gs[lo : lo + RUN], xs[lo : lo + RUN], mu)
        total += run_total
        products += run_products
    return total, products


@njit(**_INLINE)
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
def _plane_blocks(pl, plane):
    """The blocks that plane ``pl`` (``plane`` values) overlaps, in memory order: one
    (block, plane) piece each (see :func:`_plane_piece`)."""
    return range(pl * plane // BLOCK, ((pl + 1) * plane - 1) // BLOCK + 1)


@njit(**_INLINE)
def _plane_piece(b, pl, plane):
    """``(lo, hi)``: the values of plane ``pl`` in block ``b``."""
    return max(b * BLOCK, pl * plane), min((b + 1) * BLOCK, (pl + 1) * plane)


@njit(**_INLINE)
def _chan_merge(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Merge two (count, mean, sum of squared deviations) summaries (Chan et al. 1979)."""
    if count_b == 0:
        return count_a, mean_a, m2_a
    if count_a == 0:  # the formula's answer, without 0 * inf = NaN where delta^2 overflows
        return count_b, mean_b, m2_b
    count = count_a + count_b
    delta = mean_b - mean_a
    weight_b = count_b / count
    return count, mean_a + delta * weight_b, m2_a + m2_b + delta * delta * count_a * weight_b


@njit(**_INLINE)
def _merge_plane_stats(first_piece, counts, means, m2s, channels, plane, samples):
    """Per-channel (mean, biased var) from the pieces, in memory order."""
    mean_out = np.empty(channels)
    var_out = np.empty(channels)
    for c in range(channels):
        count, mean, m2 = 0, 0.0, 0.0
        for n in range(samples):
            pl = n * channels + c
            for b in _plane_blocks(pl, plane):
                k = first_piece[b] + pl - (b * BLOCK) // plane
                count, mean, m2 = _chan_merge(count, mean, m2, counts[k], means[k], m2s[k])
        mean_out[c] = mean
        var_out[c] = m2 / count
    return mean_out, var_out


@njit(**_INLINE)
def _merge_plane_sums(first_piece, piece_g, piece_h, channels, plane, samples):
    """Per-channel sums of the pieces, in memory order."""
    sum_g = np.zeros(channels)
    sum_h = np.zeros(channels)
    for c in range(channels):
        for n in range(samples):
            pl = n * channels + c
            for b in _plane_blocks(pl, plane):
                k = first_piece[b] + pl - (b * BLOCK) // plane
                sum_g[c] += piece_g[k]
                sum_h[c] += piece_h[k]
    return sum_g, sum_h


@njit(**_INLINE)
def _add_blocks(partial, channels):
    """Per-channel float64 totals of the blocks' partial sums ``(blocks, C)``, in block
    order."""
    total = np.zeros(channels)
    for b in range(partial.shape[0]):
        row = partial[b]
        for c in range(channels):
            total[c] += row[c]
    return total


@njit(**_INLINE)
def _merge_rows_sums(partial_g, partial_h, channels):
    """Add the blocks' partial sums in block order."""
    return _add_blocks(partial_g, channels), _add_blocks(partial_h, channels)


# --------------------------------------------------------------------------------------------
# Statistics and running averages
# --------------------------------------------------------------------------------------------


@njit(**_INLINE)
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
def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """The fast twin of :func:`normdrop.functional._update_running_stats` (same formula and
    rounding, tested equal): ``running <- (1 - momentum) * running + momentum * batch``, with
    the unbiased variance ``var * (count / (count - 1))``, in the buffers' dtype.

    Returns False, and leaves the buffers alone, when a channel's statistics are not finite:
    the caller then runs the reference, which skips those channels and warns.
    """
    if count < 2:
        return True
    correction, keep, take = _in_dtype(running_mean, count / (count - 1), 1.0 - momentum, momentum)
    not_finite = 0  # a count, not an early return: the loop vectorizes
    for c in range(mean.size):
        not_finite += 0 if np.isfinite(mean[c]) and np.isfinite(var[c] * correction) else 1
    if not_finite:
        return False
    for c in range(mean.size):
        running_mean[c] = keep * running_mean[c] + take * mean[c]
    for c in range(mean.size):
        running_var[c] = keep * running_var[c] + take * (var[c] * correction)
    return True


@njit(**_INLINE)
def _finish_stats(mean64, var64, shift, count, running_mean, running_var, momentum, eps, stats):
    """``stats`` = (mean, invstd, var) in the input's dtype (``mean64`` is of the shifted
    values); the running averages, if given."""
    one, eps_, _ = _in_dtype(stats, 1.0, eps, 0.0)
    for c in range(mean64.size):
        _channel_stats(stats, c, mean64[c], var64[c], shift[c], one, eps_)
    return _update_running(running_mean, running_var, stats, count, momentum)


@njit(**_INLINE)
def _channel_stats(stats, c, mean64, var64, shift, one, eps_):
    """Channel ``c``'s column of ``stats`` (mean, invstd, var in the input's dtype) from its
    float64 mean of the shifted values and variance; ``one`` and ``eps_`` in the dtype."""
    stats[0, c] = mean64 + shift
    stats[2, c] = var64
    stats[1, c] = one / np.sqrt(stats[2, c] + eps_)  # torch.rsqrt(var + eps), rounded alike


@njit(**_INLINE)
def _update_running(running_mean, running_var, stats, count, momentum):
    """:func:`update_running_stats` from ``stats`` where there are running buffers."""
    if running_mean.size == 0:
        return True
    return update_running_stats(running_mean, running_var, stats[0], stats[2], count, momentum)


@njit(**_INLINE)
def _running_stats(running_mean, running_var, eps, stats):
    """Inference: ``stats`` = (running_mean, rsqrt(running_var + eps), running_var)."""
    one, eps_, _ = _in_dtype(stats, 1.0, eps, 0.0)
    for c in range(running_mean.size):
        stats[0, c] = running_mean[c]
        stats[2, c] = running_var[c]
        stats[1, c] = one / np.sqrt(running_var[c] + eps_)


@njit(**_INLINE)
def _leading_mean(xs):
    """The float64 mean of the first ``CENTER_VALUES`` values of ``xs``, rounded to the dtype
    (0 where it is not finite): a first estimate of the mean, used as a center. The first
    values, not values spread over ``xs``: those would be loads out of memory order, which
    cost more than the pass itself on large inputs."""
    picks = min(CENTER_VALUES, xs.size)
    total = 0.0
    for k in range(picks):
        total += xs[k]
    mean = total / picks
    return xs.dtype.type(mean if np.isfinite(mean) else 0.0)


@njit(**_INLINE)
def _m2(squares, centered):
    """``sum(d^2) - sum(d)^2 / n``; inf where the squares overflowed (finite data near the
    dtype's maximum), not ``inf - inf = NaN``: the variance is then inf, as the reference's."""
    return squares - centered if squares < np.inf else squares


@njit(**_INLINE)
def _centered_moments(total, squares, n):
    """``(sum(d)^2 / n, m2 = sum(d^2) - sum(d)^2 / n)`` from the sums of ``d = x - center``."""
    centered = total * total / n
    return centered, _m2(squares, centered)


@njit(**_INLINE)
def _piece_moments(xs, shift):
    """``(mean - shift, m2)`` of the values ``xs`` (float64; ``m2`` is the sum of squared
    deviations), from one pass of sums in the values' dtype about a center ``mu``::

        d = x - mu,   m2 = sum(d^2) - sum(d)^2 / n

    exact while ``mu`` is near the mean. ``mu`` is first the mean of the leading values; where
    ``(mean - mu)^2 > RECENTER * var`` the cancellation would cost digits of the dtype's sums,
    so a second pass (the piece is in L2 by then) sums about the mean, rounded to the dtype:
    the corrected two-pass algorithm (Chan, Golub & LeVeque 1983). ``shift`` (a value of the
    channel) is what the piece means are relative to, so that Chan's merge of the pieces keeps
    their precision for data with a large offset.
    """
    n = xs.size
    mu = _leading_mean(xs)
    total, squares = _moments64(xs, mu)
    centered, m2 = _centered_moments(total, squares, n)
    if centered > RECENTER * m2:
        mu = xs.dtype.type(np.float64(mu) + total / n)
        total, squares = _moments64(xs, mu)
        centered, m2 = _centered_moments(total, squares, n)
    return (np.float64(mu) - np.float64(shift)) + total / n, max(m2, 0.0)


@njit(**_HELPER)
def _planar_moments(x, start, stop, plane, shift, channels, counts, means, m2s):
    """Count, mean and sum of squared deviations of each (block, plane) piece of the block
    ``[start, stop)`` (see :func:`_piece_moments`; means relative to the channel's ``shift``).
    The block is at most ``BLOCK`` values, so a second pass, when needed, reads it from L2."""
    first = start // plane
    for pl in range(first, (stop - 1) // plane + 1):
        lo = max(start, pl * plane)
        hi = min(stop, (pl + 1) * plane)
        counts[pl - first] = hi - lo
        means[pl - first], m2s[pl - first] = _piece_moments(
            x[lo:hi], x.dtype.type(shift[pl % channels])
        )


@njit(**_INLINE)
def _four_rows(xs, lo, channels):
    """The four rows of ``channels`` values starting at ``lo``, as slices."""
    return (
        xs[lo : lo + channels],
        xs[lo + channels : lo + 2 * channels],
        xs[lo + 2 * channels : lo + 3 * channels],
        xs[lo + 3 * channels : lo + 4 * channels],
    )


@njit(**_INLINE)
def _accumulate_moments(xs, channels, center, rows_lo, rows_hi, sums, squares):
    """``sums[c] += sum(d)``, ``squares[c] += sum(d * d)`` with ``d = x - center[c]``, as
    :func:`_accumulate_shifted` sums."""
    acc = np.empty(channels, xs.dtype)
    acc2 = np.empty(channels, xs.dtype)
    for run in range(rows_lo, rows_hi, RUN_ROWS):
        end = min(run + RUN_ROWS, rows_hi)
        for c in range(channels):
            acc[c] = 0.0
            acc2[c] = 0.0
        r = run
        while r + 4 <= end:
            r0, r1, r2, r3 = _four_rows(xs, r * channels, channels)
            for c in range(channels):
                m = center[c]
                d0, d1, d2, d3 = r0[c] - m, r1[c] - m, r2[c] - m, r3[c] - m
                acc[c] += (d0 + d1) + (d2 + d3)
                acc2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            r += 4
        for tail in range(r, end):
            row = xs[tail * channels : (tail + 1) * channels]
            for c in range(channels):
                d = row[c] - center[c]
                acc[c] += d
                acc2[c] += d * d
        for c in range(channels):
            sums[c] += acc[c]
            squares[c] += acc2[c]


@njit(**_INLINE)
def _rows_center(x, channels, rows):
    """Each channel's first mean estimate, in the dtype: the mean of ``CENTER_ROWS`` rows
    spread evenly over the input (0 where that is not finite). Rows are sampled across the
    whole input so that images in channels_last give a center near the mean, not near one
    corner of the first image. Summed in the dtype, each row scaled first (no overflow): a
    center need not be exact, only near the mean (it runs on one thread, so it is kept cheap)."""
    picks = min(rows, CENTER_ROWS)
    weight = x.dtype.type(1.0 / picks)
    center = np.zeros(channels, x.dtype)
    for k in range(picks):
        r = k * rows // picks
        row = x[r * channels : (r + 1) * channels]
        for c in range(channels):
            center[c] += row[c] * weight
    for c in range(channels):
        center[c] = center[c] if np.isfinite(center[c]) else 0.0
    return center


@njit(**_HELPER)
def _rows_moments(xs, width, center, sums, squares):
    """``sums[c] = sum(d)``, ``squares[c] = sum(d * d)`` with ``d = x - center[c]`` over the
    wide rows ``xs`` (one block; ``center`` tiled to the ``width``): sums in the dtype over runs
    of ``RUN_ROWS`` wide rows, float64 across runs, then per channel."""
    lane_sums, lane_squares = _lanes(sums, width), _lanes(squares, width)
    _accumulate_moments(xs, width, center, 0, xs.size // width, lane_sums, lane_squares)
    _fold_tiles(lane_sums, sums)
    _fold_tiles(lane_squares, squares)


@njit(**_INLINE)
def _rows_statistics(sums, squares, center, channels, count):
    """``(mean - center, var, recenter)`` per channel from the blocks' sums about ``center``:
    ``m2 = sum(d^2) - sum(d)^2 / n``. This is exact while the center is near the mean; where
    ``(mean - center)^2 > RECENTER * var`` for some channel the cancellation would cost digits of
    the dtype's sums, and ``recenter`` asks for a second pass about the mean."""
    total = _add_blocks(sums, channels)
    total_sq = _add_blocks(squares, channels)
    mean = np.empty(channels)
    var = np.empty(channels)
    per_value = 1.0 / count  # a product, not a division per channel (a vector divide is slow)
    far = 0
    for c in range(channels):
        offset = total[c] * per_value
        centered = total[c] * offset
        m2 = _m2(total_sq[c], centered)
        far += 1 if centered > RECENTER * m2 else 0
        mean[c] = offset
        var[c] = max(m2, 0.0) * per_value
    return mean, var, far > 0


# --------------------------------------------------------------------------------------------
# Forward: statistics, then y = act((x - mean) * scale + shift) * f
# --------------------------------------------------------------------------------------------


@njit(**_INLINE)
def _affine(xs, ys, mu, sc, sh):
    """``ys = (xs - mu) * sc + sh``: what the other loops compute with the identity and no
    dropout (their factor 1 and slope 1 change nothing), without reading words."""
    for k in range(xs.size):
        ys[k] = (xs[k] - mu) * sc + sh


@njit(**_INLINE)
def _forward_plane(xs, ys, ws, mu, sc, sh, cs, act, t):
    """One plane segment (one channel): ``ys = act((xs - mu) * sc + sh) * f``."""
    if act == GELU:
        for k in range(xs.size):
            ys[k] = _gelu((xs[k] - mu) * sc + sh, cs) * _drop_factor(ws[k], t, cs)
    else:
        relu = act == RELU
        for k in range(xs.size):
            z = (xs[k] - mu) * sc + sh
            ys[k] = _piecewise(z, relu, cs) * _drop_factor(ws[k], t, cs)


@njit(**_INLINE)
def _forward_row(xs, ys, ws, mean, scale, shift, cs, act, t):
    """One row (every channel once)."""
    if act == GELU:
        for c in range(xs.size):
            z = (xs[c] - mean[c]) * scale[c] + shift[c]
            ys[c] = _gelu(z, cs) * _drop_factor(ws[c], t, cs)
    else:
        relu = act == RELU
        for c in range(xs.size):
            z = (xs[c] - mean[c]) * scale[c] + shift[c]
            ys[c] = _piecewise(z, relu, cs) * _drop_factor(ws[c], t, cs)


@njit(**_HELPER)
def _forward_planar_block(
    x, y, start, stop, channels, plane, mean, scale, shift, params, act, k0, k1, offset, t, drop
):
    if act == IDENTITY and not drop:  # plain BatchNorm: no words, no activation
        for pl in range(start // plane, (stop - 1) // plane + 1):
            s = max(start, pl * plane)
            e = min(stop, (pl + 1) * plane)
            c = pl % channels
            _affine(x[s:e], y[s:e], mean[c], scale[c], shift[c])
        return
    cs = _unpack(params)
    words = _word_buffer(CHUNK + 2 * GROUP, drop)
    for lo in range(start, stop, CHUNK):
        hi = min(lo + CHUNK, stop)
        w = _words(words, lo, hi, offset, k0, k1, drop)
        for pl in range(lo // plane, (hi - 1) // plane + 1):
            s = max(lo, pl * plane)
            e = min(hi, (pl + 1) * plane)
            c = pl % channels
            _forward_plane(
                x[s:e], y[s:e], words[w + s : w + e], mean[c], scale[c], shift[c], cs, act, t
            )


@njit(**_INLINE)
def _affine_row(xs, ys, mean, scale, shift):
    """One row of :func:`_affine`: ``ys = (xs - mean) * scale + shift`` per channel."""
    for c in range(xs.size):
        ys[c] = (xs[c] - mean[c]) * scale[c] + shift[c]


@njit(**_INLINE)
def _affine_rows4(x, y, lo, channels, mean, scale, shift):
    """Four rows of :func:`_affine_row`, each coefficient loaded once for the four."""
    x0, x1, x2, x3 = _four_rows(x, lo, channels)
    y0, y1, y2, y3 = _four_rows(y, lo, channels)
    for c in range(channels):
        m, sc, sh = mean[c], scale[c], shift[c]
        y0[c] = (x0[c] - m) * sc + sh
        y1[c] = (x1[c] - m) * sc + sh
        y2[c] = (x2[c] - m) * sc + sh
        y3[c] = (x3[c] - m) * sc + sh


@njit(**_INLINE)
def _forward_rows4(x, y, words, lo, wlo, channels, mean, scale, shift, cs, relu, t, drop):
    """Four rows at once (piecewise-linear activations): each per-channel coefficient is
    loaded once for four rows. The rows are slices of the same arrays, so LLVM needs few
    overlap checks to vectorize the loop."""
    x0, x1 = x[lo : lo + channels], x[lo + channels : lo + 2 * channels]
    x2, x3 = x[lo + 2 * channels : lo + 3 * channels], x[lo + 3 * channels : lo + 4 * channels]
    y0, y1 = y[lo : lo + channels], y[lo + channels : lo + 2 * channels]
    y2, y3 = y[lo + 2 * channels : lo + 3 * channels], y[lo + 3 * channels : lo + 4 * channels]
    w0, w1 = words[wlo : wlo + channels], words[wlo + channels : wlo + 2 * channels]
    w2, w3 = (
        words[wlo + 2 * channels : wlo + 3 * channels],
        words[wlo + 3 * channels : wlo + 4 * channels],
    )
    if drop:
        for c in range(channels):
            m, sc, sh = mean[c], scale[c], shift[c]
            y0[c] = _piecewise((x0[c] - m) * sc + sh, relu, cs) * _drop_factor(w0[c], t, cs)
            y1[c] = _piecewise((x1[c] - m) * sc + sh, relu, cs) * _drop_factor(w1[c], t, cs)
            y2[c] = _piecewise((x2[c] - m) * sc + sh, relu, cs) * _drop_factor(w2[c], t, cs)
            y3[c] = _piecewise((x3[c] - m) * sc + sh, relu, cs) * _drop_factor(w3[c], t, cs)
    else:  # the always-kept words would only add a stream of loads
        for c in range(channels):
            m, sc, sh = mean[c], scale[c], shift[c]
            y0[c] = _piecewise((x0[c] - m) * sc + sh, relu, cs)
            y1[c] = _piecewise((x1[c] - m) * sc + sh, relu, cs)
            y2[c] = _piecewise((x2[c] - m) * sc + sh, relu, cs)
            y3[c] = _piecewise((x3[c] - m) * sc + sh, relu, cs)


@njit(**_HELPER)
def _forward_rows_block(
    x, y, start, stop, channels, mean, scale, shift, params, act, k0, k1, offset, t, drop
):
    step = _ROWS_PER_STEP * channels
    if act == IDENTITY and not drop:  # plain BatchNorm: no words, no activation
        for lo in range(start, stop, step):
            if stop - lo >= step:
                _affine_rows4(x, y, lo, channels, mean, scale, shift)
            else:
                for r in range(lo, stop, channels):
                    _affine_row(x[r : r + channels], y[r : r + channels], mean, scale, shift)
        return
    cs = _unpack(params)
    words = _word_buffer(_row_words(step, channels, drop), drop)
    for lo in range(start, stop, step):
        hi = min(lo + step, stop)
        w = _words(words, lo, hi, offset, k0, k1, drop)
        if act != GELU and hi - lo == step:
            _forward_rows4(
                x, y, words, lo, w + lo, channels, mean, scale, shift, cs, act == RELU, t, drop
            )
        else:
            for r in range(lo, hi, channels):
                e = r + channels
                ws = words[w + r : w + e] if drop else words[:channels]
                _forward_row(x[r:e], y[r:e], ws, mean, scale, shift, cs, act, t)


@njit(**_INLINE)
def _passes(what):
    """The passes of a forward call, as a range: 0 the statistics, 1 the output."""
    return range(0 if what <= STATS_APPLY else 1, 1 if what == STATS else 2)


@njit(**_INLINE)
def _forward_planar_task(
    stats_phase,
    x,
    y,
    start,
    stop,
    channels,
    plane,
    shift64,
    counts,
    means,
    m2s,
    mean,
    scale,
    shift,
    params,
    act,
    k0,
    k1,
    offset,
    t,
    drop,
):
    """One block of the planar forward: its pieces' moments, or its output."""
    if stats_phase:
        _planar_moments(x, start, stop, plane, shift64, channels, counts, means, m2s)
    else:
        _forward_planar_block(
            x,
            y,
            start,
            stop,
            channels,
            plane,
            mean,
            scale,
            shift,
            params,
            act,
            k0,
            k1,
            offset,
            t,
            drop,
        )


@_kernel
def _forward_planar(
    phases,
    x_at,
    y_at,
    numel,
    channels,
    plane,
    running_mean,
    running_var,
    momentum,
    eps,
    stats,
    weight,
    bias,
    params,
    act,
    key0,
    key1,
    offset,
    threshold,
    drop,
):
    x, y = _memory(x_at, numel, params), _memory(y_at, numel, params)
    n_blocks = (numel + BLOCK - 1) // BLOCK
    finite = True
    if phases == APPLY_RUNNING:
        _running_stats(running_mean, running_var, eps, stats)
    shift64 = _channel_shifts(x[: channels * plane : plane])
    k0, k1, t = _key(key0, key1, threshold)
    # One parallel loop for both phases (JIT time grows with each parallel loop).
    for stats_pass in _passes(phases):
        stats_phase = stats_pass == 0
        first_piece = (
            _plane_pieces(numel, plane) if stats_phase else np.zeros(n_blocks + 1, np.int64)
        )
        counts = np.empty(first_piece[n_blocks], np.int64)
        means = np.empty(first_piece[n_blocks])
        m2s = np.empty(first_piece[n_blocks])
        scale, shift = _output_coefficients(stats_phase, stats[1], weight, bias)
        if numel >= SERIAL_BELOW:
            for b in prange(n_blocks):
                p0, p1 = first_piece[b], first_piece[b + 1]
                _forward_planar_task(
                    stats_phase,
                    x,
                    y,
                    b * BLOCK,
                    min((b + 1) * BLOCK, numel),
                    channels,
                    plane,
                    shift64,
                    counts[p0:p1],
                    means[p0:p1],
                    m2s[p0:p1],
                    stats[0],
                    scale,
                    shift,
                    params,
                    act,
                    k0,
                    k1,
                    offset,
                    t,
                    drop,
                )
        else:
            for b in range(n_blocks):
                p0, p1 = first_piece[b], first_piece[b + 1]
                _forward_planar_task(
                    stats_phase,
                    x,
                    y,
                    b * BLOCK,
                    min((b + 1) * BLOCK, numel),
                    channels,
                    plane,
                    shift64,
                    counts[p0:p1],
                    means[p0:p1],
                    m2s[p0:p1],
                    stats[0],
                    scale,
                    shift,
                    params,
                    act,
                    k0,
                    k1,
                    offset,
                    t,
                    drop,
                )
        if stats_phase:
            samples = numel // (channels * plane)
            mean, var = _merge_plane_stats(
                first_piece, counts, means, m2s, channels, plane, samples
            )
            finite = _finish_stats(
                mean,
                var,
                shift64,
                numel // channels,
                running_mean,
                running_var,
                momentum,
                eps,
                stats,
            )
    return finite


@njit(**_INLINE)
def _forward_rows_task(
    stats_phase,
    x,
    y,
    start,
    stop,
    width,
    center,
    block_sums,
    block_squares,
    mean,
    scale,
    shift,
    params,
    act,
    k0,
    k1,
    offset,
    t,
    drop,
):
    """One block of wide rows: its moments about ``center``, or its output (coefficients
    tiled to the ``width``)."""
    if stats_phase:
        _rows_moments(x[start:stop], width, center, block_sums, block_squares)
    else:
        _forward_rows_block(
            x, y, start, stop, width, mean, scale, shift, params, act, k0, k1, offset, t, drop
        )


@njit(**_INLINE)
def _rows_passes(what):
    """The passes of a rows forward call: 0 the moments, 1 the moments again about the mean
    (only when :func:`_rows_statistics` asks for it), 2 the output."""
    return range(0 if what <= STATS_APPLY else 2, 2 if what == STATS else 3)


@_kernel
def _forward_rows(
    phases,
    x_at,
    y_at,
    numel,
    channels,
    plane,
    running_mean,
    running_var,
    momentum,
    eps,
    stats,
    weight,
    bias,
    params,
    act,
    key0,
    key1,
    offset,
    threshold,
    drop,
):
    x, y = _memory(x_at, numel, params), _memory(y_at, numel, params)
    rows = numel // channels
    tiles, width, step, n_blocks = _rows_blocks(channels, numel)
    finite = True
    recenter = False
    if phases == APPLY_RUNNING:
        _running_stats(running_mean, running_var, eps, stats)
    with_stats = phases <= STATS_APPLY
    center = _rows_center(x, channels, rows) if with_stats else np.empty(0, x.dtype)
    sums = np.empty((n_blocks, channels if with_stats else 0))
    squares = np.empty((n_blocks, channels if with_stats else 0))
    k0, k1, t = _key(key0, key1, threshold)
    for task in _rows_passes(phases):
        if task == 1 and not recenter:
            continue
        stats_phase = task < 2
        scale, shift = _output_coefficients(stats_phase, stats[1], weight, bias)
        # the statistics pass reads the center, the output pass the mean, scale and shift
        center_w = _tile(center if stats_phase else center[:0], tiles)
        mean_w = _tile(stats[0][: 0 if stats_phase else channels], tiles)
        scale_w, shift_w = _tile(scale, tiles), _tile(shift, tiles)
        if x.size >= SERIAL_BELOW:
            for b in prange(n_blocks):
                _forward_rows_task(
                    stats_phase,
                    x,
                    y,
                    b * step,
                    min((b + 1) * step, x.size),
                    width,
                    center_w,
                    sums[b],
                    squares[b],
                    mean_w,
                    scale_w,
                    shift_w,
                    params,
                    act,
                    k0,
                    k1,
                    offset,
                    t,
                    drop,
                )
        else:
            for b in range(n_blocks):
                _forward_rows_task(
                    stats_phase,
                    x,
                    y,
                    b * step,
                    min((b + 1) * step, x.size),
                    width,
                    center_w,
                    sums[b],
                    squares[b],
                    mean_w,
                    scale_w,
                    shift_w,
                    params,
                    act,
                    k0,
                    k1,
                    offset,
                    t,
                    drop,
                )
        if stats_phase:
            mean, var, recenter = _rows_statistics(sums, squares, center, channels, rows)
            center64 = np.empty(channels)
            for c in range(channels):
                center64[c] = center[c]
            if task == 0 and recenter:
                for c in range(channels):  # the mean, rounded to the dtype: a second pass
                    center[c] = center64[c] + mean[c]
                continue
            finite = _finish_stats(
                mean, var, center64, rows, running_mean, running_var, momentum, eps, stats
            )
    return finite


# --------------------------------------------------------------------------------------------
# Backward: sums of g and g * (x - mean) per channel, then dx
# --------------------------------------------------------------------------------------------


@njit(**_INLINE)
def _grad_plane(dys, xs, ws, gs, mu, sc, sh, cs, act, t):
    """``gs = g``, the gradient reaching ``z``, for one plane segment."""
    if act == GELU:
        for k in range(xs.size):
            d = dys[k] * _drop_factor(ws[k], t, cs)
            gs[k] = _gelu_grad(d, (xs[k] - mu) * sc + sh, cs)
    else:
        relu = act == RELU
        for k in range(xs.size):
            d = dys[k] * _drop_factor(ws[k], t, cs)
            gs[k] = _piecewise_grad(d, (xs[k] - mu) * sc + sh, relu, cs)


@njit(**_INLINE)
def _grad_row(dys, xs, ws, gs, mean, scale, shift, cs, act, t):
    """``gs = g`` for one row."""
    if act == GELU:
        for c in range(xs.size):
            d = dys[c] * _drop_factor(ws[c], t, cs)
            gs[c] = _gelu_grad(d, (xs[c] - mean[c]) * scale[c] + shift[c], cs)
    else:
        relu = act == RELU
        for c in range(xs.size):
            d = dys[c] * _drop_factor(ws[c], t, cs)
            gs[c] = _piecewise_grad(d, (xs[c] - mean[c]) * scale[c] + shift[c], relu, cs)


@njit(**_INLINE)
def _accumulate_rows(gs, xs, mean, channels, acc_g, acc_h):
    """``acc_g += sum_r g``, ``acc_h += sum_r g * (x - mean)`` over the rows of ``gs``/``xs``,
    in the input's dtype (the caller adds these run sums to float64 totals)."""
    rows = xs.size // channels
    if rows == _ROWS_PER_STEP:
        g0, g1 = gs[:channels], gs[channels : 2 * channels]
        g2, g3 = gs[2 * channels : 3 * channels], gs[3 * channels :]
        x0, x1 = xs[:channels], xs[channels : 2 * channels]
        x2, x3 = xs[2 * channels : 3 * channels], xs[3 * channels :]
        for c in range(channels):
            mu = mean[c]
            acc_g[c] += (g0[c] + g1[c]) + (g2[c] + g3[c])
            acc_h[c] += (g0[c] * (x0[c] - mu) + g1[c] * (x1[c] - mu)) + (
                g2[c] * (x2[c] - mu) + g3[c] * (x3[c] - mu)
            )
    else:
        for r in range(rows):
            g, x = gs[r * channels : (r + 1) * channels], xs[r * channels : (r + 1) * channels]
            for c in range(channels):
                acc_g[c] += g[c]
                acc_h[c] += g[c] * (x[c] - mean[c])


@njit(**_INLINE)
def _apply_plane(gs, xs, dxs, mu, sc, inv, coef_g, coef_xhat, training):
    """``dx`` of one plane segment from its ``g``."""
    if training:
        for k in range(xs.size):
            dxs[k] = ((gs[k] - coef_g) - ((xs[k] - mu) * inv) * coef_xhat) * sc
    else:
        for k in range(xs.size):
            dxs[k] = gs[k] * sc


@njit(**_INLINE)
def _apply_row(gs, xs, dxs, mean, scale, invstd, coef_g, coef_xhat, training):
    if training:
        for c in range(xs.size):
            xhat = (xs[c] - mean[c]) * invstd[c]
            dxs[c] = ((gs[c] - coef_g[c]) - xhat * coef_xhat[c]) * scale[c]
    else:
        for c in range(xs.size):
            dxs[c] = gs[c] * scale[c]


@njit(**_INLINE)
def _apply_rows4(g, x, dx, glo, lo, channels, mean, scale, invstd, coef_g, coef_xhat):
    """``dx`` of four rows in training (see ``_forward_rows4``); ``g`` rows start at
    ``glo``, ``x`` and ``dx`` rows at ``lo``."""
    g0, g1 = g[glo : glo + channels], g[glo + channels : glo + 2 * channels]
    g2, g3 = g[glo + 2 * channels : glo + 3 * channels], g[glo + 3 * channels : glo + 4 * channels]
    x0, x1 = x[lo : lo + channels], x[lo + channels : lo + 2 * channels]
    x2, x3 = x[lo + 2 * channels : lo + 3 * channels], x[lo + 3 * channels : lo + 4 * channels]
    d0, d1 = dx[lo : lo + channels], dx[lo + channels : lo + 2 * channels]
    d2, d3 = dx[lo + 2 * channels : lo + 3 * channels], dx[lo + 3 * channels : lo + 4 * channels]
    for c in range(channels):
        m, inv, cg, cx, sc = mean[c], invstd[c], coef_g[c], coef_xhat[c], scale[c]
        d0[c] = ((g0[c] - cg) - ((x0[c] - m) * inv) * cx) * sc
        d1[c] = ((g1[c] - cg) - ((x1[c] - m) * inv) * cx) * sc
        d2[c] = ((g2[c] - cg) - ((x2[c] - m) * inv) * cx) * sc
        d3[c] = ((g3[c] - cg) - ((x3[c] - m) * inv) * cx) * sc


@njit(**_INLINE)
def _finish_sums(sum_g, sum_h, invstd, count, training, coefs, grad_weight, grad_bias):
    """``grad_weight = sum(g * xhat)``, ``grad_bias = sum(g)`` in the input's dtype; in
    training, ``coefs`` = (sum_g / m, sum_gxhat / m), the apply pass's coefficients."""
    for c in range(invstd.size):
        _channel_sums(c, sum_g[c], sum_h[c], invstd, count, training, coefs, grad_weight, grad_bias)


@njit(**_INLINE)
def _channel_sums(c, sum_g, sum_h, invstd, count, training, coefs, grad_weight, grad_bias):
    """:func:`_finish_sums` for channel ``c``, from its float64 sums."""
    sum_gxhat = sum_h * np.float64(invstd[c])
    grad_weight[c] = sum_gxhat
    grad_bias[c] = sum_g
    if training:
        coefs[0, c] = sum_g / count
        coefs[1, c] = sum_gxhat / count


@njit(**_INLINE)
def _backward_arrays(dy_at, x_at, dx_at, numel, params):
    """``dy``, ``x`` and ``dx`` (empty when ``dx_at`` is 0: no input gradient wanted)."""
    return (
        _memory(dy_at, numel, params),
        _memory(x_at, numel, params),
        _memory(dx_at, numel if dx_at else 0, params),
    )


@njit(**_INLINE)
def _output(address, channels, params):
    """A ``(C,)`` gradient output; a scratch array where the address is 0 (not wanted)."""
    return _memory(address, channels, params) if address else np.empty(channels, params.dtype)


@njit(**_INLINE)
def _outputs(grad_weight_at, grad_bias_at, channels, params):
    return _output(grad_weight_at, channels, params), _output(grad_bias_at, channels, params)


@njit(**_INLINE)
def _backward_passes(sums, dx_at):
    """0 the sums (when asked for), 1 ``dx`` (unless its address is 0)."""
    return range(0 if sums else 1, 2 if dx_at else 1)


@njit(**_HELPER)
def _backward_planar_block(
    apply,
    dy,
    x,
    dx,
    start,
    stop,
    channels,
    plane,
    mean,
    scale,
    shift,
    invstd,
    coef_g,
    coef_xhat,
    training,
    params,
    act,
    k0,
    k1,
    offset,
    t,
    drop,
    piece_g,
    piece_h,
):
    """One block of the backward: its (block, plane) pieces' sums into ``piece_g``,
    ``piece_h`` (its own slices: piece 0 is the block's first plane), or with ``apply``, its
    ``dx``. One helper for both passes: ``g`` is computed the same way in each; without
    activation and dropout it is ``dy`` itself (``dy * 1``), read in place."""
    first = start // plane
    if act == IDENTITY and not drop:
        for pl in range(first, (stop - 1) // plane + 1):
            s = max(start, pl * plane)
            e = min(stop, (pl + 1) * plane)
            c = pl % channels
            if apply:
                _apply_plane(
                    dy[s:e],
                    x[s:e],
                    dx[s:e],
                    mean[c],
                    scale[c],
                    invstd[c],
                    coef_g[c],
                    coef_xhat[c],
                    training,
                )
            else:
                piece_g[pl - first], piece_h[pl - first] = _products64(dy[s:e], x[s:e], mean[c])
        return
    cs = _unpack(params)
    words = _word_buffer(CHUNK + 2 * GROUP, drop)
    gs = np.empty(CHUNK, dy.dtype)
    if not apply:
        for k in range(piece_g.size):
            piece_g[k] = 0.0
            piece_h[k] = 0.0
    for lo in range(start, stop, CHUNK):
        hi = min(lo + CHUNK, stop)
        w = _words(words, lo, hi, offset, k0, k1, drop)
        for pl in range(lo // plane, (hi - 1) // plane + 1):
            s = max(lo, pl * plane)
            e = min(hi, (pl + 1) * plane)
            c = pl % channels
            g = gs[: e - s]
            _grad_plane(
                dy[s:e], x[s:e], words[w + s : w + e], g, mean[c], scale[c], shift[c], cs, act, t
            )
            if apply:
                _apply_plane(
                    g,
                    x[s:e],
                    dx[s:e],
                    mean[c],
                    scale[c],
                    invstd[c],
                    coef_g[c],
                    coef_xhat[c],
                    training,
                )
            else:
                total, products = _products64(g, x[s:e], mean[c])
                piece_g[pl - first] += total
                piece_h[pl - first] += products


@njit(**_HELPER)
def _backward_rows_block(
    apply,
    dy,
    x,
    dx,
    start,
    stop,
    width,
    mean,
    scale,
    shift,
    invstd,
    coef_g,
    coef_xhat,
    training,
    params,
    act,
    k0,
    k1,
    offset,
    t,
    drop,
    acc_g,
    acc_h,
):
    """One block of wide rows (coefficients tiled to the ``width``), ``_ROWS_PER_STEP`` at a
    time: per-channel sums into ``acc_g``, ``acc_h`` (float64 totals of ``RUN_ROWS``-row sums
    in the dtype), or with ``apply``, its ``dx``. Without activation and dropout ``g = dy`` is
    read in place."""
    cs = _unpack(params)
    plain = act == IDENTITY and not drop
    step = _ROWS_PER_STEP * width
    words = _word_buffer(0 if plain else _row_words(step, width, drop), drop)
    gs = np.empty(0 if plain else step, dy.dtype)
    run_g = np.zeros(0 if apply else width, dy.dtype)
    run_h = np.zeros(0 if apply else width, dy.dtype)
    run_rows = 0
    lanes_g = acc_g if apply else _lanes(acc_g, width)
    lanes_h = acc_h if apply else _lanes(acc_h, width)
    for lo in range(start, stop, step):
        hi = min(lo + step, stop)
        if plain:
            g = dy[lo:hi]
        else:
            w = _words(words, lo, hi, offset, k0, k1, drop)
            for r in range(lo, hi, width):
                e = r + width
                _grad_row(
                    dy[r:e],
                    x[r:e],
                    words[w + r : w + e] if drop else words[:width],
                    gs[r - lo : e - lo],
                    mean,
                    scale,
                    shift,
                    cs,
                    act,
                    t,
                )
            g = gs[: hi - lo]
        if apply and training and hi - lo == step:
            _apply_rows4(g, x, dx, 0, lo, width, mean, scale, invstd, coef_g, coef_xhat)
        elif apply:
            for r in range(0, hi - lo, width):
                e = r + width
                _apply_row(
                    g[r:e],
                    x[lo + r : lo + e],
                    dx[lo + r : lo + e],
                    mean,
                    scale,
                    invstd,
                    coef_g,
                    coef_xhat,
                    training,
                )
        else:
            _accumulate_rows(g, x[lo:hi], mean, width, run_g, run_h)
            run_rows += (hi - lo) // width
            if run_rows >= RUN_ROWS or hi == stop:
                for c in range(width):
                    lanes_g[c] += run_g[c]
                    lanes_h[c] += run_h[c]
                    run_g[c] = 0.0
                    run_h[c] = 0.0
                run_rows = 0
    if not apply:
        _fold_tiles(lanes_g, acc_g)
        _fold_tiles(lanes_h, acc_h)


@_kernel
def _backward_planar(
    sums,
    dy_at,
    x_at,
    dx_at,
    numel,
    channels,
    plane,
    mean,
    invstd,
    weight,
    bias,
    params,
    act,
    key0,
    key1,
    offset,
    threshold,
    drop,
    training,
    grad_weight_at,
    grad_bias_at,
):
    dy, x, dx = _backward_arrays(dy_at, x_at, dx_at, numel, params)
    grad_weight, grad_bias = _outputs(grad_weight_at, grad_bias_at, channels, params)
    n_blocks = (numel + BLOCK - 1) // BLOCK
    scale, shift = _scale_shift(invstd, weight, bias)
    k0, k1, t = _key(key0, key1, threshold)
    coefs = np.zeros((2, channels), params.dtype)
    coef_g, coef_xhat = coefs[0], coefs[1]
    # One parallel loop for both passes (JIT time grows with each parallel loop).
    for apply_pass in _backward_passes(sums, dx_at):
        apply = apply_pass == 1
        first_piece = np.zeros(n_blocks + 1, np.int64) if apply else _plane_pieces(numel, plane)
        piece_g = np.empty(first_piece[n_blocks])
        piece_h = np.empty(first_piece[n_blocks])
        if numel >= SERIAL_BELOW:
            for b in prange(n_blocks):
                p0, p1 = first_piece[b], first_piece[b + 1]
                _backward_planar_block(
                    apply,
                    dy,
                    x,
                    dx,
                    b * BLOCK,
                    min((b + 1) * BLOCK, numel),
                    channels,
                    plane,
                    mean,
                    scale,
                    shift,
                    invstd,
                    coef_g,
                    coef_xhat,
                    training,
                    params,
                    act,
                    k0,
                    k1,
                    offset,
                    t,
                    drop,
                    piece_g[p0:p1],
                    piece_h[p0:p1],
                )
        else:
            for b in range(n_blocks):
                p0, p1 = first_piece[b], first_piece[b + 1]
                _backward_planar_block(
                    apply,
                    dy,
                    x,
                    dx,
                    b * BLOCK,
                    min((b + 1) * BLOCK, numel),
                    channels,
                    plane,
                    mean,
                    scale,
                    shift,
                    invstd,
                    coef_g,
                    coef_xhat,
                    training,
                    params,
                    act,
                    k0,
                    k1,
                    offset,
                    t,
                    drop,
                    piece_g[p0:p1],
                    piece_h[p0:p1],
                )
        if not apply:
            samples = numel // (channels * plane)
            sum_g, sum_h = _merge_plane_sums(
                first_piece, piece_g, piece_h, channels, plane, samples
            )
            _finish_sums(
                sum_g, sum_h, invstd, numel // channels, training, coefs, grad_weight, grad_bias
            )


@_kernel
def _backward_rows(
    sums,
    dy_at,
    x_at,
    dx_at,
    numel,
    channels,
    plane,
    mean,
    invstd,
    weight,
    bias,
    params,
    act,
    key0,
    key1,
    offset,
    threshold,
    drop,
    training,
    grad_weight_at,
    grad_bias_at,
):
    dy, x, dx = _backward_arrays(dy_at, x_at, dx_at, numel, params)
    grad_weight, grad_bias = _outputs(grad_weight_at, grad_bias_at, channels, params)
    tiles, width, per_block, n_blocks = _rows_blocks(channels, numel)
    scale, shift = _scale_shift(invstd, weight, bias)
    k0, k1, t = _key(key0, key1, threshold)
    coefs = np.zeros((2, channels), params.dtype)
    mean_w, invstd_w = _tile(mean, tiles), _tile(invstd, tiles)
    scale_w, shift_w = _tile(scale, tiles), _tile(shift, tiles)
    for apply_pass in _backward_passes(sums, dx_at):
        apply = apply_pass == 1
        coef_g, coef_xhat = _tile(coefs[0], tiles), _tile(coefs[1], tiles)
        partial_g = np.empty((n_blocks, 0 if apply else channels))
        partial_h = np.empty((n_blocks, 0 if apply else channels))
        if x.size >= SERIAL_BELOW:
            for b in prange(n_blocks):
                _backward_rows_block(
                    apply,
                    dy,
                    x,
                    dx,
                    b * per_block,
                    min((b + 1) * per_block, x.size),
                    width,
                    mean_w,
                    scale_w,
                    shift_w,
                    invstd_w,
                    coef_g,
                    coef_xhat,
                    training,
                    params,
                    act,
                    k0,
                    k1,
                    offset,
                    t,
                    drop,
                    partial_g[b],
                    partial_h[b],
                )
        else:
            for b in range(n_blocks):
                _backward_rows_block(
                    apply,
                    dy,
                    x,
                    dx,
                    b * per_block,
                    min((b + 1) * per_block, x.size),
                    width,
                    mean_w,
                    scale_w,
                    shift_w,
                    invstd_w,
                    coef_g,
                    coef_xhat,
                    training,
                    params,
                    act,
                    k0,
                    k1,
                    offset,
                    t,
                    drop,
                    partial_g[b],
                    partial_h[b],
                )
        if not apply:
            sum_g, sum_h = _merge_rows_sums(partial_g, partial_h, channels)
            _finish_sums(
                sum_g, sum_h, invstd, x.size // channels, training, coefs, grad_weight, grad_bias
            )


# --------------------------------------------------------------------------------------------
# Plain BatchNorm on planar inputs, channel by channel
# --------------------------------------------------------------------------------------------


@njit(**_INLINE)
def _forward_channel(what, x, y, c, channels, plane, shift64, eps, stats, weight, bias):
    """Channel ``c``: its statistics (its column of ``stats``) from the pieces of the blocked
    passes (:func:`_plane_pieces`), merged in the same order, so to the same bits; then its
    output, while its values are still in cache."""
    samples = x.size // (channels * plane)
    one, eps_, zero = _in_dtype(stats, 1.0, eps, 0.0)
    if what <= STATS_APPLY:
        # One piece per _planar_moments call, into one-element arrays: the blocked kernels'
        # compiled helper, not a second inlined copy of the moments (seconds of compile time).
        counts, means, m2s = np.empty(1, np.int64), np.empty(1), np.empty(1)
        count, mean, m2 = 0, 0.0, 0.0
        for n in range(samples):
            pl = n * channels + c
            for b in _plane_blocks(pl, plane):
                lo, hi = _plane_piece(b, pl, plane)
                _planar_moments(x, lo, hi, plane, shift64, channels, counts, means, m2s)
                count, mean, m2 = _chan_merge(count, mean, m2, counts[0], means[0], m2s[0])
        _channel_stats(stats, c, mean, m2 / count, shift64[c], one, eps_)
    if what == STATS:
        return
    mu, sc, sh = stats[0, c], _channel_scale(stats[1], weight, c), _channel_shift(bias, c, zero)
    for n in range(samples):
        lo = (n * channels + c) * plane
        _affine(x[lo : lo + plane], y[lo : lo + plane], mu, sc, sh)


@_kernel
def _forward_channels(
    what,
    x_at,
    y_at,
    numel,
    channels,
    plane,
    running_mean,
    running_var,
    momentum,
    eps,
    stats,
    weight,
    bias,
    params,
    act,
    key0,
    key1,
    offset,
    threshold,
    drop,
):
    """:func:`forward_kernel` for the ``CHANNELS`` layout (see :func:`kernel_layout`): plain
    BatchNorm only (``act``, the keys and ``drop`` are not read)."""
    x, y = _memory(x_at, numel, params), _memory(y_at, numel, params)
    if what == APPLY_RUNNING:
        _running_stats(running_mean, running_var, eps, stats)
    shift64 = _channel_shifts(x[: channels * plane : plane])
    # prange whatever the size: a serial twin of the loop would compile its body again (seconds)
    # to save a thread's wake-up on inputs under SERIAL_BELOW values
    for c in prange(channels):
        _forward_channel(what, x, y, c, channels, plane, shift64, eps, stats, weight, bias)
    if what > STATS_APPLY:
        return True
    return _update_running(running_mean, running_var, stats, numel // channels, momentum)


@njit(**_INLINE)
def _backward_channel(
    sums,
    dy,
    x,
    dx,
    c,
    channels,
    plane,
    mean,
    scale,
    invstd,
    training,
    coefs,
    grad_weight,
    grad_bias,
):
    """Channel ``c``: its sums (its parameter gradients and ``coefs`` column), added up piece
    by piece as the blocked passes add them, so to the same bits; then its ``dx``, while its
    values are still in cache."""
    samples = x.size // (channels * plane)
    mu = mean[c]
    if sums:
        sum_g, sum_h = 0.0, 0.0
        for n in range(samples):
            pl = n * channels + c
            for b in _plane_blocks(pl, plane):
                lo, hi = _plane_piece(b, pl, plane)
                piece_g, piece_h = _products64(dy[lo:hi], x[lo:hi], mu)
                sum_g += piece_g
                sum_h += piece_h
        count = x.size // channels
        _channel_sums(c, sum_g, sum_h, invstd, count, training, coefs, grad_weight, grad_bias)
    if dx.size == 0:
        return
    sc, inv, coef_g, coef_xhat = scale[c], invstd[c], coefs[0, c], coefs[1, c]
    for n in range(samples):
        lo = (n * channels + c) * plane
        hi = lo + plane
        _apply_plane(dy[lo:hi], x[lo:hi], dx[lo:hi], mu, sc, inv, coef_g, coef_xhat, training)


@_kernel
def _backward_channels(
    sums,
    dy_at,
    x_at,
    dx_at,
    numel,
    channels,
    plane,
    mean,
    invstd,
    weight,
    bias,
    params,
    act,
    key0,
    key1,
    offset,
    threshold,
    drop,
    training,
    grad_weight_at,
    grad_bias_at,
):
    """:func:`backward_kernel` for the ``CHANNELS`` layout: plain BatchNorm only."""
    dy, x, dx = _backward_arrays(dy_at, x_at, dx_at, numel, params)
    scale, _ = _scale_shift(invstd, weight, bias)
    coefs = np.zeros((2, channels), params.dtype)
    # The tasks write the parameter gradients here, copied out after the loop: the arrays of
    # _outputs (the caller's memory, or scratch where not wanted) lost their writes made inside
    # the parallel loop (numba 0.68; test_channel_kernels_equal_the_blocked_kernels_bit_for_bit).
    grads = np.zeros((2, channels), params.dtype)
    for c in prange(channels):
        _backward_channel(sums, dy, x, dx, c, channels, plane, mean, scale, invstd, training, coefs,
                          grads[0], grads[1])  # fmt: skip
    if sums:
        grad_weight, grad_bias = _outputs(grad_weight_at, grad_bias_at, channels, params)
        for c in range(channels):
            grad_weight[c] = grads[0, c]
            grad_bias[c] = grads[1, c]


# --------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------


@njit(**_HELPER)
def _dropout_block(src, dst, start, stop, params, k0, k1, offset, t):
    cs = _unpack(params)
    words = _word_buffer(CHUNK + 2 * GROUP, True)
    for lo in range(start, stop, CHUNK):
        hi = min(lo + CHUNK, stop)
        w = _words(words, lo, hi, offset, k0, k1, True)
        xs, ys, ws = src[lo:hi], dst[lo:hi], words[w + lo : w + hi]
        for k in range(hi - lo):
            ys[k] = xs[k] * _drop_factor(ws[k], t, cs)


@_kernel
def dropout_flat(src, dst, params, key0, key1, offset, threshold):
    """``dst = src * f`` element-wise over flat memory (``dst`` may be ``src``)."""
    k0, k1, t = _key(key0, key1, threshold)
    numel = src.size
    n_blocks = (numel + BLOCK - 1) // BLOCK
    if numel >= SERIAL_BELOW:
        for b in prange(n_blocks):
            _dropout_block(
                src, dst, b * BLOCK, min((b + 1) * BLOCK, numel), params, k0, k1, offset, t
            )
    else:
        for b in range(n_blocks):
            _dropout_block(
                src, dst, b * BLOCK, min((b + 1) * BLOCK, numel), params, k0, k1, offset, t
            )


# --------------------------------------------------------------------------------------------
# By layout
# --------------------------------------------------------------------------------------------

_FORWARD = {PLANAR: _forward_planar, ROWS: _forward_rows, CHANNELS: _forward_channels}
_BACKWARD = {PLANAR: _backward_planar, ROWS: _backward_rows, CHANNELS: _backward_channels}


def kernel_layout(layout: str, numel: int, channels: int, plane: int, act: int, drop: bool) -> str:
    """The kernels' layout for a call on an input of ``layout``: ``CHANNELS`` for plain
    BatchNorm (identity, no dropout) on a planar input, unless it has ``SERIAL_BELOW`` values or
    more in fewer than ``CHANNEL_MAJOR`` channels or planes shorter than
    ``CHANNEL_MAJOR_PLANE`` (one task per channel would leave threads idle or loop over short
    planes; the blocked kernels run those); else ``layout``. The result does not depend on the
    thread count, nor do the kernels'."""
    if layout != PLANAR or act != IDENTITY or drop:
        return layout
    if numel >= SERIAL_BELOW and (channels < CHANNEL_MAJOR or plane < CHANNEL_MAJOR_PLANE):
        return layout
    return CHANNELS


def forward_kernel(layout: str):
    """``(what, x_at, y_at, numel, channels, plane, running_mean, running_var, momentum, eps,
    stats, weight, bias, params, act, key0, key1, offset, threshold, drop) -> bool``.

    ``x_at``/``y_at`` are the addresses of the input and output memory (``numel`` elements each,
    dense in the layout's order: ``tensor.data_ptr()``; the same for a statistics-only call).
    ``stats`` (3, C) holds mean, invstd and the biased var in the input's dtype. ``what``:
    ``STATS`` computes them from the batch (float64 totals) and updates the running buffers
    (unless empty) by :func:`update_running_stats`, returning False when some statistic is
    not finite (buffers then untouched); ``STATS_APPLY`` then writes the output too; ``APPLY``
    writes it from the statistics as given, ``APPLY_RUNNING`` from the running buffers:
    ``y = act((x - mean) * invstd * weight + bias) * f`` (empty weight/bias: none).
    """
    return _FORWARD[layout]


def backward_kernel(layout: str):
    """``(sums, dy_at, x_at, dx_at, numel, channels, plane, mean, invstd, weight, bias, params,
    act, key0, key1, offset, threshold, drop, training, grad_weight_at, grad_bias_at)``: with
    ``sums`` (required in training), the ``(C,)`` parameter gradients, then ``dx``. Addresses as
    in :func:`forward_kernel`; ``dx_at`` 0 skips ``dx``, a gradient address 0 discards it."""
    return _BACKWARD[layout]


def _vector_type(dtype: np.dtype) -> types.Array:
    return types.Array(numpy_support.from_dtype(np.dtype(dtype)), 1, "C")


def forward_signature(dtype: np.dtype) -> tuple:
    """The numba argument types of every :func:`forward_kernel` call on ``dtype`` data: codes,
    addresses, sizes and keys are Python ints, ``momentum`` and ``eps`` floats, ``drop`` a bool,
    ``stats`` a dense (3, C) array and the other arrays dense 1-D, all of ``dtype``."""
    vector, integer, real = _vector_type(dtype), types.int64, types.float64
    stats = types.Array(vector.dtype, 2, "C")
    return (*[integer] * 6, vector, vector, real, real, stats, *[vector] * 3, *[integer] * 5,
            types.boolean)  # fmt: skip


def dropout_signature(dtype: np.dtype) -> tuple:
    """The numba argument types of every :func:`dropout_flat` call on ``dtype`` data: the
    source, target and ``params`` dense 1-D arrays of ``dtype``, the keys, offset and threshold
    Python ints."""
    vector = _vector_type(dtype)
    return (vector, vector, vector, *[types.int64] * 4)


def backward_signature(dtype: np.dtype) -> tuple:
    """The numba argument types of every :func:`backward_kernel` call on ``dtype`` data (flags
    are bools, addresses, sizes, codes and keys Python ints, the (C,) vectors and ``params``
    dense 1-D arrays of ``dtype``), so that the kernel can be compiled before its first call
    (:mod:`normdrop.kernels.compile_ahead`)."""
    vector, flag, integer = _vector_type(dtype), types.boolean, types.int64
    return (flag, *[integer] * 6, *[vector] * 5, *[integer] * 5, flag, flag, integer, integer)
