"""Benchmark of the Dask backend against the single-process engine (exact kNN and rNN, l1, float32).

Run: ``python benchmarks/distributed.py [--n-train 1000000] [--n-test 10000] [--n-features 64] [--k 1000]
[--neighbours 1000] [--workers 2]``; ``--n-train 50000 --n-test 500`` is a smoke test of a few seconds.

The synthetic training set (uniform features in [0, 1), 10 labels) is written to a ``.npy`` file, which the
single-process engine loads and the Dask workers read shard by shard (nothing passes through the client). The
script times, on the same data:

- single process: index build, kNN ordered labels for ``k``, rNN votes at a radius that holds about
  ``--neighbours`` training examples (the median distance of the ``--neighbours``-th neighbour of 200 test inputs);
- a LocalCluster of ``--workers`` worker processes with one thread each: the same three steps, checking that the
  results are bit-identical;

and prints the overhead of the cluster run, the cost of one (test chunk x training shard) block, a projection for
8, 64 and 512 workers from those measurements, and the memory of each worker process. CPU seconds are printed
next to wall seconds because the machine may be shared with other jobs.
"""

from __future__ import annotations

import os
import sys

# This script shares its name with the dask.distributed package, and running it puts its folder first on
# sys.path, where it would shadow that package (here and in the worker processes, which inherit sys.path).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _HERE]

import argparse  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from poisoncert.neighbours import NeighbourIndex  # noqa: E402

N_CLASSES = 10


def make_training_file(path: Path, n_train: int, n_features: int, seed: int) -> np.ndarray:
    """Write uniform float32 features to ``path`` in slabs (the set is never held twice); return the labels."""
    rng = np.random.default_rng(seed)
    X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_train, n_features))
    for start in range(0, n_train, 100_000):
        stop = min(start + 100_000, n_train)
        X[start:stop] = rng.random((stop - start, n_features), dtype=np.float32)
    X.flush()
    del X
    return rng.integers(0, N_CLASSES, size=n_train)


def timed(function, *args):  # type: ignore[no-untyped-def]
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _worker_cpu() -> float:
    return time.process_time()


