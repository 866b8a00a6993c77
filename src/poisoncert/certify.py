"""Certificates for nearest-neighbour classifiers against data poisoning (spec sections 3-5).

Everything here is a pure function of vote matrices or ordered neighbour labels, so each certificate can be
checked without data or models. The guarantees, under the threat model of spec section 1 (an attacker removes up
to ``e`` clean training examples and adds up to ``e`` arbitrary ones; a modification counts as one):

* **individual** (Theorems 1 and 2 of Jia, Cao, Gong): a test input whose certified poisoning size is ``e*`` keeps
  its prediction under every poisoned training set of size ``<= e*``. Deterministic, exact.
* **joint, rNN only** (Theorems 3 and 4): ``"island"`` and ``"rd"`` groupings; ``"global"`` (spec 5b) shares one
  removal budget across all test inputs and dominates every grouping; ``"split"`` (spec 5d) also splits the
  additions over labels, dominates ``"global"`` and is the default of the estimators. Deterministic.
* **joint, kNN**: :func:`knn_joint_certified_accuracy` (spec 5c) and :func:`knn_split_certified_accuracy`
  (spec 5e, with the real pulled-in labels; dominates 5c, the default). Deterministic.

Label ties go to the larger label index everywhere (spec section 2).
"""

from __future__ import annotations

from typing import Literal

import numba
import numpy as np

from ._validation import check_label_indices, check_poisoning_sizes, check_positive_int, check_votes
from .votes import margin_terms, predict, rival_counts, runner_up

__all__ = [
    "JOINT_METHODS",
    "THREAT_MODELS",
    "accuracy_from_certified_sizes",
    "certified_accuracy",
    "certified_poisoning_size",
    "knn_certified_poisoning_size",
    "knn_deletion_scan",
    "knn_joint_certified_accuracy",
    "knn_split_certified_accuracy",
    "predict",
    "runner_up",
]

ThreatModel = Literal["general", "insertion", "deletion", "label-flip"]
THREAT_MODELS: tuple[str, ...] = ("general", "insertion", "deletion", "label-flip")
JOINT_METHODS: tuple[str, ...] = ("individual", "rd", "island", "global", "split")
#: Methods defined for the general threat model only (Theorem 4 and spec 5b bound removals and additions
#: together); label-flip attacks are general attacks of the same size, so they are covered too.
_GENERAL_ONLY = ("rd", "island", "global")


def _check_threat_model(threat_model: str) -> str:
    aliases = {"insertion-only": "insertion", "deletion-only": "deletion", "labelflip": "label-flip",
               "label_flip": "label-flip"}
    threat_model = aliases.get(threat_model, threat_model)
    if threat_model not in THREAT_MODELS:
        raise ValueError(f"unknown threat model {threat_model!r}; choose one of {', '.join(THREAT_MODELS)}")
    return threat_model


def certified_poisoning_size(votes: np.ndarray, threat_model: ThreatModel = "general") -> np.ndarray:
    """Individual certified poisoning size of each prediction, from vote counts alone.

    The prediction ``a`` of a test input provably stays ``a`` for every poisoned training set whose poisoning
    size is at most the returned value (deterministic guarantee; spec section 4).

    Parameters
    ----------
    votes : ndarray of shape (n_test, n_classes), integer
        Neighbour vote counts (kNN or rNN).
    threat_model : {"general", "label-flip", "insertion", "deletion"}
        ``"general"`` and ``"label-flip"`` hold for kNN and rNN alike:
        ``e* = ceil((s_a - s_b + [a > b]) / 2) - 1`` with ``b`` the runner-up.
        ``"insertion"`` and ``"deletion"`` computed from votes alone are the **rNN** certificates
        ``e* = s_a - s_b + [a > b] - 1``; for kNN these variants depend on the neighbour order, use
        :func:`knn_certified_poisoning_size`.

    Returns
    -------
    ndarray of shape (n_test,), int64, every entry ``>= 0``. The size certifies the prediction and needs no
    true label; see :func:`certified_accuracy` for counting correct predictions only.

    Notes
    -----
    The bounds are exact: one more poisoned example can flip the prediction (remove ``a``-neighbours and/or
    add runner-up neighbours at distance 0). One sound, non-exact case: rNN deletion-only for an input that
    predicts the largest label and has no neighbour of another label, which no deletion can flip (an empty
    neighbourhood predicts the largest label); the returned ``s_a`` is then smaller than the truth.

    Examples
    --------
    >>> import numpy as np
    >>> certified_poisoning_size(np.array([[7, 2], [3, 3], [0, 5]]))
    array([2, 0, 2])
    """
    threat_model = _check_threat_model(threat_model)
    _, _, margin = margin_terms(votes)
    if threat_model in ("general", "label-flip"):
        return (margin + 1) // 2 - 1
    return margin - 1


