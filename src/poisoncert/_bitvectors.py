"""Rank and select on rows of packed bit vectors (numba kernels for the kNN split certificate's profiles).

A row is ``n_words`` little-endian ``uint64`` words (bit ``x`` of the row is bit ``x & 63`` of word ``x >> 6``)
with a table ``cum`` of the set bits before each word (``cum[p, w]``, ``w = 0 .. n_words``).

Selecting inside one word is a single ``pdep`` where the CPU has a fast one (BMI2 on Intel since Haswell, AMD since
Zen 3; microcoded and slow on Zen 1 and 2), else six halving steps. The choice is made once, from the CPU numba
compiles for, and both give the same positions (tested against each other).

These functions are inlined into the kernels of :mod:`poisoncert.joint_split` (and ``lowest_set_bit`` into the fused
search of :mod:`poisoncert.neighbours`), whose numba caches are keyed by their own files alone: after editing this
one, touch ``joint_split.py`` and ``neighbours.py`` (or clear their ``__pycache__``) so they recompile.
"""

from __future__ import annotations

import os

import numba
import numpy as np
from llvmlite import ir
from numba.extending import intrinsic

from . import _jit  # noqa: F401 - numba's start-up without SciPy's linear algebra (before any kernel runs)

__all__ = ["FAST_PDEP", "cumulative_popcounts", "lowest_set_bit", "popcount", "prefetch", "rank1", "select0",
           "select_in_word", "zero_word"]

_SLOW_PDEP_CPUS = ("znver1", "znver2", "bdver", "btver")


def _fast_pdep() -> bool:
    """Whether numba compiles for this host (no ``NUMBA_CPU_NAME``) and the host has a fast BMI2 ``pdep``."""
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        return False  # a portable target: the instruction may not be there
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
        name = llvm.get_host_cpu_name()
    except (RuntimeError, ImportError):  # pragma: no cover - llvmlite cannot read this CPU
        return False
    return bool(features.get("bmi2", False)) and not name.startswith(_SLOW_PDEP_CPUS)


#: Rows of at most this many words are searched by :func:`zero_word` in a linear count (faster up to about 150).
LINEAR_SEARCH_WORDS = 128

#: True where :func:`select_in_word` uses the ``pdep`` instruction.
FAST_PDEP = _fast_pdep()


@intrinsic
def _pdep64(typingctx, source, mask):  # type: ignore[no-untyped-def]
    """x86 BMI2 ``pdep``: the low bits of ``source`` deposited at the set bits of ``mask``."""
    signature = numba.types.uint64(numba.types.uint64, numba.types.uint64)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        word = ir.IntType(64)
        function = builder.module.declare_intrinsic("llvm.x86.bmi.pdep.64", (), ir.FunctionType(word, [word, word]))
        return builder.call(function, args)

    return signature, codegen


@intrinsic
def _trailing_zeros64(typingctx, value):  # type: ignore[no-untyped-def]
    """Trailing zero bits of a ``uint64`` (64 for zero)."""
    signature = numba.types.uint64(numba.types.uint64)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        word = ir.IntType(64)
        function = builder.module.declare_intrinsic("llvm.cttz", [word],
                                                    ir.FunctionType(word, [word, ir.IntType(1)]))
        return builder.call(function, [args[0], ir.Constant(ir.IntType(1), 0)])

    return signature, codegen


@intrinsic
def prefetch(typingctx, array, index):  # type: ignore[no-untyped-def]
    """Hint the CPU to bring element ``index`` of a C-contiguous ``array`` (counted flat) into its caches.

    Only a hint (x86 ``prefetcht0``): it reads nothing, never faults, and changes no result, so an index beyond
    the array is harmless; used to start a cache miss that a later, dependent read would otherwise wait for.
    """
    if not isinstance(array, numba.types.Array) or not isinstance(index, numba.types.Integer):
        return None
    signature = numba.types.none(array, numba.types.intp)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        byte = ir.IntType(8).as_pointer()
        item = context.get_abi_sizeof(context.get_data_type(sig.args[0].dtype))
        address = builder.gep(builder.bitcast(data, byte), [builder.mul(args[1], ir.Constant(args[1].type, item))])
        flag = ir.IntType(32)
        function = builder.module.declare_intrinsic("llvm.prefetch", [byte],
                                                    ir.FunctionType(ir.VoidType(), [byte, flag, flag, flag]))
        # read (0), keep in every cache level (3), data cache (1)
        builder.call(function, [address, ir.Constant(flag, 0), ir.Constant(flag, 3), ir.Constant(flag, 1)])
        return context.get_dummy_value()

    return signature, codegen


