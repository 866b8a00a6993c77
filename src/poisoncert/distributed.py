"""Exact neighbour search sharded over a dask.distributed cluster (``backend="dask"``).

The single-process engine (:class:`poisoncert.neighbours.NeighbourIndex`) holds the whole training set; this one
splits it into row *shards* that live on the workers, and splits every search into (test chunk x shard) *blocks*.
The results are bit-identical to the single-process engine whatever the shard and chunk sizes, because:

- every block computes its distances with the same kernel, dtype and feature order (each distance depends only on
  its test row and its training row), so the distances are the very same floats;
- each shard keeps its rows in the global tie order restricted to it (content-hash rank descending, then row), so a
  block's first ``min(k, shard)`` candidates by (distance, position) are its first by the global order key
  (distance bits ascending, rank descending, row ascending); that key is a total order, so merging the blocks'
  candidates by it and keeping the first ``k`` gives exactly the global first ``k``, in any merge order;
- radius votes are integer counts, added exactly.

How a fit runs (all heavy work in tasks; the client handles labels and 8 bytes per training row, never features):

1. *Read* (one task per shard): read the shard's rows lazily from its source (a ``.npy`` file opened with
   ``mmap_mode="r"``, a zarr array, or, for an in-memory array, rows embedded in the task), check them as
   :func:`poisoncert._validation.check_features` does, cast to the search dtype and hash every example
   (:func:`poisoncert._io.example_digests`).
2. *Ranks*: the shards' distinct digests are merged by a tree of tasks into the sorted distinct digests of the
   whole set; each shard looks its digests up there, which is its examples' global dense rank
   (:func:`poisoncert.neighbours.training_ranks`). The ranks come to the client, so that a shard lost with its
   worker is rebuilt from its source alone.
3. *Build*: each shard orders its rows and keeps the transposed features in worker memory (a persisted future).

A worker that dies takes its shards and running blocks with it; the scheduler recomputes them from their lineage
(read, build, block), on any worker, and the search result is unchanged. Workers with a CUDA GPU and PyTorch run
their blocks with the PyTorch kernels (``worker_backend="auto"``), which give the same floats.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import numbers
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from ._distance_tiles import pack_columns
from ._io import example_digests, label_codes
from ._validation import check_features, check_metric, check_positive_int
from .neighbours import (
    _METRIC_CODES,
    NeighbourIndex,
    _check_distance_range,
    _distances_numba,
    _encode_train_labels,
    _radii_in_dtype,
    _radius_counts_numba,
    _resolve_backend,
    _select_numba,
    _unit_rows,
    label_table_dtype,
)

__all__ = ["DaskNeighbourIndex", "TrainingSource", "check_training_source", "connect", "training_source"]

_DASK_HINT = "the dask backend needs dask.distributed: pip install poisoncert[dask]"
# Candidate sets merged per merge task: the merge costs O(fan-in) per kept neighbour, and a tree of fan-in 8
# keeps the number of merge levels at log8(shards).
_FAN_IN = 8
# Largest shard, in bytes of search-dtype features, when the caller does not choose: a shard and its transposed
# copy must fit a worker's memory next to the blocks' distance buffers.
_MAX_SHARD_BYTES = 1 << 30
_CLIENT_HINT = (
    "backend='dask' needs a dask.distributed client: create one (distributed.Client(...)) or use "
    "poisoncert.distributed.connect('local:N' or 'tcp://HOST:PORT')"
)


def _import_distributed():  # type: ignore[no-untyped-def]
    try:
        import distributed
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(_DASK_HINT) from error
    return distributed


# --------------------------------------------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def connect(scheduler: str, *, timeout: float = 5.0) -> Iterator[Any]:
    """A dask.distributed client for the duration of a ``with`` block; the default client inside it.

    Parameters
    ----------
    scheduler : str
        ``"tcp://HOST:PORT"`` (or ``"HOST:PORT"``, or another Dask address such as ``"tls://HOST:PORT"``): an
        existing scheduler. ``"local:N"``: a :class:`distributed.LocalCluster` of ``N`` worker processes with one
        thread each, started here and shut down on exit.
    timeout : float, default 5
        Seconds to wait for the scheduler to answer.

    Yields
    ------
    distributed.Client
        Also the default client, which ``backend="dask"`` picks up with :func:`distributed.get_client`.

    Raises
    ------
    ValueError
        For an address that is neither of the forms above.
    ConnectionError
        When the scheduler does not answer within ``timeout`` seconds; the message names the address.

    Examples
    --------
    >>> from poisoncert.distributed import connect
    >>> with connect("local:2") as client:  # doctest: +SKIP
    ...     CertifiedKNeighborsClassifier(50, backend="dask").fit(X, y).certify(X_test, y_test)
    """
    distributed = _import_distributed()
    if not isinstance(scheduler, str) or not scheduler.strip():
        raise ValueError(f"scheduler must be 'tcp://HOST:PORT' or 'local:N', got {scheduler!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    text = scheduler.strip()
    if text.startswith("local:"):
        count = text[len("local:"):]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"scheduler {scheduler!r}: 'local:N' needs a number of workers N >= 1")
        # One thread per worker process: each block then runs its Numba kernels with the cores left to it.
        with distributed.LocalCluster(n_workers=int(count), threads_per_worker=1, processes=True,
                                      dashboard_address=None, silence_logs=logging.ERROR) as cluster:
            with distributed.Client(cluster, timeout=timeout) as client:
                yield client
        return
    address = text if "://" in text else f"tcp://{text}"
    host_port = address.split("://", 1)[1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"scheduler {scheduler!r} is not an address of the form 'tcp://HOST:PORT' (or 'local:N')")
    try:
        client = distributed.Client(address, timeout=timeout)
    except (OSError, TimeoutError) as error:
        raise ConnectionError(f"cannot reach the Dask scheduler at {address}: no answer within {timeout:g} s "
                              f"({error})") from None
    with client:
        yield client


def _get_client(client: Any | None) -> Any:
    distributed = _import_distributed()
    if client is not None:
        return client
    try:
        return distributed.get_client()
    except ValueError:
        raise ValueError(_CLIENT_HINT) from None


# --------------------------------------------------------------------------------------------------------------
# Training sources: what a task needs to read its rows
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSource:
    """Where the workers read the training features: a description, not the data.

    Attributes
    ----------
    kind : {"npy", "zarr", "array"}
        ``npy``: a ``.npy`` file that each task opens with ``np.load(path, mmap_mode="r")``; ``zarr``: a zarr array
        (pickled as its store location and metadata); ``array``: an in-memory array, whose rows are embedded in
        the task that reads them.
    shape : tuple of int
        ``(n_train, n_features)``.
    dtype : numpy.dtype
        The stored dtype; features are searched in float32 when it is float32, in float64 otherwise.
    location : object
        The path (``npy``), the zarr array (``zarr``) or the array (``array``).
    """

    kind: str
    shape: tuple[int, int]
    dtype: np.dtype
    location: Any

    @property
    def search_dtype(self) -> np.dtype:
        """float32 for float32 sources, float64 for every other numeric dtype (as ``check_features``)."""
        return np.dtype(np.float32) if self.dtype == np.float32 else np.dtype(np.float64)

    def piece(self, start: int, stop: int) -> tuple[str, Any, int, int]:
        """The picklable description of rows ``start:stop`` that a read task receives."""
        if self.kind == "array":
            return ("array", self.location[start:stop], start, stop)
        return (self.kind, self.location, start, stop)


def training_source(X: Any, name: str = "X_train") -> TrainingSource:
    """Describe training features for the workers without reading them.

    Parameters
    ----------
    X : array-like, numpy.memmap, zarr array, or path
        A path to a ``.npy`` file or to a zarr array; a memory map of a whole ``.npy`` file (as returned by
        ``np.load(path, mmap_mode="r")``); a zarr array; or any in-memory array-like (its rows then travel in the
        read tasks). Only shape and dtype are checked here; finiteness is checked by the workers as they read.
    name : str
        Argument name for error messages.

    Returns
    -------
    TrainingSource
    """
    if isinstance(X, TrainingSource):
        return X
    if isinstance(X, str | os.PathLike):
        path = os.fspath(X)
        if os.path.isfile(path) and path.endswith(".npy"):
            X = np.load(path, mmap_mode="r")
        elif os.path.exists(path):
            import zarr

            X = zarr.open_array(path, mode="r")
        else:
            raise ValueError(f"{name}: no .npy file or zarr array at {path!r}")
    if type(X).__module__.split(".")[0] == "zarr":
        shape, dtype, kind, location = tuple(X.shape), np.dtype(X.dtype), "zarr", X
    elif isinstance(X, np.memmap) and _maps_whole_file(X):
        shape, dtype, kind, location = X.shape, X.dtype, "npy", os.fspath(X.filename)
    else:
        if hasattr(X, "tocsr") and hasattr(X, "nnz"):
            raise TypeError(f"{name} is a sparse matrix; poisoncert needs dense features (use {name}.toarray())")
        X = np.asarray(X)
        shape, dtype, kind, location = X.shape, X.dtype, "array", X
    if dtype.kind not in "biuf":
        raise TypeError(f"{name} must be numeric, got dtype {dtype}")
    if len(shape) != 2:
        raise ValueError(f"{name} must be a 2-D array (n_samples, n_features), got shape {tuple(shape)}")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty: it has 0 samples")
    if shape[1] == 0:
        raise ValueError(f"{name} has 0 features")
    return TrainingSource(kind, (int(shape[0]), int(shape[1])), dtype, location)


def _maps_whole_file(X: np.memmap) -> bool:
    """True when ``X`` is the whole array of a ``.npy`` file, so a worker can reopen it by path."""
    if X.filename is None or not isinstance(X.base, mmap.mmap) or not str(X.filename).endswith(".npy"):
        return False  # a slice or view of a memory map has another array as its base
    try:
        reopened = np.load(X.filename, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return reopened.shape == X.shape and reopened.dtype == X.dtype and reopened.offset == X.offset


def check_training_source(X: Any, y: Any) -> tuple[TrainingSource, np.ndarray, np.ndarray]:
    """:func:`poisoncert._validation.check_training_set` for the Dask backend: labels now, features on the workers.

    Returns
    -------
    source : TrainingSource
    classes : ndarray
        Sorted label values.
    y_index : ndarray of int64
        Each example's index into ``classes``.
    """
    from ._validation import encode_labels

    source = training_source(X, "X")
    classes, y_index = encode_labels(y)
    if len(y_index) != source.shape[0]:
        raise ValueError(f"X has {source.shape[0]} samples but y has {len(y_index)} labels")
    if len(classes) < 2:
        raise ValueError(f"y has a single class ({classes[0].item()!r}); certification needs at least 2 classes")
    return source, classes, y_index


def _read_piece(piece: tuple[str, Any, int, int], n_features: int) -> np.ndarray:
    kind, location, start, stop = piece
    if kind == "npy":
        block = np.array(np.load(location, mmap_mode="r")[start:stop])
    elif kind == "zarr":
        block = np.asarray(location[start:stop])
    else:
        block = location
    if block.shape != (stop - start, n_features):
        raise ValueError(f"X_train rows {start}..{stop - 1} have shape {block.shape}, expected "
                         f"{(stop - start, n_features)}: was the source changed after fit?")
    # The same checks and dtype rule as the single-process engine (NaN/inf refused, float32 kept).
    return check_features(block, "X_train")


# --------------------------------------------------------------------------------------------------------------
# Worker-side tasks: read, rank, build
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _RawShard:
    X: np.ndarray  # rows in source order, search dtype
    words: np.ndarray  # (n, 4) uint64: SHA-256 digests as big-endian words, which order like the digests
    peak: float


def _read_shard(piece: tuple[str, Any, int, int], n_features: int, codes: np.ndarray) -> _RawShard:
    X = _read_piece(piece, n_features)
    words = example_digests(X, codes).view(">u8").astype(np.uint64)
    return _RawShard(X, words, float(np.max(np.abs(X))))


def _peak(raw: _RawShard) -> float:
    return raw.peak


def _distinct_words(raw: _RawShard) -> np.ndarray:
    return np.unique(raw.words, axis=0)


@numba.njit(cache=True)
def _merge_distinct(a, b):  # pragma: no cover - compiled
    """The sorted distinct rows of two sorted distinct row arrays (lexicographic uint64 order), in O(len)."""
    out = np.empty((a.shape[0] + b.shape[0], a.shape[1]), a.dtype)
    i = 0
    j = 0
    n = 0
    while i < a.shape[0] or j < b.shape[0]:
        order = 0  # -1: a's row first, 1: b's row first, 0: equal rows (kept once)
        if i == a.shape[0]:
            order = 1
        elif j == b.shape[0]:
            order = -1
        else:
            for w in range(a.shape[1]):
                if a[i, w] != b[j, w]:
                    order = -1 if a[i, w] < b[j, w] else 1
                    break
        if order <= 0:
            out[n] = a[i]
            i += 1
            if order == 0:
                j += 1
        else:
            out[n] = b[j]
            j += 1
        n += 1
    return out[:n]


def _union_words(parts: list[np.ndarray]) -> np.ndarray:
    # The parts are sorted and distinct already: merging them (pairwise) is linear, where re-sorting their
    # concatenation would be the one serial step of the rank pass that grows with the training set.
    while len(parts) > 1:
        parts = [_merge_distinct(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]


@numba.njit(cache=True)
def _lookup_words(table, words, out):  # pragma: no cover - compiled
    """out[i] = position of words[i] in the sorted distinct rows ``table`` (lexicographic uint64 order)."""
    for i in range(words.shape[0]):
        lo = 0
        hi = table.shape[0]
        while lo < hi:
            mid = (lo + hi) >> 1
            less = False
            for w in range(table.shape[1]):
                if table[mid, w] != words[i, w]:
                    less = table[mid, w] < words[i, w]
                    break
            if less:
                lo = mid + 1
            else:
                hi = mid
        out[i] = lo


def _shard_ranks(table: np.ndarray, raw: _RawShard) -> np.ndarray:
    # np.unique(axis=0) sorts rows lexicographically by value, as training_ranks does; the position of a digest
    # among the distinct digests of the whole set is its dense rank.
    ranks = np.empty(len(raw.words), dtype=np.int64)
    _lookup_words(table, raw.words, ranks)
    return ranks


class _ShardIndex(NeighbourIndex):
    """One shard as a :class:`NeighbourIndex` whose positions map to global rows, ranks and label indices.

    It reuses the single-process engine's kernels and chunking (Numba, or PyTorch on a GPU worker) over its rows,
    which it keeps in the global tie order (rank descending, then row ascending).
    """

    def __init__(self, raw: _RawShard, ranks: np.ndarray, labels: np.ndarray, start: int, metric: str,
                 label_dtype: np.dtype, worker_backend: str, max_memory_mb: float) -> None:
        # The parent's __init__ would hash and rank the shard again; the attributes its search helpers read are
        # set here instead.
        local = np.lexsort((np.arange(len(ranks)), -ranks))
        X_sorted = raw.X[local]
        if metric == "cosine":
            X_sorted = _unit_rows(X_sorted, "X_train")
        self.metric = metric
        self.requested_backend = worker_backend
        self.backend = _resolve_backend(worker_backend)
        self.chunk_size = None
        self.max_memory_mb = float(max_memory_mb)
        self.progress = False
        self.dtype_ = X_sorted.dtype
        self.n_train_, self.n_features_in_ = X_sorted.shape
        self._XP = pack_columns(X_sorted)
        self._label_dtype = np.dtype(label_dtype)
        self._labels = np.ascontiguousarray(labels[local], dtype=np.int32)
        self._labels_out = self._labels.astype(self._label_dtype)
        self.global_ranks = ranks[local]
        self.rows = start + local.astype(np.int64)
        self._torch_cache = None

    def __getstate__(self) -> dict[str, Any]:
        # A shard copied to another worker (work stealing, replication) leaves its device tensors behind.
        state = dict(self.__dict__)
        state["_torch_cache"] = None
        state.pop("_torch_table_labels_cache", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.backend = _resolve_backend(self.requested_backend)  # the receiving worker may lack (or have) a GPU


def _build_shard(raw: _RawShard, ranks: np.ndarray, labels: np.ndarray, start: int, metric: str,
                 label_dtype: str, worker_backend: str, max_memory_mb: float) -> _ShardIndex:
    return _ShardIndex(raw, ranks, labels, start, metric, np.dtype(label_dtype), worker_backend, max_memory_mb)


# --------------------------------------------------------------------------------------------------------------
# Worker-side tasks: search blocks and merges
# --------------------------------------------------------------------------------------------------------------

_BUFFERS = threading.local()


def _distance_buffer(rows: int, columns: int, dtype: np.dtype) -> np.ndarray:
    """A per-thread distance buffer reused across blocks: a fresh one per block would page-fault its whole size."""
    needed = rows * columns
    buffer = getattr(_BUFFERS, "array", None)
    if buffer is None or buffer.dtype != dtype or buffer.size < needed:
        buffer = np.empty(needed, dtype=dtype)
        _BUFFERS.array = buffer
    return buffer[:needed].reshape(rows, columns)


def _block_threads(budgets: dict[str, int]) -> int:
    try:
        from distributed import get_worker

        return budgets.get(get_worker().address, 1)
    except ValueError:  # not inside a worker (e.g. a synchronous scheduler in a debugger)
        return 1


def _distance_blocks(shard: _ShardIndex, Q: np.ndarray, k: int) -> Iterator[tuple[int, int, Any]]:
    """The shard's distances to ``Q`` in sub-chunks within the block's memory budget (reused buffer on CPU)."""
    if shard.backend == "torch":
        yield from shard._distance_chunks(Q, k=k)
        return
    chunk = shard._resolved_chunk_size(len(Q), k)
    for start in range(0, len(Q), chunk):
        stop = min(start + chunk, len(Q))
        D = _distance_buffer(stop - start, shard.n_train_, shard.dtype_)
        _distances_numba(Q[start:stop], shard._XP, shard.n_train_, D, _METRIC_CODES[shard.metric])
        yield start, stop, D


def _search_block(shard: _ShardIndex, Q: np.ndarray, k: int | None, padded: np.ndarray | None,
                  sorted_radii: np.ndarray | None, n_classes: int, budgets: dict[str, int]) -> dict[str, Any]:
    """One (test chunk x shard) block: the shard's first min(k, shard) candidates and/or its radius counts."""
    began = time.perf_counter()
    numba.set_num_threads(max(1, min(_block_threads(budgets), numba.config.NUMBA_NUM_THREADS)))
    n = len(Q)
    kk = 0 if k is None else min(k, shard.n_train_)
    out: dict[str, Any] = {}
    if kk:
        out["dist"] = np.empty((n, kk), dtype=shard.dtype_)
        out["rank"] = np.empty((n, kk), dtype=np.int64)
        out["row"] = np.empty((n, kk), dtype=np.int64)
        out["label"] = np.empty((n, kk), dtype=shard._label_dtype)
    if sorted_radii is not None:
        out["counts"] = np.empty((len(sorted_radii), n, n_classes), dtype=np.int64)
    positions_buffer = None
    for start, stop, D in _distance_blocks(shard, Q, kk):
        if kk:
            if shard.backend == "torch":
                positions = shard._torch_select(D, kk)
                out["dist"][start:stop] = shard._torch_gather(D, positions)
            else:
                if positions_buffer is None:
                    positions_buffer = np.empty((stop - start, kk), dtype=np.int64)
                positions = positions_buffer[: stop - start]
                _select_numba(D.view(np.int32 if D.dtype.itemsize == 4 else np.int64), kk, positions)
                out["dist"][start:stop] = np.take_along_axis(D, positions, axis=1)
            out["rank"][start:stop] = shard.global_ranks[positions]
            out["row"][start:stop] = shard.rows[positions]
            out["label"][start:stop] = shard._labels_out[positions]
        if sorted_radii is not None:
            if shard.backend == "torch":
                out["counts"][:, start:stop] = shard._torch_radius(D, sorted_radii, n_classes)
            else:
                _radius_counts_numba(D, shard._labels, padded, len(sorted_radii), n_classes,
                                     out["counts"][:, start:stop])
    out["block_seconds"] = [time.perf_counter() - began]
    out["merge_seconds"] = 0.0
    return out