def accuracy_from_certified_sizes(certified_size: np.ndarray, e: np.ndarray | list[int] | int) -> np.ndarray:
    """Fraction of test inputs whose certified size is ``>= e``, for every ``e`` (vectorised).

    ``certified_size`` uses -1 for inputs that do not count at all (misclassified, or not certified at e = 0).
    """
    sizes = np.asarray(certified_size)
    e = check_poisoning_sizes(e)
    if sizes.ndim != 1:
        raise ValueError(f"certified_size must be 1-D, got shape {sizes.shape}")
    if sizes.size == 0:
        raise ValueError("certified_size is empty: there are no test inputs")
    sorted_sizes = np.sort(sizes)
    below = np.searchsorted(sorted_sizes, e, side="left")
    return (len(sorted_sizes) - below) / len(sorted_sizes)


def certified_accuracy(
    votes: np.ndarray,
    y: np.ndarray,
    e: np.ndarray | list[int] | int,
    method: Literal["individual", "island", "rd", "global", "split"] = "individual",
    seed: int = 0,
    threat_model: ThreatModel = "general",
    *,
    time_limit: float | None = None,
    node_limit: int | None = None,
) -> np.ndarray:
    """Provable lower bound of certified accuracy CA(e) for each poisoning size in ``e``.

    Parameters
    ----------
    votes : ndarray of shape (n_test, n_classes), integer
        Vote counts of the clean classifier.
    y : ndarray of shape (n_test,), integer
        True label indices.
    e : array-like of int
        Poisoning sizes (>= 0), any order.
    method : {"individual", "island", "rd", "global", "split"}
        ``"individual"``: each test input faces its own attacker (spec 4; valid for kNN and rNN votes under the
        general and label-flip models, for rNN votes under insertion/deletion).
        ``"island"``, ``"rd"`` (Theorem 4 with ISLAND or random grouping), ``"global"`` (spec 5b, one shared
        attack) and ``"split"`` (spec 5d, one attack whose additions are split over labels; dominates all the
        others) are joint certificates that hold for **rNN votes only**: for kNN an insertion also pushes a
        neighbour out, which these bounds do not model (use :func:`knn_joint_certified_accuracy` or
        :func:`knn_split_certified_accuracy`).
    seed : int
        Seed of the random grouping (``"rd"`` only).
    threat_model : {"general", "insertion", "deletion", "label-flip"}
        ``"split"`` and ``"individual"`` take every model (split: insertion-only has no removals, deletion-only no
        additions; label-flip uses the general bound, since relabelling e examples is a poisoning of size e);
        ``"island"``, ``"rd"`` and ``"global"`` the general and label-flip models.
    time_limit, node_limit : optional
        ``"split"`` only: a limit per poisoning size on its branch and bound; see
        :func:`poisoncert.joint_split.rnn_split_certificate` (the value stays sound; use that function to see
        whether it is exact).

    Returns
    -------
    ndarray of float, one value per entry of ``e``: with every poisoned training set of poisoning size
    ``<= e``, at least this fraction of the test set is still classified correctly. Deterministic.

    Examples
    --------
    Each input's runner-up is a different label; at e = 2 the global bound lets every runner-up gain two votes at
    once, the split bound only as many as the attacker adds in total:

    >>> import numpy as np
    >>> votes, y = np.array([[4, 1, 0], [0, 4, 1], [1, 0, 4]]), np.array([0, 1, 2])
    >>> [round(certified_accuracy(votes, y, [2], method=m).item(), 3) for m in ("individual", "global", "split")]
    [0.0, 0.333, 0.667]
    """
    votes = check_votes(votes)
    y = check_label_indices(y, votes.shape[0], votes.shape[1])
    e = check_poisoning_sizes(e)
    threat_model = _check_threat_model(threat_model)
    if votes.shape[0] == 0:
        raise ValueError("votes is empty: there are no test inputs")
    if method not in JOINT_METHODS:
        raise ValueError(f"unknown certification method {method!r}; choose one of {', '.join(JOINT_METHODS)}")
    if method in _GENERAL_ONLY and threat_model in ("insertion", "deletion"):
        raise ValueError(f"method {method!r} is defined for the general threat model only; use 'split' or "
                         f"'individual' under the {threat_model} threat model")
    if method == "individual":
        sizes = certified_poisoning_size(votes, threat_model)
        return accuracy_from_certified_sizes(np.where(predict(votes) == y, sizes, -1), e)
    if method == "island":
        return _grouped_accuracy(votes, y, e, grouping="island")
    if method == "rd":
        return _grouped_accuracy(votes, y, e, grouping="rd", seed=seed)
    if method == "global":
        from .joint import global_rnn_certified_accuracy

        return global_rnn_certified_accuracy(votes, y, e)
    from .joint_split import rnn_split_certificate

    return rnn_split_certificate(votes, y, e, threat_model, time_limit=time_limit, node_limit=node_limit).accuracy


