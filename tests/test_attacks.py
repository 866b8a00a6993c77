"""Attacks (spec section 8): verified poisoned sets bound CA(e) from above, so they never go below a certificate.

Every attack here is verified by refitting the classifier on the materialised poisoned set; a verified accuracy
below any certified lower bound means the certificate (or the attack's verification) is wrong, and fails loudly.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from poisoncert import CertifiedKNeighborsClassifier, CertifiedRadiusNeighborsClassifier
from poisoncert.attacks import PoisonedSet, attack, flips, poisoning_size, verify, witness

THREAT_MODELS = ("general", "insertion", "deletion", "label-flip")


def _blobs(seed: int, n_train: int = 60, n_test: int = 25, c: int = 3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.2, size=(c, 2))
    y_train = rng.integers(0, c, n_train)
    y_test = rng.integers(0, c, n_test)
    X_train = centres[y_train] + rng.normal(0, 1, (n_train, 2))
    X_test = centres[y_test] + rng.normal(0, 1, (n_test, 2))
    # Rounded so that distance ties and duplicate examples occur.
    return np.round(X_train, 1), y_train, np.round(X_test, 1), y_test


def _bounds(result, e: int) -> dict[str, float]:
    return {method: float(result.certified_accuracy([e], method=method)[0]) for method in result.available_methods}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threat_model", THREAT_MODELS)
def test_verified_attacks_never_go_below_any_certificate(seed, threat_model):
    X_train, y_train, X_test, y_test = _blobs(seed)
    for model in (CertifiedKNeighborsClassifier(n_neighbors=7), CertifiedRadiusNeighborsClassifier(radius=1.0)):
        model.fit(X_train, y_train)
        kwargs = {"max_e": 6} if hasattr(model, "n_neighbors") else {}
        result = model.certify(X_test, y_test, threat_model, **kwargs)
        for e in (1, 3, 6):
            found = attack(model, X_train, y_train, X_test, y_test, e, threat_model, seed=seed, time_budget=None)
            assert found.poisoning_size <= e
            for method, bound in _bounds(result, e).items():
                assert found.accuracy >= bound - 1e-12, (
                    f"{type(model).__name__} {threat_model} e={e}: verified attack accuracy {found.accuracy:.4f} "
                    f"is below the {method} certificate {bound:.4f}: one of them is wrong")


def test_the_attack_lowers_accuracy_and_its_search_agrees_with_the_refit():
    X_train, y_train, X_test, y_test = _blobs(11, n_train=120, n_test=60)
    model = CertifiedRadiusNeighborsClassifier(radius=1.5).fit(X_train, y_train)
    clean = float(np.mean(model.predict(X_test) == y_test))
    found = attack(model, X_train, y_train, X_test, y_test, 8, seed=0, time_budget=None)
    assert found.accuracy < clean
    # rNN vote bookkeeping is exact, so the search predicts the refit's accuracy.
    assert found.search_accuracy == pytest.approx(found.accuracy)
    refitted = CertifiedRadiusNeighborsClassifier(radius=1.5).fit(*found.poisoned.training_set(X_train, y_train))
    assert np.array_equal(refitted.predict(X_test), found.predictions)


def test_attacks_are_deterministic_for_a_seed():
    X_train, y_train, X_test, y_test = _blobs(5, n_train=90, n_test=40)
    model = CertifiedKNeighborsClassifier(n_neighbors=9).fit(X_train, y_train)
    first = attack(model, X_train, y_train, X_test, y_test, 4, seed=3, time_budget=None)
    second = attack(model, X_train, y_train, X_test, y_test, 4, seed=3, time_budget=None)
    assert np.array_equal(first.poisoned.removed, second.poisoned.removed)
    assert np.array_equal(first.poisoned.added_X, second.poisoned.added_X)
    assert np.array_equal(first.poisoned.added_y, second.poisoned.added_y)
    assert first.accuracy == second.accuracy


# --------------------------------------------------------------------------------------------------------------
# The rNN cover strategy: one central site, per-label threshold covers for the removals, a knapsack
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threat_model", ("general", "insertion", "deletion"))
def test_the_cover_strategy_alone_never_goes_below_any_certificate(seed, threat_model):
    X_train, y_train, X_test, y_test = _blobs(seed, n_train=80, n_test=40)
    for model in (CertifiedKNeighborsClassifier(n_neighbors=9), CertifiedRadiusNeighborsClassifier(radius=1.2)):
        model.fit(X_train, y_train)
        knn = hasattr(model, "n_neighbors")
        result = model.certify(X_test, y_test, threat_model, **({"max_e": 5} if knn else {}))
        for e in (1, 2, 5):
            found = attack(model, X_train, y_train, X_test, y_test, e, threat_model, seed=seed, time_budget=None,
                           strategies=("cover",))
            assert found.poisoning_size <= e
            assert found.poisoned.strategy.startswith("one central site")
            if not knn:
                assert found.search_accuracy == pytest.approx(found.accuracy)  # rNN bookkeeping is exact
            for method, bound in _bounds(result, e).items():
                assert found.accuracy >= bound - 1e-12, (
                    f"cover {type(model).__name__} {threat_model} e={e}: verified accuracy {found.accuracy:.4f} "
                    f"is below the {method} certificate {bound:.4f}: one of them is wrong")


@pytest.mark.parametrize("make", [lambda: CertifiedKNeighborsClassifier(n_neighbors=15),
                                  lambda: CertifiedRadiusNeighborsClassifier(radius=1.5)], ids=["knn15", "rnn"])
def test_the_cover_strategy_is_deterministic_and_never_removes_the_label_it_adds(make):
    X_train, y_train, X_test, y_test = _blobs(7, n_train=150, n_test=80, c=4)
    model = make().fit(X_train, y_train)
    clean = float(np.mean(model.predict(X_test) == y_test))
    first = attack(model, X_train, y_train, X_test, y_test, 6, seed=1, time_budget=None, strategies=("cover",))
    second = attack(model, X_train, y_train, X_test, y_test, 6, seed=1, time_budget=None, strategies=("cover",))
    assert first.accuracy < clean
    assert np.array_equal(first.poisoned.removed, second.poisoned.removed)
    assert np.array_equal(first.poisoned.added_X, second.poisoned.added_X)
    assert np.array_equal(first.poisoned.added_y, second.poisoned.added_y)
    # Removing an example of a label that is added near the same inputs would take back the votes added.
    assert not set(y_train[first.poisoned.removed].tolist()) & set(first.poisoned.added_y.tolist())
    # One site: every added example is at the same point.
    assert len(np.unique(first.poisoned.added_X, axis=0)) <= 1


def test_the_cover_greedy_and_the_knapsack_against_brute_force():
    from itertools import combinations, product

    from poisoncert.attacks import _cover_greedy, _covered, _knapsack

    rng = np.random.default_rng(0)
    for _ in range(40):
        n_targets, n_cand = int(rng.integers(1, 6)), int(rng.integers(1, 8))
        adjacency = rng.random((n_targets, n_cand)) < 0.6
        need = rng.integers(0, 4, n_targets)
        tptr = np.r_[0, np.cumsum(adjacency.sum(axis=1))].astype(np.int64)
        tlist = np.nonzero(adjacency)[1].astype(np.int64)
        owner, cand = np.nonzero(adjacency.T)
        inv_ptr = np.r_[0, np.cumsum(adjacency.sum(axis=0))].astype(np.int64)
        for budget in range(0, 4):
            chosen = _cover_greedy(tptr, tlist, inv_ptr, cand.astype(np.int64), need, budget, n_cand)
            assert chosen.sum() <= budget
            counted = _covered(tptr, tlist, chosen, need)
            assert counted == int(np.sum(adjacency[:, chosen].sum(axis=1) >= need))
            best = max(int(np.sum(adjacency[:, list(subset)].sum(axis=1) >= need))
                       for size in range(min(budget, n_cand) + 1) for subset in combinations(range(n_cand), size))
            assert counted <= best
        # A knapsack over labels: the steps it gives never exceed the capacity and reach the best total.
        value = np.maximum.accumulate(rng.integers(0, 5, (3, 5)), axis=1)
        share = _knapsack(value)
        gains = [sum(int(value[lab, j] - value[lab, 0]) for lab, j in enumerate(split))
                 for split in product(range(5), repeat=3) if sum(split) <= 4]
        assert share.sum() <= 4
        assert sum(int(value[lab, j] - value[lab, 0]) for lab, j in enumerate(share)) == max(gains)


# --------------------------------------------------------------------------------------------------------------
# Witnesses of the exact individual certificates, on scikit-learn's digits
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, test_size=0.3, random_state=0, stratify=y)
    return X_train, y_train, X_test[::18], y_test[::18]  # 30 test inputs: every refit is a full fit


@pytest.mark.parametrize("make", [lambda: CertifiedKNeighborsClassifier(n_neighbors=3),
                                  lambda: CertifiedKNeighborsClassifier(n_neighbors=15),
                                  lambda: CertifiedKNeighborsClassifier(n_neighbors=50),
                                  lambda: CertifiedRadiusNeighborsClassifier(radius=6.0)],
                         ids=["knn3", "knn15", "knn50", "rnn6"])
@pytest.mark.parametrize("threat_model", THREAT_MODELS)
def test_witnesses_flip_every_exactly_certified_input_at_size_plus_one(digits, make, threat_model):
    X_train, y_train, X_test, _ = digits
    model = make().fit(X_train, y_train)
    result = model.certify(X_test, None, threat_model)
    flipped = corners = 0
    for i, x in enumerate(X_test):
        found = witness(model, X_train, y_train, x, threat_model, index=i)
        assert found.certified_size == int(result.certified_size[i])
        if found.poisoned is None:
            assert found.reason.startswith("corner")
            corners += 1
            continue
        size = found.poisoned.poisoning_size(X_train, y_train)
        assert size <= found.certified_size + 1
        assert flips(model, X_train, y_train, found.poisoned, x), (
            f"{threat_model} witness of input {i} (certified size {found.certified_size}) does not flip it")
        flipped += 1
    assert flipped + corners == len(X_test) and corners <= len(X_test) // 10


def test_a_witness_one_smaller_never_flips(digits):
    """The certificate's side: shrinking a witness below the certified size must leave the prediction alone."""
    X_train, y_train, X_test, _ = digits
    model = CertifiedKNeighborsClassifier(n_neighbors=15).fit(X_train, y_train)
    for i, x in enumerate(X_test[:10]):
        found = witness(model, X_train, y_train, x, "insertion", index=i)
        if found.poisoned is None or found.certified_size == 0:
            continue
        smaller = PoisonedSet(found.poisoned.removed, found.poisoned.added_X[:-1], found.poisoned.added_y[:-1],
                              found.certified_size, "insertion")
        assert not flips(model, X_train, y_train, smaller, x)


