"""poisoncert: provable robustness of nearest neighbours (and baselines) against data poisoning."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

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
