"""Tests of the exact neighbour engine against a brute-force reference that follows spec sections 2 and 3."""

from __future__ import annotations

import functools
import hashlib
import itertools
import sys

import numpy as np
import pytest

from poisoncert.neighbours import (
    NeighbourIndex,
    knn_ordered_labels,
    label_table_dtype,
    radius_vote_counts,
    training_ranks,
)
from poisoncert.votes import knn_votes_from_labels

METRICS = ("l1", "l2", "cosine")
N_CLASSES = 3


# ----------------------------------------------------------------------------------------------------------------
# Reference: full distance matrix, then lexsort by (distance, -rank)
# ----------------------------------------------------------------------------------------------------------------


def reference_ranks(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spec section 2, written out: SHA-256 of (<f8 features, <i8 label), dense rank of the digest (big-endian)."""
    digests = []
    for row, label in zip(np.asarray(X, dtype=np.float64), np.asarray(y), strict=True):
        payload = b"".join(np.array([v + 0.0], dtype="<f8").tobytes() for v in row)  # -0.0 folded into 0.0
        payload += np.array([label], dtype="<i8").tobytes()
        digests.append(int.from_bytes(hashlib.sha256(payload).digest(), "big"))
    distinct = sorted(set(digests))
    position = {value: i for i, value in enumerate(distinct)}
    return np.array([position[d] for d in digests], dtype=np.int64)


def _unit(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm in float64, after dividing by their largest |entry| (no overflow)."""
    X = np.asarray(X, dtype=np.float64)
    X = X / np.abs(X).max(axis=1, keepdims=True)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def reference_distances(X_train: np.ndarray, X_test: np.ndarray, metric: str) -> np.ndarray:
    """Distances in the engine's dtype, summed feature by feature in column order (the documented definition)."""
    dtype = np.float32 if X_train.dtype == np.float32 else np.float64
    A = np.asarray(X_test, dtype=dtype)
    B = np.asarray(X_train, dtype=dtype)
    if metric == "cosine":
        A, B = _unit(A).astype(dtype), _unit(B).astype(dtype)
    D = np.zeros((len(A), len(B)), dtype=dtype)
    for f in range(A.shape[1]):
        if metric == "l1":
            D += np.abs(A[:, f, None] - B[None, :, f])
        elif metric == "l2":
            diff = A[:, f, None] - B[None, :, f]
            D += diff * diff
        else:
            D += A[:, f, None] * B[None, :, f]
    if metric == "l2":
        D = np.sqrt(D)
    elif metric == "cosine":
        D = np.maximum(dtype(1) - D, dtype(0))
    return D


def reference_order(X_train, y_train, X_test, metric):
    D = reference_distances(X_train, X_test, metric)
    rank = reference_ranks(X_train, y_train)
    # Equal rank means identical examples; order those by row so indices are comparable with the engine.
    rows = np.arange(len(X_train))
    order = np.stack([np.lexsort((rows, -rank, D[i])) for i in range(len(X_test))])
    return order, D


def tie_heavy_data(seed: int, n_train: int = 60, n_test: int = 23, n_features: int = 3, dtype=np.float64):
    """Small non-negative integer features: many exactly equal distances and duplicate training examples."""
    rng = np.random.default_rng(seed)
    X_train = rng.integers(0, 3, size=(n_train, n_features)).astype(dtype)
    y_train = rng.integers(0, N_CLASSES, size=n_train)
    X_test = rng.integers(0, 3, size=(n_test, n_features)).astype(dtype)
    # Cosine needs non-zero rows.
    X_train[X_train.sum(axis=1) == 0, 0] = 1
    X_test[X_test.sum(axis=1) == 0, 0] = 1
    return X_train, y_train, X_test


# ----------------------------------------------------------------------------------------------------------------
# Ranks
# ----------------------------------------------------------------------------------------------------------------


def test_training_ranks_match_the_spec_definition():
    X, y, _ = tie_heavy_data(0)
    np.testing.assert_array_equal(training_ranks(X, y), reference_ranks(X, y))


def test_training_ranks_ignore_row_position_and_dtype():
    X, y, _ = tie_heavy_data(1)
    ranks = training_ranks(X, y)
    perm = np.random.default_rng(2).permutation(len(X))
    np.testing.assert_array_equal(training_ranks(X[perm], y[perm]), ranks[perm])
    np.testing.assert_array_equal(training_ranks(X.astype(np.float32), y), ranks)
    np.testing.assert_array_equal(training_ranks(X.astype(np.int64), y.astype(np.int32)), ranks)


def test_training_ranks_equal_only_for_identical_examples():
    X = np.array([[0.0, 1.0], [0.0, 1.0], [-0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    y = np.array([0, 0, 0, 1, 0])
    r = training_ranks(X, y)
    assert r[0] == r[1] == r[2]  # identical (-0.0 and 0.0 are the same feature value)
    assert len({r[0], r[3], r[4]}) == 3  # the label and the features both enter the hash
    assert sorted(set(r.tolist())) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------------------------
# Agreement with the brute-force reference
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_ordered_neighbours_match_reference(metric, dtype, chunk_size):
    X_train, y_train, X_test = tie_heavy_data(3, dtype=dtype)
    order, D = reference_order(X_train, y_train, X_test, metric)
    index = NeighbourIndex(X_train, y_train, metric=metric, backend="numba", chunk_size=chunk_size)
    for k in (1, 5, 17, len(X_train)):
        labels = index.ordered_labels(X_test, k)
        assert labels.shape == (len(X_test), k)
        np.testing.assert_array_equal(labels, y_train[order[:, :k]])
        indices, distances = index.ordered_neighbors(X_test, k)
        np.testing.assert_array_equal(indices, order[:, :k])
        np.testing.assert_array_equal(distances, np.take_along_axis(D, order[:, :k], axis=1))
        assert distances.dtype == dtype


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_ordered_labels_match_reference_on_real_valued_features(metric, chunk_size):
    # 19 features: the kernel's groups of eight features (twice) and the one-by-one remainder must give the
    # reference's feature-by-feature sums bit for bit.
    rng = np.random.default_rng(4)
    X_train = rng.random((300, 19)).astype(np.float32)
    y_train = rng.integers(0, N_CLASSES, 300)
    X_test = rng.random((19, 19)).astype(np.float32)
    order, D = reference_order(X_train, y_train, X_test, metric)
    index = NeighbourIndex(X_train, y_train, metric=metric, chunk_size=chunk_size, backend="numba")
    labels = index.ordered_labels(X_test, 120)
    np.testing.assert_array_equal(labels, y_train[order[:, :120]])
    indices, distances = index.ordered_neighbors(X_test, 120)
    np.testing.assert_array_equal(indices, order[:, :120])
    np.testing.assert_array_equal(distances, np.take_along_axis(D, order[:, :120], axis=1))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_radius_votes_match_reference(metric, dtype, chunk_size):
    X_train, y_train, X_test = tie_heavy_data(5, dtype=dtype)
    D = reference_distances(X_train, X_test, metric)
    # Radii that coincide with attained distances test the "<=" boundary; unsorted with a duplicate on purpose.
    attained = np.unique(D[D > 0])
    radii = [float(attained[3]), float(attained[0]), 2.0, float(attained[0]), 1e9]
    votes = NeighbourIndex(X_train, y_train, metric=metric, backend="numba", chunk_size=chunk_size).radius_votes(
        X_test, radii, N_CLASSES
    )
    assert votes.shape == (len(radii), len(X_test), N_CLASSES) and votes.dtype == np.int64
    for position, r in enumerate(radii):
        expected = np.stack([np.bincount(y_train[D[i] <= r], minlength=N_CLASSES) for i in range(len(X_test))])
        np.testing.assert_array_equal(votes[position], expected)


def test_radius_is_compared_as_a_real_number_in_float32():
    # The float32 distance float32(0.1) is slightly above the real 0.1: outside r = 0.1, inside r = float32(0.1).
    X_train = np.zeros((1, 1), dtype=np.float32)
    X_test = np.full((1, 1), 0.1, dtype=np.float32)
    index = NeighbourIndex(X_train, np.array([0]), backend="numba")
    votes = index.radius_votes(X_test, [0.1, float(np.float32(0.1))], 2)
    assert votes[:, 0, 0].tolist() == [0, 1]


def test_k_larger_than_training_set_returns_every_example():
    X_train, y_train, X_test = tie_heavy_data(6, n_train=9)
    labels = NeighbourIndex(X_train, y_train, backend="numba").ordered_labels(X_test, 50)
    assert labels.shape == (len(X_test), 9)
    np.testing.assert_array_equal(np.sort(labels, axis=1), np.tile(np.sort(y_train), (len(X_test), 1)))


def test_shuffling_training_rows_does_not_change_labels_or_distances():
    X_train, y_train, X_test = tie_heavy_data(7, n_train=80)
    before = NeighbourIndex(X_train, y_train, backend="numba")
    perm = np.random.default_rng(8).permutation(len(X_train))
    after = NeighbourIndex(X_train[perm], y_train[perm], backend="numba")
    for k in (3, 40):
        np.testing.assert_array_equal(after.ordered_labels(X_test, k), before.ordered_labels(X_test, k))
        indices_before, distances_before = before.ordered_neighbors(X_test, k)
        indices_after, distances_after = after.ordered_neighbors(X_test, k)
        np.testing.assert_array_equal(distances_after, distances_before)
        # Same examples in the same order (up to swapping identical duplicates).
        np.testing.assert_array_equal(X_train[perm][indices_after], X_train[indices_before])


def test_memory_budget_and_chunking_do_not_change_results():
    X_train, y_train, X_test = tie_heavy_data(9, n_test=31)
    full = NeighbourIndex(X_train, y_train, backend="numba")
    tiny = NeighbourIndex(X_train, y_train, backend="numba", max_memory_mb=0.001, progress=True)
    assert tiny._resolved_chunk_size(len(X_test), 10) == 1
    assert full._resolved_chunk_size(len(X_test), 10) == len(X_test)
    np.testing.assert_array_equal(tiny.ordered_labels(X_test, 10), full.ordered_labels(X_test, 10))
    np.testing.assert_array_equal(tiny.radius_votes(X_test, [1, 2], 3), full.radius_votes(X_test, [1, 2], 3))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("max_memory_mb", [512, 0.002])
def test_fused_search_matches_reference(metric, dtype, max_memory_mb):
    # The one-pass kernel (distances, radius counts and selection per cache-sized block of test rows) against the
    # reference, over several blocks and a partial one, and with blocks cut down to single rows by the budget.
    # Radius counts come from the first k when the k-th neighbour lies beyond every radius, else from a pass over
    # the row: k = 3 takes the pass, k = 70 (every example) the first k, k = 40 either, row by row.
    X_train, y_train, X_test = tie_heavy_data(31, n_train=70, n_test=53, dtype=dtype)
    order, D = reference_order(X_train, y_train, X_test, metric)
    index = NeighbourIndex(X_train, y_train, metric=metric, backend="numba", max_memory_mb=max_memory_mb)
    radii = [0.5, 2.0, 1.0]
    for k in (3, 40, 70):
        labels, votes = index.search(X_test, n_neighbors=k, radii=radii, n_classes=N_CLASSES)
        np.testing.assert_array_equal(labels, y_train[order[:, :k]])
        for position, r in enumerate(radii):
            cast = _radius_in(r, dtype)
            expected = np.stack([np.bincount(y_train[D[i] <= cast], minlength=N_CLASSES)
                                 for i in range(len(X_test))])
            np.testing.assert_array_equal(votes[position], expected)


def _radius_in(r: float, dtype) -> float:
    # The engine compares float32 distances with the largest float32 not above r (the same test as d <= r).
    if dtype != np.float32:
        return r
    cast = np.float32(r)
    return np.nextafter(cast, np.float32(-np.inf)) if float(cast) > r else cast


def test_chunk_size_derived_from_budget_scales_with_training_set():
    rng = np.random.default_rng(10)
    index = NeighbourIndex(rng.random((1000, 2)), rng.integers(0, 2, 1000), backend="numba", max_memory_mb=1)
    chunk = index._resolved_chunk_size(10_000, 10)
    assert 1 <= chunk < 10_000
    assert chunk * 1000 * 8 <= 2**20  # the distance rows alone fit the budget


# ----------------------------------------------------------------------------------------------------------------
# Sweeps
# ----------------------------------------------------------------------------------------------------------------


def test_k_sweep_equals_individual_calls():
    X_train, y_train, X_test = tie_heavy_data(11)
    index = NeighbourIndex(X_train, y_train, backend="numba", chunk_size=6)
    ks = [1, 2, 7, 30, 60]
    sweep = knn_votes_from_labels(index.ordered_labels(X_test, max(ks)), ks, N_CLASSES)
    for position, k in enumerate(ks):
        single = index.ordered_labels(X_test, k)
        np.testing.assert_array_equal(index.ordered_labels(X_test, max(ks))[:, :k], single)
        np.testing.assert_array_equal(sweep[position], knn_votes_from_labels(single, k, N_CLASSES))


def test_radius_sweep_equals_individual_calls():
    X_train, y_train, X_test = tie_heavy_data(12)
    index = NeighbourIndex(X_train, y_train, backend="numba")
    radii = [3.0, 0.5, 1.0, 2.0, 1.0, 4.0]
    sweep = index.radius_votes(X_test, radii, N_CLASSES)
    for position, r in enumerate(radii):
        np.testing.assert_array_equal(sweep[position], index.radius_votes(X_test, r, N_CLASSES)[0])


@pytest.mark.parametrize("n_radii", [1, 64, 65, 200])
def test_many_radii_match_reference(n_radii):
    # Up to 64 radii and beyond take different binning code paths; both must agree with the reference.
    X_train, y_train, X_test = tie_heavy_data(22, dtype=np.float32)
    D = reference_distances(X_train, X_test, "l1")
    attained = np.unique(D)
    radii = np.concatenate([attained[attained > 0], np.linspace(0.25, 7.0, max(n_radii, 1))])[:n_radii]
    radii = np.random.default_rng(23).permutation(radii)
    votes = NeighbourIndex(X_train, y_train, backend="numba").radius_votes(X_test, radii, N_CLASSES)
    for position, r in enumerate(radii):
        expected = np.stack([np.bincount(y_train[D[i] <= r], minlength=N_CLASSES) for i in range(len(X_test))])
        np.testing.assert_array_equal(votes[position], expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_radius_counts_from_the_first_k_match_reference_at_attained_radii(dtype):
    # With every example among the first k, the counts come from the sorted first k (a binary search per radius
    # and interleaved label histograms): radii equal to attained distances, repeated radii and a radius below
    # every distance must count exactly the examples at distance <= r.
    X_train, y_train, X_test = tie_heavy_data(24, dtype=dtype)
    D = reference_distances(X_train, X_test, "l1")
    attained = np.unique(D)
    radii = np.concatenate([attained[1:40:3], attained[5:6], [attained[1] / 2], [float(attained.max()) + 1]])
    radii = np.random.default_rng(25).permutation(radii)
    index = NeighbourIndex(X_train, y_train, backend="numba")
    labels, votes = index.search(X_test, n_neighbors=len(X_train), radii=radii, n_classes=N_CLASSES)
    for position, r in enumerate(radii):
        cast = _radius_in(r, dtype)
        expected = np.stack([np.bincount(y_train[D[i] <= cast], minlength=N_CLASSES) for i in range(len(X_test))])
        np.testing.assert_array_equal(votes[position], expected)
    np.testing.assert_array_equal(votes, index.radius_votes(X_test, radii, N_CLASSES))  # the pass over each row


def test_convenience_functions_equal_the_index():
    X_train, y_train, X_test = tie_heavy_data(13)
    index = NeighbourIndex(X_train, y_train, metric="l2", backend="numba")
    np.testing.assert_array_equal(
        knn_ordered_labels(X_train, y_train, X_test, 9, metric="l2", backend="numba"),
        index.ordered_labels(X_test, 9),
    )
    np.testing.assert_array_equal(
        radius_vote_counts(X_train, y_train, X_test, [1.5], N_CLASSES, metric="l2", backend="numba"),
        index.radius_votes(X_test, [1.5], N_CLASSES),
    )


# ----------------------------------------------------------------------------------------------------------------
# Torch backend
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("integer_features", [True, False])
def test_torch_backend_equals_numba_backend(metric, dtype, integer_features):
    pytest.importorskip("torch")
    if integer_features:
        X_train, y_train, X_test = tie_heavy_data(14, n_train=120, n_test=29, dtype=dtype)
    else:
        rng = np.random.default_rng(15)
        X_train = rng.random((150, 6)).astype(dtype)
        y_train = rng.integers(0, N_CLASSES, 150)
        X_test = rng.random((29, 6)).astype(dtype)
    numba_index = NeighbourIndex(X_train, y_train, metric=metric, backend="numba", chunk_size=8)
    torch_index = NeighbourIndex(X_train, y_train, metric=metric, backend="torch", chunk_size=5)
    for k in (1, 13, 400):
        np.testing.assert_array_equal(torch_index.ordered_labels(X_test, k), numba_index.ordered_labels(X_test, k))
        for got, expected in zip(
            torch_index.ordered_neighbors(X_test, k), numba_index.ordered_neighbors(X_test, k), strict=True
        ):
            np.testing.assert_array_equal(got, expected)
    _, distances = numba_index.ordered_neighbors(X_test, 1)
    radii = [0.5, 1.0, 2.0, float(distances[0, 0]) or 1.0, 3.0]
    np.testing.assert_array_equal(
        torch_index.radius_votes(X_test, radii, N_CLASSES), numba_index.radius_votes(X_test, radii, N_CLASSES)
    )


@pytest.mark.parametrize("n_labels", [2, 200, 40_000])
def test_torch_label_tables_match_numba_in_every_table_dtype(n_labels):
    """The torch backend looks the labels up where the distances are, in the table's own dtype (int8, int16, int32)."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(n_labels)
    n_train = max(300, n_labels)
    X_train = rng.integers(0, 4, (n_train, 3)).astype(np.float32)  # many distance ties
    y_train = np.arange(n_train) % n_labels * 7 - 3  # label values, not indices
    X_test = rng.integers(0, 4, (17, 3)).astype(np.float32)
    numba_index = NeighbourIndex(X_train, y_train, backend="numba")
    torch_index = NeighbourIndex(X_train, y_train, backend="torch", chunk_size=6)
    expected = numba_index.ordered_labels(X_test, 250)
    got = torch_index.ordered_labels(X_test, 250)
    np.testing.assert_array_equal(got, expected)
    # Looked up on the device in the table's own dtype: 1, 2 or 4 bytes per entry to the host, not 8.
    torch, _, device = torch_index._torch_state()
    table_dtype = label_table_dtype(n_labels - 1)
    assert got.dtype == table_dtype
    assert torch_index._torch_table_labels(torch, device).dtype == getattr(torch, table_dtype.name)


def test_auto_backend_is_numba_without_a_gpu():
    X_train, y_train, _ = tie_heavy_data(16)
    index = NeighbourIndex(X_train, y_train)
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    assert index.backend == ("torch" if gpu else "numba")


def test_missing_torch_gives_install_hint(monkeypatch):
    X_train, y_train, _ = tie_heavy_data(17)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match=r"pip install poisoncert\[torch\]"):
        NeighbourIndex(X_train, y_train, backend="torch")


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_index():
    X_train, y_train, X_test = tie_heavy_data(18)
    return NeighbourIndex(X_train, y_train, backend="numba"), X_train, y_train, X_test


@pytest.mark.parametrize("k, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_k_raises(small_index, k, error):
    index, _, _, X_test = small_index
    with pytest.raises(error, match="n_neighbors"):
        index.ordered_labels(X_test, k)


@pytest.mark.parametrize("radii", [0.0, [-1.0], [1.0, float("nan")], [float("inf")], []])
def test_bad_radii_raise(small_index, radii):
    index, _, _, X_test = small_index
    with pytest.raises(ValueError, match="radi"):
        index.radius_votes(X_test, radii, N_CLASSES)


def test_label_outside_n_classes_raises(small_index):
    index, _, _, X_test = small_index
    with pytest.raises(ValueError, match="n_classes"):
        index.radius_votes(X_test, [1.0], 2)


def test_bad_test_features_raise(small_index):
    index, _, _, X_test = small_index
    with pytest.raises(ValueError, match="features"):
        index.ordered_labels(X_test[:, :2], 3)
    bad = X_test.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        index.ordered_labels(bad, 3)
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.radius_votes(bad, [1.0], N_CLASSES)
    with pytest.raises(ValueError, match="empty"):
        index.ordered_labels(X_test[:0], 3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"metric": "hamming"}, ValueError, "unknown metric"),
        ({"backend": "gpu"}, ValueError, "unknown backend"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"max_memory_mb": 0}, ValueError, "max_memory_mb"),
        ({"max_memory_mb": float("nan")}, ValueError, "max_memory_mb"),
    ],
)
def test_bad_options_raise(kwargs, error, match):
    X_train, y_train, _ = tie_heavy_data(19)
    with pytest.raises(error, match=match):
        NeighbourIndex(X_train, y_train, **kwargs)


def test_bad_training_data_raise():
    X_train, y_train, _ = tie_heavy_data(20)
    with pytest.raises(ValueError, match="empty"):
        NeighbourIndex(X_train[:0], y_train[:0])
    with pytest.raises(ValueError, match="entries"):
        NeighbourIndex(X_train, y_train[:-1])
    with pytest.raises(ValueError, match="NaN or infinite labels"):
        NeighbourIndex(X_train, np.where(y_train == 0, np.nan, y_train))
    with pytest.raises(TypeError, match="integer or string labels"):
        NeighbourIndex(X_train, np.full(len(y_train), 1 + 2j))
    bad = X_train.copy()
    bad[1, 1] = -np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        NeighbourIndex(bad, y_train)
    zero_row = X_train.copy()
    zero_row[0] = 0
    with pytest.raises(ValueError, match="cosine"):
        NeighbourIndex(zero_row, y_train, metric="cosine")


def test_results_are_identical_across_runs():
    rng = np.random.default_rng(21)
    X_train = rng.random((500, 5)).astype(np.float32)
    y_train = rng.integers(0, 4, 500)
    X_test = rng.random((40, 5)).astype(np.float32)
    first = NeighbourIndex(X_train, y_train, backend="numba").ordered_neighbors(X_test, 100)
    second = NeighbourIndex(X_train.copy(), y_train.copy(), backend="numba", chunk_size=3).ordered_neighbors(
        X_test, 100
    )
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("values", [np.array([-1, 1]), np.array(["no", "yes"]), np.array([3, 10])])
def test_index_and_estimator_order_ties_alike_for_any_label_values(values):
    """One canonical encoding, the label *values*: NeighbourIndex on values, the estimator (which maps labels to
    classes_) and the content-hash ranks all agree, so the tie order never depends on the path taken."""
    from poisoncert import CertifiedKNeighborsClassifier

    X_train, y_index, X_test = tie_heavy_data(11, n_train=60)
    y_values = values[y_index % 2]
    index = NeighbourIndex(X_train, y_values, backend="numba")
    model = CertifiedKNeighborsClassifier(n_neighbors=20, backend="numba").fit(X_train, y_values)
    np.testing.assert_array_equal(index.classes_, model.classes_)
    np.testing.assert_array_equal(index.ranks_, model.index_.ranks_)
    np.testing.assert_array_equal(index.ranks_, training_ranks(X_train, y_values))
    np.testing.assert_array_equal(index.ordered_labels(X_test, 60), model.neighbor_labels(X_test, 60))
    np.testing.assert_array_equal(index.ordered_neighbors(X_test, 60)[0],
                                  model.index_.ordered_neighbors(X_test, 60)[0])
    # The hashes use the values: labels 3 and 10 rank differently from their indices 0 and 1.
    if values.tolist() == [3, 10]:
        assert not np.array_equal(index.ranks_, training_ranks(X_train, y_index % 2)), "values, not indices"


def test_cached_search_equals_a_fresh_search_and_keys_on_the_data(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    X = rng.integers(0, 4, (80, 3)).astype(np.float32)  # many distance ties: the tie order must survive too
    y = rng.integers(0, 3, 80)
    Q = rng.integers(0, 4, (25, 3)).astype(np.float32)
    index = NeighbourIndex(X, y, backend="numba")
    fresh = index.search(Q, n_neighbors=30, radii=[1.0, 2.5], n_classes=3)
    labels, votes, from_cache = index.cached_search(Q, 30, [1.0, 2.5], 3, cache_dir=tmp_path)
    assert not from_cache
    monkeypatch.setattr(NeighbourIndex, "search", lambda *args, **kwargs: pytest.fail("searched again"))
    again = NeighbourIndex(X.copy(), y.copy(), backend="numba").cached_search(Q.copy(), 30, [1.0, 2.5], 3,
                                                                            cache_dir=tmp_path)
    assert again[2]
    for got in ((labels, votes), again[:2]):
        np.testing.assert_array_equal(got[0], fresh[0])
        np.testing.assert_array_equal(got[1], fresh[1])
        assert got[0].dtype == fresh[0].dtype
    # Any change of the data or the arguments is another entry: each of these must search.
    changed_X = X.copy()
    changed_X[0, 0] += 1
    changed_y = y.copy()
    changed_y[0] = (y[0] + 1) % 3
    for call in (lambda: index.cached_search(Q[:-1], 30, [1.0, 2.5], 3, cache_dir=tmp_path),
                 lambda: index.cached_search(Q, 29, [1.0, 2.5], 3, cache_dir=tmp_path),
                 lambda: index.cached_search(Q, 30, [1.0], 3, cache_dir=tmp_path),
                 lambda: NeighbourIndex(changed_X, y).cached_search(Q, 30, None, None, cache_dir=tmp_path),
                 lambda: NeighbourIndex(X, changed_y).cached_search(Q, 30, None, None, cache_dir=tmp_path),
                 lambda: NeighbourIndex(X, y, metric="l2").cached_search(Q, 30, None, None, cache_dir=tmp_path)):
        with pytest.raises(pytest.fail.Exception, match="searched again"):
            call()


def test_cached_search_survives_a_cache_that_cannot_be_written(tmp_path, monkeypatch):
    import errno

    from poisoncert import cache

    rng = np.random.default_rng(4)
    X, y, Q = rng.normal(size=(40, 3)), rng.integers(0, 2, 40), rng.normal(size=(6, 3))
    index = NeighbourIndex(X, y, backend="numba")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache, "save_npz", full_disk)
    with pytest.warns(RuntimeWarning, match="not cached.*No space left"):
        labels, votes, from_cache = index.cached_search(Q, 10, [1.0], 2, cache_dir=tmp_path)
    assert not from_cache and votes is not None
    np.testing.assert_array_equal(labels, index.ordered_labels(Q, 10))


def test_cached_search_gives_the_classifier_s_own_tables_for_cosine(tmp_path):
    """Regression (review): the cache searched rows it had already made unit length, and normalising twice moved
    the last bits, so the certified neighbours were not the classifier's. Near-identical rows, distances ~1e-16."""
    X = np.array([[-1.13948128583287, -2.3681708810941697, 0.6068921888261192],
                  [-1.1394812961422474, -2.3681708035210596, 0.6068921343502095],
                  [-1.139481107610607, -2.368170705061478, 0.6068920551530653],
                  [-1.1394811867949461, -2.3681708051255725, 0.6068921428382499],
                  [-1.1394812090463076, -2.368170728571609, 0.606892020618209],
                  [-1.1394811617865195, -2.3681706885475937, 0.6068921134712584],
                  [-1.139480985017699, -2.3681708797161574, 0.6068921632078629],
                  [-1.1394811867949461, -2.3681708051255725, 0.6068921428382499],
                  [-1.1394811867949461, -2.3681708051255725, 0.6068921428382499],
                  [-1.1394811867949461, -2.3681708051255725, 0.6068921428382499],
                  [-1.1394811043106101, -2.3681707873195643, 0.6068921661703206],
                  [-1.1394811867949461, -2.3681708051255725, 0.6068921428382499]])
    y = np.array([1, 1, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1])
    q = X[3:4].copy()
    index = NeighbourIndex(X, y, metric="cosine", backend="numba")
    fresh = index.search(q, n_neighbors=12, radii=[1e-7], n_classes=2)
    for _ in range(2):  # the miss, then the hit
        labels, votes, _ = index.cached_search(q, 12, [1e-7], 2, cache_dir=tmp_path)
        np.testing.assert_array_equal(labels, fresh[0])
        np.testing.assert_array_equal(votes, fresh[1])
    rng = np.random.default_rng(5)
    X_many = rng.normal(size=(300, 4)).astype(np.float32)
    Q_many = rng.normal(size=(400, 4)).astype(np.float32)
    many = NeighbourIndex(X_many, rng.integers(0, 3, 300), metric="cosine", backend="numba")
    cached = many.cached_search(Q_many, 50, cache_dir=tmp_path)[0]
    np.testing.assert_array_equal(cached, many.ordered_labels(Q_many, 50))


def test_a_cache_entry_without_the_tables_asked_for_is_searched_again(tmp_path):
    from poisoncert._io import save_npz

    rng = np.random.default_rng(6)
    X, y, Q = rng.normal(size=(50, 3)), rng.integers(0, 2, 50), rng.normal(size=(7, 3))
    index = NeighbourIndex(X, y, backend="numba")
    index.cached_search(Q, 10, [1.0], 2, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("arrays/*/*.npz")
    save_npz(entry, labels=np.zeros((7, 10), np.int16))  # the votes are gone
    labels, votes, from_cache = index.cached_search(Q, 10, [1.0], 2, cache_dir=tmp_path)
    assert not from_cache
    np.testing.assert_array_equal(votes, index.radius_votes(Q, [1.0], 2))
    np.testing.assert_array_equal(labels, index.ordered_labels(Q, 10))
    assert index.cached_search(Q, 10, [1.0], 2, cache_dir=tmp_path)[2]  # the entry was replaced
    with pytest.raises(TypeError, match="n_neighbors must be an integer"):
        index.cached_search(Q, 2.7, cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Selection of a row's first k (the kernel under every search)
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def _sampled_attempt():  # type: ignore[no-untyped-def]
    import numba

    from poisoncert import neighbours

    @numba.njit
    def attempt(bits, k, out):  # pragma: no cover - compiled
        return neighbours._select_row_sampled(bits, k, neighbours._select_scratch(k, bits.shape[0], bits.dtype), out)

    return attempt


def _sampled_path_taken(bits: np.ndarray, k: int) -> bool:
    return bool(_sampled_attempt()(bits, k, np.empty(k, np.int64)))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 7, 50, 333, 1999, 2000])
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_selection_gives_the_first_k_by_value_then_position(seed: int, k: int, dtype) -> None:
    """Rows of 2,000 small integers (many ties): both selections (sampled threshold, and the exact fallback where
    the row's first sixteenth is unrepresentative) return the reference order. The sort of the winners packs key
    and position into one word where the keys span at most 31 bits; 64-bit rows spanning more take the unpacked
    sort."""
    from poisoncert.neighbours import _select_numba

    rng = np.random.default_rng(seed)
    n = 2000
    spans = [[3], [40], [5000], [2**30]] + ([[2**31 + 5], [2**62]] if dtype == np.int64 else [])
    rows = rng.integers(0, spans, size=(len(spans), n)).astype(dtype)
    skewed = rng.integers(10, 50, size=(2, n)).astype(dtype)
    skewed[:, : n // 16] = rng.integers(0, 3, size=(2, n // 16))  # a sample far below the rest of its row
    # Key spans of 2 to 62 bits: the packed sort's one, two (2**26: its widest histograms) and three passes.
    two_passes = np.random.default_rng(seed + 100).integers(0, [[2**20], [2**26]], size=(2, n)).astype(dtype)
    rows = np.vstack([rows, two_passes, skewed])
    out = np.empty((len(rows), k), np.int64)
    _select_numba(rows, k, out)
    for row, got in zip(rows, out, strict=True):
        np.testing.assert_array_equal(got, np.lexsort((np.arange(n), row))[:k])
    if k in (50, 333):  # both paths are exercised: sampled on the random rows, exact on the skewed ones
        assert _sampled_path_taken(rows[1], k) and not _sampled_path_taken(rows[-1], k)


@functools.cache
def _labels_attempt():  # type: ignore[no-untyped-def]
    import numba

    from poisoncert import neighbours

    @numba.njit
    def attempt(bits, k, labels, label_bits, out, keys):  # pragma: no cover - compiled
        scratch = neighbours._select_scratch(k, bits.shape[0], bits.dtype)
        outcome = neighbours._select_labels_sampled(bits, k, labels, label_bits, scratch,
                                                    neighbours._label_scratch(k, bits.shape[0]), out, True)
        keys[:] = scratch[1][:k]
        return outcome

    return attempt


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 50, 333, 2000])
@pytest.mark.parametrize("n_labels", [2, 10, 128])
def test_label_selection_in_32_bit_words_gives_the_labels_of_the_first_k(seed: int, k: int, n_labels: int) -> None:
    """The fused search's selection of labels (key and label in one 32-bit word) against the reference order by
    (value, position), on rows with many ties (the stable sort must keep position order among equal keys); where
    the sampled threshold falls short or a key and label need more than 32 bits it says so and writes nothing."""
    from poisoncert.neighbours import _ESTIMATE_SHORT, _KEYS_TOO_WIDE, _SELECTED, _key_bits

    rng = np.random.default_rng(seed)
    n = 2001  # a partial last word of flags
    labels = rng.integers(0, n_labels, n).astype(np.int32)
    label_bits = _key_bits(0, n_labels - 1)
    rows = rng.integers(0, [[3], [40], [5000], [2**20], [2**26], [2**31 - 1]], size=(6, n)).astype(np.int32)
    skewed = rng.integers(10, 50, size=n).astype(np.int32)
    skewed[: n // 16] = rng.integers(0, 3, size=n // 16)  # a sample far below the rest of its row
    wide = rng.integers(2**30, 2**31 - 1, size=n).astype(np.int32)
    wide[::50] = rng.integers(0, 8, size=len(wide[::50]))  # the first k span 30 bits and more
    rows = [*rows, skewed, wide]
    for row in rows:
        out = np.full(k, -1, np.int8)
        keys = np.empty(k, np.int32)
        outcome = _labels_attempt()(row, k, labels, label_bits, out, keys)
        order = np.lexsort((np.arange(n), row))[:k]
        sampled = _sampled_path_taken(row, k)
        if not sampled:
            assert outcome == _ESTIMATE_SHORT
        elif outcome == _KEYS_TOO_WIDE:
            # Only a row whose candidates need more key bits than the labels leave (of 32) is refused.
            assert int(row.max()) - int(row.min()) >= 1 << (32 - label_bits - 1)
        else:
            assert outcome == _SELECTED
            np.testing.assert_array_equal(out, labels[order])
            np.testing.assert_array_equal(keys, row[order])
        if outcome != _SELECTED:
            assert (out == -1).all()
    if k in (50, 333):  # every outcome is exercised: a wide row is refused unless one label bit leaves 31 for keys
        outcomes = {int(_labels_attempt()(row, k, labels, label_bits, np.empty(k, np.int8), np.empty(k, np.int32)))
                    for row in rows}
        assert outcomes == {_SELECTED, _ESTIMATE_SHORT} | ({_KEYS_TOO_WIDE} if label_bits > 1 else set())


@pytest.mark.parametrize("n_labels", [1, 10, 128, 129])
def test_fused_search_of_a_large_training_set_matches_reference(n_labels: int) -> None:
    """Where the sampled selection applies (a training set large beside k), the fused search's labels, from 32-bit
    words for up to 128 labels and from positions beyond, equal the reference order; so do its radius counts."""
    rng = np.random.default_rng(n_labels)
    X_train = rng.integers(0, 6, size=(3000, 3)).astype(np.float32)
    y_train = rng.integers(0, n_labels, 3000)
    X_test = rng.integers(0, 6, size=(37, 3)).astype(np.float32)
    order, D = reference_order(X_train, y_train, X_test, "l1")
    index = NeighbourIndex(X_train, y_train, backend="numba")
    classes = np.unique(y_train)
    for k in (40, 400):
        labels, votes = index.search(X_test, n_neighbors=k, radii=[2.0], n_classes=len(classes))
        np.testing.assert_array_equal(classes[labels], y_train[order[:, :k]])
        expected = np.stack([np.bincount(np.searchsorted(classes, y_train[D[i] <= 2.0]), minlength=len(classes))
                             for i in range(len(X_test))])
        np.testing.assert_array_equal(votes[0], expected)


@functools.cache
def _labels_rows():  # type: ignore[no-untyped-def]
    import numba

    from poisoncert import neighbours

    @numba.njit
    def select_rows(rows, k, labels, label_bits, out, keys, outcomes):  # pragma: no cover - compiled
        # One set of buffers for every row, as each worker of the fused search keeps them, filled with garbage first.
        scratch = neighbours._select_scratch(k, rows.shape[1], rows.dtype)
        label_scratch = neighbours._label_scratch(k, rows.shape[1])
        label_scratch[0][:] = np.uint32(0xDEADBEEF)
        label_scratch[1][:] = np.uint32(0xDEADBEEF)
        for i in range(rows.shape[0]):
            scratch[1][:] = -7
            outcomes[i] = neighbours._select_labels_sampled(rows[i], k, labels, label_bits, scratch, label_scratch,
                                                            out[i], True)
            keys[i] = scratch[1][:k]

    return select_rows


def _expected_outcome(row: np.ndarray, k: int, label_bits: int) -> int:
    """The documented decision, written out: threshold from the first sixteenth, count, key width."""
    from poisoncert.neighbours import _ESTIMATE_SHORT, _KEYS_TOO_WIDE, _SAMPLE_SHARE, _SELECTED

    expected = k // _SAMPLE_SHARE
    rank = expected + 3 * int(np.sqrt(expected)) + 8
    if rank > len(row) // _SAMPLE_SHARE:
        return _ESTIMATE_SHORT
    threshold = int(np.sort(row[: len(row) // _SAMPLE_SHARE])[rank - 1])
    count = int((row <= threshold).sum())
    if count < k or count > 2 * k + 1024:
        return _ESTIMATE_SHORT
    return _KEYS_TOO_WIDE if (threshold - int(row.min())).bit_length() + label_bits > 32 else _SELECTED


@pytest.mark.parametrize("label_bits", range(8))
@pytest.mark.parametrize("n", [128, 191, 192, 3000, 3008])
def test_label_words_at_the_32_bit_boundary_and_with_reused_buffers(label_bits: int, n: int) -> None:
    """Keys spanning exactly 32 - label_bits bits (the word's top bit set) are selected, one bit more is refused; a
    single class (label_bits 0) and 128 classes; rows of whole and partial flag words; buffers reused across rows.
    (Written by a helper session's review.)"""
    from poisoncert.neighbours import _SELECTED

    rng = np.random.default_rng(label_bits * 7919 + n)
    k = max(1, n // 8)
    labels = rng.integers(0, 1 << label_bits, n).astype(np.int32)
    labels[-1] = (1 << label_bits) - 1
    rows = []
    for extra in (-1, 0, 1):
        span = min((1 << (32 - label_bits)) - 1 + extra, 2**31 - 1)
        row = np.full(n, 2**31 - 1, np.int64)
        chosen = rng.random(n) < 0.4
        row[chosen] = rng.choice([0, 1, span // 2, span], chosen.sum())
        row[: n // 16] = span
        row[:2] = 0
        rows.append(row)
    rows.append(rng.integers(0, 3, n))  # ties only
    rows.append(rng.integers(0, 40, n))
    rows = np.ascontiguousarray(np.stack(rows).astype(np.int32))
    out = np.full((len(rows), k), -1, np.int8)
    keys = np.empty((len(rows), k), np.int32)
    outcomes = np.empty(len(rows), np.int64)
    _labels_rows()(rows, k, labels, label_bits, out, keys, outcomes)
    for row, got, got_keys, outcome in zip(rows, out, keys, outcomes, strict=True):
        assert outcome == _expected_outcome(row, k, label_bits)
        if outcome == _SELECTED:
            order = np.lexsort((np.arange(n), row))[:k]
            np.testing.assert_array_equal(got, labels[order])
            np.testing.assert_array_equal(got_keys, row[order])
        else:
            assert (got == -1).all() and (got_keys == -7).all()


# ----------------------------------------------------------------------------------------------------------------
# Register-tiled distances (poisoncert._distance_tiles)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_packed_columns_unpack_to_the_transposed_features(dtype) -> None:
    from poisoncert._distance_tiles import pack_columns, tile_width, unpack_columns

    width = tile_width(dtype)
    assert width * np.dtype(dtype).itemsize == 32
    rng = np.random.default_rng(5)
    for n_train, n_features in itertools.product((1, width - 1, width, width + 1, 3 * width + 5), (1, 7)):
        XT = rng.normal(size=(n_features, n_train)).astype(dtype)
        XP = pack_columns(np.ascontiguousarray(XT.T))
        n_tiles = -(-n_train // width)
        assert XP.shape == (n_tiles * n_features, width) and XP.dtype == dtype and XP.flags.c_contiguous
        tiles = XP.reshape(n_tiles, n_features, width)
        np.testing.assert_array_equal(tiles[1 % n_tiles, :, 0], XT[:, (1 % n_tiles) * width])
        assert not tiles[-1, :, n_train - (n_tiles - 1) * width:].any()  # zero padding
        unpacked = unpack_columns(XP, n_train)
        np.testing.assert_array_equal(unpacked, XT)
        assert unpacked.flags.c_contiguous and not np.shares_memory(unpacked, XP)  # a copy, even of one tile


def _feature_order_distances(X_train: np.ndarray, X_test: np.ndarray, metric: str) -> np.ndarray:
    """As reference_distances, with cosine's unit rows made by the engine's own scaling (real-valued rows may end a
    bit apart under another formula; what is tested here is the sum)."""
    if metric != "cosine":
        return reference_distances(X_train, X_test, metric)
    from poisoncert.neighbours import _unit_rows

    A, B = _unit_rows(X_test, "X_test"), _unit_rows(X_train, "X_train")
    D = np.zeros((len(A), len(B)), dtype=A.dtype)
    for f in range(A.shape[1]):
        D += A[:, f, None] * B[None, :, f]
    return np.maximum(A.dtype.type(1) - D, A.dtype.type(0))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiled_distances_are_bit_identical_to_the_feature_order_sum(metric, dtype) -> None:
    """Every tile edge: training sets of one column, a partial tile, whole tiles and a tail; test sets of 1 to 3
    rows (below a tile's 8), 9 (a tile and one row), a whole row block (16) and one more; one feature and more
    than 8. Distances of random real-valued features, bit for bit against the sum in feature order, from the
    plain and the fused kernels."""
    from poisoncert._distance_tiles import tile_width

    rng = np.random.default_rng(17)
    width = tile_width(dtype)
    for n_train in (1, width - 1, width, 2 * width + 3):
        for n_features in (1, 11):
            X_train = rng.normal(size=(n_train, n_features)).astype(dtype)
            y_train = np.arange(n_train) % N_CLASSES
            index = NeighbourIndex(X_train, y_train, metric=metric, backend="numba")
            for n_test in (1, 2, 3, 9, 16, 17):
                X_test = rng.normal(size=(n_test, n_features)).astype(dtype)
                D = _feature_order_distances(X_train, X_test, metric)
                order = np.stack([np.lexsort((-reference_ranks(X_train, y_train), row)) for row in D])
                indices, distances = index.ordered_neighbors(X_test, n_train)
                np.testing.assert_array_equal(indices, order)
                np.testing.assert_array_equal(distances.view(np.uint8), np.take_along_axis(D, order, 1).view(np.uint8))
                labels, _ = index.search(X_test, n_neighbors=n_train)
                np.testing.assert_array_equal(labels, y_train[order])
