"""The on-disk cache folder and a small content-keyed cache for NumPy arrays.

Anything expensive and deterministic (parsed datasets, feature matrices, neighbour tables, experiment
intermediates) can be memoised with :func:`cached_arrays`: the caller describes *everything the result
depends on* as a JSON-serialisable ``key`` dict, and the arrays are stored under a SHA-256 of that key.
Changing any key field (a parameter, a source checksum, the package version) therefore gives a new entry;
nothing is ever looked up by a name that could silently point at stale data.

Writes are atomic (:func:`poisoncert._io.save_npz` writes a temporary file and renames it), so an
interrupted computation or write leaves either the previous state or a complete entry, never a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._io import save_npz, write_json

__all__ = ["CACHE_ENV_VAR", "cache_dir", "cache_path", "cached_arrays", "key_digest", "stored_arrays"]

#: Environment variable that overrides the default cache folder.
CACHE_ENV_VAR = "POISONCERT_CACHE"


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder poisoncert caches downloads, datasets and features in.

    Precedence: ``override`` (if not None) > the ``POISONCERT_CACHE`` environment variable (if set and
    non-empty) > ``platformdirs.user_cache_dir("poisoncert")`` (e.g. ``~/.cache/poisoncert`` on Linux).
    The folder is not created here; writers create it on first use.

    Parameters
    ----------
    override : path-like or None
        Explicit folder, e.g. from a ``--cache-dir`` command-line option.

    Returns
    -------
    pathlib.Path
        Absolute path of the cache folder (``~`` expanded).
    """
    if override is not None:
        return Path(override).expanduser().resolve()
    env = os.environ.get(CACHE_ENV_VAR, "")
    if env:
        return Path(env).expanduser().resolve()
    import platformdirs  # deferred: only needed when no folder is given

    return Path(platformdirs.user_cache_dir("poisoncert")).resolve()


def _canonical_json(key: Mapping[str, Any]) -> str:
    if not isinstance(key, Mapping):
        raise TypeError(f"cache key must be a mapping (dict), got {type(key).__name__}")
    try:
        return json.dumps(key, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_key_default)
    except TypeError as exc:  # re-raise with the key in the message so the caller sees which field
        raise TypeError(f"cache key is not JSON-serialisable ({exc}): {key!r}") from None


def _key_default(value: Any) -> Any:
    # Only lossless conversions: a float32 and the "same" float64 would otherwise hash differently
    # depending on the caller, so NumPy scalars become plain Python numbers.
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"cannot use {type(value).__name__} in a cache key")


def key_digest(key: Mapping[str, Any]) -> str:
    """Stable SHA-256 hex digest of a cache key.

    The key is serialised as JSON with sorted keys and no whitespace, so dict order does not matter,
    tuples and lists are equivalent, and NumPy scalars equal plain numbers.

    Raises
    ------
    TypeError
        If ``key`` is not a mapping or holds a value with no lossless JSON form.
    """
    return hashlib.sha256(_canonical_json(key).encode("ascii")).hexdigest()


def cache_path(key: Mapping[str, Any], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the ``.npz`` entry that :func:`cached_arrays` uses for ``key`` (it may not exist)."""
    digest = key_digest(key)
    return _resolve(cache_dir) / "arrays" / digest[:2] / f"{digest}.npz"


def _resolve(folder: str | os.PathLike[str] | None) -> Path:
    return cache_dir(folder)


def _load_entry(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError):
        # A damaged entry (disk full on another machine, manual edit) is treated as a miss and
        # overwritten; it cannot come from our own writer, which renames only complete files. A corrupted
        # zip header can also claim an unknown compression (NotImplementedError) or encryption (RuntimeError).
        return None


def stored_arrays(key: Mapping[str, Any], cache_dir: str | os.PathLike[str] | None = None
                  ) -> dict[str, np.ndarray] | None:
    """The arrays stored for ``key`` (as :func:`cached_arrays` would return them on a hit), or None: nothing is
    computed or written."""
    return _load_entry(cache_path(key, cache_dir))


def cached_arrays(
    key: Mapping[str, Any],
    compute: Callable[[], Mapping[str, np.ndarray]],
    cache_dir: str | os.PathLike[str] | None = None,
    accept: Callable[[dict[str, np.ndarray]], bool] | None = None,
) -> dict[str, np.ndarray]:
    """Return the arrays stored for ``key``, computing and storing them on a miss.

    Parameters
    ----------
    key : dict
        Everything the result depends on, JSON-serialisable (str, numbers, bool, None, lists, dicts;
        NumPy scalars and paths are converted). Include source checksums and code versions: the cache
        never invalidates entries by itself.
    compute : callable
        Called with no arguments on a miss; must return a mapping from names (valid identifiers, not
        starting with ``_``) to arrays. Object arrays are refused, so entries load with
        ``allow_pickle=False``.
    cache_dir : path-like or None
        Cache folder; see :func:`cache_dir` for the default.
    accept : callable, optional
        Checks a loaded entry (names, shapes, dtypes); one it refuses is a miss, computed again and overwritten.

    Returns
    -------
    dict of str to numpy.ndarray
        The arrays, loaded into memory. On a miss they are what ``compute`` returned, converted with
        ``np.asarray``.

    Notes
    -----
    The entry is ``<cache>/arrays/<hh>/<sha256 of key>.npz`` with a ``.json`` sidecar holding the key
    itself (for people inspecting the folder). The ``.npz`` is written to a temporary file and renamed,
    so if ``compute`` raises, or the process dies while writing, no entry exists afterwards and the next
    call recomputes. Two processes racing on the same key both compute; the last rename wins, and both
    results are equal for a deterministic ``compute``.
    """
    path = cache_path(key, cache_dir)
    hit = _load_entry(path)
    if hit is not None and (accept is None or accept(hit)):
        return hit
    result = compute()
    if not isinstance(result, Mapping):
        raise TypeError(f"compute() must return a dict of arrays, got {type(result).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for name, value in result.items():
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"array names must be identifiers not starting with '_', got {name!r}")
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(f"array {name!r} has an object dtype; only plain numeric arrays can be cached")
        arrays[name] = array
    # Sidecar first: a sidecar without an entry is harmless, an entry is only ever complete.
    write_json(path.with_suffix(".json"), {"key": json.loads(_canonical_json(key)), "arrays": sorted(arrays)})
    save_npz(path, **arrays)
    return arrays
