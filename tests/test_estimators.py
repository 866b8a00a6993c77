"""The scikit-learn estimators: fitting, votes, labels, certification results, exports and bad input."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.base import clone

from poisoncert import CertifiedKNeighborsClassifier, CertifiedRadiusNeighborsClassifier
from poisoncert.certify import certified_poisoning_size


@pytest.fixture
def blobs():
    rng = np.random.default_rng(7)
    centres = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    y = rng.integers(0, 3, size=120)
    X = centres[y] + rng.normal(scale=1.0, size=(120, 2))
    return X[:90], y[:90], X[90:], y[90:]


def _reference_knn_votes(X_train, y_train, X_test, k, n_classes):
    # Continuous random features: no distance ties, so the order is the plain distance order.
    distances = np.abs(X_test[:, None, :] - X_train[None, :, :]).sum(-1)
    nearest = np.argsort(distances, axis=1)[:, :k]
    return np.stack([np.bincount(y_train[row], minlength=n_classes) for row in nearest])


def test_knn_votes_predictions_and_score_match_reference(blobs):
    X_train, y_train, X_test, y_test = blobs
    model = CertifiedKNeighborsClassifier(n_neighbors=7).fit(X_train, y_train)
    votes = model.vote_counts(X_test)
    np.testing.assert_array_equal(votes, _reference_knn_votes(X_train, y_train, X_test, 7, 3))
    assert votes.sum(axis=1).tolist() == [7] * len(X_test)
    expected = np.array([max(range(3), key=lambda label: (row[label], label)) for row in votes])
    np.testing.assert_array_equal(model.predict(X_test), expected)
    assert model.score(X_test, y_test) == pytest.approx(np.mean(expected == y_test))


def test_rnn_votes_match_reference_and_empty_neighbourhood_uses_tie_rule(blobs):
    X_train, y_train, X_test, y_test = blobs
    model = CertifiedRadiusNeighborsClassifier(radius=1.5).fit(X_train, y_train)
    distances = np.abs(X_test[:, None, :] - X_train[None, :, :]).sum(-1)
    expected = np.stack([np.bincount(y_train[d <= 1.5], minlength=3) for d in distances])
    np.testing.assert_array_equal(model.vote_counts(X_test), expected)
    far = np.array([[100.0, 100.0]])
    assert model.vote_counts(far).tolist() == [[0, 0, 0]]
    assert model.predict(far).tolist() == [2]  # larger label wins the all-zero tie
    result = model.certify(np.vstack([X_test, far]), np.r_[y_test, 2])
    assert result.metadata["n_no_neighbour"] >= 1


def test_string_labels_with_gaps_are_mapped_through_classes(blobs):
    X_train, y_train, X_test, y_test = blobs
    names = np.array(["cat", "dog", "emu"])
    model = CertifiedKNeighborsClassifier(n_neighbors=5).fit(X_train, names[y_train])
    assert model.classes_.tolist() == ["cat", "dog", "emu"]
    numeric = CertifiedKNeighborsClassifier(n_neighbors=5).fit(X_train, y_train * 10 - 5)
    assert numeric.classes_.tolist() == [-5, 5, 15]
    np.testing.assert_array_equal(model.vote_counts(X_test), numeric.vote_counts(X_test))
    np.testing.assert_array_equal(model.predict(X_test), names[(numeric.predict(X_test) + 5) // 10])
    result = model.certify(X_test, names[y_test])
    assert set(result.predictions.tolist()) <= {"cat", "dog", "emu"}


@pytest.mark.parametrize("k", [5, 60])  # 60 + 40 > n_train = 90: the table holds the whole training set
def test_knn_result_curves_equal_the_functions_on_its_table(blobs, k):
    # A result hands its own vote counts to its global and split curves instead of counting its table again: the
    # curves must equal those of the public functions, which count (and check) the table themselves.
    from poisoncert.certify import knn_joint_certified_accuracy
    from poisoncert.joint_split import knn_split_certified_accuracy

    X_train, y_train, X_test, y_test = blobs
    names = np.array(["cat", "dog", "emu"])
    model = CertifiedKNeighborsClassifier(n_neighbors=k).fit(X_train, names[y_train])
    result = model.certify(X_test, names[y_test], max_e=40)
    table, truth, e = result.neighbor_labels, np.searchsorted(names, names[y_test]), np.arange(0, 41, 3)
    np.testing.assert_array_equal(
        result.certified_accuracy(e, method="global"),
        knn_joint_certified_accuracy(table, truth, e, n_classes=3, n_neighbors=k, n_train=len(X_train)))
    np.testing.assert_array_equal(
        result.certified_accuracy(e, method="split"),
        knn_split_certified_accuracy(table, truth, e, k, n_classes=3, n_train=len(X_train)))


def test_a_hand_built_knn_result_counts_its_table_for_its_curves():
    # Votes that do not match the table (here: both inputs given 3 votes for label 0, while their first 3
    # neighbours are 1, 1, 0): a result the package did not count itself must not take them on trust.
    from poisoncert.certify import knn_joint_certified_accuracy
    from poisoncert.joint_split import knn_split_certified_accuracy
    from poisoncert.results import CertificationResult

    table = np.array([[1, 1, 0, 0, 0]] * 2)
    result = CertificationResult(method="knn", params={"k": 3}, prediction_indices=np.array([0, 0]),
                                 y_true=np.array([0, 0]), votes=np.array([[3, 0], [3, 0]]),
                                 certified_size=np.array([0, 0]), classes=np.array([0, 1]), neighbor_labels=table,
                                 metadata={"n_train": 5})
    e = [0, 1]
    np.testing.assert_array_equal(result.certified_accuracy(e, method="global"),
                                  knn_joint_certified_accuracy(table, [0, 0], e, n_classes=2, n_neighbors=3, n_train=5))
    np.testing.assert_array_equal(result.certified_accuracy(e, method="split"),
                                  knn_split_certified_accuracy(table, [0, 0], e, 3, n_classes=2, n_train=5))
    assert result.certified_accuracy(e, method="split").tolist() == [0.0, 0.0]


def test_certify_result_is_consistent_and_exports_metadata(blobs, tmp_path):
    X_train, y_train, X_test, y_test = blobs
    model = CertifiedKNeighborsClassifier(n_neighbors=15).fit(X_train, y_train)
    result = model.certify(X_test, y_test)
    votes = model.vote_counts(X_test)
    np.testing.assert_array_equal(result.votes, votes)
    correct = result.prediction_indices == y_test
    np.testing.assert_array_equal(result.certified_size[correct], certified_poisoning_size(votes)[correct])
    assert np.all(result.certified_size[~correct] == -1)
    e = np.arange(0, 12)
    for method in result.available_methods:
        curve = result.certified_accuracy(e, method=method)
        assert curve[0] == pytest.approx(model.score(X_test, y_test))
        assert np.all(np.diff(curve) <= 0)
    assert result.default_method == "split"
    assert result.available_methods == ("individual", "global", "split")
    split, glob = result.certified_accuracy(e, "split"), result.certified_accuracy(e, "global")
    assert np.all(split >= glob - 1e-12) and np.all(glob >= result.certified_accuracy(e, "individual") - 1e-12)
    result.to_csv(tmp_path / "r.csv", e)
    result.to_json(tmp_path / "r.json", e)
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("# poisoncert")
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    assert {row["certification"] for row in rows} == set(result.available_methods)
    meta = json.loads((tmp_path / "r.json").read_text())["metadata"]
    for key in ("method", "params", "metric", "threat_model", "n_train", "n_test", "poisoncert_version", "guarantee"):
        assert key in meta
    assert meta["n_train"] == 90 and meta["n_test"] == 30 and meta["metric"] == "l1"


def test_sweeps_equal_single_fits(blobs):
    X_train, y_train, X_test, y_test = blobs
    big = CertifiedKNeighborsClassifier(n_neighbors=20).fit(X_train, y_train)
    sweep = big.vote_counts_sweep(X_test, [1, 5, 20])
    for k, votes in zip([1, 5, 20], sweep, strict=True):
        single = CertifiedKNeighborsClassifier(n_neighbors=k).fit(X_train, y_train).vote_counts(X_test)
        np.testing.assert_array_equal(votes, single)
    rnn = CertifiedRadiusNeighborsClassifier(radius=2.0).fit(X_train, y_train)
    for radius, votes in zip([0.5, 1.0, 2.0], rnn.vote_counts_sweep(X_test, [0.5, 1.0, 2.0]), strict=True):
        single = CertifiedRadiusNeighborsClassifier(radius=radius).fit(X_train, y_train).vote_counts(X_test)
        np.testing.assert_array_equal(votes, single)
    results = rnn.certify_sweep(X_test, y_test, [0.5, 2.0])
    assert sorted(results) == [0.5, 2.0]


def test_threat_model_variants_are_labelled_and_at_least_general(blobs):
    X_train, y_train, X_test, y_test = blobs
    model = CertifiedKNeighborsClassifier(n_neighbors=9).fit(X_train, y_train)
    general = model.certify(X_test, y_test)
    for threat_model in ("insertion", "deletion", "label-flip"):
        variant = model.certify(X_test, y_test, threat_model=threat_model)
        assert variant.threat_model == threat_model
        assert variant.available_methods == ("individual", "split")
        assert variant.default_method == "split"
        assert np.all(variant.certified_size >= general.certified_size)
        e = np.arange(0, 8)
        split = variant.certified_accuracy(e)
        assert np.all(split >= variant.certified_accuracy(e, "individual") - 1e-12)
        if threat_model == "label-flip":  # relabelling e examples is a general poisoning of size e
            np.testing.assert_allclose(split, general.certified_accuracy(e, "split"))
        else:  # one kind of poisoning only: never below the general certificate
            assert np.all(split >= general.certified_accuracy(e, "split") - 1e-12)


def test_get_params_and_clone():
    model = CertifiedRadiusNeighborsClassifier(radius=2.5, metric="l2")
    assert model.get_params()["radius"] == 2.5
    assert clone(model).get_params() == model.get_params()


@pytest.mark.parametrize(
    ("model", "X", "y", "message"),
    [
        (CertifiedKNeighborsClassifier(3), [[0.0], [np.nan], [1.0]], [0, 1, 0], "NaN"),
        (CertifiedKNeighborsClassifier(3), [[0.0], [np.inf], [1.0]], [0, 1, 0], "infinite"),
        (CertifiedKNeighborsClassifier(1), [[0.0], [1.0]], [0, 1, 1], "2 labels|3 labels"),
        (CertifiedKNeighborsClassifier(1), [0.0, 1.0], [0, 1], "2-D"),
        (CertifiedKNeighborsClassifier(1), np.zeros((2, 2, 2)), [0, 1], "2-D"),
        (CertifiedKNeighborsClassifier(1), np.zeros((0, 2)), [], "empty"),
        (CertifiedKNeighborsClassifier(1), [[0.0], [1.0]], [1, 1], "single class"),
        (CertifiedKNeighborsClassifier(1), [[0.0], [1.0]], [0.5, 1.0], "non-integer"),
        (CertifiedKNeighborsClassifier(0), [[0.0], [1.0]], [0, 1], ">= 1"),
        (CertifiedKNeighborsClassifier(3), [[0.0], [1.0]], [0, 1], "larger than the training set"),
        (CertifiedKNeighborsClassifier(1, metric="hamming"), [[0.0], [1.0]], [0, 1], "unknown metric"),
        (CertifiedRadiusNeighborsClassifier(0.0), [[0.0], [1.0]], [0, 1], "> 0"),
        (CertifiedRadiusNeighborsClassifier(-1.0), [[0.0], [1.0]], [0, 1], "> 0"),
        (CertifiedKNeighborsClassifier(1), [["a"], ["b"]], [0, 1], "numeric"),
    ],
)
def test_bad_training_input_is_refused(model, X, y, message):
    with pytest.raises((ValueError, TypeError), match=message):
        model.fit(X, y)


def test_bad_test_input_is_refused(blobs):
    X_train, y_train, X_test, y_test = blobs
    model = CertifiedKNeighborsClassifier(3).fit(X_train, y_train)
    with pytest.raises(ValueError, match="features but the model was fitted with 2"):
        model.predict(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="empty"):
        model.predict(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="unknown to the model"):
        model.certify(X_test, np.full(len(X_test), 7))
    with pytest.raises(ValueError, match="labels"):
        model.certify(X_test, y_test[:-1])
    with pytest.raises(ValueError, match=">= 0"):
        model.certify(X_test, y_test).certified_accuracy([-1])
    with pytest.raises(ValueError, match="not available"):
        model.certify(X_test, y_test).certified_accuracy([0], method="island")


def test_object_dtype_labels_work_for_fit_and_certify(blobs):
    # pandas string columns arrive as object arrays.
    X_train, y_train, X_test, y_test = blobs
    names = np.array(["cat", "dog", "emu"], dtype=object)
    model = CertifiedKNeighborsClassifier(n_neighbors=5).fit(X_train, names[y_train])
    result = model.certify(X_test, names[y_test])
    assert result.clean_accuracy == pytest.approx(model.score(X_test, names[y_test].astype(str)))


@pytest.mark.parametrize("labels", [np.array([0, 1, 2, 2, 1, 1, 2, 1, 2, 2]), np.array(list("abccbbcbcc"))])
def test_tie_ranks_survive_the_removal_of_a_whole_class(labels):
    """Deleting the only example of the first class shifts the label indices but no other example's rank."""
    X = np.array([[0.0], [1.0], [1.0], [1.0], [2.0], [1.0], [1.0], [1.0], [1.0], [2.0]])  # many distance ties
    X_test = np.array([[1.0], [1.4]])
    clean = CertifiedKNeighborsClassifier(n_neighbors=5).fit(X, labels)
    poisoned = CertifiedKNeighborsClassifier(n_neighbors=5).fit(X[1:], labels[1:])
    assert len(poisoned.classes_) == 2
    # The surviving examples keep their relative order (index_.order_ holds rows, best rank first).
    survivors = clean.index_.order_[clean.index_.order_ != 0] - 1
    np.testing.assert_array_equal(poisoned.index_.order_, survivors)
    np.testing.assert_array_equal(poisoned.classes_[poisoned.neighbor_labels(X_test)],
                                  clean.classes_[clean.neighbor_labels(X_test)][:, :5])


