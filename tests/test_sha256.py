"""The content hash of spec section 2 computed in parallel through OpenSSL equals hashlib's, row by row."""

from __future__ import annotations

import ctypes
import hashlib
import types

import numpy as np
import pytest

from poisoncert import _sha256
from poisoncert._io import example_digests


def _hashlib_reference(X: np.ndarray, codes: np.ndarray) -> np.ndarray:
    rows = [(np.asarray(x, dtype=np.float64) + 0.0).astype("<f8").tobytes() + int(c).to_bytes(8, "little", signed=True)
            for x, c in zip(X, codes, strict=True)]
    return np.stack([np.frombuffer(hashlib.sha256(row).digest(), dtype=np.uint8) for row in rows])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.bool_])
def test_example_digests_equal_hashlib_for_every_row(dtype):
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(2000, 13)) * 1e3).astype(dtype)
    if X.dtype.kind == "f":
        X[:7, :3] = -0.0
        X[7, 0] = np.finfo(dtype).tiny
    codes = rng.integers(-(2**63), 2**63 - 1, size=len(X))
    np.testing.assert_array_equal(example_digests(X, codes), _hashlib_reference(X, codes))
    np.testing.assert_array_equal(example_digests(X[::-1], codes[::-1]), _hashlib_reference(X, codes)[::-1])


def test_the_kernel_is_used_here_and_the_hashlib_loop_gives_the_same_digests(monkeypatch):
    rng = np.random.default_rng(4)
    X, codes = rng.random((300, 5)), rng.integers(0, 10, 300)
    if _sha256._openssl_sha256() is None:  # pragma: no cover - platforms without an exported SHA256
        pytest.skip("OpenSSL's SHA256 is not reachable through hashlib's extension on this platform")
    fast = example_digests(X, codes)
    monkeypatch.setattr(_sha256, "_openssl_sha256", lambda: None)
    np.testing.assert_array_equal(example_digests(X, codes), fast)
    assert example_digests(np.empty((0, 5)), np.empty(0, np.int64)).shape == (0, 32)


def test_a_library_whose_sha256_disagrees_with_hashlib_is_not_used(monkeypatch):
    """The kernel is trusted only after it reproduces hashlib on a probe: here "SHA256" is really SHA-1."""
    import _hashlib

    real = ctypes.CDLL(_hashlib.__file__)
    if not hasattr(real, "SHA1"):  # pragma: no cover
        pytest.skip("no OpenSSL exports reachable through hashlib's extension on this platform")
    fake = types.SimpleNamespace(CDLL=lambda path: types.SimpleNamespace(SHA256=real.SHA1), cast=ctypes.cast,
                                 c_void_p=ctypes.c_void_p)
    monkeypatch.setattr(_sha256, "ctypes", fake)
    assert _sha256._openssl_sha256.__wrapped__() is None


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="one label code per row"):
        example_digests(np.zeros((3, 2)), np.zeros(2, np.int64))
