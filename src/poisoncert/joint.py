"""Global joint certificates (spec 5b for rNN, 5c for kNN): one removal budget shared by every test input.

Both certificates bound the attacker at the level of labels. Within poisoning size ``e`` (general threat model)
it removes ``r_l`` clean examples of label ``l`` (``sum_l r_l <= e``) and adds at most ``e`` examples. Each
certificate derives, for every correctly classified test input ``i`` with prediction ``a_i``, a cost
``c_i(e)``: the input can only be flipped when ``r_{a_i} >= c_i(e)`` (``UNFLIPPABLE`` when no ``r <= e``
suffices). One attack therefore flips at most

    F(e) = max over (r_l) with sum_l r_l <= e  of  sum_l #{i correct : a_i = l, c_i(e) <= r_l}

test inputs, and ``CA(e) >= (#correct - F(e)) / |T|`` holds for every poisoned training set within the budget.
:func:`max_flips` computes ``F(e)`` exactly (a multiple-choice knapsack over labels).

Removals are the only resource the inputs compete for: added examples are not shared out, every input is
assumed to receive all ``e`` of them. That is what makes the bound sound for a single attack, and it is why
it dominates every grouping of Theorem 4 (spec 5b) and the individual certificates.
"""

from __future__ import annotations

import numba
import numpy as np

from ._validation import check_label_indices, check_poisoning_sizes, check_positive_int, check_votes
from .votes import knn_votes_from_labels, margin_terms, predict, rival_counts

__all__ = [
    "UNFLIPPABLE",
    "max_flips",
    "global_rnn_costs",
    "global_rnn_certified_accuracy",
    "global_attack_allocation",
    "knn_joint_costs",
    "knn_joint_certified_accuracy",
]

#: Cost of an input that no attack within the budget can flip (an int64 sentinel, larger than every budget).
UNFLIPPABLE = np.iinfo(np.int64).max


@numba.njit(cache=True, nogil=True)
def _knapsack(costs, starts, budget, tables):  # pragma: no cover - compiled; tested through max_flips
    """Exact ``max sum_l g_l(r_l)`` over ``sum_l r_l <= budget``; ``tables[s]`` = ``best`` after segment ``s``.

    ``costs[starts[s]:starts[s + 1]]`` holds the costs of segment (label) ``s``, sorted ascending, each in
    ``1..budget``; choosing ``r = costs[j]`` gains ``j - starts[s] + 1`` flips. ``g_l`` is a nondecreasing
    step function, so an optimal ``r_l`` is 0 or one of the costs, and only the last index of each run of
    equal costs is worth choosing. Dynamic programme over segments, ``best[b]`` = most flips with at most ``b``
    removals (nondecreasing in ``b``). Segments must come in ascending order of their largest cost (keeps
    ``reach`` small for as long as possible). The choices are not recorded here: :func:`_choice` recovers the one
    a backtrack needs from the tables, so the inner loop is a plain maximum that vectorises.
    """
    n_segments = len(starts) - 1
    best = np.zeros(budget + 1, dtype=np.int64)
    # best[b] == best[reach] for every b >= reach: no combination of the segments seen so far costs more.
    reach = 0
    for s in range(n_segments):
        start, stop = starts[s], starts[s + 1]
        new_reach = min(budget, reach + costs[stop - 1])
        last = s == n_segments - 1
        new = tables[s]
        new[:] = best
        for j in range(start, stop):
            if j + 1 < stop and costs[j + 1] == costs[j]:
                continue
            cost = costs[j]
            gain = j - start + 1
            if last:
                # Only best[budget] is read after the last segment: one candidate per cost.
                new[budget] = max(new[budget], best[budget - cost] + gain)
                continue
            _raise_shifted(new[cost : new_reach + 1], best[: new_reach + 1 - cost], gain)
        if not last:
            new[new_reach + 1 :] = new[new_reach]
        best = new
        reach = new_reach
    return best[budget]


