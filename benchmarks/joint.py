"""Time the global joint certificates (spec 5b rNN, 5c kNN) on MNIST-sized random inputs.

Sizes: 10,000 test inputs, 10 classes, 100 poisoning sizes evenly spread over 0..3,000.

* rNN: vote matrices whose neighbourhoods hold 0..8,000 examples, mostly of the true label (margins in the
  thousands, as with HOG + l1 at r = 4), and votes whose margins are spread uniformly over 1..6,000 in every
  label (many distinct costs); plus one knapsack with 1,000 distinct costs <= e = 3,000 in each of 10 labels
  (the solver's worst case at this size).
* kNN: k = 5,000 ordered neighbour labels per input, own label more frequent near the front.

Times are wall-clock seconds; the first call of a session also loads (or compiles) the numba knapsack and is
reported separately. Run: ``python benchmarks/joint.py [--n-test 10000] [--k 5000] [--e-max 3000] [--n-e 100]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from poisoncert.certify import certified_accuracy
from poisoncert.joint import global_rnn_certified_accuracy, knn_joint_certified_accuracy, max_flips


def rnn_votes(n_test: int, n_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, n_classes, n_test)
    size = rng.integers(0, 8_000, n_test)
    share = rng.dirichlet(np.full(n_classes, 0.3), n_test)
    own = rng.beta(5, 2, n_test)  # fraction of the neighbourhood carrying the true label
    share = (1 - own)[:, None] * share
    share[np.arange(n_test), y] += own
    votes = np.stack([rng.multinomial(t, p) for t, p in zip(size.tolist(), share, strict=True)])
    return votes, y


def worst_case_votes(n_test: int, n_classes: int, rng: np.random.Generator, top: int) -> tuple[np.ndarray, np.ndarray]:
    """All correct, runner-up with 0 votes, margins uniform over 1..top: many distinct costs per label."""
    y = np.arange(n_test) % n_classes
    votes = np.zeros((n_test, n_classes), dtype=np.int64)
    votes[np.arange(n_test), y] = rng.integers(1, top + 1, n_test)
    return votes, y


def knn_table(n_test: int, k: int, n_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, n_classes, n_test)
    strength = rng.beta(4, 2, n_test)[:, None]
    decay = rng.uniform(2_000, 20_000, n_test)[:, None]
    own = rng.random((n_test, k), dtype=np.float32) < strength * np.exp(-np.arange(k)[None, :] / decay)
    other = rng.integers(0, n_classes, (n_test, k), dtype=np.int8)
    return np.where(own, y[:, None].astype(np.int8), other), y


def _timed(label: str, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    print(f"  {label:<58s} {time.perf_counter() - start:8.3f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=5_000)
    parser.add_argument("--e-max", type=int, default=3_000)
    parser.add_argument("--n-e", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    e = np.linspace(0, args.e_max, args.n_e).round().astype(np.int64)
    c = args.classes
    print(f"{args.n_test} test inputs, {c} classes, {len(e)} poisoning sizes in 0..{args.e_max}")

    # Two labels whose costs (1 and 2) exceed the budget together: this call runs the numba knapsack.
    _timed("first call (numba load/compile), tiny input", global_rnn_certified_accuracy, [[3, 0], [0, 3]], [0, 1], [2])

    print("rNN, realistic votes")
    votes, y = rnn_votes(args.n_test, c, rng)
    glob = _timed("global (spec 5b)", global_rnn_certified_accuracy, votes, y, e)
    island = _timed("ISLAND (Theorem 4)", certified_accuracy, votes, y, e, method="island")
    individual = _timed("individual", certified_accuracy, votes, y, e)
    for j in np.linspace(0, len(e) - 1, 5).round().astype(int).tolist():
        print(f"    e={e[j]:5d}  individual {individual[j]:.4f}  ISLAND {island[j]:.4f}  global {glob[j]:.4f}")

    print(f"rNN, margins uniform over 1..{2 * args.e_max} in every label")
    votes, y = worst_case_votes(args.n_test, c, rng, 2 * args.e_max)
    _timed("global (spec 5b)", global_rnn_certified_accuracy, votes, y, e)
    per_label = args.n_test // c
    labels = np.repeat(np.arange(c), per_label)
    costs = np.concatenate([rng.permutation(np.arange(1, args.e_max + 1))[:per_label] for _ in range(c)])
    _timed(
        f"one knapsack, e={args.e_max}, {per_label} distinct costs <= e per label", max_flips, labels, costs, args.e_max
    )

    print(f"kNN, k={args.k}")
    table, y = _timed("generate neighbour table", knn_table, args.n_test, args.k, c, rng)
    joint = _timed("joint (spec 5c)", knn_joint_certified_accuracy, table, y, e, c)
    from poisoncert.votes import knn_votes_from_labels

    individual = certified_accuracy(knn_votes_from_labels(table, args.k, c), y, e)
    for j in np.linspace(0, len(e) - 1, 5).round().astype(int).tolist():
        print(f"    e={e[j]:5d}  individual {individual[j]:.4f}  joint {joint[j]:.4f}")


if __name__ == "__main__":
    main()
