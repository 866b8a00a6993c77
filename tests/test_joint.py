"""Global joint certificates (spec 5b rNN, 5c kNN): the label knapsack against brute force, and curve properties.

Exhaustive poisoning enumeration of these certificates lives in test_soundness.py; here the solver is checked
against a search over every allocation, the per-input costs against their definitions, and the curves against
the invariants every joint bound must satisfy (CA(0) = clean accuracy, non-increasing, >= individual,
>= ISLAND / RD for rNN).
"""

from __future__ import annotations

import itertools

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from poisoncert import joint
from poisoncert.joint import (
    UNFLIPPABLE,
    global_attack_allocation,
    global_rnn_certified_accuracy,
    knn_joint_certified_accuracy,
    knn_joint_costs,
    max_flips,
)
from poisoncert.votes import knn_votes_from_labels, predict, prefix_label_counts, rival_counts


def _brute_force_flips(labels: list[int], costs: list[int | None], budget: int, n_classes: int) -> int:
    """F by trying every allocation (r_0, ..., r_{c-1}) with r_l in 0..budget and sum <= budget."""
    best = 0
    for r in itertools.product(range(budget + 1), repeat=n_classes):
        if sum(r) > budget:
            continue
        flips = sum(1 for label, cost in zip(labels, costs, strict=True) if cost is not None and cost <= r[label])
        best = max(best, flips)
    return best


def _flips_of(labels: np.ndarray, costs: np.ndarray, allocation: np.ndarray) -> int:
    return int(np.count_nonzero(costs <= allocation[labels]))


@st.composite
def _knapsack_cases(draw, max_classes=3, max_budget=8, max_n=12):
    n_classes = draw(st.integers(1, max_classes))
    n = draw(st.integers(0, max_n))
    labels = draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n))
    # None (cannot be flipped) and costs above the budget must both be ignored.
    costs = draw(st.lists(st.one_of(st.none(), st.integers(0, max_budget + 2)), min_size=n, max_size=n))
    budget = draw(st.integers(0, max_budget))
    return labels, costs, budget, n_classes


@settings(max_examples=300, deadline=None)
@given(_knapsack_cases())
def test_solver_equals_brute_force_over_allocations(case):
    labels, costs, budget, n_classes = case
    expected = _brute_force_flips(labels, costs, budget, n_classes)
    flips, allocation = max_flips(labels, costs, budget, n_classes=n_classes, return_allocation=True)
    assert flips == expected
    # The allocation is feasible and attains the optimum.
    assert allocation.shape == (n_classes,) and allocation.min() >= 0 and allocation.sum() <= budget
    int_costs = np.array([UNFLIPPABLE if c is None else c for c in costs], dtype=np.int64)
    assert _flips_of(np.array(labels, dtype=np.int64), int_costs, allocation) == expected


def _reference_dp(labels: np.ndarray, costs: np.ndarray, budget: int, n_classes: int) -> int:
    """Textbook DP over every r_l in 0..budget (no cost candidates, no pruning): O(c * budget^2)."""
    best = np.zeros(budget + 1, dtype=np.int64)
    for label in range(n_classes):
        own = np.sort(costs[labels == label])
        gain = np.searchsorted(own, np.arange(budget + 1), side="right")  # g_l(r) for r = 0..budget
        new = np.full(budget + 1, -1, dtype=np.int64)
        for b in range(budget + 1):
            new[b] = max(best[b - r] + gain[r] for r in range(b + 1))
        best = new
    return int(best[budget])


@pytest.mark.parametrize("seed", range(12))
def test_solver_equals_reference_dp_on_larger_instances(seed):
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 7))
    budget = int(rng.integers(0, 60))
    n = int(rng.integers(0, 300))
    labels = rng.integers(0, n_classes, n)
    # Mix of free, cheap, expensive and unflippable costs, with many repeats.
    costs = rng.integers(0, 2 * budget + 2, n).astype(np.int64)
    costs[rng.random(n) < 0.1] = UNFLIPPABLE
    flips, allocation = max_flips(labels, costs, budget, n_classes=n_classes, return_allocation=True)
    finite = np.where(costs == UNFLIPPABLE, budget + 1, costs)
    assert flips == _reference_dp(labels, finite, budget, n_classes)
    assert allocation.sum() <= budget and _flips_of(labels, costs, allocation) == flips


