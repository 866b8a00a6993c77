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
    y_true : ndarray of shape (n_test,) or None
        True label indices into ``classes``; None when the test inputs came without labels (then only the
        certified sizes of the predictions exist, no accuracy curves).
    votes : ndarray of shape (n_test, n_classes)
        Vote counts (neighbours for kNN/rNN, base classifiers for DPA/Bagging).
    certified_size : ndarray of shape (n_test,)
        Individual certified poisoning size of each test input under ``threat_model``;
        ``NOT_CERTIFIED`` (-1) for misclassified inputs. Without true labels: the certified size of each
        prediction (it needs no label).
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
    neighbor_labels : ndarray of shape (n_test, K) or None
        kNN only: ordered neighbour label indices, needed by the kNN joint certificates; the split certificate
        at ``e`` reads the first ``k + e`` columns, so ``K = min(k + max_e, n_train)``.
    default_method : str
        The curve reported when no method is named.
    seed : int
        Seed for the RD grouping.
    split_options : dict
        ``time_limit`` / ``node_limit`` (per poisoning size) and ``max_memory_mb`` of the split certificates.
    max_e : int or None
        kNN: the largest poisoning size the stored neighbour table supports for the split certificate (None: no
        limit, the table holds every training example).
    """

    method: str
    params: dict[str, Any]
    prediction_indices: np.ndarray
    y_true: np.ndarray | None
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
    split_options: dict[str, Any] = field(default_factory=dict)
    max_e: int | None = None
    _cache: dict[str, dict[int, tuple[float, bool]]] = field(default_factory=dict, repr=False)
    _split: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)
    _global_removals: dict[int, list[int]] = field(default_factory=dict, repr=False)
    _certifier: Any = field(default=None, repr=False)
    # True where the package counted ``votes`` from ``neighbor_labels`` itself (their first min(k, K) columns): the
    # kNN joint curves then take those counts instead of counting the table again. A result built by hand keeps
    # False and its curves count the table, so they never depend on votes it was given.
    _votes_of_table: bool = field(default=False, repr=False)

    @property
    def predictions(self) -> np.ndarray:
        return np.asarray(self.classes)[self.prediction_indices]

    @property
    def n_test(self) -> int:
        return int(len(self.prediction_indices))

    @property
    def has_labels(self) -> bool:
        return self.y_true is not None

    @property
    def clean_accuracy(self) -> float:
        if self.y_true is None or not self.n_test:
            return float("nan")
        return float(np.mean(self.prediction_indices == self.y_true))

    @property
    def available_methods(self) -> tuple[str, ...]:
        """Curves this result can compute (none without true labels)."""
        if self.y_true is None:
            return ()
        if self.method == "rnn":
            if self.threat_model == "general":
                return ("individual", "rd", "island", "global", "split")
            return ("individual", "split")
        if self.method == "knn" and self.neighbor_labels is not None:
            if self.threat_model == "general":
                return ("individual", "global", "split")
            return ("individual", "split")
        return ("individual",)

    def spec_section(self, method: str) -> str:
        """The section of the certification contract that defines a curve (``../shared/spec/certification.md``)."""
        if self.method in ("dpa", "bagging"):
            return "6"
        return {"individual": "4", "rd": "5 (Theorem 4)", "island": "5 (Theorem 4)",
                "global": "5b" if self.method == "rnn" else "5c",
                "split": "5d" if self.method == "rnn" else "5e"}[method]

    def certified_accuracy(self, e: np.ndarray | list[int] | int, method: str | None = None) -> np.ndarray:
        """Lower bound on certified accuracy CA(e) at each poisoning size in ``e``.

        Parameters
        ----------
        e : array-like of int
            Poisoning sizes (>= 0).
        method : str, optional
            ``"individual"`` (per test input), or a joint certificate: ``"rd"``, ``"island"``, ``"global"``,
            ``"split"`` for rNN, ``"global"``, ``"split"`` for kNN. Defaults to ``default_method``.

        Returns
        -------
        ndarray of float, one value per entry of ``e``. Each value is computed once and kept, so a table, a
        plot and a file written from the same result never recompute a curve.
        """
        return self.curve(e, method)[0]

    def curve(self, e: np.ndarray | list[int] | int, method: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(certified_accuracy, exact)`` at each poisoning size: ``exact[j]`` is False where the value is a sound
        but looser bound than the certificate's definition (a split certificate stopped by its time or node limit,
        or on a coarsened need table)."""
        e = check_poisoning_sizes(e)
        method = self.default_method if method is None else method
        if self.y_true is None:
            raise ValueError("accuracy curves need the true labels of the test inputs; this result certifies the "
                             "predictions only (see certified_size)")
        if method not in self.available_methods:
            raise ValueError(
                f"method {method!r} is not available for {self.method} under the {self.threat_model} "
                f"threat model; choose one of {', '.join(self.available_methods)}"
            )
        cache = self._cache.setdefault(method, {})
        missing = np.array(sorted({int(v) for v in e.tolist()} - set(cache)), dtype=np.int64)
        if missing.size:
            for size, value, exact in zip(missing.tolist(), *self._compute(missing, method), strict=True):
                cache[size] = (float(value), bool(exact))
        return (np.array([cache[int(v)][0] for v in e.tolist()], dtype=np.float64),
                np.array([cache[int(v)][1] for v in e.tolist()], dtype=bool))

    def _compute(self, e: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
        from . import certify

        exact = np.ones(len(e), dtype=bool)
        if method == "individual":
            return certify.accuracy_from_certified_sizes(self.certified_size, e), exact
        if method == "split":
            from .joint_split import rnn_split_certificate

            options = dict(self.split_options)
            memory = options.pop("max_memory_mb", None)
            if self.method == "knn":
                if self.max_e is not None and int(e.max()) > self.max_e:
                    raise ValueError(
                        f"this kNN result holds each input's first {self.neighbor_labels.shape[1]} neighbours, enough "
                        f"for the split certificate up to e = {self.max_e}; e = {int(e.max())} needs k + e "
                        f"neighbours: certify again with max_e >= {int(e.max())}"
                    )
                if self._certifier is None:
                    from .joint_split import KnnSplitCertifier

                    # Kept with the result: its profiles and the sizes known to flip every input serve every
                    # later call (a grid's probe, then the grid).
                    self._certifier = KnnSplitCertifier(
                        self.neighbor_labels, self.y_true, int(self.params["k"]), self.votes.shape[1],
                        self.metadata.get("n_train"), self.threat_model,
                        **({} if memory is None else {"max_memory_mb": memory}),
                        _votes=self.votes if self._votes_of_table else None)
                details = self._certifier.certify(e, **options)
            else:
                details = rnn_split_certificate(self.votes, self.y_true, e, self.threat_model, **options)
            for j, size in enumerate(e.tolist()):
                self._split[size] = {"additions": details.additions[j].tolist(),
                                     "removals": details.removals[j].tolist(),
                                     "attack_flips": int(details.attack_flips[j]),
                                     "max_flips": int(details.max_flips[j]), "nodes": int(details.nodes[j]),
                                     "exact": bool(details.exact[j])}
            return details.accuracy, details.exact
        if self.method == "rnn" and method == "global":
            from .joint import global_rnn_curve

            # The knapsack that bounds the curve also gives its attacker (worst_case_removals): kept, not solved
            # again when the outputs are written.
            accuracy, removals = global_rnn_curve(self.votes, self.y_true, e)
            self._global_removals.update(zip(e.tolist(), removals.tolist(), strict=True))
            return accuracy, exact
        if self.method == "knn":
            k = int(self.params["k"])
            table = self.neighbor_labels[:, : min(k, self.neighbor_labels.shape[1])]
            if self._votes_of_table:
                from .joint import _knn_joint_curve

                # The table and the votes the package counted from it, both checked when they were made: not
                # checked and counted again (0.1 CPU-s on MNIST).
                return _knn_joint_curve(table, self.votes, self.y_true, e, k, self.votes.shape[1]), exact
            return certify.knn_joint_certified_accuracy(
                table, self.y_true, e, n_classes=self.votes.shape[1], n_neighbors=k,
                n_train=self.metadata.get("n_train"),
            ), exact
        return certify.certified_accuracy(self.votes, self.y_true, e, method=method, seed=self.seed), exact

    def split_attack(self, e: np.ndarray | list[int] | int) -> dict[str, Any]:
        """The label-level attacker behind the split certificate (spec 5d/5e) at each ``e``.

        Returns a dict with ``classes``, ``e``, ``additions`` and ``removals`` (per label, columns ordered as
        ``classes``), ``flips`` (inputs that attacker flips), ``max_flips`` (the proved bound) and ``exact``. It
        describes the over-approximated attacker, which shows where the model is weakest; it is not necessarily a
        poisoned training set that realises the bound.
        """
        e = check_poisoning_sizes(e)
        self.curve(e, "split")
        rows = [self._split[int(v)] for v in e.tolist()]
        return {"classes": np.asarray(self.classes).tolist(), "e": e.tolist(),
                "additions": [r["additions"] for r in rows], "removals": [r["removals"] for r in rows],
                "flips": [r["attack_flips"] for r in rows], "max_flips": [r["max_flips"] for r in rows],
                "exact": [r["exact"] for r in rows]}

    def worst_case_removals(self, e: np.ndarray | list[int] | int) -> np.ndarray:
        """rNN only: removals per label (columns ordered as ``classes``) of the worst-case label-level attacker
        behind the global joint certificate (spec 5b), one row per entry of ``e``. Shows where the model is
        weakest: the labels whose predictions a shared removal budget flips most cheaply.
        """
        if self.method != "rnn" or self.threat_model != "general" or self.y_true is None:
            raise ValueError("worst-case removals per label exist for labelled rNN results under the general "
                             "threat model only")
        e = check_poisoning_sizes(e)
        self.curve(e, "global")  # the curve's knapsacks keep their attackers (_compute)
        return np.array([self._global_removals[int(v)] for v in e.tolist()], dtype=np.int64).reshape(
            len(e), self.votes.shape[1])

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
            "clean_accuracy": self.clean_accuracy if self.has_labels else None,
            "labelled": self.has_labels,
            "default_method": self.default_method,
            "available_methods": list(self.available_methods),
            "spec_sections": {m: self.spec_section(m) for m in self.available_methods},
            "split_options": dict(self.split_options) if "split" in self.available_methods else None,
            "max_e": self.max_e,
            "poisoncert_version": __version__,
            "python": platform.python_version(),
            **self.metadata,
        }

    def curve_rows(self, e: np.ndarray | list[int], methods: list[str] | None = None) -> list[dict[str, Any]]:
        """Tidy rows (one per certification method and e) of certified accuracy."""
        e = check_poisoning_sizes(e)
        methods = list(self.available_methods) if methods is None else methods
        rows = []
        for method in methods:
            values, exact = self.curve(e, method=method)
            fields = self.curve_fields(method)
            for size, value, is_exact in zip(e.tolist(), values.tolist(), exact.tolist(), strict=True):
                rows.append({**fields, "e": size, "certified_accuracy": value, "exact": is_exact})
        return rows

    def curve_fields(self, method: str) -> dict[str, Any]:
        """The fields of :meth:`curve_rows` that do not depend on ``e`` (known before any curve is computed)."""
        return {
            "classifier": self.label(),
            "method": self.method,
            "certification": method,
            "spec_section": self.spec_section(method),
            "params": _format_params(self.params),
            "threat_model": self.threat_model,
            "guarantee": self.guarantee,
            "confidence": "" if self.confidence is None else self.confidence,
        }

    def label(self) -> str:
        """Short human label such as ``kNN (k=5000)``."""
        names = {"knn": "kNN", "rnn": "rNN", "dpa": "DPA", "bagging": "Bagging"}
        return f"{names.get(self.method, self.method)} ({_format_params(self.params)})"

    def per_example_rows(self) -> list[dict[str, Any]]:
        """One dict per test input: index, true label, prediction, individual certified size, vote counts."""
        classes = np.asarray(self.classes).tolist()
        truth = [None] * self.n_test if self.y_true is None else [classes[t] for t in self.y_true.tolist()]
        return [
            {"index": i, "y_true": "" if t is None else t, "prediction": classes[p], "certified_size": int(s),
             "votes": v}
            for i, (t, p, s, v) in enumerate(
                zip(truth, self.prediction_indices.tolist(), self.certified_size.tolist(), self.votes.tolist(),
                    strict=True)
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
