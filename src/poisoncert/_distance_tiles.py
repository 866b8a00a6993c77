"""Register-tiled distance kernel: exact distances of a few test rows to a tile of training columns.

A straightforward kernel over training columns in the transposed layout (``n_features x n_train``) keeps its
accumulators in memory: every group of features reads and writes each distance again, and each distance is one
serial chain of additions. Here a tile of ``TILE_ROWS`` test rows x ``TILE_VECTORS`` SIMD vectors of training
columns is summed over *all* features with its accumulators in registers (8 independent chains), each training
vector loaded once for all the rows, and written once. The training features are packed tile by tile
(:func:`pack_columns`) so that a tile's features are one contiguous run of memory; in the transposed layout each
feature of a narrow tile sits on another page, and the tiles alone were 1.3-1.9x slower than the straightforward
kernel.

The order of operations is the straightforward one, so the distances are bit-identical to it and to the PyTorch
backend: each distance starts at +0 and adds one term per feature in column order, with plain IEEE operations
(``|q - t|``; ``(q - t) * (q - t)``; ``q * t``), no fused multiply-add and no re-association. The kernel is written
as LLVM IR through a numba intrinsic because numba's loops cannot keep a vector of accumulators in registers.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from . import _jit  # noqa: F401 - numba's start-up without SciPy's linear algebra (before any kernel runs)

__all__ = ["TILE_ROWS", "TILE_VECTORS", "pack_columns", "packed_block_distances", "tile_width", "unpack_columns"]

# A tile: TILE_ROWS test rows x TILE_VECTORS SIMD vectors of 32 bytes (8 float32 or 4 float64 training columns):
# 8 accumulators, the training vector of the current feature (loaded once, used by every row) and a broadcast
# test value fit the 16 AVX2 registers. Measured against 2 x 4, 4 x 2, 3 x 3, 6 x 2, 8 x 2 and 16 x 1 (3 rounds,
# alternating; MNIST): 8 x 1 the fastest in every round, 0.87x the time of 2 x 4.
TILE_VECTORS = 1
_VECTOR_BYTES = 32
TILE_ROWS = 8


def tile_width(dtype: np.dtype) -> int:
    """Training columns per tile for features of ``dtype``."""
    return TILE_VECTORS * _VECTOR_BYTES // np.dtype(dtype).itemsize


def _n_tiles(n_train: int, width: int) -> int:
    """Tiles of ``width`` columns for ``n_train`` training rows (at least one, so an array is never empty)."""
    return max(1, -(-n_train // width))


def pack_columns(X: np.ndarray) -> np.ndarray:
    """Training features (rows ``n_train x n_features``) packed tile by tile, as the kernel reads them.

    Returns an array of shape ``(n_tiles * n_features, W)`` with ``W = tile_width(dtype)``: rows
    ``t * n_features .. (t + 1) * n_features - 1`` hold the features of training rows ``t * W .. t * W + W - 1``,
    feature by feature (the last tile padded with zeros, whose distances are never read).
    """
    n_train, n_features = X.shape
    width = tile_width(X.dtype)
    n_full = n_train // width
    n_tiles = _n_tiles(n_train, width)
    packed = np.empty((n_tiles, n_features, width), X.dtype)
    packed[:n_full] = X[: n_full * width].reshape(n_full, width, n_features).transpose(0, 2, 1)
    if n_tiles > n_full:
        packed[n_full:] = 0
        packed[n_full, :, : n_train - n_full * width] = X[n_full * width:].T
    return packed.reshape(n_tiles * n_features, width)


def unpack_columns(XP: np.ndarray, n_train: int) -> np.ndarray:
    """The training features of ``XP`` (:func:`pack_columns`) transposed, ``n_features x n_train`` (a new C array)."""
    width = XP.shape[1]
    n_tiles = _n_tiles(n_train, width)
    n_features = XP.shape[0] // n_tiles
    # np.array copies even where the result would already be contiguous (one feature, or one whole tile).
    return np.array(XP.reshape(n_tiles, n_features, width).transpose(1, 0, 2).reshape(
        n_features, n_tiles * width)[:, :n_train], order="C", copy=True)


def _emit_tile(context, builder, float_type, arrays, first_row, tile_row, first_column, rows, metric):  # type: ignore[no-untyped-def]
    """IR of one tile: ``out[r, column : column + W]`` for ``r < rows`` (both ``rows`` and ``metric`` fixed here).

    Test rows ``Q[first_row + r]``, training tile ``XP[tile_row : tile_row + n_features]``; ``metric`` 0 (l1
    terms), 1 (squared differences) or 2 (products), summed in feature order from +0.
    """
    q_ary, x_ary, o_ary = arrays
    item = context.get_abi_sizeof(float_type)
    lanes = _VECTOR_BYTES // item
    vector_type = ir.VectorType(float_type, lanes)
    intp = context.get_value_type(types.intp)
    byte_ptr = ir.IntType(8).as_pointer()
    q_stride = cgutils.unpack_tuple(builder, q_ary.strides, 2)[0]
    x_stride = cgutils.unpack_tuple(builder, x_ary.strides, 2)[0]
    o_stride = cgutils.unpack_tuple(builder, o_ary.strides, 2)[0]
    n_features = cgutils.unpack_tuple(builder, q_ary.shape, 2)[1]
    item_size = ir.Constant(intp, item)
    q_base = builder.gep(builder.bitcast(q_ary.data, byte_ptr), [builder.mul(first_row, q_stride)])
    x_base = builder.gep(builder.bitcast(x_ary.data, byte_ptr), [builder.mul(tile_row, x_stride)])
    o_base = builder.gep(builder.bitcast(o_ary.data, byte_ptr), [builder.mul(first_column, item_size)])
    # Accumulators as allocas of the entry block: LLVM promotes them to registers.
    accumulators = [[cgutils.alloca_once_value(builder, ir.Constant(vector_type, None))
                     for _ in range(TILE_VECTORS)] for _ in range(rows)]
    fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector_type, [vector_type]),
                                          f"llvm.fabs.v{lanes}f{8 * item}")
    undefined = ir.Constant(vector_type, ir.Undefined)
    broadcast = ir.Constant(ir.VectorType(ir.IntType(32), lanes), None)
    with cgutils.for_range(builder, n_features) as loop:
        feature = loop.index
        training_row = builder.gep(x_base, [builder.mul(feature, x_stride)])
        training = []
        for v in range(TILE_VECTORS):
            address = builder.gep(training_row, [ir.Constant(intp, _VECTOR_BYTES * v)])
            training.append(builder.load(builder.bitcast(address, vector_type.as_pointer()), align=item))
        for r in range(rows):
            address = builder.gep(q_base, [builder.add(builder.mul(ir.Constant(intp, r), q_stride),
                                                      builder.mul(feature, item_size))])
            value = builder.load(builder.bitcast(address, float_type.as_pointer()))
            first_lane = builder.insert_element(undefined, value, ir.Constant(ir.IntType(32), 0))
            test = builder.shuffle_vector(first_lane, undefined, broadcast)
            for v in range(TILE_VECTORS):
                if metric == 0:
                    term = builder.call(fabs, [builder.fsub(test, training[v])])
                elif metric == 1:
                    difference = builder.fsub(test, training[v])
                    term = builder.fmul(difference, difference)
                else:
                    term = builder.fmul(test, training[v])
                slot = accumulators[r][v]
                builder.store(builder.fadd(builder.load(slot), term), slot)
    for r in range(rows):
        out_row = builder.gep(o_base, [builder.mul(ir.Constant(intp, r), o_stride)])
        for v in range(TILE_VECTORS):
            pointer = builder.bitcast(builder.gep(out_row, [ir.Constant(intp, _VECTOR_BYTES * v)]),
                                      vector_type.as_pointer())
            builder.store(builder.load(accumulators[r][v]), pointer, align=item)


@intrinsic
def _tile(typingctx, Q, XP, out, i, rows, x_row, column, metric):  # type: ignore[no-untyped-def]
    """``out[r, column : column + W]`` = the sums of test rows ``Q[i + r]`` (``r < rows``, which is ``TILE_ROWS``
    or 1) with the training tile ``XP[x_row : x_row + n_features]``; ``metric`` 0 (l1), 1 (l2) or 2 (cosine).

    One loop over the features is emitted per (rows, metric); the choice is made once per call, outside it.
    """
    # The IR steps through features, columns and lanes by the item size: C-contiguous arrays only.
    if not (isinstance(Q, types.Array) and isinstance(XP, types.Array) and isinstance(out, types.Array)
            and Q.ndim == XP.ndim == out.ndim == 2 and Q.layout == XP.layout == out.layout == "C"
            and Q.dtype == XP.dtype == out.dtype and isinstance(Q.dtype, types.Float)
            and all(isinstance(value, types.Integer) for value in (i, rows, x_row, column, metric))):
        return None
    signature = types.void(Q, XP, out, i, rows, x_row, column, metric)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        float_type = context.get_value_type(signature.args[0].dtype)
        arrays = [context.make_array(signature.args[a])(context, builder, args[a]) for a in range(3)]
        first_row, rows_value, tile_row, first_column, metric_value = (
            context.cast(builder, args[a], signature.args[a], types.intp) for a in range(3, 8))

        def emit(rows: int, metric: int) -> None:
            _emit_tile(context, builder, float_type, arrays, first_row, tile_row, first_column, rows, metric)

        def emit_metric(rows: int) -> None:  # 0: l1, 1: l2, anything else: cosine
            with builder.if_else(builder.icmp_signed("==", metric_value, ir.Constant(intp, 0))) as (l1, other):
                with l1:
                    emit(rows, 0)
                with other, builder.if_else(builder.icmp_signed("==", metric_value, ir.Constant(intp, 1))) as (
                        l2, cosine):
                    with l2:
                        emit(rows, 1)
                    with cosine:
                        emit(rows, 2)

        intp = context.get_value_type(types.intp)
        with builder.if_else(builder.icmp_signed("==", rows_value, ir.Constant(intp, TILE_ROWS))) as (full, one):
            with full:
                emit_metric(TILE_ROWS)
            with one:
                emit_metric(1)
        return context.get_dummy_value()

    return signature, codegen


@numba.njit(inline="always")
def packed_block_distances(Q, XP, n_train, i0, i1, out, metric, tail):  # pragma: no cover - compiled
    """``out[i - i0, :n_train]`` = distance(``Q[i]``, training column j) for the test rows ``i0 .. i1 - 1``.

    ``XP``: :func:`pack_columns` of the training features; ``tail``: a ``(TILE_ROWS, W)`` scratch array of the
    distance dtype for the last, partial tile (its padded columns are computed there and dropped). Tile by tile,
    every ``TILE_ROWS`` test rows (then the rows left over, one at a time) are summed over all features while the
    tile is in L1.
    """
    n_features = Q.shape[1]
    width = XP.shape[1]
    n_full = n_train // width
    n_tiles = n_full + (1 if n_train % width else 0)
    zero = out.dtype.type(0)
    one = out.dtype.type(1)
    for t in range(n_tiles):
        x_row = t * n_features
        column = t * width
        i = i0
        while i < i1:
            rows = TILE_ROWS if i + TILE_ROWS <= i1 else 1
            if t < n_full:
                _tile(Q, XP, out[i - i0:], i, rows, x_row, column, metric)
            else:
                _tile(Q, XP, tail, i, rows, x_row, 0, metric)
                for r in range(rows):
                    for j in range(n_train - column):
                        out[i - i0 + r, column + j] = tail[r, j]
            i += rows
    if metric == 1:
        for i in range(i1 - i0):
            row = out[i]
            for j in range(n_train):
                row[j] = np.sqrt(row[j])
    elif metric == 2:
        for i in range(i1 - i0):
            row = out[i]
            for j in range(n_train):
                value = one - row[j]
                # Rounding can push 1 - cos slightly below 0 (or to -0.0); distances are >= +0.
                row[j] = value if value > zero else zero