def _grouped_accuracy(
    votes: np.ndarray, y: np.ndarray, e: np.ndarray, grouping: str, seed: int = 0
) -> np.ndarray:
    """Theorem 4 summed over a grouping of the test set, each group with the whole budget (spec section 5).

    Within a group U sorted by ``g_i(e)`` descending, the group certifies the members at positions ``p`` whose
    suffix sum ``sum_{i >= p} g_i(e)`` exceeds ``e`` (exactly ``w - 1`` of them, since suffix sums only shrink).
    Sorting by ``g_i(e)`` itself, not by the paper's ``(s_a - s_b) * [a == y]``, keeps misclassified members
    and tie-bit differences from being over-counted.
    """
    a, _, margin = margin_terms(votes)
    correct = a == y
    n_test = len(y)
    if grouping == "rd":
        # Random division: shuffle, then the j-th example of each predicted label goes to group j, so the
        # labels in a group are distinct and a group has at most n_classes members. Fixed across e.
        order = np.random.default_rng(seed).permutation(n_test)
        rd_group = np.empty(n_test, dtype=np.int64)
        rd_group[order] = _rank_within_label(a[order], np.zeros(n_test))
        # The groups are fixed, and within one the correct members by margin descending, then the others (g = 0),
        # have g(e) non-increasing at every e: one sort serves the whole curve.
        rd_order = np.lexsort((-margin, ~correct, rd_group))
        rd_sorted_group = rd_group[rd_order]
    out = np.empty(len(e), dtype=np.float64)
    for position, size in enumerate(e.tolist()):
        g = np.where(correct, np.maximum(margin - size, 0), 0)
        if grouping == "island":
            individually_certified = correct & (margin > 2 * size)  # T1: e <= e*
            pooled = correct & (g > 0) & ~individually_certified  # T2; everything else is T0
            members = np.flatnonzero(pooled)
            # Each new group takes, per label, the remaining T2 example with the largest margin.
            group = _rank_within_label(a[members], -margin[members])
            certified = int(individually_certified.sum()) + _certified_in_groups(group, g[members], size)
        else:
            certified = _suffix_sums_above(rd_sorted_group, g[rd_order].astype(np.int64), size)
        out[position] = certified / n_test
    return out


