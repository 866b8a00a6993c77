"""Split-budget joint certificates (spec 5d rNN, 5e kNN): against direct references, and their properties.

The exhaustive enumeration of poisoned training sets lives in test_soundness.py. Here:

* the bounded label knapsack (``_bound_flips``) against the exact solver, for every threshold and slack;
* each certificate against ``split_reference.py``, which enumerates every (alpha, r) and evaluates the spec's
  conditions literally (rNN, kNN; general, insertion-only, deletion-only; n < k, e > k, windows past n);
* the two kNN engines (e-independent SL/SR profiles and per-e need tables) against each other on larger tables;
* dominance (5d >= 5b >= ISLAND >= individual, 5e >= 5c >= individual), CA(0) = clean accuracy, monotone curves,
  independence of the test-set order; time, node and memory limits stay sound and say they are not exact; bad
  input.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poisoncert import certify, joint_split
from poisoncert.joint import max_flips
from poisoncert.joint_split import knn_split_certificate, rnn_split_certificate
from poisoncert.votes import knn_votes_from_labels, predict
from split_reference import knn_ref, rnn_ref

MODELS = ("general", "insertion", "deletion")


@st.composite
def _knapsack_cases(draw):
    c = draw(st.integers(1, 4))
    budget = draw(st.one_of(st.integers(0, 12), st.integers(60, 140)))  # costs in one scratch word, and in several
    n = draw(st.integers(0, 25))
    labels = draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    costs = draw(st.lists(st.integers(0, budget + 1), min_size=n, max_size=n))
    return np.array(labels, dtype=np.int64), np.array(costs, dtype=np.int64), budget, c


@settings(max_examples=300, deadline=None)
@given(_knapsack_cases())
def test_bounded_knapsack_is_exact_above_the_threshold(case):
    labels, costs, budget, c = case
    truth = max_flips(labels, costs, budget, n_classes=c)
    hist = np.zeros((c, budget + 1), np.int32)
    touched = np.zeros((c, budget // 64 + 1), np.uint64)
    out = np.zeros(3, np.int64)
    for threshold in range(-1, truth + 3):
        for slack in (0, 3, joint_split._NO_SLACK_LIMIT):
            joint_split._bound_flips(labels, costs, budget, c, threshold, slack, hist, touched, out)
            assert not hist.any() and not touched.any(), "the scratch arrays are left zero for the next call"
            upper, attained, exact = out.tolist()
            assert attained <= truth, "a feasible allocation cannot beat the optimum"
            if upper <= threshold:
                assert truth <= threshold
            else:
                assert upper >= truth
            if exact:
                assert upper == attained == truth
            if slack == joint_split._NO_SLACK_LIMIT and truth > threshold:
                assert exact and upper == truth


def _random_votes(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = int(rng.integers(2, 4))
    n_test = int(rng.integers(1, 5))
    votes = rng.integers(0, 6, (n_test, c))
    prediction = predict(votes)
    y = np.where(rng.random(n_test) < 0.8, prediction, rng.integers(0, c, n_test))
    return votes, y


@pytest.mark.parametrize("seed", range(40))
def test_rnn_split_equals_direct_maximisation_over_every_split(seed: int) -> None:
    rng = np.random.default_rng(seed)
    votes, y = _random_votes(rng)
    es = [0, 1, 2, 3]
    for model in MODELS:
        result = rnn_split_certificate(votes, y, es, model)
        assert result.exact.all() and result.spec_section == "5d"
        np.testing.assert_allclose(result.accuracy, [rnn_ref(votes, y, e, model) for e in es],
                                   err_msg=f"{model}: votes {votes.tolist()} y {y.tolist()}")


def _random_table(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """Skewed neighbour-label tables holding all n training examples; k > n and e > k occur."""
    c = int(rng.integers(2, 4))
    n_test = int(rng.integers(1, 4))
    n = int(rng.integers(1, 9))
    k = int(rng.integers(1, n + 3))
    table = rng.integers(0, c, (n_test, n))
    for row in table:
        row[rng.random(n) < 0.5] = rng.integers(0, c)
    kk = min(k, n)
    prediction = predict(knn_votes_from_labels(table[:, :kk], kk, c))
    y = np.where(rng.random(n_test) < 0.85, prediction, rng.integers(0, c, n_test))
    return table, y, k, c, n


@pytest.mark.parametrize("profiles", [True, False], ids=["profiles", "tables"])
@pytest.mark.parametrize("seed", range(40))
def test_knn_split_equals_direct_check_of_condition_star(seed: int, profiles: bool, monkeypatch) -> None:
    monkeypatch.setattr(joint_split, "_USE_PROFILES", profiles)
    table, y, k, c, n = _random_table(np.random.default_rng(seed))
    es = [0, 1, 2, 3]
    for model in MODELS:
        result = knn_split_certificate(table, y, es, k, n_classes=c, n_train=n, threat_model=model)
        assert result.exact.all() and result.spec_section == "5e"
        np.testing.assert_allclose(result.accuracy, [knn_ref(table, y, e, k, c, n, model) for e in es],
                                   err_msg=f"{model}, k={k}, n={n}: table {table.tolist()} y {y.tolist()}")


def _mnist_like_table(seed: int, n_test: int = 60, n: int = 400, c: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour tables where each input's own label dominates early and thins out further away."""
    rng = np.random.default_rng(seed)
    own = rng.integers(0, c, n_test)
    purity = np.linspace(0.9, 0.3, n)[None, :] * rng.uniform(0.7, 1.1, (n_test, 1))
    keep = rng.random((n_test, n)) < purity
    table = np.where(keep, own[:, None], rng.integers(0, c, (n_test, n)))
    y = np.where(rng.random(n_test) < 0.9, own, rng.integers(0, c, n_test))
    return table, y