# --------------------------------------------------------------------------------------------------------------
# Poisoned-set files and the size formula of spec section 1
# --------------------------------------------------------------------------------------------------------------


def test_poisoning_size_counts_a_modification_once_and_a_readded_example_not_at_all():
    X = np.arange(12, dtype=np.float64).reshape(6, 2)
    y = np.array([0, 1, 0, 1, 0, 1])
    assert poisoning_size(X, y, [], np.zeros((0, 2)), y[:0]) == 0
    assert poisoning_size(X, y, [2], X[[2]] + 0.5, [0]) == 1  # modification
    assert poisoning_size(X, y, [2], X[[2]], [0]) == 0  # removed and put back
    assert poisoning_size(X, y, [2], X[[2]], [1]) == 1  # label flip
    assert poisoning_size(X, y, [0, 1, 2], np.zeros((1, 2)), [0]) == 3  # |D| - |D* ∩ D|
    assert poisoning_size(X, y, [], np.zeros((4, 2)), [0, 0, 1, 1]) == 4  # |D*| - |D|
    # Duplicates are a multiset: one of two equal examples removed costs one.
    X_dup, y_dup = np.r_[X, X[:1]], np.r_[y, y[:1]]
    assert poisoning_size(X_dup, y_dup, [0], np.zeros((0, 2)), y[:0]) == 1


