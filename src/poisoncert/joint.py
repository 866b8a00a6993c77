"""Global joint certificates (spec 5b for rNN, 5c for kNN): one removal budget shared by every test input.

Both bound the attacker at the level of labels: it removes ``r_l`` clean examples of label ``l``
(``sum_l r_l <= e``) and adds ``e`` examples. A correctly classified input ``i`` predicted ``a_i`` can only be
flipped when ``r_{a_i} >= c_i(e)``, a per-input cost that each certificate derives from its own argument. The
attacker then flips at most

    F(e) = max over (r_l), sum r_l <= e, of  sum_l #{i correct : a_i = l, c_i(e) <= r_l}

(a knapsack over labels, solved exactly by :func:`max_flips`), and ``CA(e) >= (#correct - F(e)) / |T|``.
"""

from __future__ import annotations

import numba
import numpy as np

from ._validation import check_label_indices, check_poisoning_sizes, check_positive_int, check_votes
from .votes import knn_votes_from_labels, margin_terms, predict, prefix_label_counts

#: Cost of an input that no attack within the budget can flip.
UNFLIPPABLE = np.iinfo(np.int64).max


@numba.njit(cache=True)
def _knapsack(costs_by_label: np.ndarray, label_starts: np.ndarray, budget: int) -> int:  # pragma: no cover
    """Exact max flips: dp over labels, choices r_l in {0} U {costs of label l}, each costing r_l removals."""
    best = np.zeros(budget + 1, dtype=np.int64)
    for label in range(len(label_starts) - 1):
        start, stop = label_starts[label], label_starts[label + 1]
        if stop == start:
            continue
        new = best.copy()
        # Costs are sorted ascending; choosing r = costs[j] flips every input of this label up to the last
        # one with the same cost, so only the last index of each run of equal costs is a useful choice.
        for j in range(start, stop):
            if j + 1 < stop and costs_by_label[j + 1] == costs_by_label[j]:
                continue
            cost = costs_by_label[j]
            gain = j - start + 1
            for b in range(cost, budget + 1):
                value = best[b - cost] + gain
                if value > new[b]:
                    new[b] = value
        best = new
    return best[budget]


def max_flips(labels: np.ndarray, costs: np.ndarray, budget: int) -> int:
    """Largest number of inputs an attacker with ``budget`` shared removals can flip (exact).

    Parameters
    ----------
    labels : ndarray of int
        Predicted label of each correctly classified input.
    costs : ndarray of int
        Removals of its own label that input needs (``UNFLIPPABLE`` when none suffices).
    budget : int
        Total removals ``e``.
    """
    affordable = costs <= budget
    labels, costs = labels[affordable], costs[affordable]
    free = costs == 0
    flips = int(np.count_nonzero(free))
    labels, costs = labels[~free], costs[~free]
    if len(costs) == 0:
        return flips
    order = np.lexsort((costs, labels))
    labels, costs = labels[order], costs[order].astype(np.int64)
    boundaries = np.flatnonzero(np.diff(labels)) + 1
    starts = np.r_[0, boundaries, len(labels)].astype(np.int64)
    return flips + int(_knapsack(costs, starts, int(budget)))


def _curve(correct_labels: np.ndarray, cost_at, e: np.ndarray, n_test: int) -> np.ndarray:
    out = np.empty(len(e), dtype=np.float64)
    n_correct = len(correct_labels)
    for position, budget in enumerate(e.tolist()):
        flipped = max_flips(correct_labels, cost_at(budget), budget)
        out[position] = (n_correct - flipped) / n_test
    return out