@numba.njit(inline="always")
def _raise_shifted(target, source, gain):  # pragma: no cover - compiled
    """``target[b] = max(target[b], source[b] + gain)``: distinct arrays, so it vectorises.

    Written as ``t + max(d, 0)`` with the sign mask of ``d``, not as ``max``: LLVM turns the ``max`` into a store
    only where the value grows, vectorised as masked stores, which on AMD's Zen cores cost several times a plain
    store (this loop: 2-2.6x faster so on Zen 3). Integer values within about 2^61 in magnitude: no overflow.
    """
    for b in range(target.shape[0]):
        current = target[b]
        d = source[b] + gain - current
        target[b] = current + (d & ~(d >> 63))


@numba.njit(cache=True, nogil=True)
def _choice(costs, starts, tables, s, b):  # pragma: no cover - compiled; tested through max_flips
    """The removals of segment ``s`` in the optimum of :func:`_knapsack` at budget ``b`` given the earlier segments:
    0 unless a cost improves on ``best[b]`` before the segment, else the smallest cost (the last index of its run)
    that attains the maximum, as a first-strictly-better scan over the costs in ascending order would pick it.
    For the last segment only ``b = budget`` is valid (its table holds nothing else): :func:`_solve` asks there
    because it reaches the knapsack only when the segments' costs together exceed the budget."""
    after = tables[s, b]
    before = tables[s - 1, b] if s > 0 else 0
    if after == before:
        return 0
    start, stop = starts[s], starts[s + 1]
    for j in range(start, stop):
        if j + 1 < stop and costs[j + 1] == costs[j]:
            continue
        cost = costs[j]
        if cost > b:
            break
        previous = tables[s - 1, b - cost] if s > 0 else 0
        if previous + j - start + 1 == after:
            return cost
    return 0  # pragma: no cover - unreachable: the maximum is attained by some cost


def _solve(labels: np.ndarray, costs: np.ndarray, budget: int, n_classes: int) -> tuple[int, np.ndarray]:
    """F(budget) and one optimal allocation ``r`` (length ``n_classes``); inputs already validated."""
    allocation = np.zeros(n_classes, dtype=np.int64)
    affordable = costs <= budget
    labels, costs = labels[affordable], costs[affordable]
    free = costs == 0  # c_i(e) = 0: flipped by the added examples alone, whatever the removals
    flips = int(np.count_nonzero(free))
    labels, costs = labels[~free], costs[~free].astype(np.int64)
    if len(costs) == 0:
        return flips, allocation
    order = np.lexsort((costs, labels))
    labels, costs = labels[order], costs[order]
    starts = np.r_[0, np.flatnonzero(np.diff(labels)) + 1]
    stops = np.r_[starts[1:], len(labels)]
    segment_labels = labels[starts]
    top = costs[stops - 1]
    if int(top.sum()) <= budget:
        # Every flippable input of every label fits into the budget at once.
        allocation[segment_labels] = top
        return flips + len(costs), allocation
    # Reorder the segments by their largest cost (cheap labels first, see _knapsack).
    seg_order = np.argsort(top, kind="stable")
    lengths = (stops - starts)[seg_order]
    pieces = [costs[starts[s] : stops[s]] for s in seg_order.tolist()]
    seg_costs = np.concatenate(pieces)
    seg_starts = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    tables = np.empty((len(seg_order), budget + 1), dtype=np.int64)
    value = int(_knapsack(seg_costs, seg_starts, int(budget), tables))
    # Backtrack: segment s's choice at the remaining budget, capped by the reach after segment s.
    reach = np.minimum(np.cumsum(top[seg_order]), budget)
    remaining = int(budget)
    for s in range(len(seg_order) - 1, -1, -1):
        spent = int(_choice(seg_costs, seg_starts, tables, s, min(remaining, int(reach[s]))))
        allocation[segment_labels[seg_order[s]]] = spent
        remaining -= spent
    return flips + value, allocation


