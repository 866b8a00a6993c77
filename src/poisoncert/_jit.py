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

It also keys numba's on-disk cache of each poisoncert kernel on every source file the kernel can reach. Numba keys a
cached kernel on the bytes of the one file that defines it; a kernel of ``neighbours.py`` inlines helpers from
``_distance_tiles.py``, ``_bitvectors.py`` and ``votes.py``, so after a change to a helper alone (an upgrade, an
edit) numba would load the stale machine code. Here the stamp of a kernel defined in a poisoncert file also digests
the files that file imports from the package, transitively, so such a change compiles the kernel afresh. And where
those files changed on disk after this process imported the package (an upgrade during a long session), its
kernels get a stamp that matches nothing: compiled, but not stored for later processes under the new files' stamp.
Limits: a zipped install, and a locator list set through ``NUMBA_CACHE_LOCATOR_CLASSES``, get numba's own
locators, keyed on the defining file alone.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import sys
from typing import Any

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_PACKAGE = __name__.rpartition(".")[0]


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


_TOP_LEVEL_IMPORT = re.compile(
    rf"^(?:from[ \t]+(?:\.|{_PACKAGE}\.)([A-Za-z_]\w*)[ \t]+import\b"  # from .a import x, from pkg.a import x
    rf"|from[ \t]+(?:\.|{_PACKAGE})[ \t]+import[ \t]+(\([^)]*\)|[^\n#]*)"  # from . import a, b
    rf"|import[ \t]+{_PACKAGE}\.([A-Za-z_]\w*))",  # import pkg.a
    re.MULTILINE)


def imported_modules(text: str) -> set[str]:
    """Names of the package's modules that a source file imports at module level (its statements at column 0).

    A kernel can reach only what its module's globals hold, and those come from module-level imports; imports
    inside functions are Python-only paths (numba compiles no import statement). ``tests/test_kernel_cache.py`` checks
    that no package file imports from the package in an indented module-level block, which this would miss.
    """
    names: set[str] = set()
    for match in _TOP_LEVEL_IMPORT.finditer(text):
        module, listed, dotted = match.groups()
        if listed is not None:
            names.update(name.split(" as ")[0].strip() for name in listed.strip("()").split(","))
        names.add(module or dotted or "")
    names.discard("")
    return names


@functools.cache
def _file_facts(path: str, size: int, mtime_ns: int) -> tuple[bytes, frozenset[str]]:
    """SHA-256 of a source file and the package modules it imports; keyed by its stat, so edits are seen."""
    with open(path, "rb") as source:
        data = source.read()
    return hashlib.sha256(data).digest(), frozenset(imported_modules(data.decode("utf-8", "replace")))


def _closure(path: str) -> dict[str, bytes]:
    """SHA-256 (on disk now) of a package source file and of every package file it imports at module level,
    transitively, by file name."""
    reached: dict[str, bytes] = {}
    pending = [os.path.basename(path)]
    while pending:
        name = pending.pop()
        file = os.path.join(_PACKAGE_DIR, name)
        if name in reached or not os.path.isfile(file):
            continue
        stat = os.stat(file)
        reached[name], modules = _file_facts(file, stat.st_size, stat.st_mtime_ns)
        pending.extend(f"{module}.py" for module in modules)
    return reached


def _digest(reached: dict[str, bytes]) -> bytes:
    digest = hashlib.sha256()
    for name in sorted(reached):
        digest.update(name.encode() + b"\0" + reached[name])
    return digest.digest()


def source_closure_digest(path: str) -> bytes:
    """SHA-256 over a package source file and every package file it imports at module level, transitively."""
    return _digest(_closure(path))


def _changed_since_import(reached: dict[str, bytes]) -> bool:
    """Whether a file of a closure differs from what this process first found (``poisoncert``'s snapshot): the code
    it runs may then be older than the files, so its kernels must not be cached under them."""
    snapshot = getattr(sys.modules.get(_PACKAGE), "_SOURCE_DIGESTS", None)
    if snapshot is None:  # pragma: no cover - the package's own __init__ takes it
        return True
    return any(snapshot.get(name) != digest for name, digest in reached.items())


def _in_package(py_file: str) -> bool:
    return os.path.dirname(os.path.abspath(py_file)) == _PACKAGE_DIR


def _closure_locator(base: type) -> type:
    """``base`` (one of numba's cache locators), limited to poisoncert's files and stamped with their closure."""

    class Locator(base):  # type: ignore[misc, valid-type]
        @classmethod
        def from_function(cls, py_func: Any, py_file: str) -> Any:
            if not _in_package(py_file):
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self) -> Any:
            reached = _closure(self._py_file)
            stamp = super().get_source_stamp(), _digest(reached)
            if _changed_since_import(reached):
                # A stamp that no process will compute: this one's kernel is compiled but never reused.
                return (*stamp, os.urandom(16))
            return stamp

    Locator.__name__ = Locator.__qualname__ = f"PoisoncertClosure{base.__name__.lstrip('_')}"
    return Locator


def stamp_kernels_with_their_imports() -> bool:
    """Put closure-stamped locators before numba's own; True if done (False with a numba laid out otherwise)."""
    try:
        from numba.core import caching
    except ImportError:  # pragma: no cover - numba is a dependency
        return False
    impl = getattr(caching, "CacheImpl", getattr(caching, "_CacheImpl", None))
    classes = getattr(impl, "_locator_classes", None)
    if not isinstance(classes, list):  # pragma: no cover - another numba's layout
        return False
    if any(getattr(cls, "__name__", "").startswith("PoisoncertClosure") for cls in classes):
        return True
    bases = []
    for names in (("UserProvidedCacheLocator", "_UserProvidedCacheLocator"),
                  ("InTreeCacheLocator", "_InTreeCacheLocator"),
                  ("UserWideCacheLocator", "_UserWideCacheLocator")):
        base = next((getattr(caching, name) for name in names if hasattr(caching, name)), None)
        if base is None:  # pragma: no cover - another numba's layout
            return False
        bases.append(base)
    classes[:0] = [_closure_locator(base) for base in bases]
    return True


import_array_math_without_scipy_linalg()
stamp_kernels_with_their_imports()