def _rank_within_label(labels: np.ndarray, key: np.ndarray) -> np.ndarray:
    """0-based position of each element among those with the same label, ordered by ``key`` ascending."""
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((key, labels))
    sorted_labels = labels[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_labels)) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(order)) - run_start
    return rank


def _certified_in_groups(group: np.ndarray, g: np.ndarray, budget: int) -> int:
    """Sum over groups of ``w - 1``: members whose suffix sum of ``g`` (sorted descending) exceeds the budget."""
    if len(group) == 0:
        return 0
    order = np.lexsort((-g, group))
    return _suffix_sums_above(group[order], g[order].astype(np.int64), budget)


def _suffix_sums_above(sorted_group: np.ndarray, sorted_g: np.ndarray, budget: int) -> int:
    """:func:`_certified_in_groups` on members sorted by group, and by ``g`` descending within one."""
    if len(sorted_group) == 0:
        return 0
    # Suffix sums within each group: total of the group minus the prefix sum before each position.
    prefix = np.cumsum(sorted_g) - sorted_g
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_group)) + 1]
    ends = np.r_[starts[1:], len(sorted_group)]
    lengths = ends - starts
    group_prefix_start = np.repeat(prefix[starts], lengths)
    group_total = np.repeat(np.add.reduceat(sorted_g, starts), lengths)
    suffix = group_total - (prefix - group_prefix_start)
    return int(np.count_nonzero(suffix > budget))


def knn_certified_poisoning_size(
    neighbor_labels: np.ndarray,
    n_neighbors: int,
    n_classes: int,
    threat_model: ThreatModel = "general",
    n_train: int | None = None,
    chunk_size: int = 256,
) -> np.ndarray:
    """Individual certified poisoning size of each kNN prediction, for any threat model (spec section 4).

    The prediction (most votes among the first ``k`` neighbours, ties to the larger label) provably stays the
    same under every poisoned training set within the returned size, for the chosen threat model.
    Deterministic and exact (no window is cut short: a table too narrow to decide raises instead).

    Parameters
    ----------
    neighbor_labels : ndarray of shape (n_test, K), integer
        Label index of each test input's clean training examples in the order of spec section 3 (distance
        ascending, hash rank descending). ``"general"``, ``"label-flip"`` and ``"insertion"`` need the first
        ``min(k, n_train)`` columns. ``"deletion"`` pulls later examples into the window: each input needs the
        columns up to where its first flip happens (:func:`knn_deletion_scan` says which are decided); an input
        that no deletion within the table flips needs the whole training set (``K == n_train``).
    n_neighbors : int
        k.
    n_classes : int
    threat_model : {"general", "label-flip", "insertion", "deletion"}
    n_train : int, optional
        Size of the clean training set. Needed when the table is narrower than k (the training set is
        smaller than k), and for deletion-only inputs that the table does not decide.
    chunk_size : int
        Test inputs processed at once by the insertion variant (memory ~ chunk * k * n_classes).

    Returns
    -------
    ndarray of shape (n_test,), int64, ``>= 0``.
    """
    threat_model = _check_threat_model(threat_model)
    labels, k, n_classes, n_train = _check_knn_table(neighbor_labels, n_neighbors, n_classes, n_train,
                                                     threat_model)
    window = min(k, n_train)
    from .votes import knn_votes_from_labels

    votes = knn_votes_from_labels(labels[:, :window], window, n_classes)
    if threat_model in ("general", "label-flip"):
        return certified_poisoning_size(votes, "general")
    prediction = predict(votes)
    if threat_model == "deletion":
        sizes, decided = knn_deletion_scan(labels, prediction, k, n_classes, n_train)
        if not np.all(decided):
            bad = np.flatnonzero(~decided)
            raise ValueError(
                f"the deletion-only certificate of {len(bad)} test input(s) (first: {int(bad[0])}) is not decided "
                f"within the {labels.shape[1]} neighbours given: no deletion inside that window flips them. Pass "
                "n_train if the table holds the whole training set, or give more neighbours"
            )
        return sizes
    out = np.empty(len(labels), dtype=np.int64)
    width = labels.shape[1]
    for start in range(0, len(labels), chunk_size):
        stop = min(start + chunk_size, len(labels))
        block = labels[start:stop, : min(width, k)]
        # counts[i, m, l]: label-l examples among the first m clean neighbours of input i.
        counts = np.zeros((stop - start, block.shape[1] + 1, n_classes), dtype=np.int32)
        np.cumsum(np.eye(n_classes, dtype=np.int32)[block], axis=1, out=counts[:, 1:])
        out[start:stop] = _knn_insertion_size(counts, prediction[start:stop], k, n_train)
    return out


