"""Exact nearest-neighbour engine: ordered neighbour labels for kNN and radius vote counts for rNN.

Every nearest-neighbour certificate in poisoncert needs, per test input, either the labels of its first ``K``
training examples in the order of spec section 3 (distance ascending, content-hash rank descending) or the
per-label number of training examples within each radius. This module computes both **exactly** (brute force,
no approximation), streaming the test set in chunks so that peak memory is bounded whatever its size. With the
Numba backend, :meth:`NeighbourIndex.search` runs one fused kernel: each thread takes a block of 16 test rows,
computes their distances into a cache-sized buffer and, while they are hot, selects and orders each row's first
``K`` and counts its radii; no chunk-wide distance matrix is ever written.

Determinism and precision
-------------------------
- Training examples are ranked by SHA-256 of (features as little-endian float64, label index as little-endian
  int64), independent of row position (:func:`training_ranks`). The index stores the training set permuted by rank
  descending, so "larger rank first" becomes "smaller internal position first", a stable rule both backends share.
- Distances are computed in float32 when the training features are float32 and in float64 otherwise (test
  features are cast to the training dtype). Each distance is accumulated feature by feature in column order with
  plain IEEE operations (no fused multiply-add, no re-association, no BLAS), identically in the Numba and the
  PyTorch backends, so equal inputs give bit-identical distances, and therefore identical neighbours, on every run
  and on both backends. l1: ``sum |x_f - t_f|``; l2: ``sqrt(sum (x_f - t_f)**2)``; cosine: ``max(0, 1 - sum
  u_f v_f)`` with ``u, v`` the rows scaled to unit Euclidean norm (computed once with NumPy, in float64, after
  dividing each row by its largest absolute entry so that neither huge nor tiny rows lose their direction).
- Neighbours are ordered by the computed distance value; ties (equal computed distance) go to the larger rank.
- A radius ``r`` counts a training example when its computed distance ``d`` satisfies ``d <= r`` as real numbers
  (float32 distances are compared against the largest float32 not above ``r``, which is the same test).
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import sys
from collections.abc import Iterator, Sequence

import numba
import numpy as np
from numba import prange
from numba.extending import overload

from ._bitvectors import lowest_set_bit
from ._distance_tiles import TILE_ROWS, pack_columns, packed_block_distances, unpack_columns
from ._io import example_digests, label_codes
from ._validation import check_features, check_metric, check_positive_int, encode_labels
from .votes import _COUNT_LANES, _add_label_counts

__all__ = [
    "NeighbourIndex",
    "knn_ordered_labels",
    "radius_vote_counts",
    "training_ranks",
]

_METRIC_CODES = {"l1": 0, "l2": 1, "cosine": 2}
_BACKENDS = ("auto", "numba", "torch", "dask")
# Test rows that share one pass over the training tiles (each tile is reused by all of them while it is in L1).
# Measured on a 2-core AMD EPYC (AVX2) with 60,000 x 81 float32 training features.
_ROW_BLOCK = 16
_RADIUS_BLOCK = 1024
_TORCH_HINT = "the torch backend needs PyTorch: pip install poisoncert[torch]"


# --------------------------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------------------------


def training_ranks(X_train: np.ndarray, y_train: np.ndarray) -> np.ndarray:
    """Content-hash rank of every training example (spec section 2).

    The hash of an example is SHA-256 of its features as little-endian float64 followed by the code of its label
    *value* as little-endian int64 (:func:`poisoncert._io.label_codes`: an integer label is its own code, a string
    label the first 8 bytes of its SHA-256; ``-0.0`` is encoded as ``0.0``, so equal vectors hash equally). The
    same encoding serves the estimators, :class:`NeighbourIndex` and DPA's partitions. The rank is the position of
    the hash among the distinct hash values sorted ascending (as 256-bit big-endian integers): identical examples
    get equal rank, and the rank of an example does not depend on its row position. Among neighbours at equal
    distance the one with the larger rank comes first.

    Parameters
    ----------
    X_train : array-like of shape (n_train, n_features)
    y_train : array-like of shape (n_train,)
        Label values (integers or strings).

    Returns
    -------
    ndarray of shape (n_train,), int64

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.0, 1.0], [2.0, 3.0], [0.0, 1.0]])
    >>> r = training_ranks(X, np.array([0, 1, 0]))
    >>> bool(r[0] == r[2]), sorted(set(r.tolist()))
    (True, [0, 1])
    """
    X = check_features(X_train, "X_train")
    classes, y = _encode_train_labels(y_train, X.shape[0])
    return _ranks(X, label_codes(classes)[y])


def _ranks(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    words = example_digests(X, y).view(">u8").astype(np.uint64)  # 256-bit big-endian, as 4 words
    # Rank among the distinct rows in lexicographic order (np.unique(axis=0, return_inverse=True), 3x faster).
    order = np.lexsort(words.T[::-1])
    ordered = words[order]
    new = np.ones(len(words), dtype=np.int64)
    new[1:] = np.any(ordered[1:] != ordered[:-1], axis=1)
    ranks = np.empty(len(words), dtype=np.int64)
    ranks[order] = np.cumsum(new) - 1
    return ranks


def label_table_dtype(max_label: int) -> np.dtype:
    """The narrowest of int8, int16 and int32 that holds label indices up to ``max_label``.

    The kNN label table is n_test x (k + e) (MNIST: 10,000 x 10,000), so its width is memory written, page faults
    taken and bytes read by every certificate: int8 for up to 128 labels halves what int16 took.
    """
    for dtype in (np.int8, np.int16, np.int32):
        if max_label <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label index {max_label} does not fit a label table (int32)")


def _encode_train_labels(y: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted label values ``classes`` and each example's index into them (as scikit-learn maps labels)."""
    array = np.asarray(y)
    if array.ndim != 1:
        raise ValueError(f"y_train must be 1-D, got shape {array.shape}")
    if len(array) != n_rows:
        raise ValueError(f"y_train has {len(array)} entries but X_train has {n_rows} rows")
    classes, index = encode_labels(array, "y_train")
    if len(classes) > np.iinfo(np.int32).max:
        raise ValueError(f"y_train has {len(classes)} distinct labels, too many for a label index")
    return classes, index


# --------------------------------------------------------------------------------------------------------------
# Numba kernels
# --------------------------------------------------------------------------------------------------------------


@numba.njit(parallel=True, fastmath=False, cache=True)
def _distances_numba(Q, XP, n_train, out, metric):  # pragma: no cover - compiled
    """out[i, j] = distance(Q[i], training column j), blocks of ``_ROW_BLOCK`` test rows in parallel.

    ``XP``: the training features packed by :func:`poisoncert._distance_tiles.pack_columns`.
    """
    n_blocks = (Q.shape[0] + _ROW_BLOCK - 1) // _ROW_BLOCK
    for block in prange(n_blocks):
        i0 = block * _ROW_BLOCK
        i1 = min(i0 + _ROW_BLOCK, Q.shape[0])
        tail = np.empty((TILE_ROWS, XP.shape[1]), out.dtype)
        packed_block_distances(Q, XP, n_train, i0, i1, out[i0:i1], metric, tail)


@numba.njit(inline="always")
def _radix_select(bits, k, hist):  # pragma: no cover - compiled
    """Bit pattern of the k-th smallest (1-based) of the non-negative integers ``bits``, and its rank among equals.

    MSD radix selection with 11-bit digits; for non-negative IEEE floats the bit pattern orders like the value.
    Returns ``(pattern, need)`` where ``need`` = how many elements equal to ``pattern`` belong to the first k.
    """
    n_bits = bits.itemsize * 8 - 1
    prefix = 0
    shift = n_bits
    remaining = k
    while shift > 0:
        width = min(11, shift)
        shift -= width
        mask = (1 << width) - 1
        hist[: mask + 1] = 0
        for j in range(bits.shape[0]):
            value = bits[j]
            if (value >> (shift + width)) == prefix:
                hist[(value >> shift) & mask] += 1
        below = 0
        digit = 0
        for b in range(mask + 1):
            if below + hist[b] >= remaining:
                digit = b
                break
            below += hist[b]
        remaining -= below
        prefix = (prefix << width) | digit
    return prefix, remaining