@numba.njit(cache=True)
def _merge_runs(bits, rank, row, bounds, k, out):  # pragma: no cover - compiled
    """out[i] = columns of the first k of row i over sorted runs ``bounds[s]:bounds[s+1]``.

    Each run is sorted by the global order key (distance bits ascending, rank descending, row ascending); the
    merge repeatedly takes the smallest head. Rows are unique, so the key is a total order and the result does
    not depend on the runs' order or grouping. Serial: it costs O(k * runs) per row, far below the blocks' work,
    and a parallel kernel would take each worker process seconds to compile or load.
    """
    n_runs = bounds.shape[0] - 1
    for i in range(bits.shape[0]):
        heads = bounds[:-1].copy()
        for t in range(k):
            best = -1
            best_run = 0
            for s in range(n_runs):
                h = heads[s]
                if h < bounds[s + 1]:
                    if best < 0:
                        best = h
                        best_run = s
                    else:
                        b = bits[i, h]
                        c = bits[i, best]
                        if b < c or (b == c and (rank[i, h] > rank[i, best]
                                                 or (rank[i, h] == rank[i, best] and row[i, h] < row[i, best]))):
                            best = h
                            best_run = s
            out[i, t] = best
            heads[best_run] += 1


def _merge_blocks(parts: list[dict[str, Any]], k: int | None, keep: tuple[str, ...] | None) -> dict[str, Any]:
    """Merge blocks (or earlier merges) of one test chunk: first k candidates, summed counts.

    ``keep`` (the last merge of a chunk): the outputs that go back to the client, e.g. ``("label",)``.
    """
    began = time.perf_counter()
    out: dict[str, Any] = {
        "block_seconds": [s for part in parts for s in part["block_seconds"]],
        "merge_seconds": sum(part["merge_seconds"] for part in parts),
    }
    if "dist" in parts[0]:
        widths = [part["dist"].shape[1] for part in parts]
        kk = min(int(k), sum(widths))
        if len(parts) == 1:
            for name in ("dist", "rank", "row", "label"):
                out[name] = parts[0][name][:, :kk]
        else:
            merged = {name: np.concatenate([part[name] for part in parts], axis=1)
                      for name in ("dist", "rank", "row", "label")}
            dist = merged["dist"]
            columns = np.empty((dist.shape[0], kk), dtype=np.int64)
            bounds = np.r_[0, np.cumsum(widths)].astype(np.int64)
            _merge_runs(dist.view(np.int32 if dist.dtype.itemsize == 4 else np.int64), merged["rank"],
                        merged["row"], bounds, kk, columns)
            for name, values in merged.items():
                out[name] = np.take_along_axis(values, columns, axis=1)
    if "counts" in parts[0]:
        counts = parts[0]["counts"].copy()
        for part in parts[1:]:
            counts += part["counts"]
        out["counts"] = counts
    out["merge_seconds"] += time.perf_counter() - began
    if keep is not None:
        out = {name: value for name, value in out.items()
               if name in keep or name in ("block_seconds", "merge_seconds")}
    return out


