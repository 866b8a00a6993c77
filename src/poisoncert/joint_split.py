"""Split-budget joint certificates: spec 5d (rNN) and 5e (kNN), the default joint certificates.

The global certificates of spec 5b and 5c give every test input's rival the whole addition budget ``e`` at
once. One poisoned training set adds at most ``e`` examples *in total*, each with one label. Here the attacker is
over-approximated by label counts only: it removes ``r_l`` and adds ``alpha_l`` examples of label ``l``
(``sum r <= e``, ``sum alpha <= e``). For a fixed addition split ``alpha`` each correctly classified input ``i``
with prediction ``a_i`` gets a removal cost ``need_i(alpha)``: it can change its prediction only if
``r_{a_i} >= need_i(alpha)``. One attack therefore flips at most

    F* = max over alpha of  F(alpha),    F(alpha) = max over (r_l), sum r <= e, of
                                                     sum_l #{i correct : a_i = l, need_i(alpha) <= r_l}

inputs, and ``CA(e) >= (#correct - F*) / |T|`` for every poisoned training set of poisoning size ``<= e``
(deterministic). ``F`` is non-decreasing in every ``alpha_l``, so the optimum uses the whole budget and a branch
and bound over boxes of ``alpha``, each bounded by ``F`` at its capped upper corner, finds ``F*`` exactly
(:func:`_maximise_flips`). Proofs and edge cases: ``docs/split_joint_proof.md``.

* rNN (spec 5d): ``need_i(alpha) = max(0, min over l != a of (s_a - s_l + [a > l] - alpha_l))``.
* kNN (spec 5e): removals pull the next clean neighbours, whose labels are known, into the window; ``need_i`` is
  the smallest ``r_a`` satisfying the spec's condition (*), computed per (input, rival label) for every
  ``alpha_l`` from prefix and suffix maxima of ``D(p) = C_l(p) - A(p)`` over positions ``k - e .. k + e``
  (:func:`_knn_pair_needs`).

Insertion-only joint: no removals (``r = 0``, and for kNN ``rho = 0``); deletion-only joint: no additions
(``alpha = 0``, and for kNN ``N' = 0``). Under the label-flip model the general certificate applies unchanged
(relabelling ``e`` examples is a poisoning of size ``e``), so it is what label-flip results report.

Each certified value says whether it is exact: ``False`` only when the search hit ``time_limit`` or
``node_limit`` (the value is then the bound of the open boxes), or when kNN need tables were coarsened to fit
``max_memory_mb``; both keep the value sound.
"""

from __future__ import annotations

import ctypes
import heapq
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import prange
from numba.core import types
from numba.extending import intrinsic, overload

from ._bitvectors import (
    cumulative_popcounts,
    lowest_set_bit,
    popcount,
    prefetch,
    rank1,
    select0,
    select_in_word,
    zero_word,
)
from ._validation import check_label_indices, check_poisoning_sizes, check_positive_int, check_votes
from .joint import _raise_shifted
from .votes import knn_votes_from_labels, predict, rival_counts

__all__ = [
    "SPLIT_THREAT_MODELS",
    "KnnSplitCertifier",
    "SplitCertificate",
    "knn_split_certificate",
    "knn_split_certified_accuracy",
    "rnn_split_certificate",
    "rnn_split_certified_accuracy",
]

#: Threat models with a split joint certificate (label-flip uses the general one).
SPLIT_THREAT_MODELS = ("general", "insertion", "deletion", "label-flip")

# (These are read by compiled code: fixed when it compiles.)
_NO_SLACK_LIMIT = 1 << 40  # exact DP whatever the gap between the LP bound and the threshold
_LP_EXACT_GAP = 30  # run the exact DP while an evaluation's LP bound is within this many flips of the incumbent
_NEG = -(1 << 40)
_REACH_EVALUATIONS = 6  # at most this many feasible points aimed at the last unflipped inputs (_reach_every_candidate)
_MARGIN_OWN = 1 << 40  # margin entry of an input's own label: never a rival


# --------------------------------------------------------------------------------------------------------------
# The label knapsack, bounded: exact when it matters, an LP bound otherwise
# --------------------------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _bound_flips(labels, costs, budget, n_classes, threshold, slack, hist, touched, out):  # pragma: no cover
    """Bounds on ``F = max over r, sum r <= budget, of #{i : costs[i] <= r[labels[i]]}``.

    Writes ``out[0]`` an upper bound of F, ``out[1]`` a value attained by a feasible allocation, ``out[2]`` 1 when
    both equal F. Guarantees: if ``out[0] <= threshold`` then ``F <= threshold``; if F > threshold and the LP bound
    is within ``slack`` of ``max(threshold, out[1])``, the result is exact.

    Method: per label the gains ``g_l(x) = #{cost <= x}`` at its distinct costs; the LP relaxation (upper concave
    hulls, taken greedily by slope) gives the multiplier ``lam`` and the Lagrangian bound ``L = lam * budget +
    sum_l max_x (g_l(x) - lam x)``; the greedy integral part of the LP is a feasible allocation. Any allocation
    with more than ``thr`` flips has total Lagrangian loss below ``L - thr``, so a label's choices with a larger
    loss are dropped (reduced-cost fixing) and the exact dynamic programme runs over the few that remain
    (:func:`_best_gain_within`), first for a trial threshold just below the LP bound.

    ``hist`` (``n_classes x (budget + 1)``) and ``touched`` (``n_classes x (budget // 64 + 1)`` bits) are scratch,
    zero on entry and left zero: only the costs that occur are visited, not every cost up to the budget.
    """
    free = 0
    for i in range(labels.shape[0]):
        x = costs[i]
        if x == 0:
            free += 1
        elif x <= budget:
            lab = labels[i]
            hist[lab, x] += 1
            touched[lab, x >> 6] |= np.uint64(1) << np.uint64(x & 63)
    start = np.zeros(n_classes + 1, np.int64)
    for lab in range(n_classes):
        count = 0
        for w in range(touched.shape[1]):
            count += popcount(touched[lab, w])
        start[lab + 1] = start[lab] + count
    n_points = start[n_classes]
    px = np.empty(n_points, np.int64)
    pg = np.empty(n_points, np.int64)
    for lab in range(n_classes):
        j = start[lab]
        gain = 0
        for w in range(touched.shape[1]):
            word = touched[lab, w]
            touched[lab, w] = 0
            while word:
                x = 64 * w + lowest_set_bit(word)
                word &= word - np.uint64(1)
                gain += hist[lab, x]
                hist[lab, x] = 0
                px[j] = x
                pg[j] = gain
                j += 1
    # Upper concave hull of each label's points, starting at (0, 0); its segments have decreasing slopes.
    seg_dx = np.empty(n_points, np.int64)
    seg_dg = np.empty(n_points, np.int64)
    seg_label = np.empty(n_points, np.int64)
    n_seg = 0
    hx = np.empty(n_points + 1, np.int64)
    hg = np.empty(n_points + 1, np.int64)
    for lab in range(n_classes):
        h = 1
        hx[0] = 0
        hg[0] = 0
        for j in range(start[lab], start[lab + 1]):
            x = px[j]
            g = pg[j]
            while h >= 2 and (hg[h - 1] - hg[h - 2]) * (x - hx[h - 2]) <= (g - hg[h - 2]) * (hx[h - 1] - hx[h - 2]):
                h -= 1
            hx[h] = x
            hg[h] = g
            h += 1
        for j in range(1, h):
            seg_dx[n_seg] = hx[j] - hx[j - 1]
            seg_dg[n_seg] = hg[j] - hg[j - 1]
            seg_label[n_seg] = lab
            n_seg += 1
    slopes = np.empty(n_seg)
    for j in range(n_seg):
        slopes[j] = seg_dg[j] / seg_dx[j]
    order = np.argsort(-slopes)
    remaining = budget
    lam = 0.0
    greedy = 0
    greedy_left = budget
    blocked = np.zeros(n_classes, np.bool_)
    for t in range(n_seg):
        j = order[t]
        if remaining > 0:
            lam = slopes[j]
            remaining -= min(remaining, seg_dx[j])
        lab = seg_label[j]
        if not blocked[lab]:  # a label's hull segments must be taken in order to be an allocation
            if seg_dx[j] <= greedy_left:
                greedy_left -= seg_dx[j]
                greedy += seg_dg[j]
            else:
                blocked[lab] = True
    if remaining > 0:
        lam = 0.0  # everything fits: the LP takes every segment
    bound = lam * budget
    best_reduced = np.empty(n_classes)
    for lab in range(n_classes):
        b = 0.0
        for j in range(start[lab], start[lab + 1]):
            v = pg[j] - lam * px[j]
            if v > b:
                b = v
        best_reduced[lab] = b
        bound += b
    upper = free + int(math.floor(bound + 1e-7))
    lower = free + greedy
    out[1] = lower
    if upper <= threshold or upper == lower:
        out[0] = upper
        out[2] = 1 if upper == lower else 0
        return
    thr = max(threshold, lower)
    if upper - thr > slack:
        out[0] = upper
        out[2] = 0
        return
    # Exact DP over the choices whose Lagrangian loss leaves room for more than a trial threshold: first just below
    # the LP bound, where F usually is (MNIST: within 7 of it in 90 % of the calls that find F, while thr lay a
    # median 43 and up to thousands below), then 4 times further down each time, last at thr. A smaller
    # allowance drops more choices and states, so the trials cost less than one DP at thr (MNIST's kNN and rNN
    # split curves: the DPs 40 % less time).
    best = np.empty(budget + 1, np.int64)
    new = np.empty(budget + 1, np.int64)
    gap = 4
    while True:
        trial = max(thr, upper - gap)
        value = _best_gain_within(start, px, pg, lam, best_reduced, bound - (trial - free + 1) + 1e-7, budget,
                                  n_classes, best, new)
        if value >= 0 and free + value > trial:
            # Every allocation with more than ``trial`` flips was kept, so the best of them is the optimum.
            out[0] = free + value
            out[1] = free + value
            out[2] = 1
            return
        if trial == thr:
            break
        gap *= 4
    out[0] = thr
    out[2] = 1 if thr == lower else 0


@numba.njit(inline="always")
def _best_gain_within(start, px, pg, lam, best_reduced, allowed, budget, n_classes, best, new):  # pragma: no cover
    """Largest total gain of at most one point per label (``px``, ``pg`` from ``start[l]``) costing at most
    ``budget``, over the choices whose Lagrangian loss (``best_reduced[l] - (g - lam x)``, summed) is at most
    ``allowed``; ``_NEG`` when there is none. ``best``, ``new``: scratch of ``budget + 1``.

    A dynamic programme over labels on the budget spent. Loss only grows as labels are added, so a point whose
    own loss exceeds ``allowed`` is skipped and so is a state (a spend and its best gain so far) whose loss does:
    the live states then span a range of spends far narrower than the budget, and the next label's pass covers
    only that range.
    """
    best[:] = _NEG
    new[:] = _NEG
    best[0] = 0
    lo = 0
    hi = 0
    spent_reduced = 0.0
    for lab in range(n_classes):
        keep_zero = best_reduced[lab] <= allowed
        new_lo = budget + 1
        new_hi = -1
        if keep_zero:
            new[lo : hi + 1] = best[lo : hi + 1]
            new_lo = lo
            new_hi = hi
        n_kept = 0
        for j in range(start[lab], start[lab + 1]):
            if best_reduced[lab] - (pg[j] - lam * px[j]) > allowed:
                continue
            x = px[j]
            if lo + x > budget:
                continue
            n_kept += 1
            top = min(budget, hi + x)
            # Branch-free max over aligned slices: this inner loop is most of the time and vectorises so.
            _raise_shifted(new[lo + x : top + 1], best[lo : top + 1 - x], pg[j])
            new_lo = min(new_lo, lo + x)
            new_hi = max(new_hi, top)
        if n_kept == 0 and not keep_zero:
            return _NEG
        best[lo : hi + 1] = _NEG
        spent_reduced += best_reduced[lab]
        floor = spent_reduced - allowed - 1e-6  # a state's loss so far: spent_reduced - (gain - lam * spend)
        live_lo = budget + 1
        live_hi = -1
        for b in range(new_lo, new_hi + 1):
            if new[b] - lam * b < floor:
                new[b] = _NEG
            elif new[b] > _NEG:
                live_lo = min(live_lo, b)
                live_hi = b
        if live_hi < 0:
            return _NEG
        best, new = new, best
        lo = live_lo
        hi = live_hi
    value = _NEG
    for b in range(lo, hi + 1):
        value = max(value, best[b])
    return value


