"""Properties of the vote-based certificates (individual, ISLAND, RD) and their input validation.

Exhaustive poisoning enumeration lives in test_soundness.py; here: the formulas against direct definitions,
and the invariants every curve must satisfy.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from poisoncert import certify
from poisoncert.votes import knn_votes_from_labels, predict, runner_up


def _votes_and_labels(draw_votes, n_classes_max=4, n_max=25, vote_max=12):
    return st.integers(2, n_classes_max).flatmap(
        lambda c: st.integers(1, n_max).flatmap(
            lambda n: st.tuples(
                arrays(np.int64, (n, c), elements=st.integers(0, vote_max)),
                arrays(np.int64, (n,), elements=st.integers(0, c - 1)),
            )
        )
    )


vote_cases = _votes_and_labels(None)


def _direct_prediction(row):
    best = max(range(len(row)), key=lambda other: (row[other], other))
    return best


def test_predict_and_runner_up_follow_larger_label_rule():
    votes = np.array([[3, 3, 1], [0, 2, 5], [0, 0, 0], [4, 1, 4], [2, 5, 5]])
    assert predict(votes).tolist() == [1, 2, 2, 2, 2]
    assert runner_up(votes).tolist() == [0, 1, 1, 0, 1]


@given(vote_cases)
def test_prediction_matches_direct_definition(case):
    votes, _ = case
    assert predict(votes).tolist() == [_direct_prediction(row.tolist()) for row in votes]


@given(vote_cases)
def test_individual_size_matches_min_over_labels_formula(case):
    votes, _ = case
    sizes = certify.certified_poisoning_size(votes)
    for row, size in zip(votes.tolist(), sizes.tolist(), strict=True):
        a = _direct_prediction(row)
        expected = min(-(-(row[a] - row[other] + (a > other)) // 2) - 1 for other in range(len(row)) if other != a)
        assert size == expected >= 0


@given(vote_cases)
def test_rnn_insertion_and_deletion_sizes(case):
    votes, _ = case
    for model in ("insertion", "deletion"):
        sizes = certify.certified_poisoning_size(votes, model)
        for row, size in zip(votes.tolist(), sizes.tolist(), strict=True):
            a = _direct_prediction(row)
            assert size == min(row[a] - row[other] + (a > other) for other in range(len(row)) if other != a) - 1
    np.testing.assert_array_equal(certify.certified_poisoning_size(votes, "label-flip"),
                                  certify.certified_poisoning_size(votes))


@settings(max_examples=150, deadline=None)
@given(vote_cases, st.integers(0, 2**31 - 1))
def test_curve_invariants_for_every_method(case, seed):
    votes, y = case
    e = np.arange(0, 30)
    clean = np.mean(predict(votes) == y)
    curves = {m: certify.certified_accuracy(votes, y, e, method=m, seed=seed) for m in ("individual", "island", "rd")}
    for curve in curves.values():
        assert curve[0] == pytest.approx(clean)  # CA(0) is the clean accuracy
        assert np.all(np.diff(curve) <= 1e-12)  # non-increasing in e
        assert np.all((curve >= 0) & (curve <= clean + 1e-12))
    assert np.all(curves["island"] >= curves["individual"] - 1e-12)


@settings(max_examples=100, deadline=None)
@given(vote_cases)
def test_island_does_not_depend_on_test_order(case):
    votes, y = case
    e = np.arange(0, 20)
    order = np.random.default_rng(0).permutation(len(y))
    np.testing.assert_allclose(certify.certified_accuracy(votes, y, e, "island"),
                               certify.certified_accuracy(votes[order], y[order], e, "island"))


def _theorem4_group_count(members, e):
    """Direct Theorem 4 on one group: sort by g descending, smallest w with tail sum <= e, certify w - 1."""
    g = sorted(members, reverse=True)
    for w in range(1, len(g) + 2):
        if sum(g[w - 1:]) <= e:
            return w - 1
    raise AssertionError


def _island_reference(votes, y, e):
    """ISLAND exactly as spec section 5 words it, with Python loops."""
    votes = votes.tolist()
    certified = 0
    pool = []
    for row, label in zip(votes, y.tolist(), strict=True):
        a = _direct_prediction(row)
        b = max((other for other in range(len(row)) if other != a), key=lambda other: (row[other], other))
        m = row[a] - row[b] + (a > b)
        if a != label or m - e <= 0:
            continue  # T0
        if -(-m // 2) - 1 >= e:
            certified += 1  # T1
        else:
            pool.append((a, m))  # T2
    while pool:
        group = {}
        for a, m in sorted(pool, key=lambda item: -item[1]):
            group.setdefault(a, (a, m))
        for member in group.values():
            pool.remove(member)
        certified += _theorem4_group_count([m - e for _, m in group.values()], e)
    return certified / len(y)


@settings(max_examples=150, deadline=None)
@given(vote_cases)
def test_island_matches_reference(case):
    votes, y = case
    e = np.arange(0, 15)
    expected = [_island_reference(votes, y, int(size)) for size in e]
    np.testing.assert_allclose(certify.certified_accuracy(votes, y, e, "island"), expected)


def test_island_hand_example():
    # Margins 3, 3, 5, 3 with predictions 0, 1, 2, 0; e = 2: input 2 is in T1, inputs 0, 1, 3 in T2 with g = 1.
    # Label 0 has two T2 inputs, so ISLAND forms groups {0 or 3, 1} and {3 or 0}; each group's tail sum <= 2.
    votes = np.array([[5, 2, 0], [0, 5, 2], [0, 1, 5], [4, 0, 1]])
    y = np.array([0, 1, 2, 0])
    assert certify.certified_accuracy(votes, y, [2], "island")[0] == pytest.approx(1 / 4)
    assert _island_reference(votes, y, 2) == pytest.approx(1 / 4)


def test_paper_sort_key_trap_does_not_overcount():
    # One group of two members: a correct member with margin e+1 (g = 1) and a misclassified member whose raw
    # margin s_a - s_b is larger. The paper's key sorts the misclassified one first and counts it; we must not.
    votes = np.array([[4, 1, 0], [0, 1, 9]])
    y = np.array([0, 0])  # second input is misclassified (predicted 2)
    for e in range(0, 6):
        ca = certify.certified_accuracy(votes, y, [e], "rd", seed=1)[0]
        island = certify.certified_accuracy(votes, y, [e], "island")[0]
        assert ca <= 0.5 and island <= 0.5


@pytest.mark.parametrize("seed", range(20))
def test_rd_curve_sorted_once_equals_sorting_every_size(seed):
    # The RD curve sorts its fixed groups once (correct members by margin, then the misclassified); each size's
    # count must equal that of the members sorted by that size's g, with misclassified members of large margin,
    # equal margins and sizes past every margin.
    from poisoncert.certify import _certified_in_groups, _rank_within_label
    from poisoncert.votes import margin_terms

    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(1, 60)), int(rng.integers(2, 5))
    votes = rng.integers(0, 8, (n, c))
    a, _, margin = margin_terms(votes)
    y = np.where(rng.random(n) < 0.7, a, rng.integers(0, c, n))
    e = np.arange(0, 12)
    order = np.random.default_rng(seed).permutation(n)
    group = np.empty(n, dtype=np.int64)
    group[order] = _rank_within_label(a[order], np.zeros(n))
    expected = [_certified_in_groups(group, np.where(a == y, np.maximum(margin - size, 0), 0), size) / n
                for size in e]
    np.testing.assert_array_equal(certify.certified_accuracy(votes, y, e, "rd", seed=seed), expected)


def test_accuracy_from_certified_sizes():
    sizes = np.array([-1, 0, 0, 3, 7])
    np.testing.assert_allclose(certify.accuracy_from_certified_sizes(sizes, [0, 1, 3, 4, 7, 8]),
                               [0.8, 0.4, 0.4, 0.2, 0.2, 0.0])


def test_knn_variants_equal_general_for_label_flip_and_are_bounded():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, size=(40, 30))
    general = certify.knn_certified_poisoning_size(labels, 9, 3, "general")
    votes = knn_votes_from_labels(labels, 9, 3)
    np.testing.assert_array_equal(general, certify.certified_poisoning_size(votes))
    np.testing.assert_array_equal(certify.knn_certified_poisoning_size(labels, 9, 3, "label-flip"), general)
    insertion = certify.knn_certified_poisoning_size(labels, 9, 3, "insertion")
    deletion = certify.knn_certified_poisoning_size(labels, 9, 3, "deletion")
    # One-sided attacks are weaker than the general one, so their certificates are at least as large.
    assert np.all(insertion >= general) and np.all(deletion >= general)
    assert np.all(insertion <= 8)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: certify.certified_poisoning_size(np.zeros(3, dtype=int)), "2-D"),
        (lambda: certify.certified_poisoning_size(np.zeros((2, 1), dtype=int)), "at least 2 classes"),
        (lambda: certify.certified_poisoning_size(np.array([[1.5, 0.0]])), "integer counts"),
        (lambda: certify.certified_poisoning_size(np.array([[-1, 2]])), "non-negative"),
        (lambda: certify.certified_poisoning_size(np.array([[1, 2]]), "bogus"), "unknown threat model"),
        (lambda: certify.certified_accuracy(np.array([[1, 2]]), [0], [-1]), ">= 0"),
        (lambda: certify.certified_accuracy(np.array([[1, 2]]), [0, 1], [0]), "2 entries"),
        (lambda: certify.certified_accuracy(np.array([[1, 2]]), [2], [0]), "outside 0..1"),
        (lambda: certify.certified_accuracy(np.array([[1, 2]]), [-1], [0]), "outside 0..1"),
        (lambda: certify.certified_accuracy(np.array([[1, 2]]), [0.5], [0]), "integer label"),
        (lambda: certify.certified_accuracy(np.array([[1, 2]]), [0], [0], method="nope"), "unknown certification"),
        (lambda: certify.certified_accuracy(np.array([[1, 2]]), [0], [[0, 1]]), "1-D"),
        (lambda: certify.knn_certified_poisoning_size(np.zeros((2, 3), dtype=int), 5, 2, n_train=10), "needs 5"),
        (lambda: certify.knn_certified_poisoning_size(np.zeros((2, 3), dtype=int), 0, 2), ">= 1"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_truncated_neighbour_tables_never_give_optimistic_certificates():
    # Clean order 0,0,0,1,1,1 and k = 3: deleting two 0s pulls in 0,1,1 -> flipped, so the exact size is 1.
    full = np.array([[0, 0, 0, 1, 1, 1]])
    assert certify.knn_certified_poisoning_size(full, 3, 2, "deletion", n_train=6).tolist() == [1]
    # Only the first k columns and no n_train: the table is not assumed complete, and no deletion within it
    # flips the input, so the certificate is undecided: refused, with what to pass (never a silent cap).
    with pytest.raises(ValueError, match="not decided within the 3 neighbours"):
        certify.knn_certified_poisoning_size(full[:, :3], 3, 2, "deletion")
    # Five columns decide it: two deletions of label 0 leave 0, 1, 1 in the window.
    assert certify.knn_certified_poisoning_size(full[:, :5], 3, 2, "deletion").tolist() == [1]
    # A table narrower than k is refused unless n_train says the training set really is that small.
    with pytest.raises(ValueError, match="pass n_train"):
        certify.knn_certified_poisoning_size(full[:, :2], 3, 2)
    order = np.array([[0, 0, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="pass n_train"):
        certify.knn_joint_certified_accuracy(order[:, :2], [0], [0], 2, n_neighbors=4)
    assert certify.knn_joint_certified_accuracy(order, [0], [0], 2, n_neighbors=4).tolist() == [0.0]


def test_votes_from_labels_equal_counts_for_every_k():
    """Votes for many k in one pass (four interleaved histograms per row) equal a bincount of each prefix, and an
    out-of-range label anywhere inside the counted prefix is refused."""
    rng = np.random.default_rng(17)
    table = rng.choice(4, size=(9, 203), p=[0.7, 0.1, 0.15, 0.05]).astype(np.int16)
    ks = [1, 3, 4, 5, 64, 203, 300, 7]
    votes = knn_votes_from_labels(table, ks, 4)
    for position, k in enumerate(ks):
        expected = np.stack([np.bincount(row[:k], minlength=4) for row in table])
        np.testing.assert_array_equal(votes[position], expected)
    for column in (0, 101, 102, 103, 199):
        broken = table.copy()
        broken[5, column] = 4
        with pytest.raises(ValueError, match=r"label indices in 0..3"):
            knn_votes_from_labels(broken, 200, 4)
    # The last one broke column 199: the first 199 columns still vote.
    np.testing.assert_array_equal(knn_votes_from_labels(broken, 199, 4),
                                  np.stack([np.bincount(row[:199], minlength=4) for row in table]))


@pytest.mark.parametrize("bad", [-1, 3])
def test_votes_from_labels_refuse_labels_outside_the_classes(bad):
    table = np.array([[0, 1, 2, 1], [2, 2, bad, 0]])
    with pytest.raises(ValueError, match=r"label indices in 0..2"):
        knn_votes_from_labels(table, 3, 3)
    # Columns past every k are not read: the same table votes fine for k = 2 (from a column slice, not a copy).
    np.testing.assert_array_equal(knn_votes_from_labels(table[:, :4], 2, 3), [[1, 1, 0], [0, 0, 2]])
