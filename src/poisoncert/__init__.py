"""poisoncert: provable robustness of nearest neighbours (and baselines) against data poisoning."""

from __future__ import annotations

import hashlib as _hashlib
import os as _os
from typing import Any

__version__ = "0.1.0"


def _snapshot_sources() -> dict[str, bytes]:
    """SHA-256 of each of the package's source files as this process finds them when it first imports the package.

    :mod:`poisoncert._jit` caches no compiled kernel whose files have changed on disk since: that process runs the
    code it imported, and numba would store it under the new files' stamp for later processes to load.
    """
    folder = _os.path.dirname(_os.path.abspath(__file__))
    digests: dict[str, bytes] = {}
    try:
        names = _os.listdir(folder)
    except OSError:  # pragma: no cover - not a folder (a zipped install): nothing to compare
        return digests
    for name in names:
        if name.endswith(".py"):
            try:
                with open(_os.path.join(folder, name), "rb") as source:
                    digests[name] = _hashlib.sha256(source.read()).digest()
            except OSError:  # pragma: no cover - unreadable: it then never matches
                pass
    return digests


_SOURCE_DIGESTS = _snapshot_sources()

__all__ = [
    "CertificationResult",
    "CertifiedKNeighborsClassifier",
    "CertifiedRadiusNeighborsClassifier",
    "__version__",
]

_LAZY = {
    "CertificationResult": "results",
    "CertifiedKNeighborsClassifier": "estimators",
    "CertifiedRadiusNeighborsClassifier": "estimators",
}


def __getattr__(name: str) -> Any:
    # Deferred imports keep `import poisoncert` and the CLI's --help instant (numba compiles on first use).
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'poisoncert' has no attribute {name!r}")