def _check_knn_table(neighbor_labels: np.ndarray, n_neighbors: int, n_classes: int, n_train: int | None,
                     threat_model: str) -> tuple[np.ndarray, int, int, int]:
    labels = np.asarray(neighbor_labels)
    if labels.ndim != 2:
        raise ValueError(f"neighbor_labels must be 2-D (n_test, K), got shape {labels.shape}")
    k = check_positive_int(n_neighbors, "n_neighbors")
    n_classes = check_positive_int(n_classes, "n_classes", minimum=2)
    width = labels.shape[1]
    if labels.size and labels.dtype.kind not in "iu":
        raise TypeError(f"neighbor_labels must hold integer label indices, got dtype {labels.dtype}")
    if n_train is None:
        if width < k:
            raise ValueError(f"neighbor_labels has {width} columns but k={k}: pass n_train={width} if the training "
                             f"set has only {width} examples, else give the first k neighbours")
        # Unknown size: only what the columns prove is used (deletion raises for inputs they do not decide).
        n_train = width + 1 if threat_model == "deletion" else width
    else:
        n_train = check_positive_int(n_train, "n_train")
        if width > n_train:
            raise ValueError(f"neighbor_labels has {width} columns but n_train is {n_train}")
    if width < min(k, n_train):
        raise ValueError(f"neighbor_labels has {width} columns; kNN with k={k} needs {min(k, n_train)}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"neighbor_labels must hold label indices in 0..{n_classes - 1}")
    return labels, k, n_classes, n_train


def knn_deletion_scan(
    neighbor_labels: np.ndarray, prediction: np.ndarray, k: int, n_classes: int, n_train: int
) -> tuple[np.ndarray, np.ndarray]:
    """kNN deletion-only certified sizes from a (possibly partial) neighbour table, and which are decided.

    Spec section 4: ``j`` deletions, label ``a`` first, leave ``s_a' = A(k + j) - min(j, A(k + j))`` and
    ``s_l' = C_l(k + j)`` (counts among the first ``min(k + j, n)`` neighbours); the size is the last ``j`` that
    keeps ``a``. Each input is scanned until its first flip. ``decided[i]`` is False when the table ends first
    and does not hold the whole training set (``K < n_train``): ``sizes[i] = K - k`` is then a sound value
    (certified that far) but possibly below the exact one. With ``K == n_train`` every input is decided (an input
    that no deletion flips gets ``n_train``).
    """
    labels = np.ascontiguousarray(neighbor_labels)
    prediction = np.asarray(prediction, dtype=np.int64)
    sizes = np.empty(len(labels), dtype=np.int64)
    decided = np.empty(len(labels), dtype=np.bool_)
    _deletion_scan(labels, prediction, int(k), int(n_classes), int(n_train), sizes, decided)
    return sizes, decided


@numba.njit(cache=True, nogil=True, parallel=True)
def _deletion_scan(labels, prediction, k, n_classes, n_train, sizes, decided):  # pragma: no cover - compiled
    n_rows, width = labels.shape
    complete = width >= n_train
    window = min(k, n_train)
    for i in numba.prange(n_rows):
        a = prediction[i]
        counts = np.zeros(n_classes, np.int64)
        for j in range(window):
            counts[labels[i, j]] += 1
        rival = -1
        for lab in range(n_classes):
            if lab != a:
                rival = max(rival, counts[lab] + (1 if lab > a else 0))
        result = -1
        # j deletions: the window spans the first min(k + j, n) clean neighbours.
        limit = n_train if complete else width - k
        for j in range(1, limit + 1):
            position = k + j
            if position <= min(width, n_train):
                lab = labels[i, position - 1]
                counts[lab] += 1
                if lab != a:
                    rival = max(rival, counts[lab] + (1 if lab > a else 0))
            own = counts[a] - min(j, counts[a])
            if rival > own:
                result = j - 1
                break
        if result >= 0:
            sizes[i] = result
            decided[i] = True
        else:
            sizes[i] = max(limit, 0)
            decided[i] = complete


def _knn_insertion_size(counts: np.ndarray, a: np.ndarray, k: int, n_train: int) -> np.ndarray:
    """q insertions at distance 0 with label c push the last neighbours out: s_a' = A(k-q), s_c' = C(k-q) + q."""
    q = np.arange(1, k + 1)
    window = np.minimum(k - q, n_train)  # clean examples still inside the top k
    at = counts[:, window, :]  # (rows, k, classes)
    own = np.take_along_axis(at, a[:, None, None], axis=2)[..., 0]
    flipped = rival_counts(at, a) + q[None, :] > own
    # q = k always flips (the window holds only insertions), so every row has a first flipping q.
    return np.argmax(flipped, axis=1).astype(np.int64)  # first flipping q minus 1


def knn_joint_certified_accuracy(
    neighbor_labels: np.ndarray,
    y: np.ndarray,
    e: np.ndarray | list[int] | int,
    n_classes: int,
    n_neighbors: int | None = None,
    n_train: int | None = None,
) -> np.ndarray:
    """Joint certified accuracy of kNN with one removal budget shared by all test inputs (spec 5c, ours).

    With every poisoned training set of poisoning size ``<= e`` (general threat model), at least the returned
    fraction of the test set is still classified correctly. Deterministic. Never below the individual kNN
    certificate. See ``docs/knn_joint_proof.md`` for the proof.

    Parameters
    ----------
    neighbor_labels : ndarray of shape (n_test, K), integer
        Column j holds the label index of each test input's (j+1)-th nearest clean training example.
    y : ndarray of shape (n_test,)
        True label indices.
    e : array-like of int
        Poisoning sizes.
    n_classes : int
    n_neighbors : int, optional
        k; defaults to ``K``.
    n_train : int, optional
        Size of the clean training set; required when the table is narrower than k (then ``n_train == K``).
    """
    from .joint import knn_joint_certified_accuracy as _joint

    return _joint(neighbor_labels, y, e, n_classes, n_neighbors=n_neighbors, n_train=n_train)


def knn_split_certified_accuracy(
    neighbor_labels: np.ndarray,
    y: np.ndarray,
    e: np.ndarray | list[int] | int,
    k: int,
    n_classes: int | None = None,
    n_train: int | None = None,
    threat_model: ThreatModel = "general",
    *,
    time_limit: float | None = None,
    node_limit: int | None = None,
) -> np.ndarray:
    """Split-budget joint certified accuracy of kNN with the real pulled-in labels (spec 5e, ours; the default).

    With every poisoned training set of poisoning size ``<= e`` under ``threat_model``, kNN still classifies at
    least the returned fraction of the test set correctly. Deterministic. Never below
    :func:`knn_joint_certified_accuracy` (spec 5c) nor the individual certificate. ``neighbor_labels`` must hold
    each input's first ``min(k + max(e), n_train)`` neighbours (removals pull later ones into the window); see
    :func:`poisoncert.joint_split.knn_split_certificate` for the parameters, exactness flags and the worst-case
    label-level attack. Proof: ``docs/split_joint_proof.md``.
    """
    from .joint_split import knn_split_certificate

    return knn_split_certificate(neighbor_labels, y, e, k, n_classes, n_train, threat_model, time_limit=time_limit,
                                 node_limit=node_limit).accuracy