def _memory_mib() -> tuple[float, float]:
    """Resident and peak resident memory of this process (VmRSS, VmHWM), MiB.

    Not getrusage's ru_maxrss: Linux carries that across fork and exec, so a worker process would report the
    peak of the process that started it.
    """
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) / 2**10
    return values["VmRSS"], values["VmHWM"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=1_000_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--n-features", type=int, default=64)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--neighbours", type=int, default=1000, help="target rNN neighbourhood size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=4, help="test-set slices on which the engines take turns")
    args = parser.parse_args()

    from poisoncert.distributed import DaskNeighbourIndex, connect

    print(f"data: {args.n_train:,} x {args.n_features} float32 training (uniform, {N_CLASSES} labels), "
          f"{args.n_test:,} test, l1, kNN k = {args.k}, rNN at ~{args.neighbours} neighbours; "
          f"{os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.npy"
        y_train = make_training_file(path, args.n_train, args.n_features, args.seed)
        X_test = np.random.default_rng(args.seed + 1).random((args.n_test, args.n_features), dtype=np.float32)

        with connect(f"local:{args.workers}") as client:

            def on_cluster(function, *arguments):  # type: ignore[no-untyped-def]
                """timed(), with the CPU seconds of the workers and this process (scheduler and client)."""
                before = sum(client.run(_worker_cpu).values())
                result, wall, cpu = timed(function, *arguments)
                return result, wall, cpu + sum(client.run(_worker_cpu).values()) - before

            single, build_s, build_cpu = timed(lambda: NeighbourIndex(np.load(path, mmap_mode="r"), y_train,
                                                                      backend="numba"))
            probe = single.ordered_neighbors(X_test[:200], args.neighbours)[1]
            radius = float(np.median(probe[:, -1]))
            # Warm-up: each worker process loads the compiled kernels once (the single process did so above).
            warm = DaskNeighbourIndex(X_test[:50], np.arange(50) % N_CLASSES)
            warm.search(X_test[:8], n_neighbors=5, radii=[radius], n_classes=N_CLASSES)
            del warm
            index, dbuild_s, dbuild_cpu = on_cluster(DaskNeighbourIndex, str(path), y_train)
            fit_phases = index.fit_seconds_

            # The machine may be shared: the engines take turns on slices of the test set (alternating which goes
            # first), so that load from other jobs falls on both alike.
            totals = dict.fromkeys(("knn", "rnn", "dknn", "drnn", "knn_cpu", "rnn_cpu", "dknn_cpu", "drnn_cpu"), 0.0)
            labels, votes, dlabels, dvotes = [], [], [], []
            knn_blocks, rnn_blocks = [], []
            for turn, rows in enumerate(np.array_split(np.arange(args.n_test), args.rounds)):
                Q = X_test[rows]
                for engine in (("single", "cluster") if turn % 2 == 0 else ("cluster", "single")):
                    if engine == "single":
                        result, wall, cpu = timed(single.ordered_labels, Q, args.k)
                        labels.append(result)
                        totals["knn"] += wall
                        totals["knn_cpu"] += cpu
                        result, wall, cpu = timed(single.radius_votes, Q, radius, N_CLASSES)
                        votes.append(result)
                        totals["rnn"] += wall
                        totals["rnn_cpu"] += cpu
                    else:
                        result, wall, cpu = on_cluster(index.ordered_labels, Q, args.k)
                        dlabels.append(result)
                        totals["dknn"] += wall
                        totals["dknn_cpu"] += cpu
                        knn_blocks.append(index.last_run_)
                        result, wall, cpu = on_cluster(index.radius_votes, Q, radius, N_CLASSES)
                        dvotes.append(result)
                        totals["drnn"] += wall
                        totals["drnn_cpu"] += cpu
                        rnn_blocks.append(index.last_run_)
            single_peak = _memory_mib()[1]
            memory = client.run(_memory_mib)
            shard_rows = int(np.max(np.diff(index.shard_bounds_)))
            n_shards = index.n_shards_
    labels, dlabels = np.concatenate(labels), np.concatenate(dlabels)
    votes, dvotes = np.concatenate(votes, axis=1), np.concatenate(dvotes, axis=1)
    identical = np.array_equal(labels, dlabels) and labels.dtype == dlabels.dtype and np.array_equal(votes, dvotes)
    counts = votes[0].sum(axis=1)
    print(f"radius {radius:.4f}: neighbours per test input median {np.median(counts):.0f}, mean {counts.mean():.0f}")
    knn_s, rnn_s, dknn_s, drnn_s = totals["knn"], totals["rnn"], totals["dknn"], totals["drnn"]
    knn_cpu, rnn_cpu, dknn_cpu, drnn_cpu = (totals["knn_cpu"], totals["rnn_cpu"], totals["dknn_cpu"],
                                            totals["drnn_cpu"])

    def merged(runs: list[dict]) -> dict:
        return {"block_seconds": np.concatenate([run["block_seconds"] for run in runs]),
                "n_blocks": sum(run["n_blocks"] for run in runs),
                "test_rows_per_block": runs[0]["test_rows_per_block"],
                "merge_seconds": sum(run["merge_seconds"] for run in runs)}

    knn_stats, rnn_stats = merged(knn_blocks), merged(rnn_blocks)

    def row(name: str, one: float, many: float, one_cpu: float, many_cpu: float) -> str:
        return (f"  {name:<20} {one:9.2f} s {many:9.2f} s {100 * (many - one) / one:+9.1f} %   "
                f"{one_cpu:8.1f} s {many_cpu:8.1f} s {100 * (many_cpu - one_cpu) / one_cpu:+7.1f} %")

    print(f"\nresults bit-identical (kNN labels, rNN votes): {identical}")
    print(f"\n  {'wall':>31} {'':>11} {'':>11}   {'CPU':>9}")
    print(f"  {'':<20} {'1 process':>11} {f'{args.workers} workers':>11} {'overhead':>11}   "
          f"{'1 process':>10} {'cluster':>10} {'overhead':>9}")
    print(row("index build", build_s, dbuild_s, build_cpu, dbuild_cpu))
    print(row(f"kNN k = {args.k}", knn_s, dknn_s, knn_cpu, dknn_cpu))
    print(row("rNN", rnn_s, drnn_s, rnn_cpu, drnn_cpu))
    print(row("kNN + rNN searches", knn_s + rnn_s, dknn_s + drnn_s, knn_cpu + rnn_cpu, dknn_cpu + drnn_cpu))
    print("  (cluster CPU: the workers' and this process's, which runs the scheduler and the client)")
    print("  cluster index build phases: " + ", ".join(f"{name} {seconds:.2f} s"
                                                      for name, seconds in fit_phases.items()))

    print(f"\nblocks: {n_shards} shards of <= {shard_rows:,} training rows")
    pairs = float(args.n_train) * args.n_test
    for name, stats in (("kNN", knn_stats), ("rNN", rnn_stats)):
        seconds = stats["block_seconds"]
        rows = stats["test_rows_per_block"]
        print(f"  {name}: {stats['n_blocks']} blocks of {rows} test x {shard_rows:,} train; per block mean "
              f"{seconds.mean():.3f} s (min {seconds.min():.3f}, max {seconds.max():.3f}); "
              f"{1e9 * seconds.sum() / pairs:.2f} ns per (test, train) pair; merges {stats['merge_seconds']:.2f} s")

    # Projection: W workers with one core each, as here. The blocks' compute (measured per (test, train) pair)
    # splits evenly over W shards; what the cluster added here beyond compute (scheduling, transfers, merges:
    # wall x workers - compute) is taken as a fixed cost per chunk of test inputs, paid by every worker.
    print("\nprojection (one core per worker, same per-pair cost; overhead per test chunk as measured here):")
    print(f"  {'workers':>8} {'kNN search':>12} {'rNN search':>12} {'kNN speed-up':>13}")
    for workers in (8, 64, 512):
        projected = []
        for stats, wall in ((knn_stats, dknn_s), (rnn_stats, drnn_s)):
            compute = stats["block_seconds"].sum()
            chunks = stats["n_blocks"] / n_shards
            overhead_per_chunk = max(0.0, wall * args.workers - compute) / args.workers / chunks
            shard = math.ceil(args.n_train / workers)
            # Smaller shards fit more test rows into a block's memory budget: fewer chunks.
            rows = stats["test_rows_per_block"] * shard_rows / shard
            projected.append(compute / workers + overhead_per_chunk * math.ceil(args.n_test / rows))
        print(f"  {workers:>8} {projected[0]:>10.2f} s {projected[1]:>10.2f} s {knn_s / projected[0]:>12.1f}x")

    print(f"\nmemory: this process peak {single_peak:.0f} MiB (the single-process engine, the scheduler, the client; "
          f"training set "
          f"{args.n_train * args.n_features * 4 / 2**20:.0f} MiB)")
    for address, (rss, peak) in sorted(memory.items()):
        print(f"  worker {address}: resident {rss:.0f} MiB, peak {peak:.0f} MiB")


if __name__ == "__main__":  # the LocalCluster's worker processes import this file
    main()
