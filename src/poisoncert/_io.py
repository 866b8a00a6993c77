"""Atomic file writes and content hashing shared by every module that writes results or caches."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` and rename it onto ``path`` only on success.

    A crash or interrupt inside the ``with`` block leaves ``path`` untouched and no stray file behind,
    so a reader never sees a half-written result or cache entry.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results should get the usual permissions
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")


def save_npz(path: str | os.PathLike[str], **arrays: np.ndarray) -> None:
    """Save arrays to an ``.npz`` file atomically."""
    with atomic_write(path, "wb") as handle:
        np.savez(handle, **arrays)


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def array_digest(*arrays: np.ndarray) -> str:
    """SHA-256 over the dtype, shape and bytes of each array: a content key for caches."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(str(array.dtype.str).encode())
        digest.update(str(array.shape).encode())
        # The same bytes as array.tobytes(), without copying them (object arrays have no byte view).
        digest.update(array.tobytes() if array.dtype.hasobject or not array.size else array.reshape(-1).view(np.uint8))
    return digest.hexdigest()


def label_codes(classes: np.ndarray) -> np.ndarray:
    """Canonical int64 code of each label value: the label part of an example's content hash.

    Integer labels (and booleans) are their own code, so label indices ``0..c-1`` hash as themselves; string
    labels get the first 8 bytes (little-endian) of a SHA-256 of their UTF-8 text. A code depends on the label
    value alone, never on which other labels occur: a poisoned training set that removes every example of a
    class, or adds a new class, re-encodes the label *indices* but changes no other example's hash, so tie
    ranks and DPA partitions stay where they were.

    Examples
    --------
    >>> label_codes(np.array([3, 7])).tolist()
    [3, 7]
    >>> bool(label_codes(np.array(["cat", "dog"]))[0] == label_codes(np.array(["cat"]))[0])
    True
    """
    values = np.asarray(classes)
    if values.ndim != 1:
        raise ValueError(f"classes must be 1-D, got shape {values.shape}")
    if values.dtype.kind in "biu" and (values.size == 0 or int(values.max()) <= np.iinfo(np.int64).max):
        return values.astype(np.int64)
    codes = []
    for value in values.tolist():
        text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)
        digest = hashlib.sha256(b"poisoncert-label\0" + text.encode("utf-8", "surrogatepass")).digest()
        codes.append(int.from_bytes(digest[:8], "little", signed=True))
    return np.array(codes, dtype=np.int64)


def example_digests(X: np.ndarray, label_code: np.ndarray) -> np.ndarray:
    """SHA-256 of each training example's canonical bytes, shape (n, 32) uint8 (spec section 2).

    The bytes are the features as little-endian float64 (``-0.0`` folded into ``0.0`` so equal vectors hash
    equally) followed by the label's code as little-endian int64 (:func:`label_codes`; for integer labels, the
    label itself): a function of the example alone, never of its row position or of the other examples.
    Neighbour tie ranks and DPA partitions are both derived from it.
    """
    from ._sha256 import canonical_digests  # compiled, so imported only here

    features = np.asarray(X)
    if features.dtype not in (np.float32, np.float64):
        features = np.asarray(X, dtype=np.float64)
    labels = np.asarray(label_code, dtype=np.int64)
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"example_digests needs 2-D features and one label code per row, got {features.shape} "
                         f"and {labels.shape}")
    return canonical_digests(features, labels)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