def _members_block(shard: _ShardIndex, Q: np.ndarray, mode: str, limit: Any, budgets: dict[str, int]
                   ) -> dict[str, Any]:
    """Training rows within a radius (``mode="radius"``, ``d <= limit``) or per-row threshold (``"within"``,
    ``d < limit[j]``, ``limit`` in the shard's internal order), per test row, in the shard's internal order."""
    began = time.perf_counter()
    numba.set_num_threads(max(1, min(_block_threads(budgets), numba.config.NUMBA_NUM_THREADS)))
    counts = np.zeros(len(Q), dtype=np.int64)
    rows: list[np.ndarray] = []
    ranks: list[np.ndarray] = []
    for start, stop, D in _distance_blocks(shard, Q, 0):
        D = D.cpu().numpy() if shard.backend == "torch" else D
        mask = D <= limit if mode == "radius" else D < limit[None, :]
        counts[start:stop] = np.count_nonzero(mask, axis=1)
        columns = np.nonzero(mask)[1]
        rows.append(shard.rows[columns])
        ranks.append(shard.global_ranks[columns])
    return {"counts": counts, "rows": np.concatenate(rows), "ranks": np.concatenate(ranks),
            "block_seconds": [time.perf_counter() - began], "merge_seconds": 0.0}


def _merge_members(parts: list[dict[str, Any]], keep: tuple[str, ...] | None) -> dict[str, Any]:
    """Union of the blocks' members per test row, in the global internal order (rank descending, row ascending)."""
    began = time.perf_counter()
    counts = np.sum([part["counts"] for part in parts], axis=0)
    rows = np.concatenate([part["rows"] for part in parts])
    ranks = np.concatenate([part["ranks"] for part in parts])
    test_rows = np.concatenate([np.repeat(np.arange(len(part["counts"])), part["counts"]) for part in parts])
    order = np.lexsort((rows, -ranks, test_rows))
    out = {"counts": counts, "rows": rows[order], "ranks": ranks[order],
           "block_seconds": [s for part in parts for s in part["block_seconds"]],
           "merge_seconds": sum(part["merge_seconds"] for part in parts) + time.perf_counter() - began}
    if keep is not None:
        out.pop("ranks")
    return out