@pytest.mark.parametrize("seed", range(4))
def test_knn_profiles_and_tables_agree_on_larger_tables(seed: int, monkeypatch) -> None:
    table, y = _mnist_like_table(seed)
    k, es = 40, [0, 3, 7, 12, 20, 33, 40]
    profiles = knn_split_certificate(table, y, es, k, n_classes=4)
    monkeypatch.setattr(joint_split, "_USE_PROFILES", False)
    tables = knn_split_certificate(table, y, es, k, n_classes=4)
    np.testing.assert_array_equal(profiles.max_flips, tables.max_flips)
    assert profiles.exact.all() and tables.exact.all()


def _profile_bits(table_row: np.ndarray, a: int, rival: int, k: int, n: int, reach: int, side: int) -> np.ndarray:
    """Bit x = whether ``D = s_rival - s_a`` reaches a new running maximum at the side's (x + 1)-th step, read off
    the definition: the steps' D changes, their cumulative sum and its running maximum."""
    x = np.arange(reach)
    if side == 0:  # SL: neighbour k - x - 1 dropped, if it is a real one (below min(k, n))
        position = k - x - 1
        valid = (position >= 0) & (position < min(k, n))
        sign = 1
    else:  # SR: neighbour k + x taken in, if there is one
        position = k + x
        valid = (position < n) & (position < table_row.shape[0])
        sign = -1
    labels = table_row[np.where(valid, position, 0)]
    delta = np.where(valid, sign * ((labels == a).astype(int) - (labels == rival).astype(int)), 0)
    level = np.cumsum(delta)
    best = np.maximum.accumulate(np.concatenate([[0], level]))[:-1]
    return level > best