@numba.njit(inline="always")
def _min_max(values):  # pragma: no cover - compiled
    low = values[0]
    high = values[0]
    for t in range(values.shape[0]):
        low = min(low, values[t])
        high = max(high, values[t])
    return low, high


#: Widest digit of the LSD radix sort. The passes are as few as this allows and their digits equally wide: the
#: first K of an MNIST row span about 25 bits, two passes of 13 bits (11-bit digits took three).
_SORT_DIGIT = 13


@numba.njit(inline="always")
def _digit_width(n_bits):  # pragma: no cover - compiled
    """Bits per pass of an LSD radix sort of ``n_bits``-bit keys: as few passes as ``_SORT_DIGIT`` allows, equal."""
    n_passes = max(1, (n_bits + _SORT_DIGIT - 1) // _SORT_DIGIT)
    return (n_bits + n_passes - 1) // n_passes


@numba.njit(inline="always")
def _digit_starts(keys, shift, mask, hist):  # pragma: no cover - compiled
    """hist[d] = how many ``keys`` have a smaller digit ``(key >> shift) & mask`` than d (where d's run starts)."""
    hist[: mask + 2] = 0
    for t in range(keys.shape[0]):
        hist[((keys[t] >> shift) & mask) + 1] += 1
    for b in range(1, mask + 2):
        hist[b] += hist[b - 1]


@numba.njit(inline="always")
def _sort_words(src, dst, hist, low_bit, n_bits):  # pragma: no cover - compiled
    """Stable LSD radix sort of integer words by their bits ``low_bit .. low_bit + n_bits - 1``; returns the array
    that holds the sorted words (``src`` or ``dst``, by the number of passes). Digits as :func:`_digit_width`."""
    n = src.shape[0]
    digit = _digit_width(n_bits)
    shift = low_bit
    top = low_bit + n_bits
    while shift < top:
        width = min(digit, top - shift)
        mask = (1 << width) - 1
        _digit_starts(src, shift, mask, hist)
        for t in range(n):
            value = src[t]
            d = (value >> shift) & mask
            slot = hist[d]
            hist[d] = slot + 1
            dst[slot] = value
        src, dst = dst, src
        shift += width
    return src


@numba.njit(inline="always")
def _sort_packed(src, dst, hist, n_bits):  # pragma: no cover - compiled
    """Stable LSD radix sort of packed ``key << 32 | position`` words by their ``n_bits`` key bits; returns the array
    that holds the sorted words (``src`` or ``dst``, by the number of passes)."""
    return _sort_words(src, dst, hist, 32, n_bits)


@numba.njit(inline="always")
def _packed_radix_sort(keys, positions, scratch, hist, low, n_bits):  # pragma: no cover - compiled
    """:func:`_stable_radix_sort` where each key fits 31 bits above ``low`` and each position 32 bits.

    Key and position travel as one int64, ``(key - low) << 32 | position``: each pass moves 8 bytes per element
    instead of a key and a position in separate arrays, and its scattered writes touch one array, not two (a fifth to a
    third less time in the sort on MNIST's candidates). Sorted by the key bits only, stably, as the unpacked sort; the
    positions and keys are then unpacked into their arrays.
    """
    n = keys.shape[0]
    for t in range(n):
        positions[t] = (np.int64(keys[t] - low) << 32) | positions[t]
    _unpack(_sort_packed(positions, scratch[:n], hist, n_bits), n, low, keys, positions)


@numba.njit(inline="always")
def _unpack(words, count, low, keys, positions):  # pragma: no cover - compiled
    """The first ``count`` packed ``(key - low) << 32 | position`` words into ``keys`` and ``positions``."""
    low_bits = (np.int64(1) << 32) - 1
    for t in range(count):
        value = words[t]
        keys[t] = (value >> 32) + low
        positions[t] = value & low_bits


@numba.njit(inline="always")
def _key_bits(low, high):  # pragma: no cover - compiled
    """Bits of the span ``high - low`` (non-negative keys): how wide the keys are once ``low`` is taken off."""
    span = np.int64(high) - np.int64(low)
    n_bits = 0
    while (span >> n_bits) > 0:
        n_bits += 1
    return n_bits


@numba.njit(inline="always")
def _packs(n_bits, n_positions):  # pragma: no cover - compiled
    """Whether keys of ``n_bits`` and positions below ``n_positions`` fit one int64 word (31 and 32 bits)."""
    return n_bits <= 31 and n_positions <= (np.int64(1) << 32)


@numba.njit(inline="always")
def _stable_radix_sort(keys, positions, keys_tmp, positions_tmp, hist, n_positions):  # pragma: no cover - compiled
    """Sort ``keys`` ascending (carrying ``positions``, each below ``n_positions``), stably, in place; LSD radix with
    digits of at most ``_SORT_DIGIT`` bits (``hist`` holds ``2 ** _SORT_DIGIT + 2`` counts)."""
    n = keys.shape[0]
    if n < 2:
        return
    low, high = _min_max(keys)
    n_bits = _key_bits(low, high)
    if _packs(n_bits, n_positions):
        _packed_radix_sort(keys, positions, positions_tmp, hist, low, n_bits)
        return
    for t in range(n):
        keys[t] -= low
    src_k, src_p, dst_k, dst_p = keys, positions, keys_tmp, positions_tmp
    shift = 0
    digit = _digit_width(n_bits)
    while shift < n_bits:
        width = min(digit, n_bits - shift)
        mask = (1 << width) - 1
        _digit_starts(src_k, shift, mask, hist)
        for t in range(n):
            d = (src_k[t] >> shift) & mask
            slot = hist[d]
            hist[d] = slot + 1
            dst_k[slot] = src_k[t]
            dst_p[slot] = src_p[t]
        src_k, src_p, dst_k, dst_p = dst_k, dst_p, src_k, src_p
        shift += width
    if src_k is not keys:
        keys[:] = src_k
        positions[:] = src_p
    for t in range(n):
        keys[t] += low


@numba.njit(parallel=True, fastmath=False, cache=True)
def _select_numba(B, k, out_pos):  # pragma: no cover - compiled
    """out_pos[i] = internal positions of the first k of row i in the order (distance, position).

    ``B`` is the distance matrix viewed as signed integers of the same width: distances are >= +0.0, and for
    non-negative IEEE floats the integer bit pattern orders exactly like the value. Rows in parallel
    (:func:`_select_row`).
    """
    for i in prange(B.shape[0]):
        scratch = _select_scratch(k, B.shape[1], B.dtype)
        _select_row(B[i], k, scratch, out_pos[i])


#: The sampled selection (:func:`_select_row_sampled`) estimates the k-th smallest from a row's first
#: ``1 / _SAMPLE_SHARE`` part.
_SAMPLE_SHARE = 16


#: The key buffers hold ``2 k + _SELECT_SLACK`` values: the k winners, or the sampled selection's candidates (a
#: little more than k).
_SELECT_SLACK = 1024


@numba.njit(inline="always")
def _select_room(k):  # pragma: no cover - compiled
    """Length of the key buffers (``_SELECT_SLACK``)."""
    return 2 * k + _SELECT_SLACK


@numba.njit(inline="always")
def _select_scratch(k, n_train, dtype):  # pragma: no cover - compiled
    """Per-thread buffers of :func:`_select_row`: histogram, keys and positions and their sort copies, candidates."""
    room = _select_room(k)
    return (np.zeros((1 << max(12, _SORT_DIGIT)) + 2, np.int64), np.empty(room, dtype), np.empty(room, np.int64),
            np.empty(room, dtype), np.empty(room, np.int64), np.empty(n_train + 1, np.int64))


_INT32_MAX = (1 << 31) - 1


def _as_element(array, value):  # pragma: no cover - replaced by the overload below in compiled code
    """``value`` converted to ``array``'s element type (compiled code only)."""
    raise NotImplementedError


@overload(_as_element, inline="always")
def _as_element_typed(array, value):  # type: ignore[no-untyped-def]
    element = array.dtype
    return lambda array, value: element(value)


@numba.njit(inline="always")
def _sampled_threshold(bits, k, hist):  # pragma: no cover - compiled
    """The sampled selections' threshold: the value of rank about ``k / 16`` (plus three standard deviations) among
    the row's first sixteenth (:func:`_select_row_sampled`); -1 where that sixteenth is too short for it."""
    expected = k // _SAMPLE_SHARE
    rank = expected + 3 * int(np.sqrt(expected)) + 8
    if rank > bits.shape[0] // _SAMPLE_SHARE:
        return -1
    threshold, _ = _radix_select(bits[: bits.shape[0] // _SAMPLE_SHARE], rank, hist)
    return threshold


@numba.njit(inline="always")
def _select_row_sampled(bits, k, scratch, out_pos):  # pragma: no cover - compiled
    """:func:`_select_row` from an estimated threshold; False (nothing written) where the estimate falls short.

    The threshold is the value of rank about ``k / 16`` (plus three standard deviations) among the row's first
    sixteenth: training rows are stored in content-hash order, so that part is a random sample of the row, and a
    little more than k elements lie at or below it (1.13 k on MNIST at k = 10,000). One branch-free pass collects
    them all in position order; when there are at least k (else the caller selects exactly), the k smallest by
    (value, position) are among them, and a stable sort of the collected puts exactly those first. Unlike the
    exact selection this reads the row once and needs no histogram of it.
    """
    hist, keys, positions, keys_tmp, positions_tmp, candidates = scratch
    n_train = bits.shape[0]
    threshold = _sampled_threshold(bits, k, hist)
    if threshold < 0:
        return False
    n_candidates = 0
    low = threshold  # the row's minimum (a candidate), taken in the same pass
    for j in range(n_train):
        value = bits[j]
        candidates[n_candidates] = j
        n_candidates += value <= threshold
        low = min(low, value)
    if n_candidates < k or n_candidates > keys.shape[0]:
        return False
    n_bits = _key_bits(low, threshold)
    if _packs(n_bits, n_train):
        # Gathered straight into packed words (key above the minimum, position), sorted, and only the first k
        # unpacked, into the output and ``keys``: no separate gather, minimum and packing passes.
        packed = positions[:n_candidates]
        for t in range(n_candidates):
            j = candidates[t]
            packed[t] = ((np.int64(bits[j]) - np.int64(low)) << 32) | j
        _unpack(_sort_packed(packed, positions_tmp[:n_candidates], hist, n_bits), k, low, keys, out_pos)
        return True
    for t in range(n_candidates):
        j = candidates[t]
        keys[t] = bits[j]
        positions[t] = j
    _stable_radix_sort(keys[:n_candidates], positions[:n_candidates], keys_tmp[:n_candidates],
                       positions_tmp[:n_candidates], hist, n_train)
    out_pos[:] = positions[:k]
    return True


@numba.njit(inline="always")
def _select_row(bits, k, scratch, out_pos):  # pragma: no cover - compiled
    """out_pos = positions of the first k of ``bits`` (non-negative integers) ascending, ties by position.

    One histogram pass over ``(bits - min) >> shift`` (4096 bins) finds the bin holding the k-th smallest; one pass
    collects every element of a lower bin and the elements of that bin (both in position order); a radix
    selection inside the bin settles the k-th value and how many of the elements equal to it are taken (the
    smallest positions). The k winners are then sorted by a stable LSD radix sort, so equal distances stay in
    position order. Tried first: :func:`_select_row_sampled`, which gives the same positions with one pass over
    the row where its estimated threshold holds at least k elements (every MNIST test row at k = 10,000).
    Either way ``keys[:k]`` holds the k winners' values, sorted.
    """
    if not _select_row_sampled(bits, k, scratch, out_pos):
        _select_row_exact(bits, k, scratch, out_pos)


@numba.njit(inline="always")
def _select_row_exact(bits, k, scratch, out_pos):  # pragma: no cover - compiled
    """:func:`_select_row` without the sampled attempt: the histogram, the bin of the k-th, the sort."""
    hist, keys, positions, keys_tmp, positions_tmp, _ = scratch
    n_train = bits.shape[0]
    n_bins = 4096
    hist[:n_bins] = 0
    low, high = _min_max(bits)
    span = high - low
    shift = 0
    while (span >> shift) >= n_bins:
        shift += 1
    for j in range(n_train):
        hist[(bits[j] - low) >> shift] += 1
    below = 0
    split = 0
    for b in range(n_bins):
        if below + hist[b] >= k:
            split = b
            break
        below += hist[b]
    # Candidates (every element of a bin up to ``split``) by branch-free compaction: each position is written at
    # the cursor, which advances only when it belongs; a data-dependent branch here mispredicts often.
    candidates = scratch[5]
    n_candidates = 0
    base = np.int64(low)
    limit = np.int64(split) << shift  # offsets from low below it lie in a bin before split (int64: no overflow)
    end = limit + (np.int64(1) << shift)
    for j in range(n_train):
        candidates[n_candidates] = j
        n_candidates += (np.int64(bits[j]) - base) < end
    bucket_keys = np.empty(hist[split], bits.dtype)
    bucket_positions = np.empty(hist[split], np.int64)
    c = 0
    m = 0
    for t in range(n_candidates):
        j = candidates[t]
        value = bits[j]
        if np.int64(value) - base < limit:
            keys[c] = value
            positions[c] = j
            c += 1
        else:
            bucket_keys[m] = value
            bucket_positions[m] = j
            m += 1
    kth, need_equal = _radix_select(bucket_keys, k - c, hist)
    for t in range(m):
        value = bucket_keys[t]
        if value < kth or (value == kth and need_equal > 0):
            if value == kth:
                need_equal -= 1
            keys[c] = value
            positions[c] = bucket_positions[t]
            c += 1
    _stable_radix_sort(keys[:k], positions[:k], keys_tmp[:k], positions_tmp[:k], hist, n_train)
    out_pos[:] = positions[:k]


#: Multiplying a word of eight 0/1 bytes by this gathers them into its top byte (byte b to bit 56 + b; no two
#: partial products share a bit, so nothing carries into it).
_BYTES_TO_BITS = np.uint64(0x0102040810204080)

#: Outcomes of :func:`_select_labels_sampled`.
_SELECTED, _ESTIMATE_SHORT, _KEYS_TOO_WIDE = 0, 1, 2


@numba.njit(inline="always")
def _label_scratch(k, n_train):  # pragma: no cover - compiled
    """Per-thread buffers of :func:`_select_labels_sampled`: two word buffers for its sort, the row's flags."""
    room = _select_room(k)
    # Whole 64-byte groups, so that the flags can be read as words (a view needs a multiple of 8 bytes).
    return np.empty(room, np.uint32), np.empty(room, np.uint32), np.zeros(64 * ((n_train + 63) // 64), np.uint8)


@numba.njit(nogil=True)
def _select_labels_sampled(bits, k, labels, label_bits, scratch, label_scratch, out_row, want_keys):
    """The labels of the first k of ``bits`` in order, as :func:`_select_row` then a lookup, when the sampled
    threshold holds (:func:`_select_row_sampled`) and each winner's key and label fit 32 bits.

    The search needs labels, not positions: each candidate travels through the sort as one ``uint32``,
    ``(value - min) << label_bits | label``, half the bytes of a (key, position) word, and no lookup in the
    labels follows the sort. Candidates are found from a pass that writes one 0/1 byte per element (vectorised,
    with the count and the minimum), then visited 64 at a time through the set bits of a word built from those
    bytes, in position order; the stable sort keeps that order among equal values, so the labels come out exactly
    as :func:`_select_row`'s positions would give them (a fifth less time than that and the lookup, on MNIST).

    Returns ``_SELECTED`` (``out_row`` written; with ``want_keys``, ``scratch[1][:k]`` holds the winners' values,
    sorted, as :func:`_select_row` leaves them), ``_ESTIMATE_SHORT`` (the exact selection is needed) or
    ``_KEYS_TOO_WIDE`` (select with :func:`_select_row`); nothing is written unless selected.
    """
    hist, keys = scratch[0], scratch[1]
    words, words_tmp, flags = label_scratch
    n_train = bits.shape[0]
    if n_train > _INT32_MAX:  # the count below is 32-bit
        return _KEYS_TOO_WIDE
    threshold = _sampled_threshold(bits, k, hist)
    if threshold < 0:
        return _ESTIMATE_SHORT
    # In the distances' own integer type, with a 32-bit count: compared as int64 (the threshold's type) each
    # vector held 4 float32 keys, not 8, and the pass took 3x the time (MNIST: 16 us a row, now 5).
    limit = _as_element(bits, threshold)
    low = limit
    count = np.int32(0)
    for j in range(n_train):
        value = bits[j]
        below = value <= limit
        flags[j] = below
        count = np.int32(count + np.int32(below))
        low = min(low, value)
    if count < k or count > words.shape[0]:
        return _ESTIMATE_SHORT
    n_bits = _key_bits(low, threshold)
    if n_bits + label_bits > 32:
        return _KEYS_TOO_WIDE
    base = np.int64(low)
    flag_words = flags.view(np.uint64)
    n = 0
    n_blocks = n_train // 64
    for block in range(n_blocks):
        word = np.uint64(0)
        for b in range(8):
            word |= ((flag_words[8 * block + b] * _BYTES_TO_BITS) >> np.uint64(56)) << np.uint64(8 * b)
        start = 64 * block
        while word:
            j = start + lowest_set_bit(word)
            words[n] = np.uint32(((np.int64(bits[j]) - base) << label_bits) | labels[j])
            n += 1
            word &= word - np.uint64(1)
    for j in range(64 * n_blocks, n_train):
        if bits[j] <= threshold:
            words[n] = np.uint32(((np.int64(bits[j]) - base) << label_bits) | labels[j])
            n += 1
    ordered = _sort_words(words[:n], words_tmp[:n], hist, label_bits, n_bits)
    label_mask = np.uint32((1 << label_bits) - 1)
    for t in range(k):
        out_row[t] = ordered[t] & label_mask
    if want_keys:
        for t in range(k):
            keys[t] = np.int64(ordered[t] >> np.uint32(label_bits)) + base
    return _SELECTED


@numba.njit(parallel=True, fastmath=False, cache=True)
def _search_numba(Q, XP, n_train, metric, k, labels, label_bits, probe, out_labels, padded_radii, n_radii, out_votes,
                  row_block, n_threads):  # pragma: no cover - compiled
    """kNN ordered labels and rNN counts of the test rows ``Q`` in one fused pass.

    Per block of ``row_block`` test rows (in parallel): the block's distances into a thread-local buffer
    (:func:`~poisoncert._distance_tiles.packed_block_distances`; 16 rows x 60,000 float32 is 3.8 MB, so it stays
    in cache), then, row by row while
    the row is hot, the labels of its first ``k`` in order (:func:`_select_labels_sampled`, or :func:`_select_row`
    and a lookup where that does not apply; when ``k > 0``) and its radius
    counts (when ``n_radii > 0``: from those first k when the k-th lies beyond every radius, else
    :func:`_radius_row`). Results equal those of the separate kernels
    (:func:`_distances_numba`, :func:`_radius_counts_numba`, :func:`_select_numba`); the full distance matrix is
    never written to memory. ``label_bits``: bits of the largest label index; ``probe``: an empty integer array as
    wide as the distances (bit patterns).
    """
    n_query = Q.shape[0]
    n_classes = out_votes.shape[2]
    n_blocks = (n_query + row_block - 1) // row_block
    n_workers = max(1, min(n_threads, n_blocks))
    # Labels as 32-bit sort words (_select_labels_sampled) for float32 distances and up to 128 labels.
    narrow = k > 0 and probe.itemsize == 4 and label_bits <= 7
    # One worker per thread, each with its buffers allocated once and taking every n_workers-th block: a fresh
    # multi-megabyte buffer per block would page-fault its whole size every time.
    for worker in prange(n_workers):
        bits = np.empty((row_block, n_train), probe.dtype)
        counts = np.zeros((n_radii + 1, n_classes + 1), np.int64)  # a spare label slot for _add_label_counts
        bin_buffer = np.empty(_RADIUS_BLOCK, np.int32)
        lanes = np.zeros((_COUNT_LANES, n_classes + 1), np.int64)
        scratch = _select_scratch(k, n_train, probe.dtype)
        sorted_distances = scratch[1].view(Q.dtype)  # _select_row leaves the first k's bit patterns there, sorted
        positions = np.empty(k, np.int64)
        label_scratch = _label_scratch(k if narrow else 0, n_train if narrow else 0)
        tail = np.empty((TILE_ROWS, XP.shape[1]), Q.dtype)
        for block in range(worker, n_blocks, n_workers):
            i0 = block * row_block
            i1 = min(i0 + row_block, n_query)
            D = bits[: i1 - i0].view(Q.dtype)
            packed_block_distances(Q, XP, n_train, i0, i1, D, metric, tail)
            for i in range(i0, i1):
                distances = D[i - i0]
                row = out_labels[i if k > 0 else 0]  # no label table when k == 0
                if k > 0:
                    outcome = _KEYS_TOO_WIDE
                    if narrow:
                        outcome = _select_labels_sampled(bits[i - i0], k, labels, label_bits, scratch, label_scratch,
                                                         row, n_radii > 0)
                    if outcome != _SELECTED:
                        # As _select_row (each selection inlined once: numba's compile time grows with every copy).
                        if outcome == _ESTIMATE_SHORT or not _select_row_sampled(bits[i - i0], k, scratch, positions):
                            _select_row_exact(bits[i - i0], k, scratch, positions)
                        for t in range(k):
                            row[t] = labels[positions[t]]
                if n_radii > 0:
                    # When the k-th distance lies beyond the largest radius, every example within a radius is
                    # among the first k, already in order: count them there instead of passing over the row,
                    # reading the sorted distances and the labels just written (no gather).
                    if k > 0 and (k >= n_train or sorted_distances[k - 1] > padded_radii[n_radii - 1]):
                        _count_sorted_prefix(sorted_distances[:k], row, padded_radii, n_radii, counts, lanes)
                    else:
                        _radius_row(distances, labels, padded_radii, n_radii, counts, bin_buffer)
                    for c in range(n_classes):
                        running = 0
                        for r in range(n_radii):
                            running += counts[r, c]
                            out_votes[r, i, c] = running


@numba.njit(inline="always")
def _count_sorted_prefix(sorted_distances, labels, padded_radii, n_radii, counts, lanes):  # pragma: no cover
    """counts[b, l] as :func:`_radius_row` leaves them, from distances sorted ascending and their labels.

    The examples within radius ``b`` are a prefix of the sorted distances, found by binary search; the labels
    between one radius's prefix and the next are counted into bin ``b``.
    """
    counts[:, :] = 0
    start = 0
    for b in range(n_radii):
        stop = np.searchsorted(sorted_distances, padded_radii[b], side="right")
        _add_label_counts(labels, start, stop, counts[b], lanes)
        start = stop


@numba.njit(parallel=True, fastmath=False, cache=True)
def _radius_counts_numba(D, labels, padded_radii, n_radii, n_classes, out):  # pragma: no cover - compiled
    """out[r, i, l] = #{j : labels[j] == l and D[i, j] <= radii[r]}, all radii in one pass per row (rows in
    parallel; :func:`_radius_row`)."""
    for i in prange(D.shape[0]):
        counts = np.zeros((n_radii + 1, n_classes), np.int64)
        bins = np.empty(_RADIUS_BLOCK, np.int32)
        _radius_row(D[i], labels, padded_radii, n_radii, counts, bins)
        for c in range(n_classes):
            running = 0
            for r in range(n_radii):
                running += counts[r, c]
                out[r, i, c] = running


@numba.njit(inline="always")
def _radius_row(row, labels, padded_radii, n_radii, counts, bins):  # pragma: no cover - compiled
    """counts[b, l] = training examples of label l whose distance has ``b`` radii strictly below it (reset first).

    Each distance goes to bin ``b`` (so it counts for every radius from ``b`` on); the caller cumulates the bins
    over the radii. Up to 64 radii the bins of a block of distances are counted with one vectorised comparison
    pass per radius; beyond that, a fixed-trip branch-free binary search over ``padded_radii`` (the radii
    ascending, padded with +inf to a power-of-two length).
    """
    counts[:, :] = 0
    n_train = row.shape[0]
    size = padded_radii.shape[0]
    block = bins.shape[0]
    for j0 in range(0, n_train, block):
        j1 = min(j0 + block, n_train)
        width = j1 - j0
        values = row[j0:j1]
        if n_radii <= 64:
            bins[:width] = 0
            for r in range(n_radii):
                radius = padded_radii[r]
                for j in range(width):
                    bins[j] += values[j] > radius
        else:
            for j in range(width):
                d = values[j]
                base = 0
                step = size >> 1
                while step > 0:
                    base += step * (padded_radii[base + step - 1] < d)
                    step >>= 1
                bins[j] = base
        for j in range(width):
            if bins[j] < n_radii:  # typically most distances lie outside every radius
                counts[bins[j], labels[j0 + j]] += 1


# --------------------------------------------------------------------------------------------------------------
# PyTorch backend
# --------------------------------------------------------------------------------------------------------------


def _import_torch():  # type: ignore[no-untyped-def]
    try:
        import torch
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(_TORCH_HINT) from error
    return torch


def _torch_distances(torch, Q, XT, metric: int):  # type: ignore[no-untyped-def]
    """Same feature-by-feature accumulation as the Numba kernel, so the float results are bit-identical."""
    out = torch.zeros((Q.shape[0], XT.shape[1]), dtype=Q.dtype, device=Q.device)
    for f in range(Q.shape[1]):
        diff_or_prod = Q[:, f : f + 1] * XT[f][None, :] if metric == 2 else Q[:, f : f + 1] - XT[f][None, :]
        if metric == 0:
            out += diff_or_prod.abs_()
        elif metric == 1:
            out += diff_or_prod * diff_or_prod
        else:
            out += diff_or_prod
    if metric == 1:
        # Correctly rounded square roots, as in the Numba kernel: torch's vectorised CPU sqrt is not (it is off by
        # one ulp on some inputs), so use NumPy's in place there; on CUDA, float64 sqrt is IEEE-exact, and a
        # float32 root taken in float64 and rounded once to float32 is exact as well.
        if out.device.type == "cpu":
            np.sqrt(out.numpy(), out=out.numpy())
        elif out.dtype == torch.float32:
            out = out.double().sqrt_().float()
        else:
            out.sqrt_()
    elif metric == 2:
        out = 1 - out
        out = torch.where(out > 0, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out


# --------------------------------------------------------------------------------------------------------------
# Public index
# --------------------------------------------------------------------------------------------------------------


#: Version of what a cached neighbour table holds (spec section 3's order, the label and vote encodings), part of
#: every cache key: a change to any of them must bump it, so that no entry written before is read as current.
_TABLE_FORMAT = 2


class NeighbourIndex:
    """Exact brute-force nearest-neighbour index with the deterministic tie rule of spec sections 2 and 3.

    The order of the training examples for a test input is: computed distance ascending, then content-hash rank
    (:func:`training_ranks`) descending. Results are exact and bit-reproducible; see the module notes on precision.

    Parameters
    ----------
    X_train : array-like of shape (n_train, n_features)
        Finite features. float32 input is searched in float32, anything else in float64.
    y_train : array-like of shape (n_train,)
        Label values, integers or strings. They are mapped to indices through the sorted unique values
        (``classes_``), which is what every returned label index refers to; for labels ``0..c-1`` index and value
        coincide. Content hashes use the label *values*, as the estimators do, so both give identical neighbour
        orders whatever the label set.
    metric : {"l1", "l2", "cosine"}, default "l1"
        Aliases "manhattan", "cityblock" and "euclidean" are accepted. Cosine needs non-zero rows.
    backend : {"auto", "numba", "torch", "dask"}, default "auto"
        "numba": parallel CPU kernels. "torch": PyTorch on CUDA when available, else CPU (optional dependency).
        "auto": torch when it is installed and a CUDA GPU is available, numba otherwise. "dask": the training set
        sharded over the active dask.distributed client (:class:`poisoncert.distributed.DaskNeighbourIndex`, which
        this constructor then returns; optional dependency). All give identical results.
    chunk_size : int, optional
        Test inputs per chunk. By default derived from ``max_memory_mb`` and ``n_train`` (for the fused kNN/rNN
        pass of :meth:`search`, whose chunks only pace the progress bar: 1,024 with ``progress``, else all).
    max_memory_mb : float, default 512
        Budget for the working memory: a chunk's distance matrix and selection buffers, or for :meth:`search`
        (:meth:`ordered_labels`, :meth:`radius_votes`) with the Numba backend, every thread's block of up to 16
        distance rows and its selection buffers. Outputs come on top of it.
    progress : bool, default False
        Show a tqdm progress bar over chunks.

    Attributes
    ----------
    classes_ : ndarray
        The sorted label values; label index ``l`` means ``classes_[l]``.
    ranks_ : ndarray of shape (n_train,)
        Content-hash rank of each training example (:func:`training_ranks`).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.0], [1.0], [1.0], [3.0]])
    >>> index = NeighbourIndex(X, np.array([0, 1, 0, 1]), backend="numba")
    >>> index.ordered_labels(np.array([[0.9]]), 4).tolist()  # rows 1 and 2 tie at 0.1; the larger rank goes first
    [[1, 0, 0, 1]]
    >>> bool(index.ranks_[1] > index.ranks_[2])
    True
    >>> index.radius_votes(np.array([[0.9]]), [0.5, 2.5], n_classes=2)[:, 0, :].tolist()
    [[1, 1], [2, 2]]
    """

    def __new__(cls, *args: object, **kwargs: object) -> NeighbourIndex:
        # backend="dask" selects the sharded engine behind the same constructor, so callers (the estimators among
        # them) need not know which engine runs; the Dask module is imported only then.
        if cls is NeighbourIndex and kwargs.get("backend") == "dask":
            from .distributed import DaskNeighbourIndex

            cls = DaskNeighbourIndex
        return super().__new__(cls)

    def __init__(
        self,
        X_train: np.ndarray,
        y_train: np.ndarray,
        *,
        metric: str = "l1",
        backend: str = "auto",
        chunk_size: int | None = None,
        max_memory_mb: float = 512,
        progress: bool = False,
    ) -> None:
        X = check_features(X_train, "X_train")
        self.classes_, y = _encode_train_labels(y_train, X.shape[0])
        hash_labels = label_codes(self.classes_)[y]
        self.metric = check_metric(metric)
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(_BACKENDS)}")
        if chunk_size is not None:
            chunk_size = check_positive_int(chunk_size, "chunk_size")
        if (
            isinstance(max_memory_mb, bool)
            or not isinstance(max_memory_mb, numbers.Real)
            or not math.isfinite(max_memory_mb)
            or max_memory_mb <= 0
        ):
            raise ValueError(f"max_memory_mb must be a positive number of megabytes, got {max_memory_mb!r}")
        self.backend = _resolve_backend(backend)
        self.chunk_size = chunk_size
        self.max_memory_mb = float(max_memory_mb)
        self.progress = bool(progress)

        self.ranks_ = _ranks(X, hash_labels)
        # Rank descending, identical examples (equal rank) by original row: later ties become "smaller position".
        self.order_ = np.lexsort((np.arange(len(X)), -self.ranks_))
        self.dtype_ = X.dtype
        self.n_train_, self.n_features_in_ = X.shape
        self._train_peak = float(np.max(np.abs(X)))
        _check_distance_range(self._train_peak, X, self.metric, self.dtype_, "X_train")
        X_sorted = X[self.order_]
        if self.metric == "cosine":
            X_sorted = _unit_rows(X_sorted, "X_train")
        self._XP = pack_columns(X_sorted)
        self._label_dtype = label_table_dtype(int(y.max()))
        self._labels = y[self.order_].astype(np.int32)
        self._labels_out = self._labels.astype(self._label_dtype)
        self._torch_cache: tuple[object, object, object] | None = None

    @property
    def _XT(self) -> np.ndarray:
        """Training features in rank order, transposed (``n_features x n_train``): a copy unpacked from ``_XP``."""
        return unpack_columns(self._XP, self.n_train_)

    # ---------------------------------------------------------------------------------------------------------
    def ordered_labels(self, X_test: np.ndarray, n_neighbors: int) -> np.ndarray:
        """Labels of the first ``min(n_neighbors, n_train)`` neighbours of every test input, in order.

        Column ``j`` is the label index of the ``(j+1)``-th nearest training example (distance ascending, rank
        descending). Votes for every ``k <= n_neighbors`` are prefix counts of these columns
        (:func:`poisoncert.votes.knn_votes_from_labels`), so one call serves a whole k sweep.

        Returns
        -------
        ndarray of shape (n_test, min(n_neighbors, n_train)), int8 (int16 or int32 for more than 128 labels)
        """
        positions, _ = self._ordered(X_test, n_neighbors, want_distances=False)
        return positions

    def ordered_neighbors(self, X_test: np.ndarray, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
        """Row indices (into the original ``X_train``) and distances of the ordered first neighbours.

        Returns
        -------
        indices : ndarray of shape (n_test, K), int64
        distances : ndarray of shape (n_test, K), the search dtype (float32 or float64)
        """
        return self._ordered(X_test, n_neighbors, want_distances=True)

    def radius_votes(self, X_test: np.ndarray, radii: float | Sequence[float], n_classes: int) -> np.ndarray:
        """Per radius and test input, how many training examples of each label lie at distance ``<= r``.

        All radii share one pass over the distances (each distance is binned into the sorted radii and the bins
        are cumulated), so a sweep over many radii costs about as much as one.

        Parameters
        ----------
        X_test : array-like of shape (n_test, n_features)
        radii : float or sequence of float, each > 0 and finite, any order
        n_classes : int
            Number of labels; every training label index must be below it.

        Returns
        -------
        ndarray of shape (len(radii), n_test, n_classes), int64 (a leading axis of length 1 for a scalar radius)
        """
        return self.search(X_test, radii=radii, n_classes=n_classes)[1]

    def search(
        self,
        X_test: np.ndarray,
        n_neighbors: int | None = None,
        radii: float | Sequence[float] | None = None,
        n_classes: int | None = None,
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """kNN ordered labels and rNN vote counts from **one** pass over the distances.

        Each chunk of test inputs gets its distances once; the same distance rows feed the selection of the
        first ``n_neighbors`` (:meth:`ordered_labels`) and the radius counts (:meth:`radius_votes`), so a command
        that certifies kNN for every k and rNN for every r computes each distance once.

        Returns
        -------
        labels : ndarray of shape (n_test, min(n_neighbors, n_train)) or None
        votes : ndarray of shape (len(radii), n_test, n_classes) or None
        """
        if n_neighbors is None and radii is None:
            raise ValueError("search needs n_neighbors, radii or both")
        k = None if n_neighbors is None else min(check_positive_int(n_neighbors, "n_neighbors"), self.n_train_)
        if radii is not None:
            radii_array = np.atleast_1d(np.asarray(radii, dtype=np.float64))
            if radii_array.ndim != 1 or radii_array.size == 0:
                raise ValueError(f"radii must be a non-empty 1-D list of radii, got shape {radii_array.shape}")
            if not np.all(np.isfinite(radii_array)) or np.any(radii_array <= 0):
                raise ValueError(f"every radius must be a finite number > 0, got {radii_array.tolist()}")
            n_classes = check_positive_int(n_classes, "n_classes")
            if int(self._labels.max()) >= n_classes:
                raise ValueError(
                    f"y_train holds label index {int(self._labels.max())}, outside 0..{n_classes - 1} (n_classes)"
                )
        Q = self._check_test(X_test)
        labels = None if k is None else np.empty((len(Q), k), dtype=self._label_dtype)
        votes_sorted = None
        if radii is not None:
            order = np.argsort(radii_array, kind="stable")
            sorted_radii = _radii_in_dtype(radii_array[order], self.dtype_)
            votes_sorted = np.empty((len(radii_array), len(Q), n_classes), dtype=np.int64)
            padded = np.full(1 << int(len(sorted_radii)).bit_length(), np.inf, dtype=sorted_radii.dtype)
            padded[: len(sorted_radii)] = sorted_radii
        if self.backend == "torch":
            self._torch_search(Q, k, labels, votes_sorted, sorted_radii if radii is not None else None, n_classes)
        else:
            self._numba_search(Q, k, labels, votes_sorted, padded if radii is not None else None)
        votes = None
        if votes_sorted is not None:
            votes = np.empty_like(votes_sorted)
            votes[order] = votes_sorted
        return labels, votes

    def cached_search(
        self,
        X_test: np.ndarray,
        n_neighbors: int | None = None,
        radii: float | Sequence[float] | None = None,
        n_classes: int | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> tuple[np.ndarray | None, np.ndarray | None, bool]:
        """:meth:`search`, kept on disk: a second call with the same data and arguments reads the tables back.

        The entry (:func:`poisoncert.cache.cached_arrays`) is keyed by SHA-256 digests of the training set as
        indexed (features in rank order, label indices and label values) and of the test features as searched,
        the metric, ``n_neighbors``, ``radii``, ``n_classes`` and the package version; the order of spec
        section 3 depends on nothing else, so a hit equals a fresh search bit for bit. An index on the Dask
        backend searches without the cache (its training set is not held here to be digested).

        Returns
        -------
        labels, votes : as :meth:`search`
        from_cache : bool
            True when the tables were read from the cache.
        """
        if not hasattr(self, "_XP"):
            return (*self.search(X_test, n_neighbors, radii, n_classes), False)
        from . import __version__
        from ._io import array_digest
        from .cache import cached_arrays

        if n_neighbors is not None:
            n_neighbors = check_positive_int(n_neighbors, "n_neighbors")
        # The key digests the test features as the search will see them (cast, unit rows for cosine); the search
        # itself is given X_test as it came, since preparing the rows twice need not give the same bits.
        Q = self._check_test(X_test)
        key = {
            "kind": "neighbour_search",
            "table_format": _TABLE_FORMAT,
            "poisoncert_version": __version__,
            "train_sha256": array_digest(self._XP, self._labels, label_codes(self.classes_)),
            "test_sha256": array_digest(Q),
            "metric": self.metric,
            "n_neighbors": n_neighbors,
            "radii": None if radii is None else np.atleast_1d(np.asarray(radii, dtype=np.float64)).tolist(),
            "n_classes": None if n_classes is None else int(n_classes),
        }
        n_test = Q.shape[0]
        del Q
        computed: list[dict[str, np.ndarray]] = []

        def compute() -> dict[str, np.ndarray]:
            labels, votes = self.search(X_test, n_neighbors, radii, n_classes)
            computed.append({name: table for name, table in (("labels", labels), ("votes", votes))
                             if table is not None})
            return computed[0]

        def fits(tables: dict[str, np.ndarray]) -> bool:
            # An entry that loads but lacks a table or has another shape or dtype (edited by hand, or damaged in a way
            # the zip checks let through) is searched again and replaced.
            expected = {}
            if n_neighbors is not None:
                expected["labels"] = ((n_test, min(n_neighbors, self.n_train_)), self._label_dtype)
            if radii is not None:
                expected["votes"] = ((len(key["radii"]), n_test, n_classes), np.dtype(np.int64))
            return set(tables) == set(expected) and all(
                (tables[name].shape, tables[name].dtype) == want for name, want in expected.items())

        try:
            tables = cached_arrays(key, compute, cache_dir, accept=fits)
        except OSError as error:
            if not computed:
                raise
            # The search is done; a cache that cannot be written (a full disk, a read-only folder) only costs the
            # next run its reuse.
            import warnings

            warnings.warn(f"neighbour tables not cached ({error}); they were computed and are used as they are",
                          RuntimeWarning, stacklevel=2)
            tables = computed[0]
        return tables.get("labels"), tables.get("votes"), not computed

    def radius_neighbors(self, X_test: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """Training rows within distance ``<= radius`` of each test input, as CSR arrays.

        Returns
        -------
        indptr : ndarray of shape (n_test + 1,), int64
        indices : ndarray of shape (indptr[-1],), int64
            Row indices into the original ``X_train``; those of test input ``i`` are
            ``indices[indptr[i]:indptr[i + 1]]``, in the engine's internal order (rank descending).
        """
        radii = np.atleast_1d(np.asarray(radius, dtype=np.float64))
        if radii.size != 1 or not np.isfinite(radii[0]) or radii[0] <= 0:
            raise ValueError(f"radius must be one finite number > 0, got {radius!r}")
        Q = self._check_test(X_test)
        cast = _radii_in_dtype(radii, self.dtype_)[0]
        counts = np.zeros(len(Q), dtype=np.int64)
        pieces: list[np.ndarray] = []
        for start, stop, D in self._distance_chunks(Q, k=0):
            D = D.cpu().numpy() if self.backend == "torch" else D
            block_counts = np.count_nonzero(D <= cast, axis=1)
            counts[start:stop] = block_counts
            _, cols = np.nonzero(D <= cast)
            pieces.append(self.order_[cols])
        indptr = np.r_[0, np.cumsum(counts)].astype(np.int64)
        indices = np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)
        return indptr, indices

    def within(self, X_test: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Training rows ``j`` with distance ``< thresholds[j]`` to each test input (strict), as CSR arrays.

        Like :meth:`radius_neighbors`, but with one threshold per *training* row, compared with the computed
        distance in the search dtype. Returns ``(indptr, indices)`` with indices into the original ``X_train``.
        """
        thresholds = np.asarray(thresholds, dtype=np.float64)
        if thresholds.shape != (self.n_train_,):
            raise ValueError(f"thresholds must hold one value per training row ({self.n_train_}), got "
                             f"{thresholds.shape}")
        Q = self._check_test(X_test)
        internal = thresholds[self.order_].astype(self.dtype_)
        counts = np.zeros(len(Q), dtype=np.int64)
        pieces: list[np.ndarray] = []
        for start, stop, D in self._distance_chunks(Q, k=0):
            D = D.cpu().numpy() if self.backend == "torch" else D
            mask = D < internal[None, :]
            counts[start:stop] = np.count_nonzero(mask, axis=1)
            pieces.append(self.order_[np.nonzero(mask)[1]])
        indptr = np.r_[0, np.cumsum(counts)].astype(np.int64)
        indices = np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)
        return indptr, indices

    # ---------------------------------------------------------------------------------------------------------
    def _numba_search(self, Q: np.ndarray, k: int | None, labels: np.ndarray | None, votes_sorted: np.ndarray | None,
                      padded: np.ndarray | None) -> None:
        """Fill ``labels`` and ``votes_sorted`` with the fused kernel (:func:`_search_numba`), chunk by chunk."""
        probe = np.empty(0, np.int32 if np.dtype(self.dtype_).itemsize == 4 else np.int64)
        n_radii = 0 if votes_sorted is None else votes_sorted.shape[0]
        radii = padded if padded is not None else np.zeros(1, self.dtype_)
        no_labels = np.empty((1, 1), self._label_dtype)
        no_votes = np.empty((1, 1, 1), np.int64)
        metric = _METRIC_CODES[self.metric]
        # Bits of a label index (a max() inside the parallel kernel would be a parallel reduction of its own, and
        # compiling one costs about 20 s).
        label_bits = int(self._labels.max()).bit_length() if len(self._labels) else 0
        # Working memory: each thread's block of distance rows and its selection buffers (_select_scratch: four
        # key and position buffers of _select_room(k), the candidates, the k positions; _label_scratch: two word
        # buffers and a byte per training example, rounded up to 64), within max_memory_mb.
        per_row = self.n_train_ * np.dtype(self.dtype_).itemsize
        key_room = 2 * (k or 0) + _SELECT_SLACK
        selection = 8 * (4 * key_room + self.n_train_ + 1 + (k or 0)) + 4 * 2 * key_room + self.n_train_ + 64
        room = self.max_memory_mb * 2**20 / numba.get_num_threads() - selection
        row_block = int(max(1, min(_ROW_BLOCK, room // per_row)))
        # Chunks only pace the progress bar: the fused kernel never holds a chunk's whole distance matrix. Without
        # a bar, one call: each call ends waiting for its slowest thread (10 calls cost MNIST about 0.03 s).
        chunk = min(self.chunk_size or (1024 if self.progress else len(Q)), len(Q))
        for start, stop in self._chunk_bounds(len(Q), chunk):
            _search_numba(Q[start:stop], self._XP, self.n_train_, metric, k or 0, self._labels, label_bits, probe,
                          no_labels if labels is None else labels[start:stop], radii, n_radii,
                          no_votes if votes_sorted is None else votes_sorted[:, start:stop], row_block,
                          numba.get_num_threads())

    def _chunk_bounds(self, n_test: int, chunk: int) -> Iterator[tuple[int, int]]:
        starts = range(0, n_test, chunk)
        if self.progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, total=len(starts), desc="neighbours", unit="chunk")
        for start in starts:
            yield start, min(start + chunk, n_test)

    def _torch_search(self, Q: np.ndarray, k: int | None, labels: np.ndarray | None, votes_sorted: np.ndarray | None,
                      sorted_radii: np.ndarray | None, n_classes: int | None) -> None:
        for start, stop, D in self._distance_chunks(Q, k=k or 0):
            if k is not None:
                # Labels looked up where the distances are: on a GPU, the host then receives the label table
                # (one byte per entry for up to 128 labels) instead of 8-byte positions, and does no lookup.
                # The sorted values and the full order are dropped at once: the radius counts below and the next
                # chunk's distances would otherwise be allocated beside them.
                torch, _, device = self._torch_state()
                chunk_labels = self._torch_table_labels(torch, device)[D.sort(dim=1, stable=True).indices[:, :k]]
                labels[start:stop] = chunk_labels.cpu().numpy()
                del chunk_labels
            if votes_sorted is not None:
                votes_sorted[:, start:stop] = self._torch_radius(D, sorted_radii, n_classes)

    # ---------------------------------------------------------------------------------------------------------
    def _ordered(self, X_test: np.ndarray, n_neighbors: int, want_distances: bool) -> tuple[np.ndarray, np.ndarray]:
        if not want_distances:
            return self.search(X_test, n_neighbors=n_neighbors)[0], np.empty((0, 0))
        n_neighbors = check_positive_int(n_neighbors, "n_neighbors")
        Q = self._check_test(X_test)
        k = min(n_neighbors, self.n_train_)
        first = np.empty((len(Q), k), dtype=np.int64)
        distances = np.empty((len(Q), k), dtype=self.dtype_)
        position_buffer = None
        for start, stop, D in self._distance_chunks(Q, k=k):
            if self.backend == "torch":
                positions = self._torch_select(D, k)
                distances[start:stop] = self._torch_gather(D, positions)
            else:
                if position_buffer is None:
                    position_buffer = np.empty((stop - start, k), dtype=np.int64)
                positions = position_buffer[: stop - start]
                _select_numba(D.view(np.int32 if D.dtype.itemsize == 4 else np.int64), k, positions)
                distances[start:stop] = np.take_along_axis(D, positions, axis=1)
            np.take(self.order_, positions, out=first[start:stop])
        return first, distances

    def _check_test(self, X_test: np.ndarray) -> np.ndarray:
        Q = check_features(X_test, "X_test")
        if Q.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X_test has {Q.shape[1]} features but X_train has {self.n_features_in_}"
            )
        _check_distance_range(self._train_peak, Q, self.metric, self.dtype_, "X_test")
        Q = np.ascontiguousarray(Q, dtype=self.dtype_)
        if self.metric == "cosine":
            Q = _unit_rows(Q, "X_test")
        return Q

    def _resolved_chunk_size(self, n_test: int, k: int) -> int:
        if self.chunk_size is not None:
            return min(self.chunk_size, n_test)
        itemsize = np.dtype(self.dtype_).itemsize
        # Per test row: its distance row, plus the selection buffers (keys, positions and their copies) and the
        # returned positions; torch's stable sort needs a full sorted copy with int64 indices.
        per_row = self.n_train_ * itemsize + 4 * k * 8 + k * 8
        if self.backend == "torch":
            per_row += self.n_train_ * (itemsize + 8) + self.n_train_ * itemsize
        return int(max(1, min(n_test, (self.max_memory_mb * 2**20) // per_row)))

    def _distance_chunks(self, Q: np.ndarray, k: int) -> Iterator[tuple[int, int, object]]:
        D_buffer = None
        for start, stop in self._chunk_bounds(len(Q), self._resolved_chunk_size(len(Q), k)):
            if self.backend == "torch":
                torch, XT, device = self._torch_state()
                Qt = torch.from_numpy(Q[start:stop]).to(device)
                yield start, stop, _torch_distances(torch, Qt, XT, _METRIC_CODES[self.metric])
            else:
                if D_buffer is None:  # one buffer for all chunks (the last, shorter one uses a view of it)
                    D_buffer = np.empty((stop - start, self.n_train_), dtype=self.dtype_)
                D = D_buffer[: stop - start]
                _distances_numba(Q[start:stop], self._XP, self.n_train_, D, _METRIC_CODES[self.metric])
                yield start, stop, D

    # ---------------------------------------------------------------------------------------------------------
    def _torch_state(self):  # type: ignore[no-untyped-def]
        if self._torch_cache is None:
            torch = _import_torch()
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            XT = torch.from_numpy(self._XT).to(device)
            self._torch_cache = (torch, XT, device)
        return self._torch_cache

    def _torch_select(self, D, k: int) -> np.ndarray:  # type: ignore[no-untyped-def]
        # Internal positions are already in rank-descending order, so a stable sort realises the tie rule.
        _, indices = D.sort(dim=1, stable=True)
        return indices[:, :k].cpu().numpy()

    def _torch_gather(self, D, positions: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
        torch, _, device = self._torch_state()
        return D.gather(1, torch.from_numpy(positions).to(device)).cpu().numpy()

    def _torch_radius(self, D, sorted_radii: np.ndarray, n_classes: int) -> np.ndarray:  # type: ignore[no-untyped-def]
        torch, _, device = self._torch_state()
        radii = torch.from_numpy(sorted_radii).to(device)
        labels = self._torch_table_labels(torch, device)
        n_radii = len(sorted_radii)
        # bin = number of radii strictly below d (searchsorted "left"), as in the Numba kernel.
        bins = torch.searchsorted(radii, D, right=False)
        keys = bins * n_classes + labels[None, :]  # int64: the narrow labels are promoted to the bins' dtype
        counts = torch.zeros((D.shape[0], (n_radii + 1) * n_classes), dtype=torch.int64, device=device)
        counts.scatter_add_(1, keys, torch.ones_like(keys))
        counts = counts.view(D.shape[0], n_radii + 1, n_classes)[:, :n_radii].cumsum(dim=1)
        return counts.permute(1, 0, 2).cpu().numpy()

    def _torch_table_labels(self, torch, device):  # type: ignore[no-untyped-def]
        """The training labels in the label table's dtype (:func:`label_table_dtype`), on ``device``: the kNN
        tables are looked up in it, and the radius counts take it as their keys' label part."""
        if getattr(self, "_torch_table_labels_cache", None) is None:
            self._torch_table_labels_cache = torch.from_numpy(self._labels_out).to(device)
        return self._torch_table_labels_cache


# --------------------------------------------------------------------------------------------------------------
# Helpers and convenience functions
# --------------------------------------------------------------------------------------------------------------


def _resolve_backend(backend: str) -> str:
    if backend == "numba":
        return "numba"
    if backend == "torch":
        _import_torch()
        return "torch"
    # auto: torch only pays off on a GPU. Importing it (about a second) is skipped when it is not installed, and on
    # Linux when no NVIDIA driver is loaded (no /proc/driver/nvidia), unless the caller has imported it already.
    if importlib.util.find_spec("torch") is None:
        return "numba"
    if "torch" not in sys.modules and sys.platform.startswith("linux") and not os.path.exists("/proc/driver/nvidia"):
        return "numba"
    torch = _import_torch()
    return "torch" if torch.cuda.is_available() else "numba"


def _unit_rows(X: np.ndarray, name: str) -> np.ndarray:
    # Rows are scaled by their largest entry first, so that neither 1e200 (whose square overflows) nor 1e-170
    # (whose square underflows to 0) loses its direction.
    wide = np.asarray(X, dtype=np.float64)
    peak = np.max(np.abs(wide), axis=1)
    if np.any(peak == 0):
        raise ValueError(f"{name} has a row of zeros, for which the cosine distance is undefined")
    scaled = wide / peak[:, None]
    return np.ascontiguousarray(scaled / np.sqrt(np.einsum("ij,ij->i", scaled, scaled))[:, None], dtype=X.dtype)


def _check_distance_range(train_peak: float, X: np.ndarray, metric: str, dtype: np.dtype, name: str) -> None:
    """Refuse features so large that a distance could overflow to inf in ``dtype`` (neighbours would be arbitrary)."""
    if metric == "cosine":
        return
    peak = train_peak + float(np.max(np.abs(X), initial=0.0))
    largest = float(np.finfo(dtype).max)
    bound = X.shape[1] * peak if metric == "l1" else X.shape[1] * peak * peak
    if not np.isfinite(bound) or bound >= largest:
        raise ValueError(f"{name} is too large for {np.dtype(dtype).name} distances (values up to "
                         f"{float(np.max(np.abs(X))):.3g} over {X.shape[1]} features could overflow); rescale the "
                         "features")


def _radii_in_dtype(radii: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Radii in the distance dtype such that ``d <= r_cast`` iff ``d <= r`` for every distance d of that dtype."""
    if np.dtype(dtype) == np.float64:
        return radii.astype(np.float64)
    cast = radii.astype(np.float32)
    too_big = cast.astype(np.float64) > radii
    cast[too_big] = np.nextafter(cast[too_big], np.float32(-np.inf))
    return cast


def knn_ordered_labels(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, n_neighbors: int, **kwargs: object
) -> np.ndarray:
    """Ordered neighbour labels, shape (n_test, min(n_neighbors, n_train)); see :meth:`NeighbourIndex.ordered_labels`.

    ``kwargs`` are passed to :class:`NeighbourIndex` (metric, backend, chunk_size, max_memory_mb, progress).
    """
    return NeighbourIndex(X_train, y_train, **kwargs).ordered_labels(X_test, n_neighbors)  # type: ignore[arg-type]


def radius_vote_counts(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    radii: float | Sequence[float],
    n_classes: int,
    **kwargs: object,
) -> np.ndarray:
    """rNN vote counts, shape (len(radii), n_test, n_classes); see :meth:`NeighbourIndex.radius_votes`."""
    return NeighbourIndex(X_train, y_train, **kwargs).radius_votes(X_test, radii, n_classes)  # type: ignore[arg-type]
