"""Time certified-accuracy curves on MNIST-sized vote matrices and neighbour tables.

Usage: python benchmarks/certificates.py [--n-test 10000] [--n-e 3001]

Baseline named in the ratios: the individual curve (one sort + searchsorted), measured in the same run, and a
straightforward per-e Python loop over test inputs for the individual certificate.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from poisoncert import certify
from poisoncert.joint import global_rnn_certified_accuracy, knn_joint_certified_accuracy


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--n-e", type=int, default=3001, help="number of poisoning sizes for individual/ISLAND")
    parser.add_argument("--k", type=int, default=5000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n, c, k = args.n_test, 10, args.k
    # Votes shaped like rNN on MNIST HOG: ~1,100 neighbours per input, skewed toward the true label.
    y = rng.integers(0, c, n)
    probabilities = rng.dirichlet(np.full(c, 0.3), size=n)
    probabilities[np.arange(n), y] += 1.5
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    totals = rng.poisson(1100, n)
    votes = np.stack([rng.multinomial(t, p) for t, p in zip(totals, probabilities, strict=True)])
    e_full = np.arange(args.n_e)
    e_100 = np.linspace(0, 3000, 100).astype(np.int64)

    print(f"{n} test inputs, {c} labels; individual/ISLAND/RD over {len(e_full)} values of e, "
          f"global over {len(e_100)}")
    _, t_individual = _timed(certify.certified_accuracy, votes, y, e_full, "individual")
    sizes = certify.certified_poisoning_size(votes)
    correct = certify.predict(votes) == y
    _, t_loop = _timed(lambda: [np.mean(correct & (sizes >= e)) for e in e_full.tolist()])
    _, t_island = _timed(certify.certified_accuracy, votes, y, e_full, "island")
    _, t_rd = _timed(certify.certified_accuracy, votes, y, e_full, "rd")
    _, t_global = _timed(global_rnn_certified_accuracy, votes, y, e_100)

    # kNN neighbour tables: label sequences whose first k hold the votes' proportions.
    labels = np.empty((n, k), dtype=np.int16)
    for start in range(0, n, 1000):
        block = slice(start, min(start + 1000, n))
        draws = rng.random((labels[block].shape[0], k, 1)) > np.cumsum(probabilities[block], axis=1)[:, None, :]
        labels[block] = draws.sum(axis=2)
    _, t_knn_individual = _timed(
        lambda: certify.accuracy_from_certified_sizes(
            certify.knn_certified_poisoning_size(labels, k, c), e_100))
    _, t_knn_joint = _timed(knn_joint_certified_accuracy, labels, y, e_100, c)

    rows = [
        ("individual curve (baseline)", t_individual),
        ("individual, per-e NumPy loop", t_loop),
        ("ISLAND", t_island),
        ("RD", t_rd),
        (f"rNN global (5b), {len(e_100)} e", t_global),
        (f"kNN individual from table, k={k}", t_knn_individual),
        (f"kNN joint global (5c), k={k}, {len(e_100)} e", t_knn_joint),
    ]
    for name, seconds in rows:
        print(f"{name:<45} {seconds:8.3f} s   {seconds / t_individual:9.1f}x baseline")


if __name__ == "__main__":
    main()