@pytest.mark.parametrize("seed", range(12))
def test_knn_profiles_follow_their_definition_over_many_words(seed: int) -> None:
    # Word-at-a-time kernel against the running maxima, with profiles of several 64-bit words (a partial last one),
    # k above n, tables narrower than the training set, long runs of one label and labels that never occur.
    rng = np.random.default_rng(seed)
    c = int(rng.integers(2, 7))
    n_test, width = int(rng.integers(1, 6)), int(rng.integers(150, 700))
    # A table narrower than the training set (it holds the first k and more), or the whole of it with k > n too.
    n = width if seed % 3 else width + int(rng.integers(1, 200))
    k = width + 5 if seed % 3 and seed % 4 == 1 else int(rng.integers(20, width))
    table = rng.integers(0, c - (seed % 2), (n_test, width)).astype(np.int8)
    for row in table:
        start = int(rng.integers(0, width - 50))
        row[start : start + int(rng.integers(1, 140))] = rng.integers(0, c)
    votes = knn_votes_from_labels(table[:, : min(k, n, width)], min(k, n, width), c).astype(np.int64)
    a = predict(votes)
    reach = int(rng.integers(1, min(k, 300) + 1))
    inputs = np.arange(n_test)
    pair_row = np.full((n_test, c), -1, np.int64)
    wanted = rng.random((n_test, c)) < 0.8
    wanted[inputs, a] = False
    pair_row.T[wanted.T] = np.arange(int(wanted.sum()))
    n_words = -(-reach // 64)
    sl_bits = np.full((int(wanted.sum()), n_words), 7, np.uint64)
    sr_bits = np.full((n_words, int(wanted.sum())), 7, np.uint64).T
    joint_split._knn_profiles(table, inputs, a, votes, pair_row, k, n, reach, sl_bits, sr_bits)
    for i, rival in zip(*np.nonzero(wanted), strict=True):
        for side, bits in ((0, sl_bits), (1, sr_bits)):
            unpacked = np.unpackbits(np.ascontiguousarray(bits[pair_row[i, rival]]).view(np.uint8),
                                     bitorder="little")
            np.testing.assert_array_equal(unpacked[:reach].astype(bool),
                                          _profile_bits(table[i], a[i], rival, k, n, reach, side),
                                          err_msg=f"side {side}")
            assert not unpacked[reach:].any(), "bits past the reach are clear"


@pytest.mark.parametrize("seed", range(4))
def test_a_certifier_asked_again_agrees_with_a_fresh_one(seed: int) -> None:
    # It keeps its profiles and the sizes known to flip every input between calls, and builds profiles for a
    # little past the largest individual size first: none of it may change a value.
    from poisoncert.joint_split import KnnSplitCertifier

    table, y = _mnist_like_table(seed)
    k = 40
    certifier = KnnSplitCertifier(table, y, k, 4)
    calls = [[0, 3, 7], [12, 20, 33, 40], [2, 39, 25], [40]]
    for es in calls:
        again = certifier.certify(es)
        fresh = knn_split_certificate(table, y, es, k, n_classes=4)
        np.testing.assert_array_equal(again.max_flips, fresh.max_flips)
        assert again.exact.all() and fresh.exact.all()
        assert (again.attack_flips == again.max_flips).all()


def test_a_coarsened_saturated_size_does_not_mark_a_later_call_inexact() -> None:
    """Regression (review): a size that flipped everything on a coarsened table, remembered from an earlier call,
    marked a size settled exactly before as not exact."""
    from poisoncert.joint_split import KnnSplitCertifier

    table = np.array([[1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1], [0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 1, 0],
                      [1, 1, 0, 1, 0, 1, 0, 1, 0, 0, 0, 0]])
    certifier = KnnSplitCertifier(table, np.array([1, 0, 1]), 2, 2, 12, max_memory_mb=3 / 2**20)
    first, coarse, again = certifier.certify([9]), certifier.certify([5]), certifier.certify([9])
    assert first.exact.tolist() == [True] and coarse.exact.tolist() == [False]
    assert again.exact.tolist() == [True] and again.accuracy.tolist() == first.accuracy.tolist()


@pytest.mark.parametrize("seed", range(3))
def test_needs_settled_by_bracketing_values_equal_computed_needs(seed: int) -> None:
    """h(alpha) is non-increasing in alpha: where h at a smaller and a larger alpha agree, the kernel takes that
    value instead of computing it; the result must equal computing every pair, at every alpha."""
    table, y = _mnist_like_table(seed)
    k, e = 40, 20
    certifier = joint_split.KnnSplitCertifier(table, y, k, n_classes=4)
    profiles = certifier._online(e)
    pairs = np.arange(len(profiles.rival), dtype=np.int64)
    zeros = np.empty(len(pairs), np.int64)
    joint_split._online_bounds(pairs, profiles.tie, profiles.d_k, profiles.sl_bits, profiles.sl_cum, profiles.sr_bits,
                               profiles.sr_cum, e, np.empty(len(pairs), np.int64), zeros)
    args = (np.arange(len(pairs)), profiles.tie[pairs], profiles.d_k[pairs], zeros, profiles.sl_bits,
            profiles.sl_cum, profiles.sr_bits, profiles.sr_cum, e)
    none = np.empty(0, np.int32)
    direct = np.empty((e + 1, len(pairs)), np.int32)
    for alpha in range(e + 1):
        joint_split._online_label_needs(pairs, *args, alpha, none, none, direct[alpha])
    assert np.all(np.diff(direct, axis=0) <= 0) and len(np.unique(direct)) > 3  # the premise, on a varied case
    bracketed = np.empty(len(pairs), np.int32)
    for low in range(e + 1):
        for high in range(low + 2, e + 1):
            for alpha in range(low + 1, high):
                joint_split._online_label_needs(pairs, *args, alpha, direct[low], direct[high], bracketed)
                np.testing.assert_array_equal(bracketed, direct[alpha], err_msg=f"{low} < {alpha} < {high}")


def _confuser_table(seed: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Tables whose rival votes concentrate on one "confuser" label per input, over many labels: the branch and
    bound there revisits labels at new additions between memoised ones (small random tables never do)."""
    rng = np.random.default_rng(seed)
    c, n_test, n, k = 8, 200, 400, 80
    own = rng.integers(0, c, n_test)
    purity = np.linspace(0.85, 0.3, n)[None, :] * rng.uniform(0.6, 1.1, (n_test, 1))
    confuser = rng.integers(0, c, n_test)
    other = np.where(rng.random((n_test, n)) < 0.7, confuser[:, None], rng.integers(0, c, (n_test, n)))
    table = np.where(rng.random((n_test, n)) < purity, own[:, None], other)
    y = np.where(rng.random(n_test) < 0.9, own, rng.integers(0, c, n_test))
    return table, y, k, c


@pytest.mark.parametrize("seed", range(3))
def test_bracketed_needs_in_the_search_give_the_table_values(seed: int, monkeypatch) -> None:
    table, y, k, c = _confuser_table(seed)
    es = [k // 4, k // 2, 3 * k // 4, k]
    build = joint_split._OnlineProfiles.problem
    problems = []

    def recording(self, *args):  # type: ignore[no-untyped-def]
        problems.append(build(self, *args))
        return problems[-1]

    monkeypatch.setattr(joint_split._OnlineProfiles, "problem", recording)
    profiles = knn_split_certificate(table, y, es, k, n_classes=c)
    # brackets were used, not only available (the memo's counters: store used, entries, bracketed evaluations)
    assert sum(int(problem._arrays[7][-1][2]) for problem in problems) > 50
    monkeypatch.setattr(joint_split, "_USE_PROFILES", False)
    tables = knn_split_certificate(table, y, es, k, n_classes=c)
    np.testing.assert_array_equal(profiles.max_flips, tables.max_flips)
    assert profiles.exact.all() and tables.exact.all()


@pytest.mark.parametrize("seed", range(3))
def test_dense_and_per_pair_needs_give_the_same_search(seed: int, monkeypatch) -> None:
    """The needs matrix (labels x inputs) and the per-pair layout (many labels, few rivals each) run the same branch
    and bound: same values, node counts and attackers, and the values of the per-e tables."""
    rng = np.random.default_rng(seed)
    c, n_test, n, k = 16, 150, 200, 50
    own = rng.integers(0, c, n_test)
    rival = (own + 1 + rng.integers(0, c - 1, n_test)) % c
    table = np.where(rng.random((n_test, n)) < rng.uniform(0.5, 0.8, (n_test, 1)), own[:, None], rival[:, None])
    table[:, rng.random(n) < 0.05] = rng.integers(0, c)  # a few columns of some third label
    es = [3, k // 4, k // 2, k]
    runs = {}
    for padding in (0, 10**6):  # always dense, never dense
        monkeypatch.setattr(joint_split, "_DENSE_PADDING", padding)
        runs[padding] = knn_split_certificate(table, own, es, k, n_classes=c)
    dense, sparse = runs[10**6], runs[0]
    for name in ("max_flips", "attack_flips", "nodes", "additions", "removals", "exact"):
        np.testing.assert_array_equal(getattr(dense, name), getattr(sparse, name), err_msg=name)
    assert dense.nodes.sum() > 0
    monkeypatch.setattr(joint_split, "_USE_PROFILES", False)
    np.testing.assert_array_equal(knn_split_certificate(table, own, es, k, n_classes=c).max_flips, dense.max_flips)


@pytest.mark.parametrize("seed", range(6))
def test_split_dominates_the_older_certificates(seed: int) -> None:
    rng = np.random.default_rng(seed)
    votes = rng.integers(0, 40, (80, 4)) + np.eye(4, dtype=np.int64)[rng.integers(0, 4, 80)] * 30
    y = np.where(rng.random(80) < 0.85, predict(votes), rng.integers(0, 4, 80))
    es = np.arange(0, 40, 3)
    split = certify.certified_accuracy(votes, y, es, method="split")
    glob = certify.certified_accuracy(votes, y, es, method="global")
    island = certify.certified_accuracy(votes, y, es, method="island")
    individual = certify.certified_accuracy(votes, y, es, method="individual")
    assert np.all(split >= glob - 1e-12) and np.all(glob >= island - 1e-12) and np.all(island >= individual - 1e-12)
    assert split[0] == pytest.approx(np.mean(predict(votes) == y))
    assert np.all(np.diff(split) <= 1e-12)
    perm = rng.permutation(80)
    np.testing.assert_allclose(certify.certified_accuracy(votes[perm], y[perm], es, method="split"), split)
    for model in ("insertion", "deletion"):  # one kind of poisoning only: never below the general bound
        assert np.all(certify.certified_accuracy(votes, y, es, "split", threat_model=model) >= split - 1e-12)

    table, y = _mnist_like_table(seed)
    k = 40
    es = np.arange(0, 44, 4)
    split = certify.knn_split_certified_accuracy(table, y, es, k, n_classes=4)
    joint = certify.knn_joint_certified_accuracy(table[:, :k], y, es, 4, n_neighbors=k)
    sizes = certify.knn_certified_poisoning_size(table[:, :k], k, 4)
    correct = predict(knn_votes_from_labels(table[:, :k], k, 4)) == y
    individual = np.array([np.mean(correct & (sizes >= e)) for e in es])
    assert np.all(split >= joint - 1e-12) and np.all(joint >= individual - 1e-12)
    assert split[0] == pytest.approx(np.mean(correct))
    assert np.all(np.diff(split) <= 1e-12)
    perm = rng.permutation(len(y))
    np.testing.assert_allclose(certify.knn_split_certified_accuracy(table[perm], y[perm], es, k, n_classes=4), split)


def test_no_correct_input_and_two_labels() -> None:
    votes = np.array([[3, 1], [0, 2]])
    assert certify.certified_accuracy(votes, [1, 0], [0, 1, 5], method="split").tolist() == [0.0, 0.0, 0.0]
    table = np.array([[0, 0, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_allclose(certify.knn_split_certified_accuracy(table, [1, 0], [0, 1], 2, n_classes=2), [0, 0])


def test_limits_stay_sound_and_say_they_are_not_exact() -> None:
    rng = np.random.default_rng(3)
    votes = rng.integers(0, 30, (300, 6)) + np.eye(6, dtype=np.int64)[rng.integers(0, 6, 300)] * 25
    y = predict(votes)
    es = [10, 20, 30]
    exact = rnn_split_certificate(votes, y, es)
    assert exact.exact.all() and np.all(exact.nodes > 1), "this instance must need a real search"
    for limits in ({"node_limit": 1}, {"time_limit": 1e-9}):
        limited = rnn_split_certificate(votes, y, es, **limits)
        assert np.all(limited.accuracy <= exact.accuracy + 1e-12), "a limited search may only be more cautious"
        assert not limited.exact.all()
        assert np.all(limited.attack_flips <= exact.max_flips)  # the best attack found is a real one
        assert np.all((limited.max_flips == limited.attack_flips) == limited.exact)
    with pytest.raises(ValueError, match="time_limit"):
        rnn_split_certificate(votes, y, es, time_limit=0)
    with pytest.raises(ValueError, match="node_limit"):
        rnn_split_certificate(votes, y, es, node_limit=0)


def test_knn_tables_coarsened_to_a_memory_budget_stay_sound(monkeypatch) -> None:
    monkeypatch.setattr(joint_split, "_USE_PROFILES", False)
    table, y = _mnist_like_table(1)
    es = [8, 16, 24]
    exact = knn_split_certificate(table, y, es, 40, n_classes=4)
    small = knn_split_certificate(table, y, es, 40, n_classes=4, max_memory_mb=1e-4)
    assert exact.exact.all()
    assert np.all(small.accuracy <= exact.accuracy + 1e-12)
    assert not small.exact.all() and small.notes and "coarsened" in small.notes[0]
    np.testing.assert_array_equal(small.accuracy[small.exact], exact.accuracy[small.exact])


def test_the_worst_case_attack_is_consistent() -> None:
    votes = np.array([[4, 1, 0], [0, 4, 1], [1, 0, 4]])
    result = rnn_split_certificate(votes, [0, 1, 2], [2])
    assert result.max_flips.tolist() == result.attack_flips.tolist() == [1]
    assert result.additions.sum() <= 2 and result.removals.sum() <= 2
    # Replaying the reported split by hand flips exactly one input.
    alpha, r = result.additions[0], result.removals[0]
    flipped = 0
    for i, a in enumerate(predict(votes).tolist()):
        need = max(0, min(votes[i, a] - votes[i, lab] + (a > lab) - alpha[lab] for lab in range(3) if lab != a))
        flipped += r[a] >= need
    assert flipped == 1


@pytest.mark.parametrize("seed", range(30))
def test_remembered_evaluations_agree_with_fresh_ones(seed: int) -> None:
    # The branch and bound meets splits again; a remembered answer must say what a fresh evaluation would
    # let the caller conclude, and the costs of the final split must be computed at that split.
    rng = np.random.default_rng(seed)
    c, n = int(rng.integers(2, 5)), int(rng.integers(1, 30))
    margins = rng.integers(0, 8, (n, c)).astype(np.int64)
    labels = rng.integers(0, c, n)
    margins[np.arange(n), labels] = joint_split._MARGIN_OWN
    add, remove = int(rng.integers(0, 6)), int(rng.integers(0, 6))

    by_label = np.ascontiguousarray(margins.T)

    def make() -> joint_split._Problem:
        return joint_split._Problem(labels, c, add, remove, joint_split._RNN, (by_label,))

    remembering = make()
    splits = [rng.integers(0, add + 1, c) for _ in range(4)]
    for _ in range(25):
        alpha = splits[int(rng.integers(len(splits)))]
        threshold = int(rng.integers(-1, n + 1))
        slack = [0, 1, joint_split._NO_SLACK_LIMIT][int(rng.integers(3))]
        upper, attained, exact, active = remembering.evaluate(alpha, threshold, slack)
        fresh = make()
        true_upper, true_value, true_exact, true_active = fresh.evaluate(alpha, -1, joint_split._NO_SLACK_LIMIT)
        assert true_exact and true_upper == true_value
        assert attained <= true_value <= upper and active.tolist() == true_active.tolist()
        assert not exact or upper == attained == true_value
        # Without a slack limit an evaluation is exact wherever F exceeds the threshold (the search relies on it).
        assert exact or slack != joint_split._NO_SLACK_LIMIT or true_value <= threshold
        assert remembering.costs_at(alpha).tolist() == fresh.costs.tolist()
    assert remembering.evaluations <= 4 * 25


@pytest.mark.parametrize("seed", range(20))
def test_the_recorded_attacker_replays_its_flips(seed: int) -> None:
    rng = np.random.default_rng(seed)
    votes = rng.integers(0, 7, (int(rng.integers(2, 12)), int(rng.integers(2, 5))))
    prediction = predict(votes)
    result = rnn_split_certificate(votes, prediction, [1, 2, 3, 5])
    for alpha, r, flips in zip(result.additions, result.removals, result.attack_flips, strict=True):
        flipped = 0
        for i, a in enumerate(prediction.tolist()):
            need = min(max(0, votes[i, a] - votes[i, lab] + (a > lab) - alpha[lab])
                       for lab in range(votes.shape[1]) if lab != a)
            flipped += r[a] >= need
        assert flipped == flips


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: certify.knn_split_certified_accuracy([[0, 0, 1]], [0], [2], 2), "first k \\+ e = 4 neighbours"),
        (lambda: certify.knn_split_certified_accuracy([[0, 0, 1]], [0], [2], 2, n_train=5),
         "min\\(k \\+ e, n_train\\)"),
        (lambda: certify.knn_split_certified_accuracy([[0, 0, 1]], [0], [-1], 2), "must be >= 0"),
        (lambda: certify.knn_split_certified_accuracy([[0, 0, 1]], [3], [0], 2, n_classes=2), "outside 0..1"),
        (lambda: certify.knn_split_certified_accuracy([[0, 5, 1]], [0], [0], 2, n_classes=3), "outside 0..2"),
        (lambda: certify.knn_split_certified_accuracy(np.zeros((0, 3), int), [], [0], 2), "empty"),
        (lambda: certify.certified_accuracy([[1, 0]], [0], [-2], method="split"), "must be >= 0"),
        (lambda: certify.certified_accuracy([[1, 0]], [2], [0], method="split"), "outside 0..1"),
        (lambda: certify.certified_accuracy(np.zeros((0, 2), int), [], [0], method="split"), "empty"),
        (lambda: certify.certified_accuracy([[1, 0]], [0], [0], method="island", threat_model="deletion"),
         "general threat model only"),
    ],
)
def test_bad_input_gets_one_clear_error(call, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_a_table_covering_the_whole_training_set_needs_no_more_columns() -> None:
    table = np.array([[0, 0, 0, 1], [1, 1, 0, 1]])
    wide = certify.knn_split_certified_accuracy(table, [0, 1], [0, 1, 2, 3, 9], 3, n_classes=2, n_train=4)
    assert wide[0] == 1.0 and np.all(np.diff(wide) <= 0)


def test_without_n_train_the_table_end_is_never_taken_for_the_training_set_end() -> None:
    """Regression: a certifier built without n_train or max_e once clipped the order at k, so removals could not
    pull rival neighbours in and the bound was optimistic (2/3 at e = 3 here, where the truth is 1/3). Whatever the
    call sequence, the values must equal those computed with the true training-set size, and a table too narrow
    for e must be refused."""
    k = 10
    # Each input: 7 of its own label, then only rival labels: every removal of its label pulls a rival in.
    table = np.array([[a] * 7 + [rival] * 23 for a, rival in ((0, 1), (1, 2), (2, 0))])
    y, es = np.array([0, 1, 2]), [1, 2, 3, 4]
    truth = knn_split_certificate(table, y, es, k, n_classes=3, n_train=30).accuracy
    np.testing.assert_allclose(truth, [1, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(knn_split_certificate(table, y, es, k, n_classes=3).accuracy, truth)
    certifier = joint_split.KnnSplitCertifier(table, y, k, 3)
    np.testing.assert_allclose(certifier.certify(es).accuracy, truth)
    np.testing.assert_allclose(certifier.certify([3]).accuracy, truth[[2]])
    with pytest.raises(ValueError, match="k \\+ e"):
        certifier.certify([21])
    for profiles in (True, False):  # both engines
        joint_split._USE_PROFILES = profiles
        try:
            np.testing.assert_allclose(joint_split.KnnSplitCertifier(table, y, k, 3).certify(es).accuracy, truth)
        finally:
            joint_split._USE_PROFILES = True


def test_growing_profiles_never_read_past_a_narrow_table():
    """Regression (audit): a second, larger call grew the e <= k profiles past a table of width k + max_e.

    The columns beyond the table hold labels out of range, so any read there would corrupt the counts; the
    grown certifier must agree with a fresh one and with the pure function.
    """
    from poisoncert.joint_split import KnnSplitCertifier, knn_split_certificate

    k, width = 40, 52
    rng = np.random.default_rng(0)
    big = np.full((6, 120), 99, dtype=np.int64)  # label 99 does not exist (3 labels)
    big[:, :width] = rng.integers(0, 3, (6, width))
    big[:, :30] = (np.arange(6) % 3)[:, None]
    big[:, 30:width] = ((np.arange(6) + 1) % 3)[:, None]
    table = big[:, :width]
    y = table[:, 0]
    grown = KnnSplitCertifier(table, y, k, 3, n_train=1000)
    grown.certify([7])
    value = grown.certify([12])
    assert grown._profile_reach <= width - k  # the SR profile reads columns k .. k + reach - 1 only
    fresh = knn_split_certificate(np.ascontiguousarray(table), y, [12], k, 3, n_train=1000)
    assert value.accuracy.tolist() == fresh.accuracy.tolist()
    assert value.exact.tolist() == fresh.exact.tolist()


def test_a_saturated_coarsened_value_is_not_reused_as_exact(monkeypatch):
    """Regression (audit): once a coarsened size flipped everything, larger sizes inherited exact=True."""
    from poisoncert import joint_split
    from poisoncert.joint_split import knn_split_certificate

    table = np.array([[1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]])
    y = np.array([1, 0])
    monkeypatch.setattr(joint_split, "_USE_PROFILES", False)
    exact = knn_split_certificate(table, y, list(range(8)), 10, 2, n_train=14)
    coarse = knn_split_certificate(table, y, list(range(8)), 10, 2, n_train=14, max_memory_mb=1e-9)
    assert np.all(coarse.accuracy <= exact.accuracy + 1e-12)
    wrongly_exact = coarse.exact & (coarse.max_flips != exact.max_flips)
    assert not wrongly_exact.any(), (coarse.accuracy.tolist(), coarse.exact.tolist(), exact.accuracy.tolist())


@pytest.mark.parametrize("delays", [(0.0, 0.02), (0.02, 0.0)])
def test_sizes_above_saturation_record_the_smallest_saturated_attacker(monkeypatch, delays):
    """Which worker thread solves or fills in a size above saturation depends on timing; the files must not."""
    import time

    from poisoncert import joint_split
    from poisoncert.joint_split import _Solution, _solve_curve

    monkeypatch.setattr(joint_split, "_threadsafe_workers", lambda n_tasks: 2)
    n_candidates = 5

    def solve(size, previous, previous_budget):
        time.sleep(delays[size % 2])
        flips = min(size, n_candidates)
        return _Solution(flips, flips, np.array([size, 0]), 1), np.array([0, size]), False, size

    e = np.arange(12)
    results = _solve_curve(e, n_candidates, solve)
    for position, size in enumerate(e.tolist()):
        solution, removals, _ = results[position]
        if size <= n_candidates:
            assert solution.alpha.tolist() == [size, 0] and solution.nodes == 1
        else:
            assert solution.alpha.tolist() == [n_candidates, 0] and removals.tolist() == [0, n_candidates]
            assert solution.nodes == 0


def test_the_last_worker_left_gets_every_numba_thread_again(monkeypatch):
    """Workers run single-threaded inside numba; once the others are done, the check as each size's search starts
    gives the last one every thread (its threads change how fast, never what, it computes)."""
    import threading
    import time

    import numba

    from poisoncert import joint_split
    from poisoncert.joint_split import _Solution, _solve_curve, _widen_when_alone

    if numba.get_num_threads() < 2:
        pytest.skip("one numba thread")
    monkeypatch.setattr(joint_split, "_threadsafe_workers", lambda n_tasks: 2)
    seen: dict[int, list[tuple[str, int]]] = {}

    def solve(size, previous, previous_budget):
        threads = []
        for _ in range(5):  # five branch-and-bound nodes
            _widen_when_alone()
            threads.append(numba.get_num_threads())
            time.sleep(0.002 if size % 2 else 0.02)  # the odd sizes' worker ends first
        seen[size] = (threading.current_thread().name, threads)
        return _Solution(0, 0, np.array([size, 0]), 5), np.array([0, 0]), False, size

    _solve_curve(np.arange(6), 10, solve)
    assert all(threads == [1] * 5 for size, (_, threads) in seen.items() if size % 2)  # never alone
    widened = [numba.get_num_threads()] * 5
    assert seen[0][1][0] == 1 and seen[0][1][-1] == widened[0]  # widened mid-size, when the odd sizes ran out
    assert seen[2][1] == seen[4][1] == widened
    assert numba.get_num_threads() >= 2  # the caller's own setting is untouched


@pytest.mark.parametrize("seed", range(20))
def test_rnn_needs_and_the_labels_that_win_them_follow_the_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    c, n = int(rng.integers(2, 7)), int(rng.integers(1, 60))
    margins = rng.integers(-3, 12, (n, c)).astype(np.int64)
    labels = rng.integers(0, c, n)
    margins[np.arange(n), labels] = joint_split._MARGIN_OWN
    alpha, budget = rng.integers(0, 6, c), int(rng.integers(0, 9))
    out, active = np.empty(n, np.int64), np.empty(c, np.int64)
    joint_split._rnn_needs(np.ascontiguousarray(margins.T), alpha, budget, out, active, np.empty(n, np.int64))
    shifted = margins - alpha[None, :]
    need = np.maximum(shifted.min(axis=1), 0)
    np.testing.assert_array_equal(out, np.where(need <= budget, need, budget + 1))
    winners = shifted.argmin(axis=1)[need <= budget]  # the first label attaining the minimum
    np.testing.assert_array_equal(active, np.bincount(winners, minlength=c))


def test_a_search_of_many_boxes_finds_the_maximum_over_every_split() -> None:
    """The compiled branch and bound grows its box store past its first 64 boxes; F* is still the maximum of F over
    every split that spends the budget (F is non-decreasing in each alpha_l), each F by the exact knapsack."""
    rng = np.random.default_rng(4)
    c, n, e = 4, 400, 10
    votes = rng.integers(0, 40, (n, c)) + np.eye(c, dtype=np.int64)[rng.integers(0, c, n)] * 20
    y = predict(votes)
    result = rnn_split_certificate(votes, y, [e])
    assert result.nodes[0] > 64 and result.exact.all()
    a = predict(votes)
    own = votes[np.arange(n), a]
    margins = own[:, None] - votes + (a[:, None] > np.arange(c)[None, :])
    margins[np.arange(n), a] = 10**9
    best = 0
    for cut in itertools.combinations(range(e + c - 1), c - 1):  # every alpha with sum e (stars and bars)
        alpha = np.diff(np.r_[-1, cut, e + c - 1]) - 1
        need = np.maximum(0, (margins - alpha[None, :]).min(axis=1))
        best = max(best, max_flips(a, np.where(need <= e, need, 10**9), e, n_classes=c))
    assert result.max_flips[0] == best


@pytest.mark.parametrize("seed", range(3))
def test_full_memo_and_full_remembered_evaluations_change_nothing(seed: int, monkeypatch) -> None:
    """The memo of per-label needs and the table of remembered evaluations only save work: with room for (almost)
    nothing the search gives the same values, node counts and attackers."""
    table, y, k, c = _confuser_table(seed)
    es = [k // 4, k // 2, 3 * k // 4, k]
    rng = np.random.default_rng(seed)
    votes = rng.integers(0, 30, (300, 5)) + np.eye(5, dtype=np.int64)[rng.integers(0, 5, 300)] * 20
    runs = []
    for cramped in (False, True):
        if cramped:
            monkeypatch.setattr(joint_split, "_MEMO_PER_LABEL", 1)  # only h at alpha_l = e: no later value kept
            monkeypatch.setattr(joint_split, "_MEMO_BYTES", 0)
            monkeypatch.setattr(joint_split, "_SEEN_WORDS", 1)  # the smallest table: 64 evaluations
        runs.append((knn_split_certificate(table, y, es, k, n_classes=c),
                     rnn_split_certificate(votes, predict(votes), [5, 15, 30])))
    for roomy, cramped in zip(*runs, strict=True):
        for name in ("max_flips", "attack_flips", "nodes", "additions", "removals", "exact"):
            np.testing.assert_array_equal(getattr(roomy, name), getattr(cramped, name), err_msg=name)
    assert runs[0][1].nodes.max() > 30  # three evaluations or so per node: the small table filled up


@pytest.mark.parametrize("seed", range(20))
def test_the_minimum_over_labels_of_int32_needs_keeps_the_first_label_of_a_tie(seed: int) -> None:
    # The dense kNN needs (h[l, i], int32, ``size + 1`` where input i has no pair with rival l), as the search uses it.
    rng = np.random.default_rng(seed)
    c, n, budget = int(rng.integers(2, 7)), int(rng.integers(1, 80)), int(rng.integers(0, 9))
    h = rng.integers(0, budget + 2, (c, n)).astype(np.int32)
    out, winner, active = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(c, np.int64)
    joint_split._min_over_labels(h, np.zeros(c, np.int32), budget, out, winner, active)
    np.testing.assert_array_equal(out, h.min(axis=0))
    np.testing.assert_array_equal(winner, h.argmin(axis=0))  # argmin: the first label attaining the minimum
    np.testing.assert_array_equal(active, np.bincount(h.argmin(axis=0)[out <= budget], minlength=c))