# --------------------------------------------------------------------------------------------------------------
# Per-input removal costs need_i(alpha)
# --------------------------------------------------------------------------------------------------------------


@numba.njit(inline="always")
def _first_row_minimum(rows, shift, out, winner):  # pragma: no cover - compiled
    """``out[i] = min over l of rows[l, i] - shift[l]`` and ``winner[i]`` the first ``l`` attaining it. Row by row,
    branch-free, so the inner loop runs over the inputs in vector steps.

    The updates are sums with the sign mask of ``v - out[i]``, not selects: LLVM turns a select between the new
    and the old value into a store only where it changes, vectorised as masked stores, which on AMD's Zen cores
    cost several times a plain store (as in :func:`poisoncert.joint._raise_shifted`). No overflow: the values lie
    within about 2^41.
    """
    out[:] = rows[0]
    out -= shift[0]
    winner[:] = 0
    for lab in range(1, rows.shape[0]):
        row = rows[lab]
        offset = shift[lab]
        for i in range(out.shape[0]):
            current = np.int64(out[i])
            d = np.int64(row[i]) - np.int64(offset) - current
            smaller = d >> 63  # -1 where v < out[i], else 0: ties keep the first label
            out[i] = current + (d & smaller)
            chosen = np.int64(winner[i])
            winner[i] = chosen + ((lab - chosen) & smaller)


@numba.njit(cache=True, nogil=True)
def _rnn_needs(margins_by_label, alpha, budget, out, active, winner):  # pragma: no cover - compiled
    """Spec 5d: ``need_i = max(0, min_l (margin_il - alpha_l))``, ``budget + 1`` when above the budget.

    ``margins_by_label[l, i]``: one row per label (:func:`_first_row_minimum`). ``active[l]`` counts the affordable
    inputs whose minimum is attained first at label ``l`` (for branching); ``winner`` is a scratch array as long as
    ``out``.
    """
    _first_row_minimum(margins_by_label, alpha, out, winner)
    active[:] = 0
    for i in range(out.shape[0]):
        best = max(out[i], 0)
        if best <= budget:
            out[i] = best
            active[winner[i]] += 1
        else:
            out[i] = budget + 1


@numba.njit(cache=True, nogil=True, parallel=True)
def _knn_needs(pair_start, pair_label, first, zero, offset, values, step, alpha, budget, out, winner):
    """Spec 5e: ``need_i = min over its pairs (i, l) of h_il(alpha_l)`` from windowed tables.  # pragma: no cover

    Pair ``p`` stores ``h`` on the grid ``alpha = j * step``: infinite for ``j < first[p]``, 0 for
    ``j >= zero[p]``, ``values[offset[p] + j - first[p]]`` in between. ``alpha`` is rounded *up* to the grid, which
    can only lower ``h`` (it is non-increasing), so a coarse grid (``step > 1``) stays sound.
    """
    for i in prange(pair_start.shape[0] - 1):
        best = budget + 1
        arg = -1
        for p in range(pair_start[i], pair_start[i + 1]):
            j = (alpha[pair_label[p]] + step - 1) // step
            if j < first[p]:
                continue
            if j >= zero[p]:
                v = 0
            else:
                v = values[offset[p] + j - first[p]]
            if v < best:
                best = v
                arg = pair_label[p]
        out[i] = best
        winner[i] = arg


@numba.njit(cache=True, nogil=True)
def _count_winners(winner, costs, budget, n_classes, active):  # pragma: no cover - compiled
    active[:] = 0
    for i in range(winner.shape[0]):
        if costs[i] <= budget and winner[i] >= 0:
            active[winner[i]] += 1


