"""Time the whole ``poisoncert certify`` command on MNIST against faiss-cpu's exact l1 search, in one run.

Usage: python benchmarks/command.py [--repeat 2] [--skip-faiss]

Printed, all on the same machine and data (MNIST from the PyPI wheel, HOG features, 60,000 x 81 float32 training
and 10,000 test features, l1):

- faiss-cpu ``IndexFlat(81, METRIC_L1)`` k = 5000 search alone (the named baseline), best of ``--repeat``;
- the distance-only floor of poisoncert's own kernel (every test-train distance once, nothing else);
- poisoncert's one neighbour pass for kNN (k + e_max = 10,000 ordered labels) and rNN (r = 4);
- the warm command ``poisoncert certify --dataset mnist --features hog --knn 5000 --rnn 4 --no-neighbour-cache``
  (features, numba kernels and bytecode cached; the neighbour pass, the individual certificates and every joint
  curve, all outputs), wall time and peak RSS of the subprocess, best of ``--repeat`` runs (the ratio is printed
  for the best and for the median of faiss's and the command's runs);
- the same command re-run with its neighbour tables in the cache (what a second run with the default
  ``--neighbour-cache`` does: no search at all, so it is not compared with faiss's search);

and the ratios of the baseline to each, then where the command's time goes (the neighbour pass and each curve,
timed one by one in this process, then all of them side by side as the command computes them).
"""

from __future__ import annotations

import argparse
import compileall
import copy
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import poisoncert
from poisoncert.features import dataset_features
from poisoncert.neighbours import NeighbourIndex, _distances_numba