def test_solver_accepts_inf_none_and_sentinel_alike():
    labels = [0, 1, 1, 2]
    as_float = max_flips(labels, [1.0, np.inf, 2.0, 0.0], 3)
    as_object = max_flips(labels, [1, None, 2, 0], 3)
    as_int = max_flips(labels, [1, UNFLIPPABLE, 2, 0], 3)
    assert as_float == as_object == as_int == 3


@pytest.mark.parametrize(
    ("labels", "costs", "budget", "error"),
    [
        ([0, 1], [1], 2, ValueError),  # shape mismatch
        ([0, 1], [1, np.nan], 2, ValueError),
        ([0, 1], [1, -1], 2, ValueError),
        ([0, 1], [1, 1.5], 2, ValueError),
        ([0, -1], [1, 1], 2, ValueError),
        ([0, 1], [1, 1], -1, ValueError),
        ([0.0, 1.0], [1, 1], 2, TypeError),
        ([0, 1], ["a", "b"], 2, TypeError),
    ],
)
def test_solver_rejects_bad_input(labels, costs, budget, error):
    with pytest.raises(error):
        max_flips(labels, costs, budget)


# ---------------------------------------------------------------------------------------------- rNN (5b)

vote_cases = st.integers(2, 4).flatmap(
    lambda c: st.integers(1, 30).flatmap(
        lambda n: st.tuples(
            arrays(np.int64, (n, c), elements=st.integers(0, 15)),
            arrays(np.int64, (n,), elements=st.integers(0, c - 1)),
        )
    )
)