def test_poisoned_sets_round_trip_through_files(tmp_path):
    X_train, y_train, X_test, y_test = _blobs(2)
    model = CertifiedRadiusNeighborsClassifier(radius=1.0).fit(X_train, y_train)
    found = attack(model, X_train, y_train, X_test, y_test, 3, time_budget=None)
    path = tmp_path / "attack-rnn-r1-e3.npz"
    found.poisoned.save(path, metadata=found.record())
    with np.load(path, allow_pickle=False) as archive:
        assert {"removed", "added_X", "added_y", "e"} <= set(archive.files)
        assert archive["removed"].dtype == np.int64 and archive["added_X"].dtype == np.float32
    loaded = PoisonedSet.load(path, X_train, y_train)
    assert np.array_equal(loaded.removed, found.poisoned.removed)
    assert np.array_equal(loaded.added_y, found.poisoned.added_y)
    again = verify(model, X_train, y_train, loaded, X_test, y_test)
    assert again.accuracy == found.accuracy
    assert path.with_suffix(".json").is_file()


@pytest.mark.parametrize(("change", "message"), [
    ({"removed": np.array([0, 999])}, "outside the training set"),
    ({"removed": np.array([1, 1])}, "more than once"),
    ({"added_y": np.array([7])}, "does not have"),
    ({"e": 0}, "over its budget"),
])
def test_bad_poisoned_sets_are_refused(tmp_path, change, message):
    X = np.arange(20, dtype=np.float64).reshape(10, 2)
    y = np.arange(10) % 2
    fields = {"removed": np.array([3]), "added_X": np.array([[0.5, 0.5]]), "added_y": np.array([1]), "e": 1}
    fields.update(change)
    path = tmp_path / "bad.npz"
    np.savez(path, **fields)
    with pytest.raises(ValueError, match=message):
        PoisonedSet.load(path, X, y)


def test_unknown_threat_model_and_negative_budget_are_refused():
    X_train, y_train, X_test, y_test = _blobs(0)
    model = CertifiedKNeighborsClassifier(n_neighbors=3).fit(X_train, y_train)
    with pytest.raises(ValueError, match="threat model"):
        attack(model, X_train, y_train, X_test, y_test, 2, "backdoor")
    with pytest.raises(ValueError, match="e must be"):
        attack(model, X_train, y_train, X_test, y_test, -1)