def test_unfitted_changed_params_sparse_and_boolean_labels(blobs, tmp_path):
    from scipy import sparse
    from sklearn.exceptions import NotFittedError

    X, y, X_test, y_test = blobs
    for model in (CertifiedKNeighborsClassifier(), CertifiedRadiusNeighborsClassifier()):
        with pytest.raises(NotFittedError):
            model.predict(X_test)
        with pytest.raises(TypeError, match="sparse matrix"):
            model.fit(sparse.csr_matrix(X), y)
    model = CertifiedKNeighborsClassifier(n_neighbors=3, metric="l1").fit(X, y)
    model.set_params(n_neighbors=len(X) + 1)  # read at prediction time, as in scikit-learn: checked there too
    with pytest.raises(ValueError, match="larger than the training set"):
        model.predict(X_test)
    model.set_params(n_neighbors=3, metric="cosine")  # the metric takes effect at the next fit only
    assert model.certify(X_test, y_test).metadata["metric"] == "l1"
    flags = CertifiedKNeighborsClassifier(n_neighbors=3).fit(X, y == y[0])
    flags.certify(X_test, y_test == y[0]).to_json(tmp_path / "flags.json", e=[0, 1])
    assert json.loads((tmp_path / "flags.json").read_text())["metadata"]["classes"] == [False, True]


def test_extreme_feature_values_keep_their_direction_or_are_refused():
    rng = np.random.default_rng(4)
    X, y = rng.random((30, 3)), rng.integers(0, 3, 30)
    model = CertifiedKNeighborsClassifier(n_neighbors=5, metric="cosine").fit(X, y)
    direction = np.array([[1.0, 2.0, 3.0]])
    for scale in (1e-170, 1e200):
        np.testing.assert_array_equal(model.vote_counts(direction * scale), model.vote_counts(direction))
    with pytest.raises(ValueError, match="too large for float64 distances"):
        CertifiedKNeighborsClassifier(n_neighbors=5, metric="l2").fit(X * 1e200, y)
    small = CertifiedKNeighborsClassifier(n_neighbors=5).fit(X.astype(np.float32), y)
    with pytest.raises(ValueError, match="too large for float32 distances"):
        small.predict(np.array([[1e300, 0.0, 0.0]]))