def global_rnn_certified_accuracy(votes: np.ndarray, y: np.ndarray, e) -> np.ndarray:
    """Global joint certified accuracy of rNN (spec 5b): one removal budget shared by all test inputs.

    With every poisoned training set of poisoning size ``<= e`` (general threat model), at least the returned
    fraction of the test set is still classified correctly by rNN. Deterministic. Never below ISLAND, RD or any
    grouping of Theorem 4, nor below the individual certificate.
    """
    votes = check_votes(votes)
    y = check_label_indices(y, votes.shape[0], votes.shape[1])
    e = check_poisoning_sizes(e)
    if votes.shape[0] == 0:
        raise ValueError("votes is empty: there are no test inputs")
    a, _, margin = margin_terms(votes)
    correct = a == y
    labels, margins = a[correct], margin[correct]
    return _curve(labels, lambda budget: np.maximum(margins - budget, 0), e, len(y))


def knn_joint_costs(prefix: np.ndarray, rival: np.ndarray, k: int, budget: int) -> np.ndarray:
    """c_i(e) of spec 5c: smallest r in [0, e] with A_i(k - e + r) - r <= M_i + e - 1, else UNFLIPPABLE.

    ``prefix[i, m] = A_i(m)`` for m = 0..K (A_i(m) = A_i(K) beyond K); ``rival[i] = M_i``.
    ``r -> A_i(k - e + r) - r`` never increases, so a vectorised binary search finds the smallest r.
    """
    width = prefix.shape[1] - 1
    rows = np.arange(len(prefix))
    threshold = rival + budget - 1

    def holds(r: np.ndarray) -> np.ndarray:
        position = np.clip(k - budget + r, 0, width)
        return prefix[rows, position] - r <= threshold

    low = np.zeros(len(prefix), dtype=np.int64)
    high = np.full(len(prefix), budget, dtype=np.int64)
    feasible = holds(high)
    while True:
        active = low < high
        if not np.any(active):
            break
        middle = (low + high) // 2
        ok = holds(middle)
        high = np.where(active & ok, middle, high)
        low = np.where(active & ~ok, middle + 1, low)
    return np.where(feasible, low, UNFLIPPABLE)


def knn_joint_certified_accuracy(
    neighbor_labels: np.ndarray, y: np.ndarray, e, n_classes: int, n_neighbors: int | None = None
) -> np.ndarray:
    """Global joint certified accuracy of kNN (spec 5c), one removal budget shared by all test inputs.

    With every poisoned training set of poisoning size ``<= e`` (general threat model), at least the returned
    fraction of the test set is still classified correctly by kNN. Deterministic; never below the individual
    certificate. ``neighbor_labels[i, j]`` is the label of input i's (j+1)-th nearest clean training example;
    ``n_neighbors`` is k (default: the table's width; a narrower table means n_train < k). Proof:
    ``docs/knn_joint_proof.md``.
    """
    labels = np.asarray(neighbor_labels)
    if labels.ndim != 2 or labels.shape[1] == 0:
        raise ValueError(f"neighbor_labels must be 2-D (n_test, K) with K >= 1, got shape {labels.shape}")
    n_classes = check_positive_int(n_classes, "n_classes", minimum=2)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"neighbor_labels must hold integer label indices, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"neighbor_labels must hold label indices in 0..{n_classes - 1}")
    y = check_label_indices(y, labels.shape[0], n_classes)
    e = check_poisoning_sizes(e)
    width = labels.shape[1]
    # A table narrower than k means the training set has only `width` examples (n < k): A(m) = A(n) for m > n.
    k = width if n_neighbors is None else check_positive_int(n_neighbors, "n_neighbors")
    votes = knn_votes_from_labels(labels, min(k, width), n_classes)
    a = predict(votes)
    tie_bit = np.arange(n_classes)[None, :] > a[:, None]
    rival_votes = np.where(np.arange(n_classes)[None, :] == a[:, None], -1, votes + tie_bit)
    rival = rival_votes.max(axis=1)
    correct = a == y
    prefix = prefix_label_counts(labels[correct], a[correct])
    return _curve(a[correct], lambda budget: knn_joint_costs(prefix, rival[correct], k, budget), e, len(y))
