"""One result object for every method: predictions, votes, per-example certified sizes and curves.

kNN, rNN, DPA and Bagging all return a :class:`CertificationResult`, so one table and one plot can hold
them side by side. Every export carries the metadata that says what a number is: method, parameters, threat
model, guarantee (deterministic or probabilistic with its confidence), data and package version.
"""

from __future__ import annotations

import csv
import io
import platform
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__
from ._io import atomic_write, write_json
from ._validation import check_poisoning_sizes

#: Certified size given to misclassified test inputs (and to Bagging inputs that are not certified at e = 0).
NOT_CERTIFIED = -1


@dataclass
class CertificationResult:
    """Certificates of one classifier on one labelled test set.

    Attributes
    ----------
    method : str
        ``"knn"``, ``"rnn"``, ``"dpa"`` or ``"bagging"``.
    params : dict
        The method's parameters (``n_neighbors``, ``radius``, ``n_partitions``, ...).
    predictions : ndarray of shape (n_test,)
        Predicted labels, in the user's label space (``classes[prediction_indices]``).
    prediction_indices : ndarray of shape (n_test,)
        Predicted label indices into ``classes``.
    y_true : ndarray of shape (n_test,)
        True label indices into ``classes``.
    votes : ndarray of shape (n_test, n_classes)
        Vote counts (neighbours for kNN/rNN, base classifiers for DPA/Bagging).
    certified_size : ndarray of shape (n_test,)
        Individual certified poisoning size of each test input under ``threat_model``;
        ``NOT_CERTIFIED`` (-1) for misclassified inputs.
    classes : ndarray
        Label values; column ``l`` of ``votes`` is ``classes[l]``.
    threat_model : str
        ``"general"`` (default), ``"insertion"``, ``"deletion"`` or ``"label-flip"``.
    guarantee : str
        ``"deterministic"`` or ``"probabilistic"``.
    confidence : float or None
        For probabilistic certificates, the probability ``1 - alpha`` with which they hold.
    metadata : dict
        Everything else worth recording (metric, n_train, dataset, features, timings, ...).
    neighbor_labels : ndarray of shape (n_test, k) or None
        kNN only: ordered neighbour label indices, needed by the kNN joint certificate.
    default_method : str
        The curve reported when no method is named.
    seed : int
        Seed for the RD grouping.
    """

    method: str
    params: dict[str, Any]
    prediction_indices: np.ndarray
    y_true: np.ndarray
    votes: np.ndarray
    certified_size: np.ndarray
    classes: np.ndarray
    threat_model: str = "general"
    guarantee: str = "deterministic"
    confidence: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    neighbor_labels: np.ndarray | None = None
    default_method: str = "individual"
    seed: int = 0

    @property
    def predictions(self) -> np.ndarray:
        return np.asarray(self.classes)[self.prediction_indices]

    @property
    def n_test(self) -> int:
        return int(len(self.y_true))

    @property
    def clean_accuracy(self) -> float:
        return float(np.mean(self.prediction_indices == self.y_true)) if self.n_test else float("nan")

    @property
    def available_methods(self) -> tuple[str, ...]:
        """Curves this result can compute."""
        if self.threat_model != "general":
            return ("individual",)
        if self.method == "rnn":
            return ("individual", "rd", "island", "global")
        if self.method == "knn" and self.neighbor_labels is not None:
            return ("individual", "global")
        return ("individual",)

    def certified_accuracy(self, e: np.ndarray | list[int] | int, method: str | None = None) -> np.ndarray:
        """Lower bound on certified accuracy CA(e) at each poisoning size in ``e``.

        Parameters
        ----------
        e : array-like of int
            Poisoning sizes (>= 0).
        method : str, optional
            ``"individual"`` (per test input), or a joint certificate: ``"rd"``, ``"island"``, ``"global"``
            for rNN, ``"global"`` for kNN. Defaults to ``default_method``.

        Returns
        -------
        ndarray of float, one value per entry of ``e``.
        """
        from . import certify

        e = check_poisoning_sizes(e)
        method = self.default_method if method is None else method
        if method not in self.available_methods:
            raise ValueError(
                f"method {method!r} is not available for {self.method} under the {self.threat_model} "
                f"threat model; choose one of {', '.join(self.available_methods)}"
            )
        if method == "individual":
            return certify.accuracy_from_certified_sizes(self.certified_size, e)
        if self.method == "knn":
            return certify.knn_joint_certified_accuracy(
                self.neighbor_labels, self.y_true, e, n_classes=self.votes.shape[1],
                n_neighbors=self.params.get("k"), n_train=self.metadata.get("n_train"),
            )
        return certify.certified_accuracy(self.votes, self.y_true, e, method=method, seed=self.seed)

    def worst_case_removals(self, e: np.ndarray | list[int] | int) -> np.ndarray:
        """rNN only: removals per label (columns ordered as ``classes``) of the worst-case label-level attacker
        behind the global joint certificate (spec 5b), one row per entry of ``e``. Shows where the model is
        weakest: the labels whose predictions a shared removal budget flips most cheaply.
        """
        if self.method != "rnn" or self.threat_model != "general":
            raise ValueError("worst-case removals per label exist for rNN under the general threat model only")
        from .joint import global_attack_allocation

        return global_attack_allocation(self.votes, self.y_true, check_poisoning_sizes(e))

    def describe(self) -> dict[str, Any]:
        """Metadata saying exactly what the numbers are."""
        return {
            "method": self.method,
            "params": dict(self.params),
            "threat_model": self.threat_model,
            "guarantee": self.guarantee,
            "confidence": self.confidence,
            "n_test": self.n_test,
            "n_classes": int(self.votes.shape[1]),
            "classes": np.asarray(self.classes).tolist(),
            "clean_accuracy": self.clean_accuracy,
            "default_method": self.default_method,
            "available_methods": list(self.available_methods),
            "poisoncert_version": __version__,
            "python": platform.python_version(),
            **self.metadata,
        }

    def curve_rows(self, e: np.ndarray | list[int], methods: list[str] | None = None) -> list[dict[str, Any]]:
        """Tidy rows (one per certification method and e) of certified accuracy."""
        e = check_poisoning_sizes(e)
        methods = list(self.available_methods) if methods is None else methods
        label = self.label()
        rows = []
        for method in methods:
            curve = self.certified_accuracy(e, method=method)
            for size, value in zip(e.tolist(), curve.tolist(), strict=True):
                rows.append(
                    {
                        "classifier": label,
                        "method": self.method,
                        "certification": method,
                        "params": _format_params(self.params),
                        "threat_model": self.threat_model,
                        "guarantee": self.guarantee,
                        "confidence": "" if self.confidence is None else self.confidence,
                        "e": size,
                        "certified_accuracy": value,
                    }
                )
        return rows

    def label(self) -> str:
        """Short human label such as ``kNN (k=5000)``."""
        names = {"knn": "kNN", "rnn": "rNN", "dpa": "DPA", "bagging": "Bagging"}
        return f"{names.get(self.method, self.method)} ({_format_params(self.params)})"

    def per_example_rows(self) -> list[dict[str, Any]]:
        """One dict per test input: index, true label, prediction, individual certified size, vote counts."""
        classes = np.asarray(self.classes).tolist()
        return [
            {"index": i, "y_true": classes[t], "prediction": classes[p], "certified_size": int(s), "votes": v}
            for i, (t, p, s, v) in enumerate(
                zip(self.y_true.tolist(), self.prediction_indices.tolist(), self.certified_size.tolist(),
                    self.votes.tolist(), strict=True)
            )
        ]

    def to_csv(self, path: str, e: np.ndarray | list[int], methods: list[str] | None = None) -> None:
        """Write the certified-accuracy curves as a tidy CSV, atomically, with metadata as ``#`` comments."""
        write_curves_csv(path, [self], e, methods={id(self): methods} if methods else None)

    def to_json(self, path: str, e: np.ndarray | list[int], methods: list[str] | None = None) -> None:
        """Write metadata, curves and per-example certificates as JSON, atomically."""
        write_json(
            path,
            {
                "metadata": self.describe(),
                "curves": self.curve_rows(e, methods),
                "per_example": self.per_example_rows(),
            },
        )


def _format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in params.items())


def write_curves_csv(
    path: str,
    results: list[CertificationResult],
    e: np.ndarray | list[int],
    methods: dict[int, list[str] | None] | None = None,
    extra_metadata: dict[str, Any] | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> None:
    """One tidy CSV for several results (one row per classifier, certification method and e), atomically.

    The header is preceded by ``#`` comment lines holding each result's metadata, so the file says what its
    numbers are; ``pandas.read_csv(path, comment="#")`` reads it. ``rows`` may pass curve rows already computed.
    """
    buffer = io.StringIO()
    buffer.write(f"# poisoncert {__version__}: certified accuracy, a provable lower bound of CA(e)\n")
    for key, value in (extra_metadata or {}).items():
        buffer.write(f"# {key}: {value}\n")
    computed: list[dict[str, Any]] = []
    for result in results:
        meta = result.describe()
        buffer.write(f"# {result.label()}: " + "; ".join(
            f"{k}={v}" for k, v in meta.items()
            if k not in ("classes", "params") and not isinstance(v, list | tuple | dict)) + "\n")
        if rows is None:
            computed.extend(result.curve_rows(e, (methods or {}).get(id(result))))
    rows = computed if rows is None else rows
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())
