"""Rank and select on packed bit rows (the kNN split certificate's profiles) against plain NumPy."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from poisoncert import _bitvectors as bv


def _rows(seed: int, n_rows: int, n_words: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random rows of varied density (all zeros and all ones included), their bits unpacked, and ``cum``."""
    rng = np.random.default_rng(seed)
    density = rng.choice([0.0, 0.03, 0.37, 0.5, 0.9, 1.0], size=(n_rows, 1))
    unpacked = rng.random((n_rows, 64 * n_words)) < density
    bits = np.packbits(unpacked, axis=1, bitorder="little").view(np.uint64).copy()
    cum = np.empty((n_rows, n_words + 1), np.uint16)
    bv.cumulative_popcounts(bits, cum)
    return bits, unpacked, cum


@numba.njit
def _rank_all(bits, cum, p, out):  # pragma: no cover - compiled
    for x in range(out.shape[0]):
        out[x] = bv.rank1(bits, cum, p, x)


@numba.njit
def _select_all(bits, cum, p, out):  # pragma: no cover - compiled
    for m in range(out.shape[0]):
        out[m] = bv.select0(bits, cum, p, m, bits.shape[1])


@numba.njit
def _select_words_halving(words, ranks):  # pragma: no cover - compiled
    out = np.empty(words.shape[0], np.int64)
    for i in range(words.shape[0]):
        out[i] = bv.select_in_word_halving(words[i], ranks[i])
    return out


@numba.njit
def _select_words_pdep(words, ranks):  # pragma: no cover - compiled
    # Compiled only where the CPU has pdep (a separate function: LLVM cannot compile it for other targets).
    out = np.empty(words.shape[0], np.int64)
    for i in range(words.shape[0]):
        out[i] = bv.select_in_word_pdep(words[i], ranks[i])
    return out


# Both sides of the longest row that select0 searches by a linear count (longer ones binary-search).
@pytest.mark.parametrize("n_words", [1, 3, 46, 70, bv.LINEAR_SEARCH_WORDS, bv.LINEAR_SEARCH_WORDS + 1, 200])
def test_rank_and_select_agree_with_unpacked_bits(n_words: int) -> None:
    bits, unpacked, cum = _rows(n_words, 12, n_words)
    np.testing.assert_array_equal(cum[:, -1], unpacked.sum(axis=1))
    for p in range(len(bits)):
        ranks = np.empty(64 * n_words + 1, np.int64)
        _rank_all(bits, cum, p, ranks)
        np.testing.assert_array_equal(ranks, np.concatenate([[0], np.cumsum(unpacked[p])]))
        zeros = np.flatnonzero(~unpacked[p])  # position of the zero with m zeros before it, for every m
        selected = np.empty(len(zeros), np.int64)
        _select_all(bits, cum, p, selected)
        np.testing.assert_array_equal(selected, zeros)


def test_selecting_in_a_word_by_halving_finds_every_set_bit() -> None:
    rng = np.random.default_rng(3)
    words = np.concatenate([rng.integers(0, 2**63, 300, dtype=np.uint64) << np.uint64(1),
                            np.array([1, 2**63, 2**64 - 1, 0x5555555555555555], dtype=np.uint64)])
    words |= np.uint64(1)  # at least one set bit
    for rank in range(64):
        has = np.array([bin(int(w)).count("1") > rank for w in words])
        expected = np.array([[i for i in range(64) if int(w) >> i & 1][rank] for w in words[has]])
        got = _select_words_halving(words[has], np.full(int(has.sum()), rank, np.int64))
        np.testing.assert_array_equal(got, expected)


@pytest.mark.skipif(not bv.FAST_PDEP, reason="no fast BMI2 pdep on the CPU numba compiles for")
def test_pdep_select_equals_halving_select() -> None:
    rng = np.random.default_rng(4)
    words = rng.integers(0, 2**63, 5000, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 5000, dtype=np.uint64)
    words[:3] = [1, 2**63, 2**64 - 1]
    counts = np.array([bin(int(w)).count("1") for w in words])
    keep = counts > 0
    words, counts = words[keep], counts[keep]
    ranks = (rng.random(len(words)) * counts).astype(np.int64)
    np.testing.assert_array_equal(_select_words_pdep(words, ranks), _select_words_halving(words, ranks))


def test_a_portable_numba_target_never_gets_pdep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NUMBA_CPU_NAME", "generic")
    assert bv._fast_pdep() is False


@numba.njit
def _sum_with_prefetch(values, ahead):  # pragma: no cover - compiled
    total = 0
    for i in range(values.shape[0]):
        bv.prefetch(values, i + ahead)  # past the end too: a hint never faults
        total += values[i]
    return total


@pytest.mark.parametrize("dtype", [np.uint16, np.int64, np.uint64])
def test_a_prefetch_changes_no_result(dtype) -> None:
    values = np.arange(1, 2001, dtype=dtype).reshape(40, 50)
    for ahead in (0, 8, 1 << 20):
        assert _sum_with_prefetch(values.reshape(-1), ahead) == values.sum()
