"""The Dask backend: bit-identical to the single-process engine, lazy sources, worker loss and bad addresses."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from poisoncert import CertifiedKNeighborsClassifier, CertifiedRadiusNeighborsClassifier  # noqa: E402
from poisoncert.distributed import DaskNeighbourIndex, connect, training_source  # noqa: E402
from poisoncert.estimators import certify_neighbours  # noqa: E402
from poisoncert.neighbours import NeighbourIndex  # noqa: E402

THREAT_MODELS = ("general", "insertion", "deletion", "label-flip")


@pytest.fixture(scope="module")
def client():
    with connect("local:2") as dask_client:
        yield dask_client


def tie_heavy(rng: np.random.Generator, n_train: int, n_test: int, n_features: int, dtype: type):
    """Small integer features: many equal distances and duplicated training examples."""
    X_train = rng.integers(0, 3, size=(n_train, n_features)).astype(dtype)
    X_train[rng.integers(0, n_train, size=n_train // 4)] = X_train[0]  # exact duplicates of one example
    X_test = rng.integers(0, 3, size=(n_test, n_features)).astype(dtype)
    X_train[X_train.sum(axis=1) == 0, 0] = 1  # cosine needs non-zero rows
    X_test[X_test.sum(axis=1) == 0, 0] = 1
    return X_train, X_test


def assert_same_engine(index: NeighbourIndex, reference: NeighbourIndex, X_test: np.ndarray, k: int,
                       radii: list[float], n_classes: int, rng: np.random.Generator) -> None:
    np.testing.assert_array_equal(index.ranks_, reference.ranks_)
    np.testing.assert_array_equal(index.order_, reference.order_)
    labels, votes = index.search(X_test, n_neighbors=k, radii=radii, n_classes=n_classes)
    expected_labels, expected_votes = reference.search(X_test, n_neighbors=k, radii=radii, n_classes=n_classes)
    assert labels.dtype == expected_labels.dtype
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(votes, expected_votes)
    for width in (k, index.n_train_):
        rows, distances = index.ordered_neighbors(X_test, width)
        expected_rows, expected_distances = reference.ordered_neighbors(X_test, width)
        np.testing.assert_array_equal(rows, expected_rows)
        assert distances.dtype == expected_distances.dtype
        # Bit-identical floats, not merely close ones.
        np.testing.assert_array_equal(distances.view(np.uint8), expected_distances.view(np.uint8))
    for got, expected in zip(index.radius_neighbors(X_test, radii[0]), reference.radius_neighbors(X_test, radii[0]),
                             strict=True):
        np.testing.assert_array_equal(got, expected)
    thresholds = rng.random(index.n_train_) * 2 * radii[-1]
    for got, expected in zip(index.within(X_test, thresholds), reference.within(X_test, thresholds), strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("seed", range(4))
def test_index_equals_the_single_process_engine_for_random_shapes_and_shards(client, seed):
    rng = np.random.default_rng(seed)
    metric = ("l1", "l2", "cosine", "l1")[seed]
    dtype = (np.float64, np.float32)[seed % 2]
    n_train, n_test, n_features = int(rng.integers(30, 90)), int(rng.integers(5, 30)), int(rng.integers(1, 7))
    X_train, X_test = tie_heavy(rng, n_train, n_test, n_features, dtype)
    if seed == 3:  # real-valued features with a block of duplicates
        X_train = rng.random((n_train, n_features)).astype(dtype)
        X_train[: n_train // 3] = X_train[0]
    y_train = rng.integers(0, 3, size=n_train)
    shard_size = int(rng.integers(5, n_train + 10))  # one shard, many, or shards smaller than k
    chunk_size = (None, int(rng.integers(1, n_test + 1)))[seed % 2]
    reference = NeighbourIndex(X_train, y_train, metric=metric, backend="numba")
    index = NeighbourIndex(X_train, y_train, metric=metric, backend="dask", shard_size=shard_size,
                           chunk_size=chunk_size)
    assert isinstance(index, DaskNeighbourIndex) and index.backend == "dask"
    assert index.n_shards_ == -(-n_train // shard_size)
    # A radius at a typical distance (many ties on the boundary), and two fixed ones.
    radii = [float(np.median(reference.ordered_neighbors(X_test, n_train // 3)[1][:, -1])) + 0.01, 0.5, 2.5]
    assert_same_engine(index, reference, X_test, min(n_train, int(rng.integers(1, 2 * shard_size))), radii, 3, rng)


def test_workers_running_the_pytorch_kernels_give_the_same_result(client):
    pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    X_train, X_test = tie_heavy(rng, 64, 12, 3, np.float32)
    y_train = rng.integers(0, 3, size=64)
    reference = NeighbourIndex(X_train, y_train, metric="l2", backend="numba")
    # "torch" runs on the CPU here; on a worker with a CUDA GPU, "auto" picks the same kernels on the device.
    # One shard: one worker imports PyTorch (seconds), the merges are covered by the other tests.
    index = DaskNeighbourIndex(X_train, y_train, metric="l2", worker_backend="torch", shard_size=64)
    assert client.submit(lambda shard: shard.backend, index._shards[0]).result() == "torch"
    assert_same_engine(index, reference, X_test, 30, [1.0, 0.5], 3, rng)


def test_estimators_certify_identically_for_every_threat_model_and_joint_certificate(client):
    rng = np.random.default_rng(11)
    X_train, X_test = tie_heavy(rng, 70, 18, 3, np.float64)
    names = np.array(["ant", "bee", "cow"])
    y_train, y_test = names[rng.integers(0, 3, size=70)], names[rng.integers(0, 3, size=18)]
    grid = np.arange(0, 5)  # up to the smallest max_e below

    def assert_same(got, expected):
        assert got.keys() == expected.keys()
        for key in got:
            a, b = got[key], expected[key]
            np.testing.assert_array_equal(a.votes, b.votes)
            np.testing.assert_array_equal(a.certified_size, b.certified_size)
            np.testing.assert_array_equal(a.predictions, b.predictions)
            if b.neighbor_labels is not None:
                np.testing.assert_array_equal(a.neighbor_labels, b.neighbor_labels)
            assert a.available_methods == b.available_methods and len(b.available_methods) >= 2
            for method in b.available_methods:
                np.testing.assert_array_equal(a.certified_accuracy(grid, method=method),
                                              b.certified_accuracy(grid, method=method))

    # One pass for kNN and rNN (the CLI's path), general threat model: every joint certificate.
    options = {"knn": [3, 6], "rnn": [1.0, 2.0], "max_e": 5}
    dask_knn, dask_rnn = certify_neighbours(X_train, y_train, X_test, y_test, backend="dask", **options)
    knn, rnn = certify_neighbours(X_train, y_train, X_test, y_test, backend="numba", **options)
    assert dask_knn[3].metadata["backend"] == "dask"
    assert_same(dask_knn, knn)
    assert_same(dask_rnn, rnn)
    # The other threat models from one fit per estimator (deletion re-reads wider neighbour tables).
    models = {backend: (CertifiedKNeighborsClassifier(n_neighbors=6, backend=backend).fit(X_train, y_train),
                        CertifiedRadiusNeighborsClassifier(radius=1.5, backend=backend).fit(X_train, y_train))
              for backend in ("dask", "numba")}
    (knn_dask, rnn_dask), (knn_numba, rnn_numba) = models["dask"], models["numba"]
    for threat_model in THREAT_MODELS[1:]:
        assert_same({"knn": knn_dask.certify(X_test, y_test, threat_model, max_e=4),
                     "rnn": rnn_dask.certify(X_test, y_test, threat_model)},
                    {"knn": knn_numba.certify(X_test, y_test, threat_model, max_e=4),
                     "rnn": rnn_numba.certify(X_test, y_test, threat_model)})
    np.testing.assert_array_equal(models["dask"][0].predict(X_test), models["numba"][0].predict(X_test))


def test_npy_memmap_and_zarr_sources_are_read_by_the_workers(client, tmp_path):
    rng = np.random.default_rng(5)
    X_train, X_test = tie_heavy(rng, 1200, 9, 4, np.float32)
    y_train = rng.integers(0, 4, size=1200)
    np.save(tmp_path / "train.npy", X_train)
    reference = NeighbourIndex(X_train, y_train, metric="l2", backend="numba")
    sources = [np.load(tmp_path / "train.npy", mmap_mode="r")]
    zarr = pytest.importorskip("zarr")
    store = zarr.open_array(str(tmp_path / "train.zarr"), mode="w", shape=X_train.shape, chunks=(250, 4), dtype="f4")
    store[:] = X_train
    sources.append(store)
    for source in sources:
        described = training_source(source)
        assert described.kind in ("npy", "zarr")
        # A read task carries the source's location and a row range, never the rows.
        assert len(pickle.dumps(described.piece(0, 1200))) < 4000 < X_train.nbytes
        index = NeighbourIndex(source, y_train, metric="l2", backend="dask", shard_size=400)
        labels, votes = index.search(X_test, n_neighbors=50, radii=[1.0, 2.0], n_classes=4)
        expected_labels, expected_votes = reference.search(X_test, n_neighbors=50, radii=[1.0, 2.0], n_classes=4)
        np.testing.assert_array_equal(labels, expected_labels)
        np.testing.assert_array_equal(votes, expected_votes)
    # Default shards: the rows split over the cluster's 2 threads, rounded up to whole zarr chunks of 250 rows.
    assert NeighbourIndex(store, y_train, backend="dask").shard_bounds_.tolist() == [0, 750, 1200]
    # A slice of a memory map is not the whole file: it is treated as an in-memory array.
    assert training_source(np.load(tmp_path / "train.npy", mmap_mode="r")[10:]).kind == "array"
    # The estimators take a path as well.
    model = CertifiedKNeighborsClassifier(n_neighbors=5, backend="dask").fit(str(tmp_path / "train.npy"), y_train)
    assert model.index_.source_.kind == "npy"
    single = CertifiedKNeighborsClassifier(n_neighbors=5).fit(X_train, y_train)
    np.testing.assert_array_equal(model.vote_counts(X_test), single.vote_counts(X_test))


def test_bad_training_data_is_refused_by_the_workers_with_the_engine_messages(client, tmp_path):
    X = np.ones((30, 2))
    X[17, 1] = np.nan
    np.save(tmp_path / "nan.npy", X)
    with pytest.raises(ValueError, match="X_train contains NaN or infinite values"):
        NeighbourIndex(np.load(tmp_path / "nan.npy", mmap_mode="r"), np.arange(30) % 2, backend="dask",
                       shard_size=10)
    zero = np.ones((30, 2))
    zero[25] = 0
    with pytest.raises(ValueError, match="row of zeros"):
        NeighbourIndex(zero, np.arange(30) % 2, metric="cosine", backend="dask", shard_size=10)
    with pytest.raises(ValueError, match="too large for float32 distances"):
        NeighbourIndex(np.full((30, 2), 1e38, np.float32), np.arange(30) % 2, backend="dask", shard_size=10)
    with pytest.raises(ValueError, match="no .npy file or zarr array"):
        CertifiedKNeighborsClassifier(n_neighbors=3, backend="dask").fit(str(tmp_path / "missing.npy"),
                                                                         np.arange(30) % 2)
    with pytest.raises(ValueError, match="X has 30 samples but y has 29 labels"):
        CertifiedKNeighborsClassifier(n_neighbors=3, backend="dask").fit(X, np.arange(29) % 2)
    with pytest.raises(ValueError, match="unknown backend"):
        CertifiedKNeighborsClassifier(n_neighbors=3, backend="spark").fit(np.ones((30, 2)), np.arange(30) % 2)


def test_unreachable_scheduler_fails_within_seconds_naming_the_address():
    began = time.perf_counter()
    with pytest.raises(ConnectionError, match=r"tcp://127\.0\.0\.1:9\b"):
        with connect("tcp://127.0.0.1:9", timeout=1):
            pass
    assert time.perf_counter() - began < 10
    for bad in ("local:0", "local:two", "no-port", ""):
        with pytest.raises(ValueError, match="local:N"):
            with connect(bad):
                pass


def test_a_worker_killed_during_a_search_changes_nothing(client, tmp_path):
    rng = np.random.default_rng(3)
    X_train = rng.random((6000, 8)).astype(np.float32)
    X_train[:500] = X_train[0]
    y_train = rng.integers(0, 3, size=6000)
    X_test = rng.random((240, 8)).astype(np.float32)
    np.save(tmp_path / "train.npy", X_train)
    expected = NeighbourIndex(X_train, y_train, backend="numba").search(X_test, 40, [0.8], 3)
    # Many small blocks, so that the run is still going when the worker dies; both workers hold shards.
    index = NeighbourIndex(np.load(tmp_path / "train.npy", mmap_mode="r"), y_train, backend="dask",
                           shard_size=1500, chunk_size=8)
    pids = client.run(os.getpid)
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = index.search(X_test, 40, [0.8], 3)
        except BaseException as error:  # reported below
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not any(client.processing().values()) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert thread.is_alive(), "the search ended before a worker could be killed; make it longer"
    victim = sorted(pids)[0]
    os.kill(pids[victim], signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    assert victim not in client.scheduler_info(n_workers=-1)["workers"]  # the worker really died
    labels, votes = outcome["result"]
    np.testing.assert_array_equal(labels, expected[0])
    np.testing.assert_array_equal(votes, expected[1])
    client.wait_for_workers(2, timeout=60)  # the nanny restarts it


def test_cli_scheduler_local_gives_the_single_process_results(tmp_path):
    """`poisoncert certify --scheduler local:2` writes the same curves and certificates as the default engine."""
    from typer.testing import CliRunner

    from poisoncert.cli import app

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 120)
    X = np.round(np.eye(3)[y] * 2 + rng.normal(scale=0.6, size=(120, 3)), 1)
    np.savez(tmp_path / "train.npz", X=X[:90], y=y[:90])
    np.savez(tmp_path / "test.npz", X=X[90:], y=y[90:])
    runner = CliRunner()
    outputs = {}
    for name, extra in (("local", []), ("dask", ["--scheduler", "local:2"])):
        result = runner.invoke(app, ["certify", "--train", str(tmp_path / "train.npz"), "--test",
                                     str(tmp_path / "test.npz"), "--knn", "7", "--rnn", "1.2", "--e-max", "8",
                                     "--out", str(tmp_path / name), "--no-progress", *extra])
        assert result.exit_code == 0, result.output
        outputs[name] = result.output
    for file in ("curves.csv", "examples.csv"):
        def body(path):
            return [line for line in path.read_text().splitlines() if not line.startswith("#")]
        assert body(tmp_path / "local" / file) == body(tmp_path / "dask" / file)


def test_cli_unreachable_scheduler_fails_fast_and_writes_nothing(tmp_path):
    from typer.testing import CliRunner

    from poisoncert.cli import app

    np.savez(tmp_path / "train.npz", X=np.eye(3), y=np.arange(3))
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["certify", "--train", str(tmp_path / "train.npz"), "--test",
                                      str(tmp_path / "train.npz"), "--knn", "1", "--scheduler",
                                      "tcp://127.0.0.1:9", "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 2
    assert "127.0.0.1:9" in result.output
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "out").exists()