def _check_solver_inputs(labels, costs, budget, n_classes) -> tuple[np.ndarray, np.ndarray, int, int]:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if labels.size and labels.dtype.kind not in "iu":
        raise TypeError(f"labels must hold integer label indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and labels.min() < 0:
        raise ValueError(f"labels must be label indices >= 0, found {labels.min()}")
    costs = np.asarray(costs)
    if costs.dtype == object:
        # None marks an input that cannot be flipped; a user convenience, not a hot path.
        costs = np.array([np.inf if c is None else c for c in costs.tolist()], dtype=np.float64)
    if costs.shape != labels.shape:
        raise ValueError(f"costs has shape {costs.shape} but labels has shape {labels.shape}")
    if costs.size and costs.dtype.kind == "f":
        if np.any(np.isnan(costs)):
            raise ValueError("costs contains NaN; use +inf (or None) for an input that cannot be flipped")
        finite = np.isfinite(costs)
        if np.any(costs[finite] != np.round(costs[finite])) or np.any(costs == -np.inf):
            raise ValueError("costs must be whole numbers of removals or +inf")
        costs = np.where(finite, costs, 0).astype(np.int64)
        costs[~finite] = UNFLIPPABLE
    elif costs.size and costs.dtype.kind not in "iu":
        raise TypeError(f"costs must be integers (or float with +inf), got dtype {costs.dtype}")
    costs = costs.astype(np.int64, copy=False)
    if costs.size and costs.min() < 0:
        raise ValueError(f"costs must be >= 0 removals, found {costs.min()}")
    budget = check_positive_int(budget, "budget", minimum=0)
    if n_classes is None:
        n_classes = int(labels.max()) + 1 if labels.size else 1
    else:
        n_classes = check_positive_int(n_classes, "n_classes")
        if labels.size and labels.max() >= n_classes:
            raise ValueError(f"labels holds label index {labels.max()}, outside 0..{n_classes - 1}")
    return labels, costs, budget, n_classes


def max_flips(
    labels: np.ndarray,
    costs: np.ndarray,
    budget: int,
    n_classes: int | None = None,
    return_allocation: bool = False,
) -> int | tuple[int, np.ndarray]:
    """Most inputs one attack can flip with ``budget`` removals shared across labels (exact).

    Solves ``F = max over (r_l), sum_l r_l <= budget, of sum_l #{i : labels[i] = l, costs[i] <= r_l}`` exactly
    by a dynamic programme over labels whose budget axis is ``0..budget``. Its cost is
    ``O(sum_l D_l * budget)`` with ``D_l`` the number of distinct costs ``<= budget`` of label ``l`` (the last
    label costs only ``O(D_l)``).

    Parameters
    ----------
    labels : ndarray of shape (n,), int
        Predicted label of each (correctly classified) input.
    costs : ndarray of shape (n,), int or float
        Removals of its own label that the input needs before it can be flipped. ``UNFLIPPABLE``, ``+inf``
        (float arrays) or ``None`` (object arrays) mark an input no attack can flip. A cost of 0 is flipped
        for free.
    budget : int
        Total removals ``e`` (>= 0).
    n_classes : int, optional
        Length of the returned allocation; defaults to ``max(labels) + 1``.
    return_allocation : bool
        Also return one optimal allocation ``r`` (``r[l]`` removals of label ``l``, ``sum(r) <= budget``).

    Returns
    -------
    int, or (int, ndarray of shape (n_classes,)) when ``return_allocation``.

    Examples
    --------
    Three inputs predicted 0 (costs 1, 1, 2), one predicted 1 (cost 3), one that cannot be flipped:

    >>> max_flips([0, 0, 0, 1, 2], [1, 1, 2, 3, None], budget=3, return_allocation=True)
    (3, array([2, 0, 0]))
    """
    labels, costs, budget, n_classes = _check_solver_inputs(labels, costs, budget, n_classes)
    flips, allocation = _solve(labels, costs, budget, n_classes)
    return (flips, allocation) if return_allocation else flips


def _curve(
    labels: np.ndarray, costs: np.ndarray, e: np.ndarray, n_test: int, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """CA bound and worst-case allocation for every budget; ``costs[j]`` holds c_i(e[j]) of the inputs."""
    accuracy = np.empty(len(e), dtype=np.float64)
    allocation = np.zeros((len(e), n_classes), dtype=np.int64)
    for position, budget in enumerate(e.tolist()):
        flipped, allocation[position] = _solve(labels, costs[position], budget, n_classes)
        accuracy[position] = (len(labels) - flipped) / n_test
    return accuracy, allocation


def global_rnn_costs(margin: np.ndarray, e: np.ndarray) -> np.ndarray:
    """c_i(e) of spec 5b for every budget: ``max(margin_i - e, 0)``, shape (len(e), n).

    ``margin_i = s_a - s_b + [a > b]`` (:func:`poisoncert.votes.margin_terms`). Removing ``r`` examples of
    label ``a`` lowers ``s_a`` by at most ``r``; ``e`` added examples raise any other label by at most ``e``; a
    flip needs ``s_l* + [l > a] > s_a*`` for some ``l != a``, hence ``r >= margin - e``.
    """
    margin = np.asarray(margin, dtype=np.int64)
    return np.maximum(margin[None, :] - np.asarray(e, dtype=np.int64)[:, None], 0)


def _rnn_setup(votes, y, e) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    votes = check_votes(votes)
    y = check_label_indices(y, votes.shape[0], votes.shape[1])
    e = check_poisoning_sizes(e)
    if votes.shape[0] == 0:
        raise ValueError("votes is empty: there are no test inputs")
    a, _, margin = margin_terms(votes)
    correct = a == y
    return a[correct], margin[correct], e, y, votes.shape[1]


def global_rnn_certified_accuracy(votes: np.ndarray, y: np.ndarray, e: np.ndarray | list[int] | int) -> np.ndarray:
    """Global joint certified accuracy of rNN (spec 5b): one attack, one removal budget for all test inputs.

    Proved (deterministic, general threat model): for every poisoned training set of poisoning size ``<= e``,
    rNN still classifies at least the returned fraction of the test set correctly. The bound is
    ``(#correct - F(e)) / |T|`` with ``F`` the exact label knapsack of :func:`max_flips` on the costs
    ``c_i(e) = max(s_a - s_b + [a > b] - e, 0)`` of the correctly classified inputs. It is never below the
    individual certificate, nor below ISLAND, RD or any grouping of Theorem 4. Valid for **rNN votes only**:
    a kNN insertion also pushes a neighbour out (use :func:`knn_joint_certified_accuracy`).

    Parameters
    ----------
    votes : ndarray of shape (n_test, n_classes), integer
        rNN vote counts of the clean classifier.
    y : ndarray of shape (n_test,), integer
        True label indices.
    e : array-like of int
        Poisoning sizes (>= 0), any order.

    Returns
    -------
    ndarray of float, one lower bound of CA(e) per entry of ``e``.

    Examples
    --------
    Two correct inputs of different labels, each with margin 4 (individual certified size 1): at ``e = 2``
    one attack can flip only one of them (each needs 2 removals of its own label).

    >>> global_rnn_certified_accuracy([[4, 0], [0, 3]], [0, 1], [0, 1, 2, 3])
    array([1. , 1. , 0.5, 0. ])
    """
    return global_rnn_curve(votes, y, e)[0]


def global_attack_allocation(votes: np.ndarray, y: np.ndarray, e: np.ndarray | list[int] | int) -> np.ndarray:
    """Worst-case removals per label behind :func:`global_rnn_certified_accuracy` (spec 5b).

    Returns an int64 array of shape ``(len(e), n_classes)``: row ``j`` is one allocation ``r`` with
    ``sum(r) <= e[j]`` that attains ``F(e[j])`` (the label-level attacker's optimum; ties between optima are
    broken arbitrarily but deterministically). It describes the over-approximated attacker of the bound, not
    necessarily an attack that realises it.
    """
    return global_rnn_curve(votes, y, e)[1]


def global_rnn_curve(votes: np.ndarray, y: np.ndarray, e: np.ndarray | list[int] | int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`global_rnn_certified_accuracy` and :func:`global_attack_allocation` from one knapsack per size."""
    labels, margin, e, y, n_classes = _rnn_setup(votes, y, e)
    costs = global_rnn_costs(margin, e)
    return _curve(labels, costs, e, len(y), n_classes)


def knn_joint_costs(prefix: np.ndarray, rival: np.ndarray, k: int, e: np.ndarray) -> np.ndarray:
    """c_i(e) of spec 5c for every budget, shape (len(e), n): smallest ``r`` in ``0..e`` with
    ``A_i(k - e + r) - r <= M_i + e - 1``, ``UNFLIPPABLE`` when none.

    Parameters
    ----------
    prefix : ndarray of shape (n, K + 1), int
        ``prefix[i, m] = A_i(m)``, label-``a_i`` count among the first ``m`` clean neighbours; read as
        ``A_i(m) = A_i(K)`` for ``m > K`` and 0 for ``m <= 0``.
    rival : ndarray of shape (n,), int
        ``M_i = max over l != a_i of (s_l + [l > a_i])``.
    k : int
    e : ndarray of int

    Notes
    -----
    ``r -> A_i(k - e + r) - r`` never increases (``A`` grows by at most 1 per position), so the condition
    holds on an upper interval of ``r`` and a binary search finds its start in ``ceil(log2(max(e) + 2))``
    rounds (:func:`_first_cost`, inputs in parallel).
    """
    prefix = np.ascontiguousarray(prefix, dtype=np.int64)
    budgets = np.ascontiguousarray(e, dtype=np.int64).reshape(-1)
    out = np.empty((len(budgets), prefix.shape[0]), dtype=np.int64)
    _knn_joint_costs_of_prefixes(prefix, np.ascontiguousarray(rival, dtype=np.int64), k, budgets, out)
    return out


@numba.njit(inline="always")
def _first_cost(prefix, rival, k, e, out, t):  # pragma: no cover - compiled
    """``out[j, t]`` = the smallest ``r`` in ``0..e[j]`` with ``prefix[clip(k - e[j] + r)] - r <= rival + e[j] - 1``,
    ``UNFLIPPABLE`` when none (``prefix`` is one input's ``A(0..K)``)."""
    width = prefix.shape[0] - 1
    for j in range(e.shape[0]):
        budget = e[j]
        threshold = rival + budget - 1
        if prefix[min(k, width)] - budget > threshold:  # r = budget fails, so every smaller r does
            out[j, t] = UNFLIPPABLE
            continue
        low = 0
        high = budget
        while low < high:
            middle = (low + high) // 2
            if prefix[min(max(k - budget + middle, 0), width)] - middle <= threshold:
                high = middle
            else:
                low = middle + 1
        out[j, t] = low


@numba.njit(cache=True, nogil=True, parallel=True)
def _knn_joint_costs_of_prefixes(prefix, rival, k, e, out):  # pragma: no cover - compiled
    for t in numba.prange(prefix.shape[0]):
        _first_cost(prefix[t], rival[t], k, e, out, t)


def knn_joint_certified_accuracy(
    neighbor_labels: np.ndarray,
    y: np.ndarray,
    e: np.ndarray | list[int] | int,
    n_classes: int,
    n_neighbors: int | None = None,
    n_train: int | None = None,
) -> np.ndarray:
    """Global joint certified accuracy of kNN (spec 5c): one attack, one removal budget for all test inputs.

    Proved (deterministic, general threat model): for every poisoned training set of poisoning size ``<= e``,
    kNN still classifies at least the returned fraction of the test set correctly. An input ``i`` predicted
    ``a`` keeps at least ``A_i(k - e + r_a) - r_a`` votes for ``a`` when ``r_a`` label-``a`` examples are
    removed, and every other label gains at most ``e`` votes; this gives the per-input cost ``c_i(e)`` of
    :func:`knn_joint_costs`, and the label knapsack :func:`max_flips` bounds the flips of a single attack.
    Never below the individual kNN certificate. Proof and edge cases: ``docs/knn_joint_proof.md``.

    Parameters
    ----------
    neighbor_labels : ndarray of shape (n_test, K), integer
        Column ``j`` holds the label index of each test input's ``(j+1)``-th nearest clean training example
        in the order of spec section 3. ``K >= min(k, n_train)`` is required; a table narrower than k means
        the training set has only ``K`` examples (then ``A_i(m) = A_i(K)`` for ``m > K``). Columns beyond k
        are ignored.
    y : ndarray of shape (n_test,), integer
        True label indices.
    e : array-like of int
        Poisoning sizes (>= 0), any order.
    n_classes : int
    n_neighbors : int, optional
        k; defaults to ``K``.
    n_train : int, optional
        Size of the clean training set. Required when the table is narrower than k, which is only right when
        the training set has exactly ``K`` examples: a table merely cut short would give wrong predictions.

    Returns
    -------
    ndarray of float, one lower bound of CA(e) per entry of ``e``.

    Examples
    --------
    Two inputs of different labels, k = 4, each with neighbours (own, own, own, 2): individually certified
    only at e = 0, but at e = 1 flipping either needs one removal of its own label, so one attack flips one.

    >>> table = [[0, 0, 0, 2], [1, 1, 1, 2]]
    >>> knn_joint_certified_accuracy(table, [0, 1], [0, 1, 2], n_classes=3)
    array([1. , 0.5, 0. ])
    """
    labels = np.asarray(neighbor_labels)
    if labels.ndim != 2 or labels.shape[1] == 0:
        raise ValueError(f"neighbor_labels must be 2-D (n_test, K) with K >= 1, got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"neighbor_labels must hold integer label indices, got dtype {labels.dtype}")
    if labels.shape[0] == 0:
        raise ValueError("neighbor_labels is empty: there are no test inputs")
    n_classes = check_positive_int(n_classes, "n_classes", minimum=2)
    if labels.min() < 0 or labels.max() >= n_classes:
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise ValueError(f"neighbor_labels holds label index {bad}, outside 0..{n_classes - 1}")
    y = check_label_indices(y, labels.shape[0], n_classes)
    e = check_poisoning_sizes(e)
    k = labels.shape[1] if n_neighbors is None else check_positive_int(n_neighbors, "n_neighbors")
    if labels.shape[1] < k and n_train != labels.shape[1]:
        raise ValueError(
            f"neighbor_labels has {labels.shape[1]} columns but k={k}: give the first k neighbours, or pass "
            f"n_train={labels.shape[1]} if the training set has only {labels.shape[1]} examples"
        )
    # A(m) is only read at m <= k (r <= e), so columns beyond k never matter.
    labels = labels[:, : min(k, labels.shape[1])]
    return _knn_joint_curve(labels, knn_votes_from_labels(labels, labels.shape[1], n_classes), y, e, k, n_classes)


def _knn_joint_curve(labels: np.ndarray, votes: np.ndarray, y: np.ndarray, e: np.ndarray, k: int,
                     n_classes: int) -> np.ndarray:
    """:func:`knn_joint_certified_accuracy` on checked inputs: ``labels`` the first ``min(k, K)`` columns of a
    table of label indices, ``votes`` their counts (a result's own, which it counted from that table)."""
    a = predict(votes)
    rival = rival_counts(votes, a)
    correct = np.flatnonzero(a == y)
    costs = np.empty((len(e), len(correct)), dtype=np.int64)
    _knn_joint_costs_of_rows(labels, correct, a, rival.astype(np.int64), k, e, costs)
    return _curve(a[correct], costs, e, len(y), n_classes)[0]


@numba.njit(cache=True, nogil=True, parallel=True)
def _knn_joint_costs_of_rows(labels, rows, a, rival, k, e, out):  # pragma: no cover - compiled
    """``out[j, t] = c_i(e[j])`` of :func:`knn_joint_costs` for input ``i = rows[t]``, straight from the label table.

    No (rows x K) prefix-count matrix: each input's ``A_i(m)`` is built in a per-thread buffer, one pass over its
    first ``K`` labels, then searched by :func:`_first_cost`; inputs in parallel.
    """
    width = labels.shape[1]
    n_rows = rows.shape[0]
    n_blocks = min(n_rows, 256)
    for block in numba.prange(n_blocks):
        prefix = np.empty(width + 1, np.int64)
        for t in range(block * n_rows // n_blocks, (block + 1) * n_rows // n_blocks):
            i = rows[t]
            own = a[i]
            count = 0
            prefix[0] = 0
            for m in range(width):
                if labels[i, m] == own:
                    count += 1
                prefix[m + 1] = count
            _first_cost(prefix, rival[i], k, e, out, t)
