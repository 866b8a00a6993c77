"""Vote matrices: from ordered neighbour labels to per-label counts, prediction and runner-up.

Every nearest-neighbour certificate in poisoncert is a function of a vote matrix ``votes`` of shape
``(n_test, n_classes)``: ``votes[i, l]`` is the number of neighbours of test input ``i`` with label index ``l``.
Ties between labels go to the **larger** label index (spec section 2), for prediction and runner-up alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np

from . import _jit  # noqa: F401 - numba's start-up without SciPy's linear algebra (before any kernel runs)
from ._validation import check_votes


def _argmax_larger_label(values: np.ndarray) -> np.ndarray:
    """Row-wise argmax that breaks ties toward the larger column index."""
    flipped = values[:, ::-1]
    return values.shape[1] - 1 - np.argmax(flipped, axis=1)


def predict(votes: np.ndarray) -> np.ndarray:
    """Predicted label index per row: most votes, ties to the larger label.

    Parameters
    ----------
    votes : ndarray of shape (n_test, n_classes), integer
        Neighbour vote counts.

    Returns
    -------
    ndarray of shape (n_test,), int64

    Examples
    --------
    >>> import numpy as np
    >>> predict(np.array([[3, 3, 1], [0, 2, 5], [0, 0, 0]]))
    array([1, 2, 2])
    """
    votes = check_votes(votes)
    return _argmax_larger_label(votes).astype(np.int64)


def runner_up(votes: np.ndarray, prediction: np.ndarray | None = None) -> np.ndarray:
    """Runner-up label per row: most votes among labels other than the prediction, ties to the larger label."""
    votes = check_votes(votes)
    if prediction is None:
        prediction = _argmax_larger_label(votes)
    masked = votes.astype(np.int64, copy=True)
    masked[np.arange(len(masked)), prediction] = np.iinfo(np.int64).min
    return _argmax_larger_label(masked).astype(np.int64)


def rival_counts(counts: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """``max over l != a of (s_l + [l > a])`` along the last axis: the count a rival label needs to beat ``a``.

    ``counts`` has shape (n, ..., n_classes) and ``prediction`` shape (n,); ``a`` keeps its prediction exactly
    while ``s_a >= rival``. Works for one vote matrix and for stacks of them (e.g. one per window length).
    """
    counts = np.asarray(counts, dtype=np.int64)
    a = np.asarray(prediction).reshape((-1,) + (1,) * (counts.ndim - 1))
    classes = np.arange(counts.shape[-1])
    rival = np.where(classes == a, np.iinfo(np.int64).min, counts + (classes > a))
    return rival.max(axis=-1)


def margin_terms(votes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prediction ``a``, runner-up ``b`` and the tie-aware margin ``s_a - s_b + [a > b]`` per row.

    The margin is the number of votes that must move for ``b`` to overtake ``a`` under the larger-label tie
    rule, counted so that ``ceil(margin / 2) - 1`` is the individual certified size of spec section 4.
    """
    votes = check_votes(votes).astype(np.int64, copy=False)
    a = _argmax_larger_label(votes).astype(np.int64)
    b = runner_up(votes, a)
    rows = np.arange(len(votes))
    margin = votes[rows, a] - votes[rows, b] + (a > b).astype(np.int64)
    return a, b, margin


