"""Time DPA and Bagging (default nearest-centroid base learner) at MNIST scale.

Shapes as MNIST with HOG features: 60,000 x 81 training vectors, 10,000 test vectors, 10 classes. The data are
random (the timing of the vectorised learner depends on the shapes only), unless ``--real`` is given and
``poisoncert.datasets`` can provide MNIST HOG features.

Run: ``python benchmarks/baselines.py [--partitions 5500] [--estimators 1000] [--subsample 27] [--real] [--sklearn]``
(``--sklearn`` adds the baseline, scikit-learn's ``NearestCentroid`` fitted per base classifier through the generic
joblib path, and prints the speed-up against it).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from poisoncert.baselines import DPA, Bagging


def _data(real: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    if real:
        from poisoncert import datasets, features

        data = datasets.load("mnist")
        return (features.hog(data.X_train), data.y_train, features.hog(data.X_test), data.y_test,
                "MNIST, HOG (81 features)")
    rng = np.random.default_rng(0)
    X_train = rng.random((60_000, 81), dtype=np.float32)
    y_train = rng.integers(0, 10, 60_000)
    X_test = rng.random((10_000, 81), dtype=np.float32)
    y_test = rng.integers(0, 10, 10_000)
    return X_train, y_train, X_test, y_test, "random 60,000 x 81 train / 10,000 test, 10 classes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=5500)
    parser.add_argument("--estimators", type=int, default=1000)
    parser.add_argument("--subsample", type=int, default=27)
    parser.add_argument("--real", action="store_true", help="use MNIST HOG features from poisoncert.datasets")
    parser.add_argument("--sklearn", action="store_true",
                        help="also time the generic joblib path with sklearn's NearestCentroid per partition")
    args = parser.parse_args()
    X_train, y_train, X_test, y_test, what = _data(args.real)
    print(f"data: {what}")
    models = [
        (f"DPA (n_partitions={args.partitions}), vectorised nearest-centroid", DPA(n_partitions=args.partitions)),
        (f"Bagging (N={args.estimators}, xi={args.subsample}), vectorised nearest-centroid",
         Bagging(n_estimators=args.estimators, subsample_size=args.subsample)),
    ]
    if args.sklearn:
        import warnings

        from sklearn.neighbors import NearestCentroid

        # scikit-learn warns about zero variance on every tiny partition; the predictions are unaffected.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="sklearn.neighbors._nearest_centroid")

        models += [
            (f"DPA (n_partitions={args.partitions}), sklearn NearestCentroid via joblib",
             DPA(n_partitions=args.partitions, base_estimator=NearestCentroid(), n_jobs=-1)),
            (f"Bagging (N={args.estimators}, xi={args.subsample}), sklearn NearestCentroid via joblib",
             Bagging(n_estimators=args.estimators, subsample_size=args.subsample, base_estimator=NearestCentroid(),
                     n_jobs=-1)),
        ]
    totals: dict[str, float] = {}
    for name, model in models:
        start = time.perf_counter()
        model.fit(X_train, y_train)
        fitted = time.perf_counter()
        result = model.certify(X_test, y_test)
        done = time.perf_counter()
        sizes = result.certified_size
        print(f"{name}: fit {fitted - start:.1f} s, vote + certify {done - fitted:.1f} s, "
              f"total {done - start:.1f} s; clean accuracy {result.clean_accuracy:.4f}, "
              f"CA(0) {result.certified_accuracy([0])[0]:.4f}, median certified size of certified inputs "
              f"{np.median(sizes[sizes >= 0]) if np.any(sizes >= 0) else float('nan')}")
        totals[name] = done - start
    if args.sklearn:  # ratios against the named baseline, measured in this run
        for method in ("DPA", "Bagging"):
            fast = next(t for n, t in totals.items() if n.startswith(method) and "vectorised" in n)
            slow = next(t for n, t in totals.items() if n.startswith(method) and "sklearn" in n)
            print(f"{method}: vectorised nearest-centroid is {slow / fast:.1f}x faster than the baseline "
                  "(sklearn NearestCentroid per base classifier via joblib)")


if __name__ == "__main__":
    main()