def _times(function, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def _best(function, repeat: int) -> float:
    return min(_times(function, repeat))


#: Runs the command given as its arguments and prints its wall seconds and peak RSS (KiB). A forked child's peak RSS
#: counts its parent's pages from before exec, so the command is started from this small process rather than from
#: the benchmark, which holds hundreds of MB of features and tables at that point.
_LAUNCHER = """
import os, subprocess, sys, time
start = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
_, status, usage = os.wait4(process.pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def _child(command: list[str]) -> tuple[float, float]:
    """Run ``command`` to its end: (wall seconds, its own peak RSS in MiB), through :data:`_LAUNCHER`."""
    report = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], check=True, capture_output=True, text=True)
    seconds, peak_kib, status = report.stdout.split()
    if int(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit status {status}; run it by hand to see why")
    return float(seconds), int(peak_kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-faiss", action="store_true")
    args = parser.parse_args()
    # Warm means this package's bytecode written too, as an installed package has it. Where Python is told not to
    # write it (PYTHONDONTWRITEBYTECODE, set on this project's machine) an editable checkout would compile its
    # source on every start, 0.1 s of the command; compileall writes it whatever that setting.
    compileall.compile_dir(os.path.dirname(poisoncert.__file__), quiet=1)
    X_train, y_train, X_test, y_test, _ = dataset_features("mnist", "hog", progress=False)  # also warms the cache
    print(f"MNIST HOG: train {X_train.shape}, test {X_test.shape}, {X_train.dtype}; {os.cpu_count()} cores")

    index = NeighbourIndex(X_train, y_train, metric="l1", backend="numba")
    index.search(X_test[:32], n_neighbors=10_000, radii=[4.0], n_classes=10)  # compile / load kernels
    chunk = 512
    buffer = np.empty((chunk, len(X_train)), dtype=np.float32)

    def distances_only() -> None:
        Q = np.ascontiguousarray(X_test)
        for start in range(0, len(Q), chunk):
            block = Q[start : start + chunk]
            _distances_numba(block, index._XP, index.n_train_, buffer[: len(block)], 0)

    t_floor = _best(distances_only, args.repeat)
    t_pass = _best(lambda: index.search(X_test, n_neighbors=10_000, radii=[4.0], n_classes=10), args.repeat)

    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "poisoncert.cli", "certify", "--dataset", "mnist", "--features", "hog",
                   "--knn", "5000", "--rnn", "4", "--out", out, "--no-progress"]
        subprocess.run(command, check=True, capture_output=True)  # numba's cache, and the neighbour tables cached
        runs = [_child([*command, "--no-neighbour-cache"]) for _ in range(args.repeat)]
        command_times = [seconds for seconds, _ in runs]
        t_command = min(command_times)
        peak_mb = max(peak for _, peak in runs)
        t_cached = _best(lambda: subprocess.run(command, check=True, capture_output=True), args.repeat)

    phases = _command_phases(X_train, y_train, X_test, y_test)

    t_faiss = None
    if not args.skip_faiss:
        import faiss

        flat = faiss.IndexFlat(X_train.shape[1], faiss.METRIC_L1)
        flat.add(np.ascontiguousarray(X_train))
        # As many faiss searches as commands, so that best and median compare like with like (one faiss search
        # against the best of several commands favoured poisoncert).
        faiss_times = _times(lambda: flat.search(np.ascontiguousarray(X_test), 5000), args.repeat)
        t_faiss = min(faiss_times)

    rows = [("faiss-cpu IndexFlat L1, k=5000 search (baseline)", t_faiss, True),
            ("poisoncert distance-only floor (l1, every pair once)", t_floor, True),
            ("poisoncert one pass: kNN 10,000 ordered labels + rNN r=4", t_pass, True),
            ("poisoncert certify --knn 5000 --rnn 4 (whole command)", t_command, True),
            ("  the same, re-run with its neighbour tables cached (no search)", t_cached, False)]
    for name, seconds, compared in rows:
        if seconds is None:
            continue
        ratio = f"  baseline / this = {t_faiss / seconds:5.2f}x" if t_faiss and compared else ""
        print(f"{name:<66} {seconds:7.2f} s{ratio}")
    if t_faiss:
        median_faiss, median_command = float(np.median(faiss_times)), float(np.median(command_times))
        print(f"medians of {args.repeat} runs: faiss {median_faiss:.2f} s, the whole command {median_command:.2f} s, "
              f"baseline / this = {median_faiss / median_command:.2f}x")
    print(f"peak RSS of the command (the timed runs): {peak_mb:.0f} MiB")
    print("where the command's time goes (in this process, warm; wall seconds):")
    for name, seconds in phases:
        print(f"  {name:<64} {seconds:7.2f} s")


def _command_phases(X_train, y_train, X_test, y_test, backend: str = "numba") -> list[tuple[str, float]]:
    """The command's steps timed one by one: the neighbour pass, each certificate's curve on the command's grid."""
    from poisoncert._classifiers import certify_neighbours
    from poisoncert.experiments import compute_curves, default_e_grid, table_points

    phases = []
    start = time.perf_counter()
    knn, rnn = certify_neighbours(X_train, y_train, X_test, y_test, knn=[5000], rnn=[4.0], metric="l1",
                                  backend=backend)
    phases.append(("neighbour pass + individual certificates", time.perf_counter() - start))
    results = [*knn.values(), *rnn.values()]
    start = time.perf_counter()
    e = default_e_grid(results, n_points=51)
    e = np.union1d(e, np.asarray(table_points(e), dtype=np.int64))
    phases.append((f"e grid ({len(e)} sizes; kNN split probes only where they could extend it)",
                   time.perf_counter() - start))
    fresh = copy.deepcopy(results)  # no curve computed yet, for the side-by-side timing below
    for result in results:
        for method in result.available_methods:
            start = time.perf_counter()
            result.curve(e, method)
            phases.append((f"{result.label()} {method} curve", time.perf_counter() - start))
    start = time.perf_counter()
    compute_curves(fresh, e)
    phases.append(("every curve as the command computes them (side by side, compute_curves)",
                   time.perf_counter() - start))
    return phases


if __name__ == "__main__":
    main()