def _hold(value: Any) -> Any:
    """A task whose result is its argument: the test chunk lives on a worker with lineage (the task spec)."""
    return value


def _workers(client: Any) -> dict[str, dict[str, Any]]:
    """Every worker's scheduler record (recent versions list only the first few unless asked for all)."""
    try:
        return client.scheduler_info(n_workers=-1)["workers"]
    except TypeError:  # distributed before the n_workers argument: it lists them all
        return client.scheduler_info()["workers"]


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _thread_budgets(client: Any) -> dict[str, int]:
    """Numba threads per block on each worker: the host's cores shared among the Dask threads on that host.

    Without this, every worker process would start one Numba thread per core and N workers on one machine would
    oversubscribe it N times.
    """
    workers = _workers(client)
    cores = client.run(_usable_cores, on_error="return")
    threads_per_host: dict[str, int] = {}
    for info in workers.values():
        threads_per_host[info["host"]] = threads_per_host.get(info["host"], 0) + int(info["nthreads"])
    budgets = {}
    for address, info in workers.items():
        host_cores = cores.get(address)
        if isinstance(host_cores, int):
            budgets[address] = max(1, host_cores // max(1, threads_per_host[info["host"]]))
    return budgets


# --------------------------------------------------------------------------------------------------------------
# Public index
# --------------------------------------------------------------------------------------------------------------


class DaskNeighbourIndex(NeighbourIndex):
    """:class:`~poisoncert.neighbours.NeighbourIndex` with the training set sharded over a Dask cluster.

    Same interface and bit-identical results (see the module notes). ``NeighbourIndex(..., backend="dask")``
    constructs one, and so do the estimators with ``backend="dask"``.

    Parameters
    ----------
    X_train : array-like, numpy.memmap, zarr array or path
        See :func:`training_source`. A ``.npy`` file (path or whole-file memory map) or a zarr array is read by the
        workers, shard by shard; it never passes through the client.
    y_train : array-like of shape (n_train,)
        Label values (in client memory).
    metric : {"l1", "l2", "cosine"}, default "l1"
    backend : "dask"
    chunk_size : int, optional
        Test inputs per block. By default derived from ``max_memory_mb`` and the shard size.
    max_memory_mb : float, default 512
        Working-memory budget of one block (its distance rows and candidate buffers) and one merge. Each worker
        thread keeps its block's distance buffer for the next block (allocating it afresh would page-fault it
        whole every time), so an idle worker holds up to this much per thread besides its shards.
    progress : bool, default False
        Show a tqdm progress bar over test chunks.
    shard_size : int, optional
        Training rows per shard. Default: the rows split evenly over the cluster's Dask threads, in shards of at
        most 1 GiB of features.
    worker_backend : {"auto", "numba", "torch"}, default "auto"
        Kernels of the blocks, resolved on each worker: "auto" uses PyTorch where the worker has a CUDA GPU.
    client : distributed.Client, optional
        Default: the active client (:func:`distributed.get_client`).

    Attributes
    ----------
    classes_, ranks_, order_, dtype_, n_train_, n_features_in_
        As in :class:`NeighbourIndex`.
    shard_bounds_ : ndarray of int64
        Shard ``s`` holds training rows ``shard_bounds_[s]:shard_bounds_[s + 1]``.
    fit_seconds_ : dict
        Wall seconds of the fit's phases: reading and hashing the shards, ranks, building the shards.
    last_run_ : dict
        Statistics of the last search: blocks, per-block compute seconds, merge seconds, wall seconds.
    """

    def __init__(
        self,
        X_train: Any,
        y_train: np.ndarray,
        *,
        metric: str = "l1",
        backend: str = "dask",
        chunk_size: int | None = None,
        max_memory_mb: float = 512,
        progress: bool = False,
        shard_size: int | None = None,
        worker_backend: str = "auto",
        client: Any | None = None,
    ) -> None:
        if backend != "dask":
            raise ValueError(f"DaskNeighbourIndex runs backend='dask', got backend={backend!r}")
        if worker_backend not in ("auto", "numba", "torch"):
            raise ValueError(f"unknown worker_backend {worker_backend!r}; choose one of auto, numba, torch")
        source = training_source(X_train, "X_train")
        self.classes_, y = _encode_train_labels(y_train, source.shape[0])
        self.metric = check_metric(metric)
        if chunk_size is not None:
            chunk_size = check_positive_int(chunk_size, "chunk_size")
        if shard_size is not None:
            shard_size = check_positive_int(shard_size, "shard_size")
        if (
            isinstance(max_memory_mb, bool)
            or not isinstance(max_memory_mb, numbers.Real)
            or not math.isfinite(max_memory_mb)
            or max_memory_mb <= 0
        ):
            raise ValueError(f"max_memory_mb must be a positive number of megabytes, got {max_memory_mb!r}")
        self.backend = "dask"
        self.worker_backend = worker_backend
        self.chunk_size = chunk_size
        self.max_memory_mb = float(max_memory_mb)
        self.progress = bool(progress)
        self.source_ = source
        self.dtype_ = source.search_dtype
        self.n_train_, self.n_features_in_ = source.shape
        self._max_label = int(y.max())
        self._label_dtype = label_table_dtype(self._max_label)
        self.last_run_: dict[str, Any] = {}
        self._client = _get_client(client)
        self._fit(source, y, label_codes(self.classes_)[y], shard_size)

    # ---------------------------------------------------------------------------------------------------------
    def _fit(self, source: TrainingSource, y: np.ndarray, codes: np.ndarray, shard_size: int | None) -> None:
        client = self._client
        workers = sorted(_workers(client).items())
        if not workers:
            raise ValueError("the Dask cluster has no workers")
        if shard_size is None:
            threads = sum(int(info["nthreads"]) for _, info in workers)
            row_bytes = self.n_features_in_ * self.dtype_.itemsize
            n_shards = max(threads, math.ceil(self.n_train_ * row_bytes / _MAX_SHARD_BYTES))
            shard_size = math.ceil(self.n_train_ / n_shards)
            if source.kind == "zarr":  # whole zarr chunks per shard: no chunk is decompressed twice
                rows = int(source.location.chunks[0])
                shard_size = rows * math.ceil(shard_size / rows)
        bounds = np.r_[np.arange(0, self.n_train_, shard_size), self.n_train_].astype(np.int64)
        self.shard_bounds_ = bounds
        spans = list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))
        addresses = [address for address, _ in workers]
        with warnings.catch_warnings():
            # An in-memory training set is embedded in its read tasks on purpose (so that a lost shard can be
            # recomputed); distributed warns about such large graphs.
            warnings.filterwarnings("ignore", message=".*[Ll]arge graph.*")
            # Round-robin placement spreads the shards (and so the blocks) evenly; any worker may recompute one.
            raws = [client.submit(_read_shard, source.piece(a, b), self.n_features_in_, codes[a:b], pure=False,
                                  workers=[addresses[s % len(addresses)]], allow_other_workers=True)
                    for s, (a, b) in enumerate(spans)]
        began = time.perf_counter()
        peaks = [client.submit(_peak, raw, pure=False) for raw in raws]
        peak = max(client.gather(peaks))
        read_seconds = time.perf_counter() - began
        table = _tree([client.submit(_distinct_words, raw, pure=False) for raw in raws],
                      lambda group: client.submit(_union_words, group, pure=False))
        rank_parts = client.gather([client.submit(_shard_ranks, table, raw, pure=False) for raw in raws])
        rank_seconds = time.perf_counter() - began - read_seconds
        del table, peaks
        self._ranks = np.concatenate(rank_parts)
        self._train_peak = peak
        # The single-process overflow check, on the training set's largest |value| gathered from the shards.
        _check_distance_range(peak, np.full((1, self.n_features_in_), peak), self.metric, self.dtype_, "X_train")
        labels = y.astype(np.int32)
        shards = [client.submit(_build_shard, raw, ranks, labels[a:b], a, self.metric, self._label_dtype.str,
                                self.worker_backend, self.max_memory_mb, pure=False)
                  for raw, ranks, (a, b) in zip(raws, rank_parts, spans, strict=True)]
        del raws
        _import_distributed().wait(shards)
        for shard in shards:
            if shard.status == "error":
                shard.result()  # raises the worker's exception (e.g. a zero row under the cosine metric)
        self._shards = shards
        self.fit_seconds_ = {"read_and_hash": read_seconds, "ranks": rank_seconds,
                             "build": time.perf_counter() - began - read_seconds - rank_seconds}

    @property
    def ranks_(self) -> np.ndarray:
        """Content-hash rank of each training example, computed by the workers (:func:`training_ranks`)."""
        return self._ranks

    @property
    def order_(self) -> np.ndarray:
        """Training rows in the global tie order (rank descending, then row), as :attr:`NeighbourIndex.order_`."""
        if getattr(self, "_order", None) is None:
            self._order = np.lexsort((np.arange(self.n_train_), -self._ranks))
        return self._order

    @property
    def n_shards_(self) -> int:
        """Number of training shards."""
        return len(self._shards)

    # ---------------------------------------------------------------------------------------------------------
    def search(
        self,
        X_test: np.ndarray,
        n_neighbors: int | None = None,
        radii: float | Sequence[float] | None = None,
        n_classes: int | None = None,
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """kNN ordered labels and rNN vote counts from one distributed pass; see :meth:`NeighbourIndex.search`."""
        if n_neighbors is None and radii is None:
            raise ValueError("search needs n_neighbors, radii or both")
        k = None if n_neighbors is None else min(check_positive_int(n_neighbors, "n_neighbors"), self.n_train_)
        sorted_radii = padded = order = None
        if radii is not None:
            radii_array = np.atleast_1d(np.asarray(radii, dtype=np.float64))
            if radii_array.ndim != 1 or radii_array.size == 0:
                raise ValueError(f"radii must be a non-empty 1-D list of radii, got shape {radii_array.shape}")
            if not np.all(np.isfinite(radii_array)) or np.any(radii_array <= 0):
                raise ValueError(f"every radius must be a finite number > 0, got {radii_array.tolist()}")
            n_classes = check_positive_int(n_classes, "n_classes")
            if self._max_label >= n_classes:
                raise ValueError(
                    f"y_train holds label index {self._max_label}, outside 0..{n_classes - 1} (n_classes)"
                )
            order = np.argsort(radii_array, kind="stable")
            sorted_radii = _radii_in_dtype(radii_array[order], self.dtype_)
            padded = np.full(1 << int(len(sorted_radii)).bit_length(), np.inf, dtype=sorted_radii.dtype)
            padded[: len(sorted_radii)] = sorted_radii
        Q = self._check_test(X_test)
        keep = (("label",) if k is not None else ()) + (("counts",) if radii is not None else ())
        result = self._run(Q, k or 0, _search_block, (k, padded, sorted_radii, n_classes or 0), keep,
                           len(sorted_radii) if sorted_radii is not None else 0, n_classes or 0)
        votes = None
        if sorted_radii is not None:
            votes = np.empty_like(result["counts"])
            votes[order] = result["counts"]
        return result.get("label"), votes

    def _ordered(self, X_test: np.ndarray, n_neighbors: int, want_distances: bool) -> tuple[np.ndarray, np.ndarray]:
        if not want_distances:
            return self.search(X_test, n_neighbors=n_neighbors)[0], np.empty((0, 0))
        k = min(check_positive_int(n_neighbors, "n_neighbors"), self.n_train_)
        Q = self._check_test(X_test)
        result = self._run(Q, k, _search_block, (k, None, None, 0), ("row", "dist"), 0, 0)
        return result["row"], result["dist"]

    def radius_neighbors(self, X_test: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """Training rows within distance ``<= radius``, as CSR; see :meth:`NeighbourIndex.radius_neighbors`."""
        radii = np.atleast_1d(np.asarray(radius, dtype=np.float64))
        if radii.size != 1 or not np.isfinite(radii[0]) or radii[0] <= 0:
            raise ValueError(f"radius must be one finite number > 0, got {radius!r}")
        Q = self._check_test(X_test)
        cast = _radii_in_dtype(radii, self.dtype_)[0]
        return self._members(Q, "radius", [cast] * self.n_shards_)

    def within(self, X_test: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Training rows ``j`` with distance ``< thresholds[j]``, as CSR; see :meth:`NeighbourIndex.within`."""
        thresholds = np.asarray(thresholds, dtype=np.float64)
        if thresholds.shape != (self.n_train_,):
            raise ValueError(f"thresholds must hold one value per training row ({self.n_train_}), got "
                             f"{thresholds.shape}")
        Q = self._check_test(X_test)
        # Each shard needs its rows' thresholds in its internal order, which is the global order restricted to it.
        order = self.order_
        shard_of = np.searchsorted(self.shard_bounds_, order, side="right") - 1
        limits = []
        for s in range(self.n_shards_):
            rows = order[shard_of == s]
            limits.append(self._client.submit(_hold, thresholds[rows].astype(self.dtype_), pure=False))
        return self._members(Q, "within", limits)

    # ---------------------------------------------------------------------------------------------------------
    def _members(self, Q: np.ndarray, mode: str, limits: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        counts = np.zeros(len(Q), dtype=np.int64)
        pieces: dict[int, np.ndarray] = {}

        def collect(start: int, stop: int, result: dict[str, Any]) -> None:
            counts[start:stop] = result["counts"]
            pieces[start] = result["rows"]

        self._schedule(Q, 0, lambda shard, q, s, budgets: (_members_block, shard, q, mode, limits[s], budgets),
                       lambda group, keep: (_merge_members, group, keep), collect, 0, 0)
        indptr = np.r_[0, np.cumsum(counts)].astype(np.int64)
        indices = np.concatenate([pieces[s] for s in sorted(pieces)]) if pieces else np.zeros(0, np.int64)
        return indptr, indices.astype(np.int64)

    def _run(self, Q: np.ndarray, k: int, block: Any, arguments: tuple[Any, ...], keep: tuple[str, ...],
             n_radii: int, n_classes: int) -> dict[str, np.ndarray]:
        n = len(Q)
        out: dict[str, np.ndarray] = {}
        if "label" in keep:
            out["label"] = np.empty((n, k), dtype=self._label_dtype)
        if "row" in keep:
            out["row"] = np.empty((n, k), dtype=np.int64)
        if "dist" in keep:
            out["dist"] = np.empty((n, k), dtype=self.dtype_)
        if "counts" in keep:
            out["counts"] = np.empty((n_radii, n, n_classes), dtype=np.int64)

        def collect(start: int, stop: int, result: dict[str, Any]) -> None:
            for name, array in out.items():
                if name == "counts":
                    array[:, start:stop] = result[name]
                else:
                    array[start:stop] = result[name]

        self._schedule(Q, k, lambda shard, q, s, budgets: (block, shard, q, *arguments, budgets),
                       lambda group, final_keep: (_merge_blocks, group, k, final_keep), collect, n_radii, n_classes,
                       keep)
        return out

    def _task_rows(self, n_test: int, k: int, n_radii: int, n_classes: int) -> int:
        """Test inputs per block: the block's distance rows and candidates, and a merge's inputs, within budget."""
        if self.chunk_size is not None:
            return min(self.chunk_size, n_test)
        shard_rows = int(np.max(np.diff(self.shard_bounds_)))
        itemsize = self.dtype_.itemsize
        candidate = itemsize + 8 + 8 + self._label_dtype.itemsize
        per_row = (shard_rows * itemsize + 5 * k * 8 + (_FAN_IN + 1) * k * candidate
                   + (_FAN_IN + 1) * n_radii * n_classes * 8)
        return int(max(1, min(n_test, (self.max_memory_mb * 2**20) // per_row)))

    def _schedule(self, Q: np.ndarray, k: int, block_task: Any, merge_task: Any, collect: Any, n_radii: int,
                  n_classes: int, keep: tuple[str, ...] = ()) -> None:
        """Submit (chunk x shard) blocks and their merge trees, a window of chunks at a time; collect each chunk.

        A window keeps the candidates waiting for their merge bounded whatever the test set's size; earlier
        chunks get higher priority, so chunks complete roughly in order.
        """
        distributed = _import_distributed()
        client = self._client
        began = time.perf_counter()
        budgets = _thread_budgets(client)
        threads = sum(int(info["nthreads"]) for info in _workers(client).values())
        rows = self._task_rows(len(Q), k, n_radii, n_classes)
        starts = list(range(0, len(Q), rows))
        window = max(2, math.ceil(2 * max(threads, 1) / self.n_shards_)) + 1
        pending = distributed.as_completed()
        spans: dict[str, tuple[int, int]] = {}
        stats = {"block_seconds": [], "merge_seconds": 0.0}

        def submit(i: int) -> None:
            start = starts[i]
            stop = min(start + rows, len(Q))
            q = client.submit(_hold, Q[start:stop], pure=False, priority=-i)
            blocks = []
            for s, shard in enumerate(self._shards):
                function, *args = block_task(shard, q, s, budgets)
                blocks.append(client.submit(function, *args, pure=False, priority=-i))

            def merge(group: list[Any], final_keep: tuple[str, ...] | None = None) -> Any:
                function, *args = merge_task(group, final_keep)
                return client.submit(function, *args, pure=False, priority=-i)

            final = merge(_tree_groups(blocks, merge), keep)
            spans[final.key] = (start, stop)
            pending.add(final)

        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(starts), desc="neighbours (dask)", unit="chunk")
        following = 0
        try:
            for following in range(min(window, len(starts))):
                submit(following)
            following = min(window, len(starts))
            for future in pending:
                result = future.result()  # re-raises a task's exception here
                start, stop = spans.pop(future.key)
                collect(start, stop, result)
                stats["block_seconds"].extend(result["block_seconds"])
                stats["merge_seconds"] += result["merge_seconds"]
                del future, result
                if bar is not None:
                    bar.update(1)
                if following < len(starts):
                    submit(following)
                    following += 1
        except BaseException:
            client.cancel(list(pending.futures))
            raise
        finally:
            if bar is not None:
                bar.close()
        self.last_run_ = {
            "n_blocks": len(stats["block_seconds"]),
            "n_shards": self.n_shards_,
            "test_rows_per_block": rows,
            "block_seconds": np.asarray(stats["block_seconds"]),
            "merge_seconds": stats["merge_seconds"],
            "wall_seconds": time.perf_counter() - began,
        }


def _tree(parts: list[Any], combine: Any) -> Any:
    """Combine futures in groups of ``_FAN_IN`` until one is left."""
    while len(parts) > 1:
        parts = [combine(parts[i : i + _FAN_IN]) for i in range(0, len(parts), _FAN_IN)]
    return parts[0]


def _tree_groups(parts: list[Any], combine: Any) -> list[Any]:
    """Combine futures in groups of ``_FAN_IN`` until at most ``_FAN_IN`` are left (the final merge's inputs)."""
    while len(parts) > _FAN_IN:
        parts = [combine(parts[i : i + _FAN_IN]) for i in range(0, len(parts), _FAN_IN)]
    return parts

