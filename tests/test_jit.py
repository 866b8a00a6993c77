"""Numba's start-up without SciPy's linear algebra (poisoncert._jit), checked in fresh interpreters."""

import subprocess
import sys
import textwrap

import numba.np.linalg
import pytest

pytestmark = pytest.mark.skipif(not hasattr(numba.np.linalg, "ensure_blas"),
                                reason="this numba has no BLAS probe to answer")


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_first_kernel_call_skips_scipy_linalg_and_leaves_numbas_probe_in_place():
    out = _run("""
        import sys
        import numpy as np
        import numba.np.linalg
        probe = numba.np.linalg.ensure_blas
        from poisoncert.votes import knn_votes_from_labels
        votes = knn_votes_from_labels(np.array([[0, 1, 1, 2]], dtype=np.int64), 3, n_classes=3)
        assert votes.tolist() == [[1, 2, 0]], votes
        import numba.np.arraymath as arraymath
        print("scipy.linalg" in sys.modules, arraymath._HAVE_BLAS, numba.np.linalg.ensure_blas is probe,
              arraymath.ensure_blas is probe)
    """)
    assert out.split() == ["False", "True", "True", "True"]


def test_kernels_that_use_blas_still_get_it():
    out = _run("""
        import sys
        import numba
        import numpy as np
        import poisoncert.votes  # noqa: F401

        @numba.njit
        def product(a, b):
            return np.dot(a, b)

        a = np.arange(12.0).reshape(3, 4)
        b = np.arange(8.0).reshape(4, 2)
        assert np.array_equal(product(a, b), a @ b)
        print("scipy.linalg.cython_blas" in sys.modules)
    """)
    assert out.split() == ["True"]


def test_nothing_is_changed_once_arraymath_is_imported():
    out = _run("""
        import numba.np.arraymath
        from poisoncert._jit import import_array_math_without_scipy_linalg
        print(import_array_math_without_scipy_linalg())
    """)
    assert out.split() == ["False"]