def _individual_sizes(votes: np.ndarray) -> np.ndarray:
    """e* = min over l != a of ceil((s_a - s_l + [a > l]) / 2) - 1, straight from spec section 4."""
    a = predict(votes)
    out = []
    for row, label in zip(votes.tolist(), a.tolist(), strict=True):
        out.append(min(-(-(row[label] - row[o] + (label > o)) // 2) - 1 for o in range(len(row)) if o != label))
    return np.array(out, dtype=np.int64)


def _individual_accuracy(votes: np.ndarray, y: np.ndarray, e: np.ndarray) -> np.ndarray:
    certified = (predict(votes) == y)[None, :] & (e[:, None] <= _individual_sizes(votes)[None, :])
    return certified.mean(axis=1)


@settings(max_examples=150, deadline=None)
@given(vote_cases, st.integers(0, 2**31 - 1))
def test_rnn_global_curve_invariants(case, seed):
    from poisoncert import certify

    votes, y = case
    e = np.arange(0, 20)
    glob = global_rnn_certified_accuracy(votes, y, e)
    assert glob[0] == pytest.approx(np.mean(predict(votes) == y))  # CA(0) = clean accuracy
    assert np.all(np.diff(glob) <= 1e-12)  # non-increasing in e
    assert np.all(glob >= _individual_accuracy(votes, y, e) - 1e-12)
    assert np.all(glob >= certify.certified_accuracy(votes, y, e, method="island") - 1e-12)
    assert np.all(glob >= certify.certified_accuracy(votes, y, e, method="rd", seed=seed) - 1e-12)
    np.testing.assert_array_equal(certify.certified_accuracy(votes, y, e, method="global"), glob)
    # Order of the test set does not matter, nor the order of e.
    perm = np.random.default_rng(seed).permutation(len(y))
    np.testing.assert_array_equal(global_rnn_certified_accuracy(votes[perm], y[perm], e), glob)
    np.testing.assert_array_equal(global_rnn_certified_accuracy(votes, y, e[::-1]), glob[::-1])


@settings(max_examples=100, deadline=None)
@given(vote_cases)
def test_rnn_global_equals_brute_force_label_attacker(case):
    """Against the definition of 5b directly: every allocation r, flip i iff r_{a_i} >= max(margin_i - e, 0)."""
    votes, y = case
    a = predict(votes)
    c = votes.shape[1]
    e = np.arange(0, 6)
    glob = global_rnn_certified_accuracy(votes, y, e)
    alloc = global_attack_allocation(votes, y, e)
    correct = [i for i in range(len(y)) if a[i] == y[i]]
    for position, budget in enumerate(e.tolist()):
        costs = []
        for i in correct:
            row, label = votes[i].tolist(), int(a[i])
            margin = min(row[label] - row[o] + (label > o) for o in range(c) if o != label)
            costs.append(max(margin - budget, 0))
        flips = _brute_force_flips([int(a[i]) for i in correct], costs, budget, c)
        assert glob[position] == pytest.approx((len(correct) - flips) / len(y))
        assert alloc[position].sum() <= budget
        assert _flips_of(a[correct], np.array(costs, dtype=np.int64), alloc[position]) == flips


@settings(max_examples=100, deadline=None)
@given(vote_cases)
def test_rnn_global_equals_individual_when_one_label_is_predicted(case):
    """With one predicted label the attacker's r is one number: flips #{margin <= 2e} = the individual count."""
    votes, y = case
    votes = votes.copy()
    votes[:, -1] += votes.sum(axis=1)  # the last label always wins
    y = np.where(np.arange(len(y)) % 3 == 0, 0, votes.shape[1] - 1)  # some misclassified inputs too
    e = np.arange(0, 40)
    np.testing.assert_allclose(global_rnn_certified_accuracy(votes, y, e), _individual_accuracy(votes, y, e))


def test_rnn_global_hand_example():
    """Three labels; margins s_a - s_b + [a > b] = 6, 6, 5 (runner-up ties go to the larger label): e* = 2 each.

    e = 3: costs max(margin - 3, 0) = 3, 3, 2; any two of them cost more than 3, so one attack flips one input:
    CA = 2/3 while the individual certificate gives 0. e = 4: costs 2, 2, 1: two fit (e.g. 2 + 1), all three
    need 5: CA = 1/3. e = 5: costs 1, 1, 0: all flipped.
    """
    votes = np.array([[6, 0, 0], [0, 6, 0], [0, 0, 4]])
    y = np.array([0, 1, 2])
    e = np.arange(7)
    np.testing.assert_allclose(global_rnn_certified_accuracy(votes, y, e), [1, 1, 1, 2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(_individual_accuracy(votes, y, e), [1, 1, 1, 0, 0, 0, 0])
    allocation = global_attack_allocation(votes, y, e)
    assert np.all(allocation.sum(axis=1) <= e)
    assert np.all(allocation[:3] == 0)  # nothing can be flipped: no removal is worth making


def test_rnn_global_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        global_rnn_certified_accuracy(np.zeros((0, 3), dtype=int), np.zeros(0, dtype=int), [0])
    with pytest.raises(ValueError):
        global_rnn_certified_accuracy([[1, 2]], [0], [-1])
    with pytest.raises(ValueError):
        global_rnn_certified_accuracy([[1, 2]], [2], [0])


# ---------------------------------------------------------------------------------------------- kNN (5c)


@st.composite
def _neighbour_cases(draw):
    n_classes = draw(st.integers(2, 4))
    n_test = draw(st.integers(1, 12))
    width = draw(st.integers(1, 14))
    table = draw(arrays(np.int64, (n_test, width), elements=st.integers(0, n_classes - 1)))
    y = draw(arrays(np.int64, (n_test,), elements=st.integers(0, n_classes - 1)))
    # k below, at or above the table width (above: the training set has fewer than k examples).
    k = draw(st.integers(1, width + 4))
    return table, y, n_classes, k


def _direct_costs(table: np.ndarray, k: int, n_classes: int, budget: int) -> list[int | None]:
    """c_i(e) straight from spec 5c with Python loops (A(m) = A(K) beyond the table, 0 for m <= 0)."""
    out = []
    for row in table.tolist():
        window = row[: min(k, len(row))]
        s = [window.count(label) for label in range(n_classes)]
        a = max(range(n_classes), key=lambda label: (s[label], label))
        rival = max(s[label] + (label > a) for label in range(n_classes) if label != a)

        def count(m: int, row=row, a=a) -> int:
            return row[: max(0, min(m, len(row)))].count(a)

        out.append(next((r for r in range(budget + 1) if count(k - budget + r) - r <= rival + budget - 1), None))
    return out


@settings(max_examples=150, deadline=None)
@given(_neighbour_cases())
def test_knn_costs_match_direct_definition(case):
    table, _, n_classes, k = case
    table = table[:, :k] if table.shape[1] > k else table
    votes = knn_votes_from_labels(table, min(k, table.shape[1]), n_classes)
    a = predict(votes)
    classes = np.arange(n_classes)
    rival = np.array([max(v[o] + (o > ai) for o in classes if o != ai) for v, ai in zip(votes, a, strict=True)])
    e = np.arange(0, k + 3)
    costs = knn_joint_costs(prefix_label_counts(table, a), rival, k, e)
    for position, budget in enumerate(e.tolist()):
        expected = [UNFLIPPABLE if c is None else c for c in _direct_costs(table, k, n_classes, budget)]
        assert costs[position].tolist() == expected


@settings(max_examples=150, deadline=None)
@given(_neighbour_cases())
def test_knn_joint_with_r_equal_e_is_the_individual_certificate(case):
    """Spec 5c's claim, checked: an input is unflippable (no r <= e works) exactly when e <= e*."""
    table, _, n_classes, k = case
    table = table[:, : min(k, table.shape[1])]
    votes = knn_votes_from_labels(table, table.shape[1], n_classes)
    a = predict(votes)
    classes = np.arange(n_classes)
    rival = np.array([max(v[o] + (o > ai) for o in classes if o != ai) for v, ai in zip(votes, a, strict=True)])
    e = np.arange(0, k + 3)
    unflippable = knn_joint_costs(prefix_label_counts(table, a), rival, k, e) == UNFLIPPABLE
    np.testing.assert_array_equal(unflippable, e[:, None] <= _individual_sizes(votes)[None, :])


@settings(max_examples=150, deadline=None)
@given(_neighbour_cases(), st.integers(0, 2**31 - 1))
def test_knn_joint_curve_invariants(case, seed):
    table, y, n_classes, k = case
    e = np.arange(0, k + 3)
    joint_ca = knn_joint_certified_accuracy(table, y, e, n_classes, n_neighbors=k, n_train=table.shape[1])
    votes = knn_votes_from_labels(table, min(k, table.shape[1]), n_classes)
    assert joint_ca[0] == pytest.approx(np.mean(predict(votes) == y))  # CA(0) = clean accuracy
    assert np.all(np.diff(joint_ca) <= 1e-12)
    assert np.all(joint_ca >= _individual_accuracy(votes, y, e) - 1e-12)
    # Within k poisoned examples the attacker can replace the whole neighbourhood.
    assert np.all(joint_ca[e >= k] == 0)
    perm = np.random.default_rng(seed).permutation(len(y))
    np.testing.assert_array_equal(
        knn_joint_certified_accuracy(table[perm], y[perm], e, n_classes, k, table.shape[1]), joint_ca
    )
    # Columns beyond k are never read.
    if table.shape[1] > k:
        np.testing.assert_array_equal(knn_joint_certified_accuracy(table[:, :k], y, e, n_classes), joint_ca)


@settings(max_examples=100, deadline=None)
@given(_neighbour_cases())
def test_knn_joint_equals_brute_force_label_attacker(case):
    table, y, n_classes, k = case
    e = np.arange(0, 5)
    joint_ca = knn_joint_certified_accuracy(table, y, e, n_classes, n_neighbors=k, n_train=table.shape[1])
    a = predict(knn_votes_from_labels(table, min(k, table.shape[1]), n_classes))
    correct = np.flatnonzero(a == y)
    for position, budget in enumerate(e.tolist()):
        costs = _direct_costs(table[correct], k, n_classes, budget)
        flips = _brute_force_flips(a[correct].tolist(), costs, budget, n_classes)
        assert joint_ca[position] == pytest.approx((len(correct) - flips) / len(y))


def test_knn_joint_small_training_set_is_not_looser_than_k_equal_n():
    """n < k: an addition pushes nothing out while the neighbourhood is short, so k > n certifies at least
    as much as k = n on the same table (A(m) = A(n) beyond n)."""
    rng = np.random.default_rng(3)
    # Several predicted labels, so that the shared budget matters (with one label every bound is individual).
    y = np.arange(200) % 3
    table = np.where(rng.random((200, 9)) < 0.7, y[:, None], rng.integers(0, 3, (200, 9)))
    e = np.arange(0, 12)
    short = knn_joint_certified_accuracy(table, y, e, 3)
    longer = knn_joint_certified_accuracy(table, y, e, 3, n_neighbors=15, n_train=9)
    assert np.all(longer >= short) and np.any(longer > short)


@settings(max_examples=150, deadline=None)
@given(_neighbour_cases())
def test_knn_joint_costs_from_the_table_match_the_prefix_matrix_version(case):
    """The certificate's kernel (no prefix matrix, inputs in parallel) equals knn_joint_costs on every input."""
    table, _, n_classes, k = case
    table = table[:, : min(k, table.shape[1])]
    votes = knn_votes_from_labels(table, table.shape[1], n_classes)
    a = predict(votes)
    rival = rival_counts(votes, a).astype(np.int64)
    e = np.arange(0, k + 3)
    rows = np.arange(table.shape[0])[::-1].copy()  # any subset, in any order
    out = np.empty((len(e), len(rows)), dtype=np.int64)
    joint._knn_joint_costs_of_rows(table, rows, a, rival, k, e, out)
    expected = knn_joint_costs(prefix_label_counts(table, a), rival, k, e)
    np.testing.assert_array_equal(out, expected[:, rows])


@pytest.mark.parametrize(
    ("table", "y", "n_classes", "k", "error"),
    [
        (np.zeros((2, 0), dtype=int), [0, 0], 2, None, ValueError),
        (np.zeros((0, 3), dtype=int), [], 2, None, ValueError),
        (np.zeros(3, dtype=int), [0], 2, None, ValueError),
        (np.zeros((2, 3)), [0, 0], 2, None, TypeError),
        (np.full((2, 3), 2), [0, 0], 2, None, ValueError),
        (np.zeros((2, 3), dtype=int), [0, 5], 2, None, ValueError),
        (np.zeros((2, 3), dtype=int), [0, 0], 1, None, ValueError),
        (np.zeros((2, 3), dtype=int), [0, 0], 2, 0, ValueError),
    ],
)
def test_knn_joint_rejects_bad_input(table, y, n_classes, k, error):
    with pytest.raises(error):
        knn_joint_certified_accuracy(table, y, [0, 1], n_classes, n_neighbors=k)


def test_the_global_curve_keeps_its_attacker_for_worst_case_removals():
    """An rNN result's global curve and its worst-case removals come from one knapsack per size: after the curve,
    the removals are read back, and they equal a fresh global_attack_allocation whatever was computed first."""
    from poisoncert._classifiers import certify_neighbours

    rng = np.random.default_rng(41)
    X = rng.random((260, 4))
    y = (X[:, 0] * 3).astype(int) % 3
    fresh = lambda: certify_neighbours(X[:200], y[:200], X[200:], y[200:], rnn=[0.45])[1][0.45]  # noqa: E731
    e = np.array([0, 1, 2, 3, 5, 8])
    expected = joint.global_attack_allocation(fresh().votes, y[200:], e)
    assert expected.sum() > 0
    result = fresh()
    result.curve(e[::2], "global")
    assert set(result._global_removals) == set(e[::2].tolist())  # kept by the curve
    np.testing.assert_array_equal(result.worst_case_removals(e), expected)  # the rest solved on demand
    np.testing.assert_array_equal(result.curve(e, "global")[0], joint.global_rnn_certified_accuracy(
        fresh().votes, y[200:], e))
    np.testing.assert_array_equal(fresh().worst_case_removals(e[::-1]), expected[::-1])


@numba.njit
def _raise_all(target, source, gain):  # pragma: no cover - compiled
    joint._raise_shifted(target, source, gain)


@settings(max_examples=200, deadline=None)
@given(arrays(np.int64, st.integers(0, 70), elements=st.sampled_from([-(1 << 40), -(1 << 40) + 3, -5, 0, 1, 7, 900])),
       st.integers(0, 5000), st.randoms(use_true_random=False))
def test_raising_by_a_shifted_row_is_an_elementwise_maximum(target, gain, random):
    # The sign-mask form (no masked stores) against the plain maximum, with the DP's "impossible" value among them.
    source = np.array(random.sample(list(target), len(target)), dtype=np.int64)
    expected = np.maximum(target, source + gain)
    _raise_all(target, source, gain)
    np.testing.assert_array_equal(target, expected)