@numba.njit(inline="always")
def lowest_set_bit(word):  # pragma: no cover - compiled
    """Position of the lowest set bit of a nonzero ``uint64``."""
    return np.int64(_trailing_zeros64(word))


@numba.njit(inline="always")
def popcount(x):  # pragma: no cover - compiled
    """Set bits of a ``uint64``."""
    x = x - ((x >> np.uint64(1)) & np.uint64(0x5555555555555555))
    x = (x & np.uint64(0x3333333333333333)) + ((x >> np.uint64(2)) & np.uint64(0x3333333333333333))
    x = (x + (x >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return int((x * np.uint64(0x0101010101010101)) >> np.uint64(56))


@numba.njit(inline="always")
def select_in_word_pdep(word, j):  # pragma: no cover - compiled
    """Position of the set bit of ``word`` with ``j`` set bits below it (``0 <= j < popcount(word)``)."""
    return np.int64(_trailing_zeros64(_pdep64(np.uint64(1) << np.uint64(j), word)))


@numba.njit(inline="always")
def select_in_word_halving(word, j):  # pragma: no cover - compiled
    """As :func:`select_in_word_pdep`, by halving: six popcounts, no special instruction."""
    position = 0
    width = 32
    while width > 0:
        low = popcount(word & ((np.uint64(1) << np.uint64(width)) - np.uint64(1)))
        if j >= low:
            j -= low
            word = word >> np.uint64(width)
            position += width
        width //= 2
    return position


select_in_word = select_in_word_pdep if FAST_PDEP else select_in_word_halving


@numba.njit(cache=True, nogil=True)
def cumulative_popcounts(bits, cum):  # pragma: no cover - compiled
    """``cum[p, w]`` = set bits of row ``p`` in its words ``0 .. w - 1``."""
    for p in range(bits.shape[0]):
        total = 0
        cum[p, 0] = 0
        for w in range(bits.shape[1]):
            total += popcount(bits[p, w])
            cum[p, w + 1] = total


@numba.njit(inline="always")
def rank1(bits, cum, p, x):  # pragma: no cover - compiled
    """Set bits of row ``p`` among positions ``0 .. x - 1``."""
    w = x >> 6
    rest = x & 63
    if rest == 0:
        return np.int64(cum[p, w])
    mask = (np.uint64(1) << np.uint64(rest)) - np.uint64(1)
    return np.int64(cum[p, w]) + popcount(bits[p, w] & mask)


@numba.njit(inline="always")
def zero_word(cum, p, m, n_words):  # pragma: no cover - compiled
    """The word of row ``p`` holding its zero bit with exactly ``m`` zero bits before it (``m`` below the row's
    zeros), and how many of the word's own zeros come before that bit.

    The zeros before word ``w`` (``64 w - cum[p, w]``) never decrease in ``w``: the word is the last one with at
    most ``m`` before it, and so the count of words ``1 .. n_words - 1`` with at most ``m`` before them. Rows of up
    to :data:`LINEAR_SEARCH_WORDS` words count them, in vector steps without a branch; longer rows binary-search.
    LLVM compiles the binary search's steps as branches, whatever the source (a select, or a sign mask, which it
    recognises as one), and each step's outcome is as good as random: on MNIST's kNN split (63 words a row) that
    search was a quarter of the need evaluations' time, and the count is 2.5x faster (2-4x at 16-79 words).
    """
    if n_words <= LINEAR_SEARCH_WORDS:
        lo = 0
        for w in range(1, n_words):
            lo += 64 * w - np.int64(cum[p, w]) <= m
        return lo, m - (64 * lo - np.int64(cum[p, lo]))
    lo = 0
    size = n_words
    while size > 1:
        half = size // 2
        middle = lo + half
        lo = middle if 64 * middle - np.int64(cum[p, middle]) <= m else lo
        size -= half
    return lo, m - (64 * lo - np.int64(cum[p, lo]))


@numba.njit(inline="always")
def select0(bits, cum, p, m, n_words):  # pragma: no cover - compiled
    """Position of the zero bit of row ``p`` that has exactly ``m`` zero bits before it."""
    word, rest = zero_word(cum, p, m, n_words)
    return 64 * word + select_in_word(~bits[p, word], rest)
