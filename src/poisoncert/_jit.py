"""Numba's start-up for poisoncert's compiled kernels, without the SciPy import it does not need here.

Every module of poisoncert with compiled kernels imports this one, directly or through ``poisoncert.votes``. The
first kernel call of a process (even one loaded from numba's cache) builds numba's target context, which imports
``numba.np.arraymath``; that module probes for BLAS at import by importing ``scipy.linalg.cython_blas``, and so all
of ``scipy.linalg`` (with SciPy's array-API layer, which touches NumPy's lazily loaded ``f2py``): 0.1-0.2 s of one
core before the first kernel runs, about a third of numba's first call, while no poisoncert kernel uses BLAS. Here
``numba.np.arraymath`` is imported with that probe answered from the file system (SciPy, a dependency, ships
``cython_blas`` as an extension module in its ``linalg`` package), and the probe is put back at once: a kernel that
does use BLAS (``np.dot``) still runs numba's own check when it is compiled, and SciPy's BLAS is imported then. With
another numba (where that probe is gone or renamed), or with ``numba.np.arraymath`` already imported, nothing is
changed. Limits, neither of which touches poisoncert's own kernels: the answer assumes the ``cython_blas`` found
loads (with a broken SciPy whose file is there but does not load, numba's ``np.correlate`` and ``np.convolve`` in a
kernel fail instead of falling back to their plain loops), and another thread compiling a BLAS kernel during this
one import would skip numba's check of SciPy's integer width.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _scipy_ships_cython_blas() -> bool:
    """Whether SciPy's ``linalg/cython_blas`` extension is installed, found without importing ``scipy.linalg``."""
    try:
        spec = importlib.util.find_spec("scipy")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    for folder in spec.submodule_search_locations:
        linalg = os.path.join(folder, "linalg")
        if os.path.isfile(os.path.join(linalg, "__init__.py")) and any(
                os.path.isfile(os.path.join(linalg, "cython_blas" + suffix))
                for suffix in importlib.machinery.EXTENSION_SUFFIXES):
            return True
    return False


def import_array_math_without_scipy_linalg() -> bool:
    """Import ``numba.np.arraymath`` with its BLAS probe answered from the file system; True if that was done."""
    if "numba.np.arraymath" in sys.modules:
        return False
    try:
        from numba.np import linalg
    except ImportError:  # pragma: no cover - another numba's layout
        return False
    probe = getattr(linalg, "ensure_blas", None)
    if probe is None or not _scipy_ships_cython_blas():  # pragma: no cover - another numba, or no SciPy BLAS
        return False

    def blas_found() -> None:
        return None

    linalg.ensure_blas = blas_found
    try:
        from numba.np import arraymath
    finally:
        linalg.ensure_blas = probe
    if getattr(arraymath, "ensure_blas", None) is blas_found:
        arraymath.ensure_blas = probe
    return True


import_array_math_without_scipy_linalg()
