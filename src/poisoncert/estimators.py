"""Scikit-learn estimators for certified kNN and rNN.

``fit`` stores the training set and builds the neighbour index; ``vote_counts``, ``predict`` and ``score``
behave like scikit-learn's neighbour classifiers (with poisoncert's deterministic tie rules); ``certify``
returns a :class:`~poisoncert.results.CertificationResult` whose guarantees hold against data poisoning. The
work is done by :mod:`poisoncert._classifiers`; these classes add scikit-learn's estimator protocol
(``get_params``, ``clone``, ``score``, fitted checks).
"""

from __future__ import annotations

from sklearn.base import BaseEstimator, ClassifierMixin

from ._classifiers import KNeighborsCertifier, RadiusNeighborsCertifier, certify_neighbours

__all__ = ["CertifiedKNeighborsClassifier", "CertifiedRadiusNeighborsClassifier", "certify_neighbours"]


class CertifiedKNeighborsClassifier(ClassifierMixin, BaseEstimator, KNeighborsCertifier):
    """k-nearest-neighbour classifier with certified robustness against data poisoning.

    The prediction of a test input is the majority label of its ``n_neighbors`` nearest training examples
    (distance ascending, ties between training examples by a SHA-256 content rank, ties between labels to the
    larger label). ``certify`` proves, deterministically, how many poisoned training examples (removed, added or
    modified; spec section 1) each prediction survives, and a joint certificate for the whole test set.

    Parameters
    ----------
    n_neighbors : int, default=5
        k; must not exceed the number of training examples.
    metric : {"l1", "l2", "cosine"}, default="l1"
    backend : {"auto", "numba", "torch", "dask"}, default="auto"
        Distance engine; "auto" uses PyTorch on a CUDA GPU when available, else Numba. "dask" shards the training
        set over the active dask.distributed client (:mod:`poisoncert.distributed`); ``X`` may then also be a
        ``.npy`` path or memory map, or a zarr array, which the workers read. Results are identical.
    max_memory_mb : int, default=512
        Bound on the memory of one chunk of the distance computation.
    progress : bool, default=False
        Show a progress bar over test chunks.

    Examples
    --------
    >>> import numpy as np
    >>> from poisoncert import CertifiedKNeighborsClassifier
    >>> X = np.array([[0.0], [0.1], [0.2], [1.0], [1.1]])
    >>> clf = CertifiedKNeighborsClassifier(n_neighbors=3).fit(X, ["a", "a", "a", "b", "b"])
    >>> clf.predict([[0.05], [1.05]]).tolist()  # 1.05: its three nearest are 1.1 (b), 1.0 (b), 0.2 (a)
    ['a', 'b']
    >>> clf.certify([[0.05]], ["a"]).certified_size.tolist()
    [1]
    """


class CertifiedRadiusNeighborsClassifier(ClassifierMixin, BaseEstimator, RadiusNeighborsCertifier):
    """Radius-nearest-neighbour classifier with certified robustness against data poisoning.

    The prediction of a test input is the majority label of all training examples within distance ``radius``
    (ties to the larger label). An input with no neighbour has all votes zero and predicts the **largest
    label** by the tie rule (spec section 3); certification reports how many inputs had none
    (``metadata["n_no_neighbour"]``). ``certify`` proves individual certificates for every threat model, and
    joint certificates (Theorem 4 with RD/ISLAND grouping, and the global certificate of spec 5b, the default).

    Parameters
    ----------
    radius : float, default=1.0
        r > 0.
    metric : {"l1", "l2", "cosine"}, default="l1"
    backend : {"auto", "numba", "torch", "dask"}, default="auto"
        As for :class:`CertifiedKNeighborsClassifier`.
    max_memory_mb : int, default=512
    progress : bool, default=False

    Examples
    --------
    >>> import numpy as np
    >>> from poisoncert import CertifiedRadiusNeighborsClassifier
    >>> X = np.array([[0.0], [0.1], [0.2], [1.0]])
    >>> clf = CertifiedRadiusNeighborsClassifier(radius=0.5).fit(X, [0, 0, 0, 1])
    >>> clf.vote_counts([[0.1], [5.0]]).tolist()
    [[3, 0], [0, 0]]
    """
