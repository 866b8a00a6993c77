"""kNN and rNN certifiers: fitting, votes and certificates over one exact neighbour index.

The scikit-learn estimators of :mod:`poisoncert.estimators` are these classes plus scikit-learn's estimator
protocol. This module imports no scikit-learn (about a second of start-up), so the CLI's ``certify``, which calls
:func:`certify_neighbours`, does not pay for it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import certify as _certify
from ._validation import (
    check_features,
    check_metric,
    check_positive_int,
    check_radii,
    check_training_set,
    encode_test_labels,
)
from .results import NOT_CERTIFIED, CertificationResult
from .votes import knn_votes_from_labels, predict


class _NeighborsCertifier:
    """Shared fitting, validation and neighbour index of the kNN and rNN certifiers."""

    _method = ""

    def __init__(self, metric: str, backend: str, max_memory_mb: int, progress: bool) -> None:
        self.metric = metric
        self.backend = backend
        self.max_memory_mb = max_memory_mb
        self.progress = progress

    def fit(self, X: np.ndarray, y: np.ndarray) -> _NeighborsCertifier:
        """Store the training set and build the exact neighbour index.

        Parameters
        ----------
        X : array-like of shape (n_train, n_features)
            Finite numeric features.
        y : array-like of shape (n_train,)
            Integer or string labels; at least two distinct classes.
        """
        self._validate_params_()
        if self.backend == "dask":
            # Features stay where they are (a .npy file, a zarr array): the workers read and check them.
            from .distributed import check_training_source

            X, classes, y_index = check_training_source(X, y)
        else:
            X, classes, y_index = check_training_set(X, y)
        self._check_training_size(X.shape[0])
        from .neighbours import NeighbourIndex

        self.classes_ = classes
        self.n_features_in_ = X.shape[1]
        self.n_train_ = X.shape[0]
        self._y_index = y_index
        self.index_ = NeighbourIndex(
            X, classes[y_index], metric=self.metric, backend=self.backend, max_memory_mb=self.max_memory_mb,
            progress=self.progress,
        )
        return self

    def _adopt(self, other: _NeighborsCertifier) -> None:
        """Share ``other``'s fit (same training set, metric and backend) instead of building a second index."""
        self._validate_params_()
        for name in ("classes_", "n_features_in_", "n_train_", "_y_index", "index_"):
            setattr(self, name, getattr(other, name))
        self._check_training_size(self.n_train_)

    def _validate_params_(self) -> None:
        check_metric(self.metric)
        check_positive_int(self.max_memory_mb, "max_memory_mb")
        if self.backend not in ("auto", "numba", "torch", "dask"):
            raise ValueError(f"unknown backend {self.backend!r}; choose 'auto', 'numba', 'torch' or 'dask'")

    def _check_training_size(self, n_train: int) -> None:
        """Hook for estimator-specific checks against the training-set size."""

    def _check_X(self, X: np.ndarray) -> np.ndarray:
        if not hasattr(self, "index_"):
            from sklearn.utils.validation import check_is_fitted  # deferred: only this error needs scikit-learn

            check_is_fitted(self, "index_")
        return check_features(X, "X", n_features=self.n_features_in_)

    def vote_counts(self, X: np.ndarray) -> np.ndarray:
        """Neighbour votes per class, shape (n_test, n_classes), columns in the order of ``classes_``."""
        raise NotImplementedError

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Majority label of the neighbours, ties to the larger class index (spec section 2)."""
        votes = self.vote_counts(X)
        return self.classes_[predict(votes)]

    def _metadata(self, n_test: int) -> dict[str, Any]:
        return {
            "metric": self.index_.metric,  # the one the index was built with, even after set_params
            "n_train": int(self.n_train_),
            "n_features": int(self.n_features_in_),
            "backend": self.index_.backend if hasattr(self.index_, "backend") else self.backend,
            "tie_rule": "neighbours: distance asc, SHA-256 content rank desc; labels: larger label wins",
        }

    def _test_labels(self, y: np.ndarray | None, n_rows: int) -> np.ndarray | None:
        return None if y is None else encode_test_labels(self.classes_, y, n_rows)

    def _result(
        self,
        votes: np.ndarray,
        y_index: np.ndarray | None,
        sizes: np.ndarray,
        threat_model: str,
        params: dict[str, Any],
        split_options: dict[str, Any],
        **extra: Any,
    ) -> CertificationResult:
        prediction = predict(votes)
        return CertificationResult(
            method=self._method,
            params=params,
            prediction_indices=prediction,
            y_true=y_index,
            votes=votes,
            certified_size=sizes if y_index is None else np.where(prediction == y_index, sizes, NOT_CERTIFIED),
            classes=self.classes_,
            threat_model=threat_model,
            metadata=self._metadata(len(prediction)),
            default_method="split" if y_index is not None else "individual",
            split_options=split_options,
            **extra,
        )


class KNeighborsCertifier(_NeighborsCertifier):
    """kNN: fit, votes and certificates (the API of :class:`~poisoncert.estimators.CertifiedKNeighborsClassifier`,
    which adds scikit-learn's estimator protocol)."""

    _method = "knn"

    def __init__(
        self,
        n_neighbors: int = 5,
        metric: str = "l1",
        backend: str = "auto",
        max_memory_mb: int = 512,
        progress: bool = False,
    ) -> None:
        super().__init__(metric=metric, backend=backend, max_memory_mb=max_memory_mb, progress=progress)
        self.n_neighbors = n_neighbors

    def _validate_params_(self) -> None:
        super()._validate_params_()
        check_positive_int(self.n_neighbors, "n_neighbors")

    def _check_training_size(self, n_train: int) -> None:
        if self.n_neighbors > n_train:
            raise ValueError(f"n_neighbors={self.n_neighbors} is larger than the training set ({n_train} examples)")

    def neighbor_labels(self, X: np.ndarray, n_neighbors: int | None = None) -> np.ndarray:
        """Label indices of each input's nearest training examples in order, shape (n_test, n_neighbors)."""
        X = self._check_X(X)
        count = self._current_k() if n_neighbors is None else check_positive_int(n_neighbors, "n_neighbors")
        return self.index_.ordered_labels(X, min(count, self.n_train_))

    def _current_k(self) -> int:
        # n_neighbors is read at prediction time (as in scikit-learn), so set_params after fit is checked here.
        k = check_positive_int(self.n_neighbors, "n_neighbors")
        self._check_training_size(self.n_train_)
        return k

    def vote_counts(self, X: np.ndarray) -> np.ndarray:
        labels = self.neighbor_labels(X)
        return knn_votes_from_labels(labels, self.n_neighbors, len(self.classes_))

    def vote_counts_sweep(self, X: np.ndarray, n_neighbors: Sequence[int]) -> np.ndarray:
        """Votes for many k from one distance pass: shape (len(n_neighbors), n_test, n_classes)."""
        ks = [check_positive_int(k, "n_neighbors") for k in n_neighbors]
        if not ks:
            raise ValueError("n_neighbors is empty: give at least one k")
        if max(ks) > self.n_train_:
            raise ValueError(f"k={max(ks)} is larger than the training set ({self.n_train_} examples)")
        labels = self.neighbor_labels(X, max(ks))
        return knn_votes_from_labels(labels, ks, len(self.classes_))

    def certify(
        self,
        X: np.ndarray,
        y: np.ndarray | None = None,
        threat_model: str = "general",
        *,
        max_e: int | None = None,
        time_limit: float | None = None,
        node_limit: int | None = None,
    ) -> CertificationResult:
        """Certify every test input individually and prepare the joint certificates.

        Under ``threat_model`` (default: general; also "insertion", "deletion", "label-flip"), each test input's
        prediction provably stays the same for every poisoned training set of poisoning size at most
        ``result.certified_size[i]`` (deterministic; with labels, misclassified inputs get -1). With true labels
        ``y``, ``result.certified_accuracy(e)`` is the split-budget joint certificate of spec 5e (the default;
        also "global" = spec 5c under the general model, and "individual").

        Parameters
        ----------
        X : array-like of shape (n_test, n_features)
        y : array-like of shape (n_test,), optional
            True labels. Without them only the predictions are certified (no accuracy curves).
        threat_model : str
        max_e : int, optional
            Largest poisoning size for the joint certificates: the split certificate at ``e`` reads each input's
            first ``k + e`` neighbours, which are computed in the same pass. Default ``k``.
        time_limit, node_limit : optional
            Per poisoning size, for the branch and bound of the split certificate (a value it leaves open is
            still sound, and marked not exact).
        """
        return self.certify_sweep(X, y, [self.n_neighbors], threat_model=threat_model, max_e=max_e,
                                  time_limit=time_limit, node_limit=node_limit)[self.n_neighbors]

    def certify_sweep(
        self,
        X: np.ndarray,
        y: np.ndarray | None,
        n_neighbors: Sequence[int],
        threat_model: str = "general",
        *,
        max_e: int | None = None,
        time_limit: float | None = None,
        node_limit: int | None = None,
    ) -> dict[int, CertificationResult]:
        """:meth:`certify` for many k from one distance pass; returns ``{k: result}``."""
        X, y_index, ks, threat_model, max_e = self._sweep_arguments(X, y, n_neighbors, threat_model, max_e)
        labels = self.index_.ordered_labels(X, self._table_width(ks, max_e, y_index))
        return self._results_from_labels(X, labels, y_index, ks, threat_model, max_e,
                                         {"time_limit": time_limit, "node_limit": node_limit})

    def _sweep_arguments(self, X: np.ndarray, y: np.ndarray | None, n_neighbors: Sequence[int], threat_model: str,
                         max_e: int | None) -> tuple[np.ndarray, np.ndarray | None, list[int], str, int | None]:
        X = self._check_X(X)
        y_index = self._test_labels(y, X.shape[0])
        ks = [check_positive_int(k, "n_neighbors") for k in n_neighbors]
        if not ks:
            raise ValueError("n_neighbors is empty: give at least one k")
        if max(ks) > self.n_train_:
            raise ValueError(f"k={max(ks)} is larger than the training set ({self.n_train_} examples)")
        threat_model = _certify._check_threat_model(threat_model)
        if max_e is not None:
            max_e = check_positive_int(max_e, "max_e", minimum=0)
        return X, y_index, ks, threat_model, max_e

    def _table_width(self, ks: Sequence[int], max_e: int | None, y_index: np.ndarray | None) -> int:
        """Columns of the neighbour table: k, plus the joint certificates' reach (k + e) when there are labels."""
        joint_e = max(ks) if max_e is None else max_e
        return min(self.n_train_, max(ks) + (joint_e if y_index is not None else 0))

    def _results_from_labels(self, X: np.ndarray, labels: np.ndarray, y_index: np.ndarray | None, ks: list[int],
                             threat_model: str, max_e: int | None, options: dict[str, Any]
                             ) -> dict[int, CertificationResult]:
        n_classes = len(self.classes_)
        joint_e = max(ks) if max_e is None else max_e
        all_votes = knn_votes_from_labels(labels, ks, n_classes)
        results = {}
        options = {**options, "max_memory_mb": self.max_memory_mb}
        for k, votes in zip(ks, all_votes, strict=True):
            if threat_model == "deletion":
                sizes = self._deletion_sizes(X, labels, predict(votes), k)
            elif threat_model in ("general", "label-flip"):
                # What knn_certified_poisoning_size computes for these models, from the votes already counted.
                sizes = _certify.certified_poisoning_size(votes, "general")
            else:
                sizes = _certify.knn_certified_poisoning_size(labels[:, :k], k, n_classes, threat_model,
                                                              n_train=self.n_train_)
            table_width = min(self.n_train_, k + joint_e)
            result = self._result(
                votes, y_index, sizes, threat_model, {"k": k}, options,
                neighbor_labels=np.ascontiguousarray(labels[:, :table_width]) if y_index is not None else None,
                max_e=None if table_width == self.n_train_ else joint_e,
                _votes_of_table=y_index is not None,  # votes: the first min(k, n_train) columns of this table
            )
            result.metadata["neighbour_table_width"] = int(table_width)
            results[k] = result
        return results

    def _deletion_sizes(self, X: np.ndarray, labels: np.ndarray, prediction: np.ndarray, k: int) -> np.ndarray:
        """Exact kNN deletion-only certified sizes (spec section 4), streamed.

        Deletions pull later neighbours into the window, so an input's certificate is decided only at its first
        flip, which may lie far out. Inputs the table does not decide get their neighbour order again, twice as
        wide each round (in row chunks within ``max_memory_mb``), until decided or the whole training set is read.
        """
        n_classes = len(self.classes_)
        sizes, decided = _certify.knn_deletion_scan(labels, prediction, k, n_classes, self.n_train_)
        width = labels.shape[1]
        undecided = np.flatnonzero(~decided)
        while undecided.size:
            width = min(self.n_train_, 2 * width)
            # The label table (int8/int16/int32) and the engine's own buffers per row; see NeighbourIndex.
            rows_per_chunk = max(1, int(self.max_memory_mb * 2**20 // (width * 16)))
            for start in range(0, len(undecided), rows_per_chunk):
                rows = undecided[start : start + rows_per_chunk]
                wider = self.index_.ordered_labels(X[rows], width)
                sizes[rows], decided[rows] = _certify.knn_deletion_scan(wider, prediction[rows], k, n_classes,
                                                                        self.n_train_)
            undecided = undecided[~decided[undecided]]
        return sizes


class RadiusNeighborsCertifier(_NeighborsCertifier):
    """rNN: fit, votes and certificates (the API of
    :class:`~poisoncert.estimators.CertifiedRadiusNeighborsClassifier`, which adds scikit-learn's estimator
    protocol)."""

    _method = "rnn"

    def __init__(
        self,
        radius: float = 1.0,
        metric: str = "l1",
        backend: str = "auto",
        max_memory_mb: int = 512,
        progress: bool = False,
    ) -> None:
        super().__init__(metric=metric, backend=backend, max_memory_mb=max_memory_mb, progress=progress)
        self.radius = radius

    def _validate_params_(self) -> None:
        super()._validate_params_()
        check_radii([self.radius])

    def vote_counts(self, X: np.ndarray) -> np.ndarray:
        return self.vote_counts_sweep(X, [self.radius])[0]

    def vote_counts_sweep(self, X: np.ndarray, radii: Sequence[float]) -> np.ndarray:
        """Votes for many radii from one distance pass: shape (len(radii), n_test, n_classes)."""
        X = self._check_X(X)
        radii = check_radii(radii)
        return self.index_.radius_votes(X, radii, len(self.classes_))

    def certify(
        self,
        X: np.ndarray,
        y: np.ndarray | None = None,
        threat_model: str = "general",
        *,
        time_limit: float | None = None,
        node_limit: int | None = None,
    ) -> CertificationResult:
        """Certify every test input individually and jointly.

        Under ``threat_model`` each test input's prediction provably stays the same for every poisoned training
        set of size at most ``result.certified_size[i]`` (deterministic; with labels, misclassified inputs get -1).
        With true labels ``y``, ``result.certified_accuracy(e, method=...)`` offers the split-budget joint
        certificate of spec 5d (the default, every threat model), and under the general model also ``"global"``
        (spec 5b), ``"island"`` and ``"rd"`` (Theorem 4). ``time_limit`` and ``node_limit`` bound the split
        certificate's branch and bound per poisoning size (values it leaves open stay sound, marked not exact).
        """
        return self.certify_sweep(X, y, [self.radius], threat_model=threat_model, time_limit=time_limit,
                                  node_limit=node_limit)[float(self.radius)]

    def certify_sweep(
        self,
        X: np.ndarray,
        y: np.ndarray | None,
        radii: Sequence[float],
        threat_model: str = "general",
        *,
        time_limit: float | None = None,
        node_limit: int | None = None,
    ) -> dict[float, CertificationResult]:
        """:meth:`certify` for many radii from one distance pass; returns ``{r: result}``."""
        X = self._check_X(X)
        y_index = self._test_labels(y, X.shape[0])
        threat_model = _certify._check_threat_model(threat_model)
        radii = check_radii(radii)
        all_votes = self.index_.radius_votes(X, radii, len(self.classes_))
        return self._results_from_votes(all_votes, radii, y_index, threat_model,
                                        {"time_limit": time_limit, "node_limit": node_limit})

    def _results_from_votes(self, all_votes: np.ndarray, radii: np.ndarray, y_index: np.ndarray | None,
                            threat_model: str, options: dict[str, Any]) -> dict[float, CertificationResult]:
        results = {}
        for radius, votes in zip(radii.tolist(), all_votes, strict=True):
            sizes = _certify.certified_poisoning_size(votes, threat_model)
            result = self._result(votes, y_index, sizes, threat_model, {"r": radius}, options)
            result.metadata["n_no_neighbour"] = int(np.count_nonzero(votes.sum(axis=1) == 0))
            results[float(radius)] = result
        return results


def certify_neighbours(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray | None,
    *,
    knn: Sequence[int] = (),
    rnn: Sequence[float] = (),
    threat_model: str = "general",
    max_e: int | None = None,
    time_limit: float | None = None,
    node_limit: int | None = None,
    neighbour_cache: str | os.PathLike[str] | None = None,
    **estimator_params: Any,
) -> tuple[dict[int, CertificationResult], dict[float, CertificationResult]]:
    """kNN for every k in ``knn`` and rNN for every radius in ``rnn`` from **one** neighbour index and one pass.

    One content-hash ranking of the training set, and each test chunk's distances computed once for the kNN
    selection (out to ``max(k) + max_e``) and the radius counts alike. ``estimator_params`` (metric, backend,
    max_memory_mb, progress) go to both estimators. Results equal those of the separate estimators.
    ``neighbour_cache``: a cache folder in which that pass's tables are kept and reused
    (:meth:`~poisoncert.neighbours.NeighbourIndex.cached_search`); None (default) searches every time. Each
    result's metadata says which (``neighbour_tables_from_cache``).
    """
    if not knn and not rnn:
        raise ValueError("give at least one k (knn) or one radius (rnn)")
    base = KNeighborsCertifier(n_neighbors=max(knn), **estimator_params) if knn else None
    radius = RadiusNeighborsCertifier(radius=float(max(rnn)), **estimator_params) if rnn else None
    fitted = (base or radius).fit(X_train, y_train)
    if base is not None and radius is not None:
        radius._adopt(base)
    X = fitted._check_X(X_test)
    y_index = fitted._test_labels(y_test, X.shape[0])
    threat_model = _certify._check_threat_model(threat_model)
    options = {"time_limit": time_limit, "node_limit": node_limit}
    width, radii = None, None
    if base is not None:
        _, _, ks, _, max_e = base._sweep_arguments(X, y_test, knn, threat_model, max_e)
        width = base._table_width(ks, max_e, y_index)
    if radius is not None:
        radii = check_radii(rnn)
    if neighbour_cache is None:
        labels, votes = fitted.index_.search(X, n_neighbors=width, radii=radii, n_classes=len(fitted.classes_))
        from_cache = False
    else:
        labels, votes, from_cache = fitted.index_.cached_search(X, n_neighbors=width, radii=radii,
                                                                n_classes=len(fitted.classes_),
                                                                cache_dir=neighbour_cache)
    knn_results = base._results_from_labels(X, labels, y_index, ks, threat_model, max_e, options) if base else {}
    rnn_results = radius._results_from_votes(votes, radii, y_index, threat_model, options) if radius else {}
    for result in [*knn_results.values(), *rnn_results.values()]:
        result.metadata["neighbour_tables_from_cache"] = from_cache
    return knn_results, rnn_results