@numba.njit(cache=True, nogil=True, parallel=True)
def _knn_pair_needs(table, inputs, pred, votes, pair_row, k, n, big_n, span_e, removals, add, step, out, first, zero):
    """``h(alpha)`` of every (input, rival label) pair on the grid ``alpha = min(j * step, add)``.  # pragma: no cover

    Spec 5e, condition (*): input ``i`` (prediction ``a``) can flip towards ``l`` only if some ``N'`` in ``[0, N]``
    and ``rho`` in ``[0, E]`` give ``D(k - N' + rho) + min(N', alpha) + min(r, rho) >= t``, with
    ``D(p) = C_l(p) - A(p)`` (counts among the first ``min(p, n)`` clean neighbours) and ``t = [a > l]``. For a
    fixed position ``p`` the left side is largest at the largest feasible ``N'`` (both ``min`` terms grow with
    it), which splits the maximum into two families: ``N' = N, rho = u`` (``u`` in 0..E) and ``rho = E, N' = v``
    (``v`` in 0..N). With ``d[q] = D(k - N + q)``:

        G(alpha, r) = max(min(N, alpha) + LA(r), r + RB(alpha))
        LA(r)     = max over u of d[u] + min(u, r)            = max(max_{u<=r} d[u] + u, r + max_{r<=u<=E} d[u])
        RB(alpha) = max over v of d[N + E - v] + min(v, alpha) (the same two halves, with v for u)

    ``h(alpha)`` = the smallest ``r`` in ``0..removals`` with ``G(alpha, r) >= t`` (``removals + 1`` when none).
    LA and RB are non-decreasing, so ``h`` is non-increasing in ``alpha``. General: ``N = min(k, e)``,
    ``E = removals = add = e``; insertion-only: ``E = removals = 0``; deletion-only: ``N = add = 0``.

    All labels of one input share its neighbour sequence, so they are computed together (label is the inner,
    vectorised axis): one pass per position updates every ``d``. ``pair_row[i, l]`` is the output row of pair
    ``(inputs[i], l)``, or -1 when that pair is not wanted. ``first[p]``/``zero[p]``: the first grid index where
    ``h <= removals`` / ``h == 0``.
    """
    n_inputs = inputs.shape[0]
    c = votes.shape[1]
    n_grid = out.shape[1]
    span = big_n + span_e + 1
    lo_p = k - big_n
    k_eff = min(k, n)
    readable = min(span, n - lo_p + 1)  # positions past n repeat D(n)
    offset = big_n + span_e
    low = -(1 << 30)
    n_chunks = min(n_inputs, 256)
    for chunk in prange(n_chunks):
        d = np.empty((span, c), np.int32)
        la = np.empty((span_e + 1, c), np.int32)
        pm = np.empty((span, c), np.int32)
        sq = np.empty((span, c), np.int32)
        inverse = np.empty((span_e + 2, c), np.int32)
        counts = np.empty(c, np.int32)
        running = np.empty(c, np.int32)
        base = np.empty(c, np.int32)
        top = np.empty(c, np.int32)
        tie = np.empty(c, np.int32)
        h = np.empty((n_grid, c), np.int32)
        n_finite = np.empty(c, np.int32)
        n_zero = np.empty(c, np.int32)
        for i in range(chunk * n_inputs // n_chunks, (chunk + 1) * n_inputs // n_chunks):
            row = table[inputs[i]]
            a = pred[i]
            for lab in range(c):
                counts[lab] = votes[i, lab]
                tie[lab] = 1 if a > lab else 0
            # Counts among the first lo_p neighbours, from the votes at min(k, n).
            if lo_p <= k_eff:
                for j in range(lo_p, k_eff):
                    counts[row[j]] -= 1
            else:
                for j in range(k_eff, min(lo_p, n)):
                    counts[row[j]] += 1
            # Forward: d, prefix maxima of d[u] + u (left family, u <= E) and of d from E on (right family).
            for q in range(span):
                if 0 < q < readable:
                    counts[row[lo_p + q - 1]] += 1
                own = counts[a]
                for lab in range(c):
                    d[q, lab] = counts[lab] - own
            running[:] = low
            for q in range(span_e + 1):
                for lab in range(c):
                    running[lab] = max(running[lab], d[q, lab] + q)
                    la[q, lab] = running[lab]
            running[:] = low
            for q in range(span_e, span):
                for lab in range(c):
                    running[lab] = max(running[lab], d[q, lab])
                    pm[q, lab] = running[lab]
            # Backward: suffix maxima of d[q] - q (right family) and of d over u >= r (completing LA).
            running[:] = low
            for q in range(span - 1, span_e - 1, -1):
                for lab in range(c):
                    running[lab] = max(running[lab], d[q, lab] - q)
                    sq[q, lab] = running[lab]
            running[:] = low
            for q in range(span_e, -1, -1):
                for lab in range(c):
                    running[lab] = max(running[lab], d[q, lab])
                    la[q, lab] = max(la[q, lab], q + running[lab])
            # LA steps by 0 or 1: "smallest r with LA(r) >= LA(0) + v" is a table over v; written from the top
            # down, each entry keeps the smallest r.
            for lab in range(c):
                base[lab] = la[0, lab]
                top[lab] = la[removals, lab] - la[0, lab]
            for r in range(span_e, -1, -1):
                for lab in range(c):
                    inverse[la[r, lab] - base[lab], lab] = r
            n_finite[:] = 0
            n_zero[:] = 0
            for j in range(n_grid):
                alpha = min(j * step, add)
                capped = min(alpha, big_n)
                for lab in range(c):
                    rb = sq[offset - capped, lab] + offset
                    if alpha <= big_n:
                        rb = max(rb, alpha + pm[offset - alpha, lab])
                    best = max(tie[lab] - rb, 0)
                    wanted = tie[lab] - capped - base[lab]
                    if wanted <= 0:
                        best = 0
                    elif wanted <= top[lab]:
                        best = min(best, inverse[wanted, lab])
                    best = min(best, removals + 1)
                    h[j, lab] = best
                    n_finite[lab] += best <= removals
                    n_zero[lab] += best == 0
            # h is non-increasing in alpha: the finite and the zero values are suffixes of the grid.
            for lab in range(c):
                target = pair_row[i, lab]
                if target < 0:
                    continue
                for j in range(n_grid):
                    out[target, j] = h[j, lab]
                first[target] = n_grid - n_finite[lab]
                zero[target] = n_grid - n_zero[lab]


@numba.njit(cache=True, nogil=True)
def _pack_windows(out, first, zero, offset, values):  # pragma: no cover - compiled
    for p in range(out.shape[0]):
        base = offset[p] - first[p]
        for j in range(first[p], zero[p]):
            values[base + j] = out[p, j]


@numba.njit(cache=True, nogil=True, parallel=True)
def _knn_profiles(table, inputs, pred, votes, pair_row, k, n, reach, sl_bits, sr_bits):  # pragma: no cover
    """Bitsets of ``SL(x) = max_{k-x <= p <= k} D(p)`` and ``SR(y) = max_{k <= p <= k+y} D(p)`` per pair.

    Bit ``x`` of ``sl_bits[p]`` is ``SL(x + 1) - SL(x)`` (0 or 1, since D moves by at most one per position), for
    ``x < reach``; likewise ``sr_bits``. ``SL(0) = SR(0) = D(k) = s_l - s_a``. These do not depend on the
    poisoning size, so one pass serves a whole curve of the general certificate at every ``e <= k``.

    Word by word, not position by position: each side's positions are first recorded as one bitset per label
    (its steps), then per rival the walk visits only the rival's own steps. One position moves one count: the
    predicted label's moves every rival's D (one way), a rival's moves only its own (the other way). The
    maximum rises at a step that raises D while D is at its maximum (``gap``, the maximum minus D, is 0), so a
    run of such steps between two of the others is a masked word, and a run entered with ``gap > 0`` first spends
    the gap (a select). Per input the rivals' loop then costs their steps and words, not every position times
    every label (MNIST: a quarter of the time).
    """
    n_inputs = inputs.shape[0]
    c = votes.shape[1]
    n_words = (reach + 63) >> 6
    n_chunks = min(n_inputs, 256)
    one, full = np.uint64(1), ~np.uint64(0)
    for chunk in prange(n_chunks):
        steps = np.zeros((c, n_words), np.uint64)  # steps[l, w]: positions of the side whose neighbour has label l
        for i in range(chunk * n_inputs // n_chunks, (chunk + 1) * n_inputs // n_chunks):
            row = table[inputs[i]]
            a = pred[i]
            for side in range(2):
                steps[:, :] = 0
                if side == 0:
                    # x drops neighbour k - x - 1 from the prefix (only real neighbours: below min(k, n)).
                    for x in range(max(0, k - min(k, n)), min(reach, k)):
                        steps[row[k - x - 1], x >> 6] |= one << np.uint64(x & 63)
                else:
                    # x takes neighbour k + x in (while there is one, in the training set and in the table).
                    for x in range(max(0, min(reach, n - k, row.shape[0] - k))):
                        steps[row[k + x], x >> 6] |= one << np.uint64(x & 63)
                for lab in range(c):
                    target = pair_row[i, lab]
                    if target < 0:
                        continue
                    gap = 0
                    for w in range(n_words):
                        out = np.uint64(0)
                        if side == 0:
                            # Dropping a predicted neighbour raises D; dropping one of the rival lowers it.
                            rises, falls = steps[a, w], steps[lab, w]
                            while True:
                                below = (one << np.uint64(lowest_set_bit(falls))) - one if falls else full
                                run = rises & below
                                rises &= ~below
                                if gap == 0:
                                    out |= run
                                else:
                                    count = popcount(run)
                                    if count <= gap:
                                        gap -= count
                                    else:
                                        out |= run & ~((one << np.uint64(select_in_word(run, gap))) - one)
                                        gap = 0
                                if not falls:
                                    break
                                gap += 1
                                falls &= falls - one
                            sl_bits[target, w] = out
                        else:
                            # Taking in one of the rival raises D; taking in a predicted neighbour lowers it.
                            rises, falls = steps[lab, w], steps[a, w]
                            while rises:
                                bit = lowest_set_bit(rises)
                                below = (one << np.uint64(bit)) - one
                                gap += popcount(falls & below)
                                falls &= ~below
                                if gap == 0:
                                    out |= one << np.uint64(bit)
                                else:
                                    gap -= 1
                                rises &= rises - one
                            gap += popcount(falls)
                            sr_bits[target, w] = out


@numba.njit(inline="always")
def _online_need(sl_bits, sl_cum, sr_bits, sr_cum, p, d_k, t, zeros, e, alpha, n_words):  # pragma: no cover
    """Spec 5e ``h(alpha)`` of pair ``p`` at ``e <= k`` (general model), ``e + 1`` when infinite.

    ``zeros``: the zero bits of the pair's SL steps below ``e`` (the same at every ``alpha``).

    ``G(alpha, r) = max(alpha + r + SL(e - r), alpha + r + SR(e - alpha)) >= t``: from the second term
    ``r >= t - alpha - SR(e - alpha)``; from the first, ``r + SL(e - r) = e + SL(0) - zeros(e - r)`` with
    ``zeros(x)`` the zero bits of SL's steps below ``x``, so the smallest ``r`` is ``e - x`` for the largest ``x``
    with ``zeros(x) <= e + SL(0) - (t - alpha)``.
    """
    y = e - alpha
    best = t - alpha - (d_k + rank1(sr_bits, sr_cum, p, y))
    if best < 0:
        best = 0
    m = e + d_k - (t - alpha)
    if m >= 0:
        if zeros <= m:
            best = 0
        else:
            r1 = e - select0(sl_bits, sl_cum, p, m, n_words)
            if r1 < best:
                best = r1
    if best > e:
        best = e + 1
    return best


@numba.njit(cache=True, nogil=True, parallel=True)
def _online_bounds(pairs, tie, d_k, sl_bits, sl_cum, sr_bits, sr_cum, e, out, zeros):  # pragma: no cover - compiled
    """``h(e)`` of each listed pair: a lower bound of ``h(alpha)`` for every ``alpha <= e``; and in ``zeros`` the
    zero bits of its SL steps below ``e``, which :func:`_online_label_needs` reads at every ``alpha``."""
    n_words = sl_bits.shape[1]
    for j in prange(pairs.shape[0]):
        p = pairs[j]
        zeros[j] = e - rank1(sl_bits, sl_cum, p, e)
        out[j] = _online_need(sl_bits, sl_cum, sr_bits, sr_cum, p, d_k[p], tie[p], zeros[j], e, e, n_words)


#: Pairs per task of :func:`_online_label_needs` (its select buffer is this long).
_NEEDS_CHUNK = 2048
#: How many pairs ahead :func:`_online_label_needs` prefetches the SL counts.
_PREFETCH_PAIRS = 8


@numba.njit(cache=True, nogil=True, parallel=True)
def _online_label_needs(pairs, slots, tie, d_k, zeros, sl_bits, sl_cum, sr_bits, sr_cum, e, alpha, below, above,
                        out):  # pragma: no cover - compiled
    """``h(alpha)`` of the listed pairs (all with the same rival label, so one ``alpha``); :func:`_online_need`.

    Pair ``j`` writes ``out[slots[j]]`` (its input's place in the problem; slots of other inputs are left as they
    are). ``tie``, ``d_k`` and ``zeros`` (:func:`_online_bounds`) are per listed pair, in its order (contiguous
    reads). ``below`` and ``above``: like ``out``, ``h`` at a smaller and at a larger ``alpha`` (or empty
    arrays). ``h`` is non-increasing in ``alpha`` (more additions of the rival never make flipping harder), so
    where the two agree they are ``h(alpha)`` too, and only the other pairs are computed.

    Two passes per chunk of pairs: the first settles what the counts alone settle and finds, for the others, the
    SL word that holds the zero to select; the second reads those words. Each of those reads is a cache miss at
    an address known in advance, so the second pass keeps many of them in flight; interleaved with the first
    pass's branches they were taken one at a time (twice the time on MNIST).
    """
    n_words = sl_bits.shape[1]
    cum_row = sl_cum.shape[1]
    n = pairs.shape[0]
    bracketed = below.shape[0] == out.shape[0]
    y = e - alpha
    flat = sl_bits.reshape(-1)
    n_chunks = (n + _NEEDS_CHUNK - 1) // _NEEDS_CHUNK
    for chunk in prange(n_chunks):
        start = chunk * _NEEDS_CHUNK
        stop = min(start + _NEEDS_CHUNK, n)
        todo = np.empty(stop - start, np.int64)  # pair index j
        where = np.empty(stop - start, np.int64)  # flat SL word index
        rank = np.empty(stop - start, np.int64)  # zeros of that word before the one selected
        count = 0
        for j in range(start, stop):
            # The SL counts of a pair a few ahead: its select counts its words there, starting with a cache miss.
            ahead = pairs[min(j + _PREFETCH_PAIRS, n - 1)] * cum_row
            prefetch(sl_cum, ahead)
            prefetch(sl_cum, ahead + n_words // 2)
            prefetch(sl_cum, ahead + n_words)
            slot = slots[j]
            if bracketed and below[slot] == above[slot]:
                out[slot] = below[slot]
                continue
            p = pairs[j]
            t = tie[j]
            best = t - alpha - (d_k[j] + rank1(sr_bits, sr_cum, p, y))
            if best < 0:
                best = 0
            m = e + d_k[j] - (t - alpha)
            if m >= 0:
                if zeros[j] <= m:
                    best = 0
                elif best > zeros[j] - m:
                    # The zero selected lies below e with at most e - zeros[j] ones before it, so the SL term is at
                    # least zeros[j] - m: only a smaller one can lower ``best`` (MNIST: 9 % of the selects skipped).
                    word, rest = zero_word(sl_cum, p, m, n_words)
                    todo[count] = j
                    where[count] = p * n_words + word
                    prefetch(flat, p * n_words + word)  # read in the second pass
                    rank[count] = rest
                    count += 1
            out[slot] = best if best <= e else e + 1
        for q in range(count):
            j = todo[q]
            w = where[q]
            r1 = e - (64 * (w - pairs[j] * n_words) + select_in_word(~flat[w], rank[q]))
            if r1 < out[slots[j]]:
                out[slots[j]] = r1


@numba.njit(cache=True, nogil=True)
def _min_over_pairs(input_start, input_pairs, pair_rival, h, budget, out, active, winner):  # pragma: no cover
    """``need_i = min over the input's pairs of h``; ``winner[i]`` the rival of the first of the input's pairs, in
    label order, that attains it (-1 where none is within ``budget``); ``active[l]`` counts affordable inputs won
    by rival ``l``."""
    active[:] = 0
    for i in range(input_start.shape[0] - 1):
        best = budget + 1
        arg = -1
        for j in range(input_start[i], input_start[i + 1]):
            v = h[input_pairs[j]]
            if v < best:
                best = v
                arg = pair_rival[input_pairs[j]]
        out[i] = best
        winner[i] = arg
        if best <= budget:
            active[arg] += 1


@numba.njit(cache=True, nogil=True)
def _min_over_labels(h, no_shift, budget, out, winner, active):  # pragma: no cover - compiled
    """``out[i] = min over labels l of h[l, i]`` (:func:`_first_row_minimum`, ``no_shift`` zeros); ``active[l]``
    counts the affordable (``<= budget``) inputs whose first minimal label is ``l`` (``winner``: scratch)."""
    _first_row_minimum(h, no_shift, out, winner)
    active[:] = 0
    for i in range(out.shape[0]):
        if out[i] <= budget:
            active[winner[i]] += 1


# --------------------------------------------------------------------------------------------------------------
# Branch and bound over the addition split
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Solution:
    lower: int  # flips of the best label-level attack found (alpha, r feasible)
    upper: int  # proved upper bound of F*
    alpha: np.ndarray
    nodes: int

    @property
    def exact(self) -> bool:
        return self.lower == self.upper


#: Kinds of need kernel a problem holds (:func:`_problem_needs`).
_RNN, _TABLE, _ONLINE = 0, 1, 2
#: Remembered evaluations of one problem: room for this many int64 of splits and active counts (MNIST's searches
#: make at most a few thousand evaluations; past the room, evaluations are no longer remembered).
_SEEN_WORDS = 1 << 19
#: An empty int64 array (what a dense online problem has for its per-input pair lists).
_NONE = np.zeros(0, np.int64)


def _monotonic_clock() -> np.ndarray:
    """[address of the C library's ``clock_gettime``, ``CLOCK_MONOTONIC``], or [0, 0] where there is none (Windows):
    the compiled branch and bound reads the clock for ``time_limit`` itself, without the GIL."""
    clock_id = getattr(time, "CLOCK_MONOTONIC", None)
    address = 0
    if clock_id is not None:
        try:
            address = ctypes.cast(ctypes.CDLL(None).clock_gettime, ctypes.c_void_p).value or 0
        except (AttributeError, OSError, TypeError):  # pragma: no cover - no such symbol here
            address = 0
    return np.array([address, clock_id if address else 0], dtype=np.int64)


_CLOCK = _monotonic_clock()


@intrinsic
def _clock_gettime(typingctx, address, clock_id, out):  # type: ignore[no-untyped-def]  # pragma: no cover
    """``clock_gettime(clock_id, out)`` through the function at the integer ``address`` (``out``: two int64, the
    ``timespec`` of 64-bit platforms). An argument, not a constant, so that the kernels calling it stay cacheable."""
    if not (isinstance(address, types.Integer) and isinstance(clock_id, types.Integer)
            and isinstance(out, types.Array)):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        target = context.make_array(signature.args[2])(context, builder, value=args[2])
        byte_pointer = ir.PointerType(ir.IntType(8))
        function = ir.FunctionType(ir.IntType(32), [ir.IntType(32), byte_pointer])
        pointer = builder.inttoptr(args[0], function.as_pointer())
        builder.call(pointer, [builder.trunc(args[1], ir.IntType(32)), builder.bitcast(target.data, byte_pointer)])
        return context.get_dummy_value()

    return types.void(address, clock_id, out), codegen


@numba.njit(inline="always")
def _seconds(clock, buffer):  # pragma: no cover - compiled
    """Monotonic seconds (:func:`_clock_gettime`); ``clock`` from :func:`_monotonic_clock`, nonzero."""
    _clock_gettime(clock[0], clock[1], buffer)
    return buffer[0] + 1e-9 * buffer[1]


class _Problem:
    """One F* problem: candidate inputs (their predicted labels) and a need kernel for any addition split.

    ``state`` holds the kernel's arrays in the tuple's slot for ``kind`` (the other two slots are None, and the
    types pick the kernel: :func:`_problem_needs`). The scratch and the remembered evaluations are arrays too, all
    in one tuple: the branch and bound runs compiled, without the GIL. Numba compiles the search once per type of
    that tuple: per kind, and within a kind per layout of its arrays (a kNN table's int16 or int32 values, say).
    """

    def __init__(self, labels: np.ndarray, n_classes: int, add_budget: int, remove_budget: int, kind: int,
                 state: tuple[Any, ...]) -> None:
        self.labels = np.ascontiguousarray(labels, dtype=np.int64)
        self.n_classes = n_classes
        self.add_budget = add_budget
        self.remove_budget = remove_budget
        n = len(self.labels)
        states: list[tuple[Any, ...] | None] = [None, None, None]
        states[kind] = state
        capacity = max(64, _SEEN_WORDS // (2 * n_classes))
        slots = 1 << (2 * capacity - 1).bit_length()  # at most half full
        self.costs = np.empty(n, np.int64)
        self._arrays = (
            kind, self.labels, n_classes, add_budget, remove_budget, *states,
            self.costs, np.zeros(n_classes, np.int64), np.empty(n, np.int64),  # costs, active counts, winners
            np.zeros((n_classes, remove_budget + 1), np.int32),  # _bound_flips scratch
            np.zeros((n_classes, remove_budget // 64 + 1), np.uint64), np.zeros(3, np.int64),
            # remembered evaluations: open-addressing table of entry numbers; each entry's split, active counts and
            # (upper, attained, exact); counters (entries, fresh evaluations)
            np.full(slots, -1, np.int64), np.empty((capacity, n_classes), np.int64),
            np.empty((capacity, n_classes), np.int64), np.empty((capacity, 3), np.int64), np.zeros(2, np.int64),
        )

    @property
    def evaluations(self) -> int:
        """Fresh evaluations of F so far (remembered answers not counted)."""
        return int(self._arrays[-1][1])

    def evaluate(self, alpha: np.ndarray, threshold: int, slack: int) -> tuple[int, int, bool, np.ndarray]:
        """(upper, attained, exact, active label counts) of F(alpha); see :func:`_evaluate`."""
        active = np.empty(self.n_classes, np.int64)
        upper, attained, exact = _evaluate(self._arrays, np.asarray(alpha, dtype=np.int64), int(threshold),
                                           int(slack), active)
        return int(upper), int(attained), bool(exact), active

    def costs_at(self, alpha: np.ndarray) -> np.ndarray:
        """Every candidate's need (removals that flip it) under the addition split ``alpha``, freshly computed."""
        _costs_at(self._arrays, np.asarray(alpha, dtype=np.int64))
        return self.costs


@numba.njit(cache=True, nogil=True)
def _problem_needs(problem, alpha):  # pragma: no cover - compiled
    """Each candidate's need under ``alpha`` into the problem's costs, and the active label counts."""
    _kind_needs(problem[5], problem[6], problem[7], alpha, problem[4], problem[2], problem[8], problem[9],
                problem[10])


def _kind_needs(rnn, table, online, alpha, remove, c, costs, active, winner):  # type: ignore[no-untyped-def]
    """Stand-in for compiled code, which calls the implementation :func:`_kind_needs_typed` picks."""
    raise NotImplementedError("called from compiled code only")  # pragma: no cover


@overload(_kind_needs)
def _kind_needs_typed(rnn, table, online, alpha, remove, c, costs, active, winner):  # type: ignore[no-untyped-def]
    """The need kernel of the problem's kind: the one of its three states that is not None. Chosen by type, so a
    search compiles (and loads from numba's cache) only its own kind's kernel."""
    if not isinstance(rnn, types.NoneType):
        def rnn_needs(rnn, table, online, alpha, remove, c, costs, active, winner):  # type: ignore[no-untyped-def]
            _rnn_needs(rnn[0], alpha, remove, costs, active, winner)  # pragma: no cover - compiled

        return rnn_needs
    if not isinstance(table, types.NoneType):
        def table_needs(rnn, table, online, alpha, remove, c, costs, active, winner):  # type: ignore[no-untyped-def]
            pair_start, rivals, first, zero, offset, values, step = table  # pragma: no cover - compiled
            _knn_needs(pair_start, rivals, first, zero, offset, values, step, alpha, remove, costs, winner)
            _count_winners(winner, costs, remove, c, active)

        return table_needs

    def online_needs(rnn, table, online, alpha, remove, c, costs, active, winner):  # type: ignore[no-untyped-def]
        _online_needs(online, alpha, remove, costs, active, winner)  # pragma: no cover - compiled

    return online_needs


@numba.njit(cache=True, nogil=True)
def _costs_at(problem, alpha):  # pragma: no cover - compiled
    _problem_needs(problem, alpha)


@numba.njit(cache=True, nogil=True)
def _evaluate(problem, alpha, threshold, slack, active_out):  # pragma: no cover - compiled
    """(upper, attained, exact) of F(alpha) (:func:`_bound_flips`); its active label counts into ``active_out``.

    The branch and bound meets the same split again (boxes share feasible points and corners): a result kept
    from before answers when it was exact, or when its upper bound is within ``threshold`` (then so is F, which
    is all the caller learns from a fresh evaluation too). Results are kept while the table has room.
    """
    labels, c, remove = problem[1], problem[2], problem[4]
    costs, active, hist, touched, out = problem[8], problem[9], problem[11], problem[12], problem[13]
    table, seen_alpha, seen_active, seen_result = problem[14], problem[15], problem[16], problem[17]
    counters = problem[18]
    mask = table.shape[0] - 1
    key = np.uint64(14695981039346656037)  # FNV-1a over the split's entries
    for j in range(c):
        key = (key ^ np.uint64(alpha[j])) * np.uint64(1099511628211)
    slot = np.int64(key & np.uint64(mask))
    entry = -1
    while table[slot] >= 0:
        candidate = table[slot]
        same = True
        for j in range(c):
            if seen_alpha[candidate, j] != alpha[j]:
                same = False
                break
        if same:
            entry = candidate
            break
        slot = (slot + 1) & mask
    if entry >= 0 and (seen_result[entry, 2] == 1 or seen_result[entry, 0] <= threshold):
        active_out[:] = seen_active[entry]
        return seen_result[entry, 0], seen_result[entry, 1], seen_result[entry, 2] == 1
    counters[1] += 1
    _problem_needs(problem, alpha)
    _bound_flips(labels, costs, remove, c, threshold, slack, hist, touched, out)
    active_out[:] = active
    new = entry < 0 and counters[0] < seen_alpha.shape[0]
    if new:
        entry = counters[0]
        counters[0] += 1
        table[slot] = entry
        seen_alpha[entry] = alpha
    if new or (entry >= 0 and out[2] == 1):
        seen_result[entry] = out
        seen_active[entry] = active
    return out[0], out[1], out[2] == 1


@numba.njit(inline="always")
def _capped(lo, hi, budget, out):  # pragma: no cover - compiled
    """``out = min(hi, budget - (sum lo - lo))``: the box's corner, each coordinate capped by what the others
    leave of the budget."""
    total = lo.sum()
    for j in range(lo.shape[0]):
        out[j] = min(hi[j], budget - (total - lo[j]))


@numba.njit(inline="always")
def _feasible_point(lo, corner, budget, active, shared):  # pragma: no cover - compiled
    """A point of the box that spends the whole budget (or its corner, if that is feasible): the slack goes in
    proportion to each label's active inputs times its room first when ``shared``, the rest widest first."""
    slack = budget - lo.sum()
    width = corner - lo
    if width.sum() <= slack:
        return corner.copy()
    point = lo.copy()
    if shared:
        weight = active * width
        total = weight.sum()
        if total > 0:
            for j in range(point.shape[0]):
                point[j] += min(width[j], (slack * weight[j]) // total)
            slack = budget - point.sum()
            width = corner - point
    for j in np.argsort(-width, kind="mergesort"):
        if slack <= 0:
            break
        add = min(slack, width[j])
        point[j] += add
        slack -= add
    return point


@numba.njit(inline="always")
def _reach_every_candidate(problem, best_alpha, incumbent):  # pragma: no cover - compiled
    """Where the root's bound is every candidate but the seeds leave some unflipped (the size at which the curve
    reaches zero), a few feasible points aimed at the inputs the best seed cannot flip at any removal count: part
    ``t`` of its largest addition moves to the labels that are those inputs' cheapest rivals once they get
    additions, ``t`` found by a ternary search on the flips attained (at most ``_REACH_EVALUATIONS``). A search
    that then holds a split flipping every candidate stops at once; otherwise only the incumbent may have risen.
    Returns the incumbent (``best_alpha`` updated with it)."""
    c, budget, remove, n_candidates = problem[2], problem[3], problem[4], problem[1].shape[0]
    costs, winner = problem[8], problem[10]
    gap = np.int64(_LP_EXACT_GAP)
    active = np.empty(c, np.int64)  # (the root's active counts are the caller's: not overwritten)
    base = best_alpha.copy()
    j = np.argmax(base)
    base[j] += budget - base.sum()  # F is non-decreasing: the whole budget
    _problem_needs(problem, base)
    stuck = costs > remove
    if not stuck.any():
        return incumbent
    # Every other label given up to half of base[j] on top: the stuck inputs' cheapest rivals there.
    probe = base.copy()
    for lab in range(c):
        if lab != j:
            probe[lab] = min(budget, base[lab] + base[j] // 2)
    _problem_needs(problem, probe)
    weight = np.zeros(c, np.int64)
    for i in range(costs.shape[0]):
        if stuck[i] and costs[i] <= remove and 0 <= winner[i] != j:
            weight[winner[i]] += 1
    total = weight.sum()
    if total == 0:
        return incumbent
    point = np.empty(c, np.int64)
    low, high = np.int64(0), base[j] // 2
    for _ in range(_REACH_EVALUATIONS // 2):
        if high - low < 3:
            break
        third = (high - low) // 3
        found = np.zeros(2, np.int64)
        for side in range(2):
            t = low + third if side == 0 else high - third
            point[:] = base
            for lab in range(c):
                point[lab] += (t * weight[lab]) // total
            point[j] -= point.sum() - budget
            _, attained, _ = _evaluate(problem, point, incumbent, gap, active)
            found[side] = attained
            if attained > incumbent:
                incumbent = attained
                best_alpha[:] = point
                if incumbent >= n_candidates:
                    return incumbent
        if found[0] < found[1]:
            low = low + third
        else:
            high = high - third
    return incumbent


@numba.njit(cache=True, nogil=True)
def _branch_and_bound(problem, starts, node_limit, time_limit, clock, best_alpha, result):  # pragma: no cover
    """``F* = max over integer alpha >= 0, sum alpha <= A, of F(alpha)`` by best-first branch and bound.

    A box ``[lo, hi]`` is bounded by F at its upper corner capped at ``A - (sum lo - lo_l)`` per coordinate (F is
    non-decreasing in every ``alpha_l``, and every feasible point of the box lies below that corner). Feasible
    points (all of the slack spent, widest coordinates first, or first in proportion to the labels' winning inputs
    where the box's bound is every candidate; the vertices ``A e_l``; ``starts``) give attained values. Boxes are
    split at the midpoint of the coordinate with the most inputs whose cheapest rival is that label, weighted by
    its width. ``node_limit`` (> 0) and ``time_limit`` (seconds, > 0, read from ``clock``) stop the search; the
    open boxes' largest bound is then the upper bound (sound, not exact).

    Writes the best split into ``best_alpha``, (lower, upper, nodes) into ``result``, and leaves the candidates'
    needs under the best split in the problem's costs (for its removals).
    """
    c, budget, n_candidates = problem[2], problem[3], problem[1].shape[0]
    gap, no_gap = np.int64(_LP_EXACT_GAP), np.int64(_NO_SLACK_LIMIT)  # typed as incumbent is: one compiled _evaluate
    active = np.empty(c, np.int64)
    best_alpha[:] = 0
    if budget == 0:
        upper, lower, _ = _evaluate(problem, best_alpha, np.int64(-1), no_gap, active)
        result[0], result[1], result[2] = lower, upper, 0
        _problem_needs(problem, best_alpha)
        return
    buffer = np.zeros(2, np.int64)
    started = _seconds(clock, buffer) if time_limit > 0 else 0.0
    incumbent = -1
    for s in range(starts.shape[0]):
        point = starts[s].copy()
        _, attained, _ = _evaluate(problem, point, incumbent, gap, active)
        if attained > incumbent:
            incumbent = attained
            best_alpha[:] = point
    # Boxes: lo, capped corner, active counts, bound exact?, feasible point probed? (entry numbers in the heap). A
    # box's row is reused once it has left the heap for good, so they take room for the open boxes only.
    capacity = 64
    free = np.empty(capacity, np.int64)
    n_free = 0
    box_lo = np.empty((capacity, c), np.int64)
    box_corner = np.empty((capacity, c), np.int64)
    box_active = np.empty((capacity, c), np.int64)
    box_flags = np.empty((capacity, 2), np.bool_)
    n_boxes = 0
    hi = np.full(c, budget, np.int64)
    upper, _, exact = _evaluate(problem, hi, incumbent, gap, active)
    if upper >= n_candidates > incumbent >= 0:
        incumbent = _reach_every_candidate(problem, best_alpha, incumbent)
    # Heap entries: (-upper bound, -flips found in the box, counter, box). Among equal bounds the box whose feasible
    # point flips most comes first: where every box is bounded by all candidates (the size at which the curve
    # reaches zero) the search is a hunt for a split that flips them all, and that box is the nearest to one.
    heap = [(np.int64(0), np.int64(0), np.int64(0), np.int64(0))]
    heap.pop()
    counter = 0
    if upper > incumbent:
        box_lo[0] = 0
        box_corner[0] = hi
        box_active[0] = active
        box_flags[0, 0] = exact
        box_flags[0, 1] = True
        n_boxes = 1
        heapq.heappush(heap, (np.int64(-upper), np.int64(-incumbent), np.int64(counter), np.int64(0)))
    nodes = 0
    stopped_at = -1
    child_hi = np.empty(c, np.int64)
    child_lo = np.empty(c, np.int64)
    child_corner = np.empty(c, np.int64)
    child_active = np.empty(c, np.int64)
    while len(heap) > 0:
        neg_upper, neg_found, _, box = heapq.heappop(heap)
        if -neg_upper <= incumbent:
            heap.clear()
            break
        if (node_limit > 0 and nodes >= node_limit) or (time_limit > 0 and _seconds(clock, buffer) - started
                                                          > time_limit):
            stopped_at = -neg_upper
            break
        lo, corner = box_lo[box], box_corner[box]
        if not box_flags[box, 1]:
            # The box's feasible point is probed when the box comes up, not when it is made: boxes pruned in the
            # meantime by a better incumbent never cost an evaluation. Where the box's bound is every candidate
            # the slack is shared in proportion to the labels' winning inputs.
            point = _feasible_point(lo, corner, budget, box_active[box], -neg_upper >= n_candidates)
            _, attained, _ = _evaluate(problem, point, incumbent, gap, active)
            if attained > incumbent:
                incumbent = attained
                best_alpha[:] = point
            if -neg_upper > incumbent:
                counter += 1
                box_flags[box, 1] = True
                heapq.heappush(heap, (neg_upper, np.int64(-attained), np.int64(counter), box))
            else:
                free[n_free] = box
                n_free += 1
            continue
        if not box_flags[box, 0]:
            # An LP bound heads the queue: replace it by F itself (exact above the incumbent) before splitting.
            value, _, _ = _evaluate(problem, corner, incumbent, no_gap, active)
            if value > incumbent:
                counter += 1
                box_flags[box, 0] = True
                box_active[box] = active
                heapq.heappush(heap, (np.int64(-value), neg_found, np.int64(counter), box))
            else:
                free[n_free] = box
                n_free += 1
            continue
        nodes += 1
        width = corner - lo
        # The box leaves the heap for good; its row is reused only after its children are made from it.
        if width.max() == 0:
            free[n_free] = box
            n_free += 1
            continue  # a single feasible point whose exact F was recorded when it was created
        score = box_active[box] * width
        j = np.argmax(score) if score.max() > 0 else np.argmax(width)
        middle = (lo[j] + corner[j]) // 2
        for half in range(2):
            if half == 0:
                child_lo[:] = lo
                child_hi[:] = corner
                child_hi[j] = middle
            else:
                child_lo[:] = lo
                child_lo[j] = middle + 1
                child_hi[:] = corner
            if child_lo.sum() > budget:
                continue
            _capped(child_lo, child_hi, budget, child_corner)
            if (child_corner - child_lo).sum() <= budget - child_lo.sum():
                # The corner is feasible: F there is the box's maximum, so its exact value settles the box.
                _, attained, _ = _evaluate(problem, child_corner, incumbent, no_gap, child_active)
                if attained > incumbent:
                    incumbent = attained
                    best_alpha[:] = child_corner
                continue
            value, _, exact_child = _evaluate(problem, child_corner, incumbent, gap, child_active)
            if value > incumbent:
                if n_free > 0:
                    n_free -= 1
                    row = free[n_free]
                else:
                    if n_boxes == capacity:
                        capacity *= 2
                        box_lo = _grown(box_lo, capacity)
                        box_corner = _grown(box_corner, capacity)
                        box_active = _grown(box_active, capacity)
                        box_flags = _grown(box_flags, capacity)
                        free = np.empty(capacity, np.int64)  # empty now: every row is taken
                        lo, corner = box_lo[box], box_corner[box]
                    row = n_boxes
                    n_boxes += 1
                box_lo[row] = child_lo
                box_corner[row] = child_corner
                box_active[row] = child_active
                box_flags[row, 0] = exact_child
                box_flags[row, 1] = False
                counter += 1
                heapq.heappush(heap, (np.int64(-value), neg_found, np.int64(counter), np.int64(row)))
        free[n_free] = box
        n_free += 1
    upper_bound = max(incumbent, stopped_at)
    for entry in heap:
        upper_bound = max(upper_bound, -entry[0])
    result[0] = max(incumbent, 0)
    result[1] = max(upper_bound, 0)
    result[2] = nodes
    _problem_needs(problem, best_alpha)


@numba.njit(inline="always")
def _grown(array, rows):  # pragma: no cover - compiled
    bigger = np.empty((rows, array.shape[1]), array.dtype)
    bigger[: array.shape[0]] = array
    return bigger


def _maximise_flips(problem: _Problem, time_limit: float | None = None, node_limit: int | None = None,
                    starts: Sequence[np.ndarray] = ()) -> _Solution:
    """``F* = max over integer alpha >= 0, sum alpha <= A, of F(alpha)`` (:func:`_branch_and_bound`), exact
    unless a limit stopped it. Afterwards ``problem.costs`` holds the candidates' needs under the best split."""
    c = problem.n_classes
    budget = problem.add_budget
    if len(problem.labels) == 0:
        return _Solution(0, 0, np.zeros(c, np.int64), 0)
    _widen_when_alone()
    # A warm start (the previous poisoning size's best split) is usually near-optimal; without one, the vertices
    # (every addition on one label) are good first guesses.
    points = [np.asarray(start, dtype=np.int64) for start in starts if int(np.sum(start)) <= budget]
    seeds = np.array(points, dtype=np.int64).reshape(-1, c) if points else np.eye(c, dtype=np.int64) * budget
    seeds = seeds if budget else seeds[:0]
    best_alpha, result = np.zeros(c, np.int64), np.zeros(3, np.int64)
    # (a node limit past int64 is no limit)
    _branch_and_bound(problem._arrays, seeds, min(int(node_limit or 0), 2**62), float(time_limit or 0.0), _CLOCK,
                      best_alpha, result)
    return _Solution(int(result[0]), int(result[1]), best_alpha, int(result[2]))


@numba.njit(cache=True, nogil=True)
def _online_needs(state, alpha, budget, out, active, winner):  # pragma: no cover - compiled
    """kNN split needs from the SL/SR profiles (:class:`_OnlineProfiles`): ``h`` per rival label and value of its
    ``alpha_l``, then the minimum over each input's rivals.

    ``h`` is memoised per (label, ``alpha_l``): the branch and bound revisits the same coordinates (box ends,
    midpoints, the budget) far more often than it meets new ones. A label's values are recomputed only when its
    ``alpha_l`` changed, and then only where the nearest memoised values on either side disagree
    (:func:`_online_label_needs`).
    """
    (pairs, slots, tie, d_k, zeros, sl_bits, sl_cum, sr_bits, sr_cum, size, label_start, h, dense, n_inputs,
     input_start, input_pairs, pair_rival, no_shift, held, memo_alpha, memo_entry, memo_count, memo_store,
     memo_start, memo_used) = state
    c = label_start.shape[0] - 1
    unbracketed = h[:0]
    for lab in range(c):
        lo, hi = label_start[lab], label_start[lab + 1]
        value = alpha[lab]
        if lo == hi or held[lab] == value:
            continue
        target = h[lab * n_inputs : (lab + 1) * n_inputs] if dense else h[lo:hi]
        width = target.shape[0]
        count = memo_count[lab]
        known = memo_alpha[lab]
        at = np.searchsorted(known[:count], value)
        if at < count and known[at] == value:
            start = memo_start[memo_entry[lab, at]]
            target[:] = memo_store[start : start + width]
        else:
            below, above = unbracketed, unbracketed
            if 0 < at < count:
                memo_used[2] += 1  # label evaluations between two memoised values (for tests)
                start = memo_start[memo_entry[lab, at - 1]]
                below = memo_store[start : start + width]
                start = memo_start[memo_entry[lab, at]]
                above = memo_store[start : start + width]
            _online_label_needs(pairs[lo:hi], slots[lo:hi], tie[lo:hi], d_k[lo:hi], zeros[lo:hi], sl_bits, sl_cum,
                                sr_bits, sr_cum, size, value, below, above, target)
            _memoise(lab, value, at, target, memo_alpha, memo_entry, memo_count, memo_store, memo_start, memo_used)
        held[lab] = value
    if dense:
        _min_over_labels(h.reshape((c, n_inputs)), no_shift, budget, out, winner, active)
    else:
        _min_over_pairs(input_start, input_pairs, pair_rival, h, budget, out, active, winner)


@numba.njit(inline="always")
def _memoise(lab, value, at, values, memo_alpha, memo_entry, memo_count, memo_store, memo_start,
             memo_used):  # pragma: no cover - compiled
    """Keep ``values`` as label ``lab``'s needs at ``alpha_l = value`` (position ``at`` of its memoised values,
    ascending), while the store and the label's row have room."""
    count = memo_count[lab]
    entry = memo_used[1]
    if (count == memo_alpha.shape[1] or entry == memo_start.shape[0]
            or memo_used[0] + values.shape[0] > memo_store.shape[0]):
        return
    memo_start[entry] = memo_used[0]
    memo_store[memo_used[0] : memo_used[0] + values.shape[0]] = values
    memo_used[0] += values.shape[0]
    memo_used[1] += 1
    for t in range(count, at, -1):
        memo_alpha[lab, t] = memo_alpha[lab, t - 1]
        memo_entry[lab, t] = memo_entry[lab, t - 1]
    memo_alpha[lab, at] = value
    memo_entry[lab, at] = entry
    memo_count[lab] = count + 1


# --------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------


@dataclass
class SplitCertificate:
    """A split-budget joint certificate curve (spec 5d or 5e), with how each value was obtained.

    Attributes
    ----------
    e : ndarray of int
        Poisoning sizes.
    accuracy : ndarray of float
        Proved lower bound of CA(e): with every poisoned training set of poisoning size ``<= e`` (under
        ``threat_model``) at least this fraction of the test set stays correctly classified. Deterministic.
    exact : ndarray of bool
        True where ``accuracy`` equals the certificate's definition (F* found exactly); False where a time/node
        limit or a coarsened kNN table left a (still sound) looser value.
    max_flips : ndarray of int
        The proved upper bound of ``F*`` behind ``accuracy``.
    attack_flips : ndarray of int
        Flips of the best label-level attack found, ``(alpha, r)`` below; ``== max_flips`` where exact.
    additions, removals : ndarray of shape (len(e), n_classes)
        That attack's additions ``alpha_l`` and removals ``r_l`` per label index. It describes the
        over-approximated attacker of the bound, which shows where the model is weakest, not necessarily a
        poisoned set that realises it.
    nodes : ndarray of int
        Branch-and-bound boxes split per value.
    spec_section : str
        ``"5d"`` (rNN) or ``"5e"`` (kNN).
    threat_model : str
    n_test, n_correct : int
    """

    e: np.ndarray
    accuracy: np.ndarray
    exact: np.ndarray
    max_flips: np.ndarray
    attack_flips: np.ndarray
    additions: np.ndarray
    removals: np.ndarray
    nodes: np.ndarray
    spec_section: str
    threat_model: str
    n_test: int
    n_correct: int
    notes: list[str] = field(default_factory=list)


def _check_threat_model(threat_model: str) -> str:
    from .certify import _check_threat_model as check

    return check(threat_model)


def _budgets(threat_model: str, e: int) -> tuple[int, int]:
    """(addition budget, removal budget) of one poisoning size under a threat model."""
    if threat_model == "insertion":
        return e, 0
    if threat_model == "deletion":
        return 0, e
    return e, e


def _allocation(labels: np.ndarray, costs: np.ndarray, budget: int, n_classes: int) -> np.ndarray:
    from .joint import max_flips

    _, allocation = max_flips(labels, costs, budget, n_classes=n_classes, return_allocation=True)
    return allocation


def _assemble(e: np.ndarray, solutions: list[_Solution], removals: list[np.ndarray], n_correct: int, n_test: int,
              n_classes: int, section: str, threat_model: str, coarse: np.ndarray | None = None) -> SplitCertificate:
    upper = np.array([s.upper for s in solutions], dtype=np.int64)
    exact = np.array([s.exact for s in solutions], dtype=bool)
    if coarse is not None:
        exact &= ~coarse
    return SplitCertificate(
        e=e,
        accuracy=(n_correct - upper) / n_test,
        exact=exact,
        max_flips=upper,
        attack_flips=np.array([s.lower for s in solutions], dtype=np.int64),
        additions=np.array([s.alpha for s in solutions], dtype=np.int64).reshape(len(e), n_classes),
        removals=np.array(removals, dtype=np.int64).reshape(len(e), n_classes),
        nodes=np.array([s.nodes for s in solutions], dtype=np.int64),
        spec_section=section,
        threat_model=threat_model,
        n_test=n_test,
        n_correct=n_correct,
    )


def _warm_starts(previous: _Solution | None, previous_budget: int, budget: int) -> list[np.ndarray]:
    """Incumbent seeds from the previous (smaller) poisoning size: its best split as it is (feasible here too, so
    the search starts at least at the previous F*) and rescaled to this budget."""
    if previous is None or previous_budget <= 0 or budget <= 0:
        return []
    scaled = np.floor(previous.alpha * (budget / previous_budget)).astype(np.int64)
    scaled[int(np.argmax(previous.alpha))] += budget - int(scaled.sum())
    return [previous.alpha, np.maximum(scaled, 0)]


def _threadsafe_workers(n_tasks: int) -> int:
    """Worker threads for a curve: one per numba thread when numba's threading layer may be entered from several
    threads at once (tbb, omp; not workqueue), else 1."""
    if n_tasks < 2 or numba.get_num_threads() < 2:
        return 1
    _warm_threading_layer(np.zeros(2))
    try:
        layer = numba.threading_layer()
    except ValueError:  # pragma: no cover - no parallel function has run
        return 1
    return min(numba.get_num_threads(), n_tasks) if layer in ("tbb", "omp") else 1


@numba.njit(parallel=True, cache=True)
def _warm_threading_layer(x):  # pragma: no cover - compiled
    total = 0.0
    for i in prange(x.shape[0]):
        total += x[i]
    return total


#: Per worker thread of :func:`_solve_curve`: ``widen``, called as each poisoning size's search starts, gives the
#: worker every numba thread again once it is the last one left (None otherwise).
_worker = threading.local()


def _widen_when_alone() -> None:
    widen = getattr(_worker, "widen", None)
    if widen is not None:
        widen()


def _solve_curve(e: np.ndarray, n_candidates: int, solve: Any,
                 saturated: list[tuple[int, _Solution, np.ndarray, bool]] | None = None,
                 ) -> dict[int, tuple[_Solution, np.ndarray, bool]]:
    """Run ``solve(size, previous, previous_budget) -> (solution, removals, coarsened, budget)`` for every size.

    Sizes are taken in ascending order, each seeded with the previous size's best split; with several numba
    threads they are dealt round-robin to worker threads (each single-threaded inside numba until it is the last one
    left: the sizes it starts from then on, often the curve's costliest, run on every thread). Once one size
    provably flips every candidate, so does every larger one (F* is non-decreasing in e): those are filled in,
    in the end all from the smallest such size. ``saturated`` (appended to) carries such sizes from one call to
    the next.
    """
    order = np.argsort(e, kind="stable").tolist()
    workers = _threadsafe_workers(len(order))
    results: dict[int, tuple[_Solution, np.ndarray, bool]] = {}
    # (size, solution, removals, coarsened) of sizes that flip every candidate
    saturated = [] if saturated is None else saturated

    threads = numba.get_num_threads()
    finished, lock = [0], threading.Lock()  # workers whose sizes are all done

    def widen() -> None:
        if finished[0] == workers - 1:  # the last worker left: its kernels may use every thread again
            numba.set_num_threads(threads)
            _worker.widen = None

    def run(positions: list[int], single_threaded: bool) -> None:
        if single_threaded:
            numba.set_num_threads(1)
            _worker.widen = widen  # asked as each size's branch and bound starts
        try:
            solve_all(positions)
        finally:
            _worker.widen = None
            with lock:
                finished[0] += 1

    def solve_all(positions: list[int]) -> None:
        previous, previous_budget = None, 0
        for position in positions:
            size = int(e[position])
            done = [item for item in saturated if item[0] <= size]
            if done:
                _, solution, removals, coarsened = min(done, key=lambda item: item[0])
                results[position] = (replace(solution, nodes=0), removals, coarsened)
                continue
            solution, removals, coarsened, budget = solve(size, previous, previous_budget)
            results[position] = (solution, removals, coarsened)
            if solution.exact and solution.lower == n_candidates:
                saturated.append((size, solution, removals, coarsened))
            previous, previous_budget = solution, budget

    if workers == 1:
        run(order, False)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(run, order[w::workers], True) for w in range(workers)]:
                future.result()
    if saturated:
        # Which larger sizes a worker solved itself and which it filled in depends on timing; the smallest
        # saturated size is always solved (nothing smaller could fill it in), so every size above it takes its
        # attacker: the files then record the same split whatever the threads did.
        first, solution, removals, coarsened = min(saturated, key=lambda item: item[0])
        for position in order:
            if int(e[position]) > first:
                results[position] = (replace(solution, nodes=0), removals, coarsened)
    return results


def _check_limits(time_limit: float | None, node_limit: int | None) -> None:
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, int | float)
                                   or not time_limit > 0):
        raise ValueError(f"time_limit must be a positive number of seconds (per poisoning size), got {time_limit!r}")
    if time_limit is not None and not _CLOCK[0]:  # pragma: no cover - platforms without clock_gettime
        raise ValueError("time_limit needs the C library's monotonic clock_gettime, which this platform does not "
                         "offer; use node_limit")
    if node_limit is not None:
        check_positive_int(node_limit, "node_limit")


# --------------------------------------------------------------------------------------------------------------
# rNN: spec 5d
# --------------------------------------------------------------------------------------------------------------


def rnn_split_certificate(
    votes: np.ndarray,
    y: np.ndarray,
    e: np.ndarray | list[int] | int,
    threat_model: str = "general",
    *,
    time_limit: float | None = None,
    node_limit: int | None = None,
) -> SplitCertificate:
    """Split-budget joint certificate of rNN (spec 5d): one attack, its additions and removals split over labels.

    Proved (deterministic): for every poisoned training set within poisoning size ``e`` under ``threat_model``,
    rNN still classifies at least ``result.accuracy`` of the test set correctly. Never below the global certificate
    (spec 5b), hence never below ISLAND, RD or the individual certificate. Valid for **rNN votes only**.

    Parameters
    ----------
    votes : ndarray of shape (n_test, n_classes), integer
        rNN vote counts of the clean classifier.
    y : ndarray of shape (n_test,), integer
        True label indices.
    e : array-like of int
        Poisoning sizes (>= 0), any order.
    threat_model : {"general", "insertion", "deletion", "label-flip"}
        Insertion-only: no removals (``r = 0``); deletion-only: no additions (``alpha = 0``); label-flip: the
        general certificate (flipping ``e`` labels is a poisoning of size ``e``).
    time_limit : float, optional
        Seconds of branch and bound per poisoning size; when reached, the sound bound of the open boxes is
        returned and marked not exact. Default: no limit (exact).
    node_limit : int, optional
        The same, as a number of boxes split per poisoning size.

    Returns
    -------
    SplitCertificate

    Examples
    --------
    Three inputs whose runner-ups are three different labels. At e = 2 the global certificate (spec 5b) lets every
    runner-up gain 2 votes at once and certifies 1 of 3; split, the attacker's 2 additions go to one or two labels
    and only one input can be flipped:

    >>> result = rnn_split_certificate([[4, 1, 0], [0, 4, 1], [1, 0, 4]], [0, 1, 2], [0, 1, 2])
    >>> result.accuracy.round(3).tolist(), result.exact.tolist()
    ([1.0, 1.0, 0.667], [True, True, True])
    """
    threat_model = _check_threat_model(threat_model)
    _check_limits(time_limit, node_limit)
    votes = check_votes(votes)
    y = check_label_indices(y, votes.shape[0], votes.shape[1])
    e = check_poisoning_sizes(e)
    if votes.shape[0] == 0:
        raise ValueError("votes is empty: there are no test inputs")
    n_test, c = votes.shape
    votes = votes.astype(np.int64, copy=False)
    a = predict(votes)
    correct = np.flatnonzero(a == y)
    own = votes[correct, a[correct]]
    classes = np.arange(c)
    margins = own[:, None] - votes[correct] + (a[correct, None] > classes[None, :])
    margins[np.arange(len(correct)), a[correct]] = _MARGIN_OWN
    labels = a[correct]
    smallest = margins.min(axis=1)
    model = "general" if threat_model == "label-flip" else threat_model
    solutions, removals = [], []

    def solve(size: int, previous: _Solution | None, previous_budget: int) -> tuple[_Solution, np.ndarray, bool, int]:
        add, remove = _budgets(model, size)
        # An input that even the whole budget on its cheapest rival cannot flip never counts.
        candidate = smallest <= add + remove
        by_label, lab = np.ascontiguousarray(margins[candidate].T), labels[candidate]
        problem = _Problem(lab, c, add, remove, _RNN, (by_label,))
        solution = _maximise_flips(problem, time_limit, node_limit, _warm_starts(previous, previous_budget, add))
        # the best split's costs, for its removal allocation
        return solution, _allocation(lab, problem.costs, remove, c), False, add

    by_position = _solve_curve(e, len(correct), solve)
    for position in range(len(e)):
        solutions.append(by_position[position][0])
        removals.append(by_position[position][1])
    return _assemble(e, solutions, removals, len(correct), n_test, c, "5d", threat_model)


def rnn_split_certified_accuracy(votes: np.ndarray, y: np.ndarray, e: np.ndarray | list[int] | int,
                                 threat_model: str = "general", **limits: Any) -> np.ndarray:
    """:func:`rnn_split_certificate` ``.accuracy`` (spec 5d): one lower bound of CA(e) per entry of ``e``."""
    return rnn_split_certificate(votes, y, e, threat_model, **limits).accuracy


# --------------------------------------------------------------------------------------------------------------
# kNN: spec 5e
# --------------------------------------------------------------------------------------------------------------

#: Pairs whose need tables are computed at once (bounds the scratch memory of the table builder).
_PAIR_BLOCK = 2048
#: Use the e-independent SL/SR profiles for the general certificate at e <= k (tests switch it off to check the
#: per-e tables against them).
_USE_PROFILES = True
#: Memory for memoised per-label need vectors of one poisoning size.
_MEMO_BYTES = 64 * 2**20
#: Memoised values of alpha_l per label and poisoning size, at most.
_MEMO_PER_LABEL = 512
#: The kNN split problem holds its needs as a labels x inputs matrix while that has at most this many entries per
#: (input, rival) pair; else one value per pair (many labels with few rivals each: 1.5-2x faster there).
_DENSE_PADDING = 8


def _check_knn_table(neighbor_labels: np.ndarray, y: np.ndarray, e: np.ndarray, k: int, n_classes: int | None,
                     n_train: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int]:
    labels = np.asarray(neighbor_labels)
    if labels.ndim != 2 or labels.shape[1] == 0:
        raise ValueError(f"neighbor_labels must be 2-D (n_test, K) with K >= 1, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"neighbor_labels must hold integer label indices, got dtype {labels.dtype}")
    if labels.shape[0] == 0:
        raise ValueError("neighbor_labels is empty: there are no test inputs")
    k = check_positive_int(k, "k")
    e = check_poisoning_sizes(e)
    lowest, highest = int(labels.min()), int(labels.max())  # one pass each over a table of up to 10^8 entries
    if lowest < 0:
        raise ValueError(f"neighbor_labels holds label index {lowest}; label indices start at 0")
    y_array = np.asarray(y)
    if n_classes is None:
        top = highest
        if y_array.size and y_array.dtype.kind in "iu":
            top = max(top, int(y_array.max()))
        n_classes = max(2, top + 1)
    n_classes = check_positive_int(n_classes, "n_classes", minimum=2)
    if highest >= n_classes:
        raise ValueError(f"neighbor_labels holds label index {highest}, outside 0..{n_classes - 1}")
    y = check_label_indices(y, labels.shape[0], n_classes)
    width = labels.shape[1]
    needed = k + (int(e.max()) if e.size else 0)
    if n_train is None:
        if width < needed:
            raise ValueError(
                f"neighbor_labels has {width} columns, but spec 5e at k={k}, e={needed - k} reads each input's "
                f"first k + e = {needed} neighbours; give {needed} columns, or pass n_train={width} if the training "
                f"set has only {width} examples"
            )
        # The training set may be larger than the table: never treat the table's end as the training set's end
        # (that would stop removals from pulling in later, possibly rival, neighbours). Every call checks that the
        # table reaches k + e, so no position past it is read, and clipping at `width` never happens inside it.
        n_train = width
    else:
        n_train = check_positive_int(n_train, "n_train")
        if width > n_train:
            raise ValueError(f"neighbor_labels has {width} columns but n_train is {n_train}")
        if width < min(needed, n_train):
            raise ValueError(
                f"neighbor_labels has {width} columns, but spec 5e at k={k}, e={needed - k} reads the first "
                f"min(k + e, n_train) = {min(needed, n_train)} neighbours of each input"
            )
    return labels, y, e, k, n_classes, n_train


def _knn_tables(table: np.ndarray, inputs: np.ndarray, pred: np.ndarray, votes: np.ndarray, wanted: np.ndarray,
                k: int, n_train: int, spans: tuple[int, int, int, int], step: int, max_bytes: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """Windowed need tables of the wanted pairs: (rival, first, zero, offset, values), grid ``alpha = j * step``.

    ``wanted[i, l]`` selects the pairs of input ``inputs[i]``; pairs come out grouped by input, rivals ascending.
    ``spans`` = (N, E, removals, additions) of the threat model. None when the values would exceed ``max_bytes``.
    """
    big_n, span_e, removals, add = spans
    n_grid = -(-add // step) + 1
    value_dtype = np.int16 if removals + 1 <= np.iinfo(np.int16).max else np.int32
    block_inputs = max(1, _PAIR_BLOCK // max(1, votes.shape[1] - 1))
    rivals, firsts, zeros, pieces = [], [], [], []
    total = 0
    for start in range(0, len(inputs), block_inputs):
        stop = min(start + block_inputs, len(inputs))
        block_wanted = wanted[start:stop]
        pair_row = np.full(block_wanted.shape, -1, dtype=np.int64)
        pair_row[block_wanted] = np.arange(int(block_wanted.sum()))
        n_pairs = int(block_wanted.sum())
        out = np.empty((n_pairs, n_grid), dtype=np.int32)
        first = np.empty(n_pairs, np.int64)
        zero = np.empty(n_pairs, np.int64)
        _knn_pair_needs(table, inputs[start:stop], pred[start:stop], votes[start:stop], pair_row, k, n_train,
                        big_n, span_e, removals, add, step, out, first, zero)
        lengths = zero - first
        offset = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64) if n_pairs else np.zeros(0, np.int64)
        piece = np.empty(int(lengths.sum()), dtype=value_dtype)
        _pack_windows(out, first, zero, offset, piece)
        total += piece.nbytes
        if total > max_bytes:
            return None
        rivals.append(np.nonzero(block_wanted)[1])
        firsts.append(first)
        zeros.append(zero)
        pieces.append(piece)
    rival = np.concatenate(rivals).astype(np.int64) if rivals else np.zeros(0, np.int64)
    first = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
    zero = np.concatenate(zeros) if zeros else np.zeros(0, np.int64)
    lengths = zero - first
    offset = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64) if len(lengths) else np.zeros(0, np.int64)
    values = np.concatenate(pieces) if pieces else np.zeros(0, value_dtype)
    return rival, first, zero, offset, values


def _flippable_pairs(votes: np.ndarray, a: np.ndarray, alive: np.ndarray, own: np.ndarray, classes: np.ndarray,
                     reach: int) -> np.ndarray:
    """``wanted[i, l]``: rival ``l`` of input ``alive[i]`` passes the necessary test ``D(k) + reach >= [a > l]``.

    ``D(k) = s_l - s_a`` and every term of condition (*) exceeds ``D(k)`` by at most ``reach`` (D moves by one
    per position, and ``N' + rho`` adds at most the budgets), so a pair failing it is infinite everywhere.
    """
    return (a[alive, None] != classes[None, :]) & (
        votes[alive] - own[alive, None] + reach >= (a[alive, None] > classes[None, :]))


def _table_problem(table: np.ndarray, votes: np.ndarray, a: np.ndarray, correct: np.ndarray, margin: np.ndarray,
                   own: np.ndarray, classes: np.ndarray, k: int, n_train: int, variant: int, size: int,
                   max_memory_mb: float) -> tuple[_Problem, int]:
    """The F* problem of one poisoning size from per-pair need tables (any threat model, any ``e``)."""
    c = len(classes)
    add, remove = _budgets(("general", "insertion", "deletion")[variant], size)
    big_n = min(k, size) if variant != 2 else 0
    reach = {0: big_n + 2 * size, 1: 2 * big_n, 2: 2 * size}[variant]
    # An input certified individually at e is unflippable in 5c, hence in 5e (dominance, docs/split_joint_proof.md).
    alive = correct[margin[correct] <= 2 * size] if variant == 0 else correct
    wanted = _flippable_pairs(votes, a, alive, own, classes, reach)
    keep_inputs = wanted.any(axis=1)
    alive, wanted = alive[keep_inputs], wanted[keep_inputs]
    spans = {0: (big_n, size, size, size), 1: (big_n, 0, 0, size), 2: (0, size, size, 0)}[variant]
    args = (table, alive, a[alive], votes[alive].astype(np.int64), wanted, k, n_train, spans)
    step = 1
    while True:
        packed = _knn_tables(*args, step, max_memory_mb * 2**20)
        if packed is not None or step >= max(add, 1):
            break
        step *= 2
    if packed is None:  # even one grid point per pair is too large: certify with the coarsest grid anyway
        packed = _knn_tables(*args, step, math.inf)
    rivals, first, zero, offset, values = packed
    rows = np.repeat(alive, wanted.sum(axis=1))
    # Drop pairs that no addition split makes affordable, then inputs with no pair left.
    live = first < -(-add // step) + 1
    rows, rivals, first, zero, offset = rows[live], rivals[live], first[live], zero[live], offset[live]
    inputs, pair_start = np.unique(rows, return_index=True)
    pair_start = np.r_[pair_start, len(rows)].astype(np.int64)
    return _Problem(a[inputs], c, add, remove, _TABLE, (pair_start, rivals, first, zero, offset, values, step)), step


@dataclass
class _OnlineProfiles:
    """SL/SR bitsets of the pairs that can matter at the largest ``e <= k``, with rank tables."""

    rows: np.ndarray
    rival: np.ndarray
    tie: np.ndarray
    d_k: np.ndarray
    margin: np.ndarray  # of the pair's input
    sl_bits: np.ndarray
    sl_cum: np.ndarray
    sr_bits: np.ndarray
    sr_cum: np.ndarray

    @classmethod
    def build(cls, table: np.ndarray, votes: np.ndarray, a: np.ndarray, correct: np.ndarray, margin: np.ndarray,
              own: np.ndarray, k: int, n_train: int, sizes: np.ndarray) -> _OnlineProfiles | None:
        largest = int(sizes.max()) if sizes.size else 0
        if largest == 0:
            return None
        classes = np.arange(votes.shape[1])
        alive = correct[margin[correct] <= 2 * largest]
        wanted = _flippable_pairs(votes, a, alive, own, classes, 3 * largest)
        keep = wanted.any(axis=1)
        alive, wanted = alive[keep], wanted[keep]
        # Pairs numbered label-major (all pairs of rival 0, then 1, ...): one rival's pairs are then a contiguous
        # block of the bitsets, read sequentially by _online_label_needs.
        pair_row = np.full(wanted.shape, -1, dtype=np.int64)
        pair_row.T[wanted.T] = np.arange(int(wanted.sum()))
        n_words = -(-largest // 64)
        n_pairs = int(wanted.sum())
        sl_bits = np.zeros((n_pairs, n_words), np.uint64)
        # SR is stored word-major (a transposed view: still indexed [pair, word]): a need evaluation reads SR at one
        # word for all of a rival's pairs (y = e - alpha_l is theirs alike), so those reads are contiguous. SL is
        # searched per pair (its zero to select depends on the pair), so it stays pair-major. MNIST: the need
        # evaluations 25 % faster.
        sr_bits = np.zeros((n_words, n_pairs), np.uint64).T
        if n_pairs:
            _knn_profiles(table, alive, a[alive], votes[alive].astype(np.int64), pair_row, k, n_train, largest,
                          sl_bits, sr_bits)
        # Counts of set bits before each word: at most 64 * n_words, so uint16 holds them up to e = 65,535.
        cum_dtype = np.uint16 if 64 * n_words <= np.iinfo(np.uint16).max else np.int64
        sl_cum = np.empty((n_pairs, n_words + 1), cum_dtype)
        sr_cum = np.empty((n_words + 1, n_pairs), cum_dtype).T
        cumulative_popcounts(sl_bits, sl_cum)
        cumulative_popcounts(sr_bits, sr_cum)
        rival, position = np.nonzero(wanted.T)
        rows = alive[position]
        rival = rival.astype(np.int64)
        return cls(rows=rows, rival=rival, tie=(a[rows] > rival).astype(np.int64),
                   d_k=(votes[rows, rival] - own[rows]).astype(np.int64), margin=margin[rows],
                   sl_bits=sl_bits, sl_cum=sl_cum, sr_bits=sr_bits, sr_cum=sr_cum)

    def problem(self, size: int, a: np.ndarray, c: int) -> _Problem:
        """The F* problem at poisoning size ``size <= k``, general threat model.

        ``h`` is computed per rival label and value of ``alpha_l`` and memoised: the branch and bound revisits the
        same coordinates (box ends, midpoints, the budget) far more often than it meets new ones.
        """
        candidate = (self.margin <= 2 * size) & (self.d_k + 3 * size >= self.tie)
        pairs = np.flatnonzero(candidate)
        bound, zeros = np.empty(len(pairs), np.int64), np.empty(len(pairs), np.int64)
        _online_bounds(pairs, self.tie, self.d_k, self.sl_bits, self.sl_cum, self.sr_bits, self.sr_cum, size, bound,
                       zeros)
        kept = bound <= size  # h(alpha) >= h(e): infinite everywhere otherwise
        pairs, zeros, bound = pairs[kept], zeros[kept], bound[kept]  # (already label-major)
        pair_rival = self.rival[pairs]
        label_start = np.searchsorted(pair_rival, np.arange(c + 1))
        inputs, input_of_pair = np.unique(self.rows[pairs], return_inverse=True)
        n_inputs = len(inputs)
        # Dense: h[l, i] is input i's need against rival l (e + 1 where it has no such pair), and the minimum runs
        # label by label in vector steps. Where few inputs have a pair per label (many labels, few rivals each),
        # that matrix is mostly padding: h is then one value per pair, each label a block of it, and the minimum
        # runs over each input's pairs. Either way a label's values are replaced only when its alpha_l changed.
        dense = _DENSE_PADDING * len(pairs) >= c * n_inputs
        if dense:
            h = np.full((c, n_inputs), size + 1, np.int32)
            slots = input_of_pair.astype(np.int64)
            input_start = input_pairs = _NONE
        else:
            h = np.empty(len(pairs), np.int32)
            slots = np.arange(len(pairs), dtype=np.int64) - np.repeat(label_start[:-1], np.diff(label_start))
            input_pairs = np.argsort(input_of_pair, kind="stable").astype(np.int64)
            input_start = np.searchsorted(input_of_pair[input_pairs], np.arange(n_inputs + 1)).astype(np.int64)
        # The memo (:func:`_online_needs`): per label its memoised alpha_l ascending and their entries, whose values
        # lie in one store of _MEMO_BYTES (pages are touched only as it fills). Each label with pairs starts with h
        # at alpha_l = size, the bound computed above: later alpha_l have a memoised value above them.
        row = min(size + 2, _MEMO_PER_LABEL)
        memo_alpha, memo_entry = np.empty((c, row), np.int64), np.empty((c, row), np.int64)
        memo_count, memo_start = np.zeros(c, np.int64), np.empty(c * row, np.int64)
        memo_store = np.empty(max(_MEMO_BYTES // 4, h.size), np.int32)
        used = entries = 0
        for lab in range(c):
            lo, hi = int(label_start[lab]), int(label_start[lab + 1])
            if lo < hi:
                top = np.full(n_inputs, size + 1, np.int32) if dense else np.empty(hi - lo, np.int32)
                top[slots[lo:hi]] = bound[lo:hi]
                memo_store[used : used + len(top)] = top
                memo_start[entries], memo_alpha[lab, 0], memo_entry[lab, 0], memo_count[lab] = used, size, entries, 1
                used, entries = used + len(top), entries + 1
        state = (pairs.astype(np.int64), slots, self.tie[pairs], self.d_k[pairs], zeros, self.sl_bits, self.sl_cum,
                 self.sr_bits, self.sr_cum, size, label_start.astype(np.int64), h.reshape(-1), dense, n_inputs,
                 input_start, input_pairs, pair_rival, np.zeros(c, np.int32), np.full(c, -1, np.int64), memo_alpha,
                 memo_entry, memo_count, memo_store, memo_start, np.array([used, entries, 0], np.int64))
        return _Problem(a[inputs], c, size, size, _ONLINE, state)


class KnnSplitCertifier:
    """The kNN split certificate (spec 5e) of one neighbour table, computed for any poisoning sizes on demand.

    Holds the votes, predictions and (for the general model) the e-independent SL/SR profiles, so that several
    calls (a grid, then a few more points) share that work. Parameters as in :func:`knn_split_certificate`;
    ``max_e`` is the largest poisoning size the profiles are first built for (they grow when needed).
    """

    def __init__(self, neighbor_labels: np.ndarray, y: np.ndarray, k: int, n_classes: int | None = None,
                 n_train: int | None = None, threat_model: str = "general", *, max_memory_mb: float = 1024,
                 max_e: int | None = None, _votes: np.ndarray | None = None) -> None:
        self.threat_model = _check_threat_model(threat_model)
        if isinstance(max_memory_mb, bool) or not isinstance(max_memory_mb, int | float) or not max_memory_mb > 0:
            raise ValueError(f"max_memory_mb must be a positive number, got {max_memory_mb!r}")
        self.max_memory_mb = float(max_memory_mb)
        hint = [] if max_e is None else [check_positive_int(max_e, "max_e", minimum=0)]
        self.table, self.y, _, self.k, self.c, self.n_train = _check_knn_table(neighbor_labels, y, hint, k,
                                                                              n_classes, n_train)
        self._n_train_given = n_train
        n_test = self.table.shape[0]
        window = min(self.k, self.n_train, self.table.shape[1])
        if _votes is not None and _votes.shape == (n_test, self.c) and window == min(self.k, self.table.shape[1]):
            # A CertificationResult's counts of this table's first min(k, K) columns, made by the package from this
            # very table (results.py passes them only then): not counted again. No caller outside passes them.
            self.votes = _votes
        else:
            self.votes = knn_votes_from_labels(self.table[:, :window], window, self.c)
        self.a = predict(self.votes)
        self.correct = np.flatnonzero(self.a == self.y)
        self.model = "general" if self.threat_model == "label-flip" else self.threat_model
        self.variant = {"general": 0, "insertion": 1, "deletion": 2}[self.model]
        self.own = self.votes[np.arange(n_test), self.a]
        # Individual margin: an input certified individually at e is unflippable in 5c, hence in 5e (dominance).
        self.margin = self.own - rival_counts(self.votes, self.a) + 1
        self._profiles: _OnlineProfiles | None = None
        self._profile_reach = 0
        # Sizes known to flip every correct input (with their attackers), from earlier calls as well.
        self._saturated: list[tuple[int, _Solution, np.ndarray, bool]] = []
        # Below about half the largest individual margin some input stays certified: the curve is not zero there.
        self._largest_individual = int((self.margin[self.correct].max() - 1) // 2) if self.correct.size else 0
        self._max_e_hint = hint[0] if hint else 0

    def _online(self, largest: int) -> _OnlineProfiles | None:
        if self.variant != 0 or not _USE_PROFILES:
            return None
        # SR reads positions k .. k + reach - 1: a table narrower than the training set caps the reach at its
        # width (the table was checked to reach k + e for every e asked for).
        cap = self.k if self.table.shape[1] >= self.n_train else max(0, min(self.k, self.table.shape[1] - self.k))
        reach = min(cap, max(largest, self._max_e_hint))
        if self._profiles is None or reach > self._profile_reach:
            reach = min(cap, max(reach, 2 * self._profile_reach))  # grow geometrically: few rebuilds
            # The general certificate at every e <= k reads two e-independent profiles per pair (_knn_profiles).
            self._profiles = _OnlineProfiles.build(self.table, self.votes, self.a, self.correct, self.margin,
                                                   self.own, self.k, self.n_train, np.array([reach]))
            self._profile_reach = reach
        return self._profiles

    def certify(self, e: np.ndarray | list[int] | int, *, time_limit: float | None = None,
                node_limit: int | None = None) -> SplitCertificate:
        """The certificate at every poisoning size in ``e`` (any order)."""
        _check_limits(time_limit, node_limit)
        e = check_poisoning_sizes(e)
        # The table must reach k + e (or hold the whole training set) for the largest e asked for, and still hold
        # label indices only: the compiled kernels read it without bounds checks, and it is the caller's array.
        _check_knn_table(self.table, self.y, e, self.k, self.c, self._n_train_given)
        c, n_test = self.c, self.table.shape[0]
        solutions, removals, coarse = [], [], np.zeros(len(e), dtype=bool)
        classes = np.arange(c)
        online: _OnlineProfiles | None = None  # the current stage's profiles, read by solve() when it runs

        def solve(size: int, previous: _Solution | None, previous_budget: int
                  ) -> tuple[_Solution, np.ndarray, bool, int]:
            add, remove = _budgets(self.model, size)
            if online is not None and size <= self.k:
                problem, step = online.problem(size, self.a, c), 1
            else:
                problem, step = _table_problem(self.table, self.votes, self.a, self.correct, self.margin, self.own,
                                               classes, self.k, self.n_train, self.variant, size, self.max_memory_mb)
            solution = _maximise_flips(problem, time_limit, node_limit, _warm_starts(previous, previous_budget, add))
            return solution, _allocation(problem.labels, problem.costs, remove, c), step > 1, add

        # The profiles cost time in proportion to their reach. Every size up to the largest individually certified
        # one leaves an input certified (dominance), so the curve reaches zero above it, usually soon after: the
        # sizes up to a little past it go first, on profiles that reach only that far, and the larger sizes need
        # profiles of their own only if the curve has not reached zero by then (they are filled in otherwise).
        first = int(math.ceil(1.25 * (self._largest_individual + 1)))
        later = e > first
        stages = [np.arange(len(e))]
        if self.variant == 0 and np.any(later & (e <= self.k)):
            stages = [np.flatnonzero(~later), np.flatnonzero(later)]
        by_position: dict[int, tuple[_Solution, np.ndarray, bool]] = {}
        # Only exact saturated sizes outlive a call: one found on a coarsened table would mark later sizes not
        # exact that an earlier call had settled exactly (within a call, it fills as it always did).
        self._saturated[:] = [item for item in self._saturated if not item[3]]
        for positions in stages:
            stage = e[positions]
            wanted = stage[(stage > 0) & (stage <= self.k)]
            if self._saturated:
                wanted = wanted[wanted < min(item[0] for item in self._saturated)]
            online = self._online(int(wanted.max())) if wanted.size else None
            solved = _solve_curve(stage, len(self.correct), solve, self._saturated)
            by_position.update({int(positions[j]): solved[j] for j in range(len(positions))})
        for position in range(len(e)):
            solution, allocation, coarsened = by_position[position]
            solutions.append(solution)
            removals.append(allocation)
            coarse[position] = coarsened
        result = _assemble(e, solutions, removals, len(self.correct), n_test, c, "5e", self.threat_model, coarse)
        if coarse.any():
            result.notes.append(f"need tables coarsened to fit max_memory_mb={self.max_memory_mb} at e="
                                f"{e[coarse].tolist()}: those values are sound but not exact")
        return result


def knn_split_certificate(
    neighbor_labels: np.ndarray,
    y: np.ndarray,
    e: np.ndarray | list[int] | int,
    k: int,
    n_classes: int | None = None,
    n_train: int | None = None,
    threat_model: str = "general",
    *,
    time_limit: float | None = None,
    node_limit: int | None = None,
    max_memory_mb: float = 1024,
) -> SplitCertificate:
    """Split-budget joint certificate of kNN with the real pulled-in labels (spec 5e).

    Proved (deterministic): for every poisoned training set within poisoning size ``e`` under ``threat_model``,
    kNN still classifies at least ``result.accuracy`` of the test set correctly. Never below the global kNN
    certificate (spec 5c) nor the individual one. Proof and edge cases: ``docs/split_joint_proof.md``.

    Parameters
    ----------
    neighbor_labels : ndarray of shape (n_test, K), integer
        Label index of each test input's clean training examples in the order of spec section 3. The certificate
        at ``e`` reads the first ``k + e`` of them (removals pull later examples into the window), so ``K`` must be
        at least ``min(k + max(e), n_train)``.
    y : ndarray of shape (n_test,), integer
        True label indices.
    e : array-like of int
        Poisoning sizes (>= 0), any order.
    k : int
    n_classes : int, optional
        Defaults to the largest label index in the table or ``y``, plus one.
    n_train : int, optional
        Size of the clean training set. Required when the table is narrower than ``k + max(e)``, which is only
        right when it holds the whole training set (``K == n_train``).
    threat_model : {"general", "insertion", "deletion", "label-flip"}
        Insertion-only: ``r = rho = 0``; deletion-only: ``alpha = N' = 0``; label-flip: the general certificate.
    time_limit, node_limit : optional
        Per poisoning size, as in :func:`rnn_split_certificate`.
    max_memory_mb : float
        Budget for the per-pair need tables of one poisoning size (insertion-only, deletion-only, and e > k). A
        table that would not fit is kept on a coarser addition grid (rounding ``alpha`` up, which is sound) and
        its values are marked not exact.

    Returns
    -------
    SplitCertificate
    """
    e = check_poisoning_sizes(e)
    certifier = KnnSplitCertifier(neighbor_labels, y, k, n_classes, n_train, threat_model,
                                  max_memory_mb=max_memory_mb)
    return certifier.certify(e, time_limit=time_limit, node_limit=node_limit)


def knn_split_certified_accuracy(
    neighbor_labels: np.ndarray,
    y: np.ndarray,
    e: np.ndarray | list[int] | int,
    k: int,
    n_classes: int | None = None,
    n_train: int | None = None,
    threat_model: str = "general",
    **limits: Any,
) -> np.ndarray:
    """:func:`knn_split_certificate` ``.accuracy`` (spec 5e): one lower bound of CA(e) per entry of ``e``.

    Examples
    --------
    Two inputs of different labels, k = 4, each with neighbours (own, own, own, 2, ...): at e = 1 a single
    addition can help only one rival label, and a removal pulls in a known neighbour.

    >>> table = [[0, 0, 0, 2, 0, 0], [1, 1, 1, 2, 1, 1]]
    >>> knn_split_certified_accuracy(table, [0, 1], [0, 1, 2], k=4, n_classes=3)
    array([1. , 0.5, 0. ])
    """
    return knn_split_certificate(neighbor_labels, y, e, k, n_classes, n_train, threat_model, **limits).accuracy