def knn_votes_from_labels(
    neighbor_labels: np.ndarray, n_neighbors: int | Sequence[int], n_classes: int
) -> np.ndarray:
    """kNN vote matrices for one or many k from ordered neighbour labels, in one pass.

    Parameters
    ----------
    neighbor_labels : ndarray of shape (n_test, K), integer
        Column ``j`` holds the label index of each test input's ``(j+1)``-th nearest training example in the
        order of spec section 3 (``K = min(max k, n_train)``).
    n_neighbors : int or sequence of int
        The k values. A k larger than ``K`` uses all ``K`` columns (kNN with k >= n votes with everything).
    n_classes : int

    Returns
    -------
    ndarray of shape (n_test, n_classes) for a single k, or (len(k), n_test, n_classes) for a sequence.

    Examples
    --------
    >>> knn_votes_from_labels(np.array([[0, 1, 1, 2]]), [1, 3], 3).tolist()
    [[[1, 0, 0]], [[1, 2, 0]]]
    """
    labels = np.asarray(neighbor_labels)
    if labels.ndim != 2:
        raise ValueError(f"neighbor_labels must be 2-D (n_test, K), got shape {labels.shape}")
    single = np.isscalar(n_neighbors)
    ks = np.atleast_1d(np.asarray(n_neighbors, dtype=np.int64))
    if np.any(ks < 1):
        raise ValueError(f"every k must be >= 1, got {ks.tolist()}")
    if labels.dtype.kind not in "iu":
        labels = labels.astype(np.int64)
    n_test, width = labels.shape
    order = np.argsort(ks, kind="stable")
    stops = np.minimum(ks[order], width).astype(np.int64)
    out_sorted = np.zeros((len(ks), n_test, n_classes), dtype=np.int64)
    # The kernel reads the table in place (a column slice of a wider table is not copied) and checks each label it
    # counts, so a table is read once.
    if not _prefix_votes(labels, stops, out_sorted):
        raise ValueError(f"neighbor_labels must hold label indices in 0..{n_classes - 1}")
    out = np.empty_like(out_sorted)
    out[order] = out_sorted
    return out[0] if single else out


#: Interleaved histograms of :func:`_add_label_counts`.
_COUNT_LANES = 4


@numba.njit(inline="always")
def _add_label_counts(labels, start, stop, counts, lanes):  # pragma: no cover - compiled
    """counts[l] += #{start <= t < stop : labels[t] == l}, an entry outside ``0 .. len(counts) - 2`` counted in the
    last slot; ``lanes`` (``_COUNT_LANES`` x ``len(counts)``, zero) is left zero.

    Consecutive neighbours mostly share a label, so one histogram would chain nearly every increment through the
    same counter (a store-to-load dependency per label); four histograms, taken in turn, break that chain.
    """
    last = counts.shape[0] - 1
    t = start
    while t + _COUNT_LANES <= stop:
        for lane in range(_COUNT_LANES):
            label = labels[t + lane]
            lanes[lane, label if 0 <= label < last else last] += 1
        t += _COUNT_LANES
    while t < stop:
        label = labels[t]
        lanes[0, label if 0 <= label < last else last] += 1
        t += 1
    for slot in range(last + 1):
        for lane in range(_COUNT_LANES):
            counts[slot] += lanes[lane, slot]
            lanes[lane, slot] = 0


@numba.njit(parallel=True, cache=True, nogil=True)
def _prefix_votes(labels, stops, out):  # pragma: no cover - compiled
    """out[s, i, l] = label-l count among the first stops[s] columns of row i (stops ascending); rows in parallel.

    Returns False when a counted entry is not a label index in ``0 .. out.shape[2] - 1`` (``out`` is then void).
    """
    n_classes = out.shape[2]
    bad = 0
    for i in numba.prange(labels.shape[0]):
        counts = np.zeros(n_classes + 1, np.int64)  # the last slot collects out-of-range entries
        lanes = np.zeros((_COUNT_LANES, n_classes + 1), np.int64)
        row = labels[i]
        start = 0
        for s in range(stops.shape[0]):
            _add_label_counts(row, start, stops[s], counts, lanes)
            start = max(start, stops[s])
            out[s, i, :] = counts[:n_classes]
        bad += counts[n_classes]
    return bad == 0


def prefix_label_counts(neighbor_labels: np.ndarray, label: np.ndarray) -> np.ndarray:
    """``A_i(m)`` for m = 0..K: how many of the first m neighbours of input i carry ``label[i]``.

    Returns an int64 array of shape (n_test, K + 1) whose column 0 is zero.
    """
    labels = np.asarray(neighbor_labels)
    hits = labels == np.asarray(label)[:, None]
    out = np.zeros((labels.shape[0], labels.shape[1] + 1), dtype=np.int64)
    np.cumsum(hits, axis=1, out=out[:, 1:])
    return out
