"""Brute-force reference for the soundness tests of spec section 7.

Independent of ``poisoncert``'s certificate code on purpose: a tiny nearest-neighbour classifier written
the obvious way (sort, count, argmax) and an enumeration of *every* poisoned training set within a budget on
tiny instances (a handful of training examples with small integer features, a handful of candidate points
for insertions). The certificates under test must never promise more than what this enumeration finds.

Modelling choices (spec sections 1-3):

- Ranks of clean examples: SHA-256 of (features as little-endian float64, label as little-endian int64),
  read as a big integer. Neighbours sort by (l1 distance ascending, rank descending).
- Inserted examples choose their rank: ``+inf`` (wins every distance tie) or ``-inf`` (loses every tie).
  For kNN these two extremes cover every intermediate rank: only whether an inserted example lands inside
  the top k matters, and that is monotone in its rank.
- Label-flipped examples keep their features; their rank may be the hash of the new (features, label) or
  either extreme (a superset of the real attacker, which only makes the soundness check stronger).
- Labels tie to the larger index; rNN with no neighbour has all-zero votes and predicts the largest label.
- Poisoning size of the general model: ``max(|D*|, |D|) - |D* ∩ D|`` = ``max(#removed, #added)``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

INF = math.inf

#: Threat models enumerated here (spec section 1).
THREAT_MODELS = ("general", "insertion", "deletion", "label-flip")


@dataclass(frozen=True)
class Example:
    """One training example: integer feature tuple, label index and tie rank (larger wins ties)."""

    features: tuple[int, ...]
    label: int
    rank: float | int


def hash_rank(features: Sequence[int], label: int) -> int:
    """Rank of a clean example: a SHA-256 of a canonical encoding, independent of row position."""
    payload = np.asarray(features, dtype="<f8").tobytes() + np.asarray([label], dtype="<i8").tobytes()
    return int.from_bytes(hashlib.sha256(payload).digest(), "big")


def clean_example(features: Sequence[int], label: int) -> Example:
    features = tuple(int(v) for v in features)
    return Example(features, int(label), hash_rank(features, label))


def l1(u: Sequence[int], v: Sequence[int]) -> int:
    return sum(abs(a - b) for a, b in zip(u, v, strict=True))


def argmax_larger_label(votes: Sequence[int]) -> int:
    """Index of the largest count; ties to the larger label."""
    best = 0
    for label, count in enumerate(votes):
        if count >= votes[best]:
            best = label
    return best


def neighbour_order(train: Sequence[Example], x: Sequence[int]) -> list[Example]:
    """Training examples ordered by (distance ascending, rank descending)."""
    return sorted(train, key=lambda ex: (l1(ex.features, x), -ex.rank))


def knn_votes(train: Sequence[Example], x: Sequence[int], k: int, n_classes: int) -> list[int]:
    votes = [0] * n_classes
    for ex in neighbour_order(train, x)[:k]:
        votes[ex.label] += 1
    return votes


def rnn_votes(train: Sequence[Example], x: Sequence[int], radius: int, n_classes: int) -> list[int]:
    votes = [0] * n_classes
    for ex in train:
        if l1(ex.features, x) <= radius:
            votes[ex.label] += 1
    return votes


@dataclass(frozen=True)
class Classifier:
    """kNN (``kind="knn"``, ``param`` = k) or rNN (``kind="rnn"``, ``param`` = radius) with l1."""

    kind: str
    param: int
    n_classes: int

    def votes(self, train: Sequence[Example], x: Sequence[int]) -> list[int]:
        if self.kind == "knn":
            return knn_votes(train, x, self.param, self.n_classes)
        return rnn_votes(train, x, self.param, self.n_classes)

    def predict(self, train: Sequence[Example], x: Sequence[int]) -> int:
        return argmax_larger_label(self.votes(train, x))


@dataclass
class Instance:
    """A tiny poisoning problem: clean training set, labelled test inputs, candidate insertion points."""

    train: list[Example]
    tests: list[tuple[int, ...]]
    y: list[int]
    candidate_points: list[tuple[int, ...]]
    clf: Classifier
    description: str = ""
    tie_ranks: tuple[float, ...] = field(default=(INF, -INF))

    @property
    def n_classes(self) -> int:
        return self.clf.n_classes

    def insertion_candidates(self) -> list[Example]:
        """Every example the attacker may insert: candidate point x label x tie rank."""
        ranks = self.tie_ranks if self.clf.kind == "knn" else (INF,)  # rNN ignores ranks
        return [
            Example(p, label, rank) for p in self.candidate_points for label in range(self.n_classes) for rank in ranks
        ]

    def votes(self) -> np.ndarray:
        return np.array([self.clf.votes(self.train, x) for x in self.tests], dtype=np.int64)

    def neighbour_labels(self) -> np.ndarray:
        """(n_test, n) labels of all clean training examples of each test input, in neighbour order."""
        return np.array([[ex.label for ex in neighbour_order(self.train, x)] for x in self.tests], dtype=np.int64)

    def predictions(self, train: Sequence[Example] | None = None) -> list[int]:
        train = self.train if train is None else train
        return [self.clf.predict(train, x) for x in self.tests]


def _submultisets(items: Sequence[Example], max_size: int) -> Iterator[tuple[Example, ...]]:
    for size in range(max_size + 1):
        yield from itertools.combinations_with_replacement(items, size)


def poisoned_sets(inst: Instance, e_max: int, threat_model: str) -> Iterator[tuple[int, list[Example]]]:
    """Every poisoned training set ``D*`` within poisoning size ``e_max``, with its size.

    ``general``: remove any sub-multiset R and add any multiset A of candidates, size ``max(|R|, |A|)``.
    ``insertion``: A only. ``deletion``: R only. ``label-flip``: relabel up to ``e_max`` clean examples.
    """
    train = inst.train
    n = len(train)
    if threat_model == "label-flip":
        for size in range(min(e_max, n) + 1):
            for idx in itertools.combinations(range(n), size):
                choices = []
                for i in idx:
                    ex = train[i]
                    options = []
                    for label in range(inst.n_classes):
                        if label == ex.label:
                            continue
                        for rank in (hash_rank(ex.features, label), INF, -INF):
                            options.append(Example(ex.features, label, rank))
                    choices.append(options)
                kept = [train[i] for i in range(n) if i not in idx]
                for flipped in itertools.product(*choices):
                    yield size, kept + list(flipped)
        return
    removals: list[tuple[int, ...]] = []
    if threat_model in ("general", "deletion"):
        for size in range(min(e_max, n) + 1):
            removals.extend(itertools.combinations(range(n), size))
    else:
        removals.append(())
    additions: list[tuple[Example, ...]] = [()]
    if threat_model in ("general", "insertion"):
        additions = list(_submultisets(inst.insertion_candidates(), e_max))
    for removed in removals:
        kept = [train[i] for i in range(n) if i not in removed]
        for added in additions:
            yield max(len(removed), len(added)), kept + list(added)


@dataclass
class BruteForceResult:
    """What the exhaustive attack achieves.

    min_flip[i] : smallest poisoning size that changes test input i's (clean) prediction, or ``math.inf``.
    min_correct[s] : fewest correct predictions over all D* with poisoning size <= s (s = 0..e_max).
    """

    e_max: int
    min_flip: list[float]
    min_correct: list[int]
    witness: dict[int, tuple[int, list[Example]]]  # test index -> (size, D*) of a smallest flip
    worst_set: dict[int, list[Example]]  # size s -> a D* of size s attaining the unprefixed min_correct[s]


def brute_force(inst: Instance, e_max: int, threat_model: str) -> BruteForceResult:
    clean_pred = inst.predictions()
    n_test = len(inst.tests)
    min_flip: list[float] = [INF] * n_test
    witness: dict[int, tuple[int, list[Example]]] = {}
    min_correct = [n_test + 1] * (e_max + 1)
    worst_set: dict[int, list[Example]] = {}
    for size, poisoned in poisoned_sets(inst, e_max, threat_model):
        pred = inst.predictions(poisoned)
        correct = sum(p == y for p, y in zip(pred, inst.y, strict=True))
        if correct < min_correct[size]:
            min_correct[size] = correct
            worst_set[size] = poisoned
        for i in range(n_test):
            if pred[i] != clean_pred[i] and size < min_flip[i]:
                min_flip[i] = size
                witness[i] = (size, poisoned)
    for s in range(1, e_max + 1):  # budget e allows every size <= e
        min_correct[s] = min(min_correct[s], min_correct[s - 1])
    return BruteForceResult(e_max, min_flip, min_correct, witness, worst_set)


def random_instance(seed: int, kind: str, n_test: int | None = None) -> Instance:
    """A random tiny instance with integer features so that distance ties are frequent."""
    rng = np.random.default_rng(seed)
    dim = int(rng.integers(1, 3))
    side = 5 if dim == 1 else 3
    grid = [tuple(int(v) for v in p) for p in itertools.product(range(side), repeat=dim)]
    n_classes = int(rng.integers(2, 4))
    n = int(rng.integers(3, 8))
    # Skewed label frequencies so that large margins (certified sizes 1-3) occur, not only ties.
    label_p = rng.dirichlet(np.full(n_classes, 0.6))
    train = [clean_example(grid[rng.integers(len(grid))], int(rng.choice(n_classes, p=label_p))) for _ in range(n)]
    if n_test is None:
        n_test = int(rng.integers(3, 6))
    picks = rng.choice(len(grid), size=n_test, replace=False)
    tests = [grid[i] for i in picks]
    y = [int(v) for v in rng.integers(n_classes, size=n_test)]
    # Test locations give distance-0 insertions (the exactness witnesses); one extra point adds other ties.
    extra = grid[rng.integers(len(grid))]
    candidates = list(dict.fromkeys([*tests, extra]))
    if kind == "knn":
        clf = Classifier("knn", int(rng.integers(1, n + 2)), n_classes)  # k > n happens too
    else:
        clf = Classifier("rnn", int(rng.integers(0, 3)), n_classes)
    desc = f"seed={seed} {kind} param={clf.param} c={n_classes} n={n} dim={dim}"
    inst = Instance(train, tests, y, candidates, clf, desc)
    # Mostly-correct labels make the joint checks bite (a misclassified input cannot lose anything).
    keep = rng.random(n_test) < 0.75
    inst.y = [p if k else t for p, k, t in zip(inst.predictions(), keep, y, strict=True)]
    return inst


def clustered_knn_instance(seed: int) -> Instance:
    """Tiny kNN instances of 2-3 well-separated clusters, each with a majority label and a few rival examples
    just beside it; the test inputs sit at the cluster centres. Unlike uniform random instances, these often
    make the split certificate (spec 5e) strictly better than 5c: the clusters' rivals differ, and removals
    pull in rival examples whose labels are known.
    """
    rng = np.random.default_rng(seed)
    n_clusters = int(rng.integers(2, 4))
    n_classes = int(rng.integers(2, 4))
    train, tests, y = [], [], []
    for j in range(n_clusters):
        centre = 20 * j
        own = int(rng.integers(0, n_classes))
        train += [clean_example((centre,), own)] * int(rng.integers(2, 4))
        for _ in range(int(rng.integers(1, 3))):
            train.append(clean_example((centre + int(rng.integers(1, 3)),), int(rng.integers(0, n_classes))))
        tests.append((centre,))
        y.append(own)
    clf = Classifier("knn", int(rng.integers(2, 6)), n_classes)
    candidates = list(dict.fromkeys([*tests, (10,), (1,)]))  # at, between and just past the clusters
    return Instance(train, tests, y, candidates, clf, f"clustered seed={seed} k={clf.param} c={n_classes}")


def describe(inst: Instance) -> str:
    """A readable dump of an instance, for failure messages."""
    rows = [inst.description, f"  classifier: {inst.clf}"]
    rows.append("  train: " + ", ".join(f"{ex.features}:{ex.label}" for ex in inst.train))
    rows.append(f"  tests: {inst.tests}  y={inst.y}")
    rows.append(f"  candidate points: {inst.candidate_points}")
    rows.append(f"  clean votes: {inst.votes().tolist()}")
    return "\n".join(rows)


def describe_set(poisoned: Sequence[Example], inst: Instance) -> str:
    """The poisoned set as removed clean examples and added/changed examples."""
    remaining = list(inst.train)
    added = []
    for ex in poisoned:
        if ex in remaining:
            remaining.remove(ex)
        else:
            added.append(ex)
    fmt = [f"{ex.features}:{ex.label}" for ex in remaining]
    rank = {INF: "+inf", -INF: "-inf"}
    fmt_added = [f"{ex.features}:{ex.label}(rank {rank.get(ex.rank, 'hash')})" for ex in added]
    return f"removed [{', '.join(fmt)}], added [{', '.join(fmt_added)}]"
