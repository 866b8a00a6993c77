"""SHA-256 of every training example at once, in parallel, through the OpenSSL that :mod:`hashlib` uses.

The content hash of spec section 2 is one SHA-256 per example over 8 (d + 1) bytes (:func:`canonical_digests`).
:mod:`hashlib` computes it, but one call per example from Python holds the GIL for the whole loop (it releases it
only for inputs of 2 KiB and more): 0.1-0.2 s for MNIST's 60,000 training examples, on one core, before any
search can start. Here a compiled kernel writes each canonical row and calls OpenSSL's one-shot ``SHA256``, the
function behind ``hashlib.sha256`` (found through Python's own ``_hashlib`` extension), for rows in parallel and
without the GIL: about 0.03 s. Same function, same bytes, so the same digests; a check against :mod:`hashlib` runs
once per process before the kernel is trusted, and where the symbol is not reachable (Windows, Pythons without
an OpenSSL-backed ``hashlib``) the :mod:`hashlib` loop is used instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from . import _jit  # noqa: F401 - numba's start-up without SciPy's linear algebra (before any kernel runs)


@intrinsic
def _sha256_into(typingctx, address, data, out):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``SHA256(data bytes, data nbytes, out bytes)`` through the function at the integer ``address``.

    The address is an argument, not a constant baked into the code, so the kernels that call this stay cacheable.
    """
    if not (isinstance(address, types.Integer) and isinstance(data, types.Array) and isinstance(out, types.Array)):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        byte_pointer = ir.PointerType(ir.IntType(8))
        size = context.get_value_type(types.uintp)
        source = context.make_array(signature.args[1])(context, builder, value=args[1])
        target = context.make_array(signature.args[2])(context, builder, value=args[2])
        nbytes = builder.mul(source.nitems, context.get_constant(types.intp, signature.args[1].dtype.bitwidth // 8))
        function = ir.FunctionType(byte_pointer, [byte_pointer, size, byte_pointer])
        pointer = builder.inttoptr(args[0], function.as_pointer())
        builder.call(pointer, [builder.bitcast(source.data, byte_pointer), nbytes,
                               builder.bitcast(target.data, byte_pointer)])
        return context.get_dummy_value()

    return types.void(address, data, out), codegen


@numba.njit(parallel=True, nogil=True, cache=True)
def _digest_rows(address, features, rows, out):  # pragma: no cover - compiled
    """out[i] = SHA-256 of ``rows[i]`` after its first d entries are set to ``features[i]`` as float64 (+ 0.0
    folds -0.0 into 0.0); the last entry (the label code's bits) is the caller's. Rows in parallel."""
    n_features = features.shape[1]
    for i in numba.prange(features.shape[0]):
        row = rows[i]
        for f in range(n_features):
            row[f] = np.float64(features[i, f]) + 0.0
        _sha256_into(address, row, out[i])


@functools.cache
def _openssl_sha256() -> int | None:
    """Address of OpenSSL's ``SHA256`` as loaded by :mod:`hashlib`, if it is reachable and agrees with it."""
    try:
        import _hashlib

        address = ctypes.cast(ctypes.CDLL(_hashlib.__file__).SHA256, ctypes.c_void_p).value
    except (ImportError, AttributeError, OSError, TypeError):  # no OpenSSL hashlib, or no such export
        return None
    if not address:
        return None
    probe = np.arange(-3.0, 6.0, dtype=np.float64).reshape(3, 3)
    probe[0, 1] = -0.0
    codes = np.array([7, -1, 2**40], dtype=np.int64)
    if not np.array_equal(_with_kernel(address, probe, codes), _with_hashlib(probe, codes)):
        return None  # a library that answers differently under that name is not used
    return address


def _canonical_rows(n_rows: int, n_features: int, codes: np.ndarray) -> np.ndarray:
    rows = np.empty((n_rows, n_features + 1), dtype="<f8")
    rows.view("<i8")[:, n_features] = codes
    return rows


def _with_kernel(address: int, features: np.ndarray, codes: np.ndarray) -> np.ndarray:
    if features.dtype not in (np.float32, np.float64):
        features = features.astype(np.float64)
    rows = _canonical_rows(*features.shape, codes)
    out = np.empty((len(features), 32), dtype=np.uint8)
    _digest_rows(address, np.ascontiguousarray(features), rows, out)
    return out


def _with_hashlib(features: np.ndarray, codes: np.ndarray) -> np.ndarray:
    rows = _canonical_rows(*features.shape, codes)
    rows[:, : features.shape[1]] = features
    rows[:, : features.shape[1]] += 0.0
    view = memoryview(rows.view(np.uint8).reshape(-1))
    width = rows.shape[1] * 8
    digests = b"".join(hashlib.sha256(view[start : start + width]).digest()
                       for start in range(0, len(view), width))
    return np.frombuffer(digests, dtype=np.uint8).reshape(len(features), 32).copy()


def canonical_digests(features: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """SHA-256 of each row's canonical bytes, shape (n, 32) uint8: the features as little-endian float64 with
    ``-0.0`` folded into ``0.0``, then the code as little-endian int64 (``features`` 2-D, real; ``codes`` int64)."""
    if features.shape[0] == 0:
        return np.empty((0, 32), dtype=np.uint8)
    address = _openssl_sha256()
    if address is None:
        return _with_hashlib(features, codes)
    return _with_kernel(address, features, codes)
