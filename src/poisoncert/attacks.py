"""Attacks: concrete poisoned training sets, verified by refitting, that bound certified accuracy from above.

Every certificate in poisoncert is a lower bound of CA(e). A *verified attack* (spec section 8) is a training set
``D*`` within poisoning size ``e``, materialised as removed rows of the clean set plus added examples (features and
labels), together with the accuracy of the **same classifier refitted on D* from scratch** (same engine, metric,
content-hash ranks of the added examples, label rule). Nothing in that number is estimated, so

    certified lower bound  <=  CA(e)  <=  verified attack accuracy

and the width of the band says how much certification work is left. Two kinds of attacks:

* :func:`witness` / :func:`witnesses`: for one test input and one threat model, a poisoned set of size
  ``certified_size + 1`` that flips its prediction, wherever the individual certificate is exact (spec section 4;
  the documented corners get ``None`` and a reason).
* :func:`attack`: for a budget ``e``, one poisoned set that lowers the accuracy of the whole test set. It searches
  on exact votes: each test input's poisoned votes (for kNN also its window in the clean neighbour order, so that
  an added example pushes out the real last neighbour and a removal pulls in the real next one) are updated as
  additions and removals are chosen. The first strategy ("cover") puts the whole addition budget at one site
  that reaches many inputs (moved by coordinate ascent on the number its copies misclassify) and chooses the
  removals per label as a threshold cover: a correctly classified input flips once a known number of its
  neighbours of its predicted label are gone, and removals of examples that many such inputs share reach those
  numbers together; a knapsack splits the removals over labels, and site, label split and removals are refined
  in turn. Older strategies (shared sites and removals by a lazy greedy, followed by rounds that drop actions no
  flipped input needed and spend the budget again) run in the time left. The result is always verified by
  refitting (:func:`verify`).

This module consumes the fitted estimators and their neighbour engine; it never imports the certificates'
internals, and nothing in :mod:`poisoncert.certify` imports it.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np

from . import __version__
from ._io import atomic_write, example_digests, label_codes, write_json
from ._validation import check_features
from .votes import predict, rival_counts

__all__ = [
    "PoisonedSet",
    "VerifiedAttack",
    "attack",
    "poisoning_size",
    "verify",
    "witness",
    "witnesses",
]

THREAT_MODELS = ("general", "insertion", "deletion", "label-flip")


# --------------------------------------------------------------------------------------------------------------
# Poisoned training sets
# --------------------------------------------------------------------------------------------------------------


def _codes(values: np.ndarray, classes: np.ndarray) -> np.ndarray:
    positions = np.clip(np.searchsorted(classes, values), 0, len(classes) - 1)
    return label_codes(classes)[positions]


def poisoning_size(X_train: np.ndarray, y_train: np.ndarray, removed: np.ndarray, added_X: np.ndarray,
                   added_y: np.ndarray) -> int:
    """``max(|D*|, |D|) - |D* ∩ D|`` (multiset intersection; spec section 1) of ``D* = D - removed + added``.

    Examples are compared by content (features and label value), so adding back a copy of a removed example
    costs nothing, and a modification (remove + add) costs one.
    """
    X_train = np.asarray(X_train)
    classes = np.unique(np.concatenate([np.asarray(y_train), np.asarray(added_y)]))
    removed = np.asarray(removed, dtype=np.int64)
    clean = example_digests(X_train, _codes(np.asarray(y_train), classes))
    added = example_digests(np.asarray(added_X, dtype=np.float64).reshape(-1, X_train.shape[1]),
                            _codes(np.asarray(added_y), classes))
    keep = np.ones(len(X_train), dtype=bool)
    keep[removed] = False
    digests = np.concatenate([clean, clean[keep], added]).view("V32").ravel()
    origin = np.r_[np.zeros(len(clean), np.int8), np.ones(int(keep.sum()) + len(added), np.int8)]
    _, inverse = np.unique(digests, return_inverse=True)
    inverse = inverse.ravel()
    in_clean = np.bincount(inverse[origin == 0], minlength=inverse.max() + 1)
    in_poisoned = np.bincount(inverse[origin == 1], minlength=inverse.max() + 1)
    common = int(np.minimum(in_clean, in_poisoned).sum())
    return max(int(in_poisoned.sum()), len(X_train)) - common


@dataclass
class PoisonedSet:
    """A poisoned training set ``D* = D - removed + added``, described against the clean set ``D``.

    Attributes
    ----------
    removed : ndarray of int64
        Row indices (into the clean training set as loaded) of the removed examples, each at most once.
    added_X : ndarray of shape (m, n_features), float32
    added_y : ndarray of shape (m,)
        Labels of the added examples, as in the training set (values, not indices).
    e : int
        The budget the set was made for; its poisoning size never exceeds it.
    threat_model : str
    strategy : str
        How it was found.
    """

    removed: np.ndarray
    added_X: np.ndarray
    added_y: np.ndarray
    e: int
    threat_model: str = "general"
    strategy: str = ""

    def training_set(self, X_train: np.ndarray, y_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(X*, y*)``: the clean set without the removed rows, then the added examples."""
        X_train, y_train = np.asarray(X_train), np.asarray(y_train)
        keep = np.ones(len(X_train), dtype=bool)
        keep[self.removed] = False
        added_X = np.asarray(self.added_X, dtype=X_train.dtype).reshape(-1, X_train.shape[1])
        added_y = np.asarray(self.added_y).astype(y_train.dtype, copy=False)
        return np.concatenate([X_train[keep], added_X]), np.concatenate([y_train[keep], added_y])

    def poisoning_size(self, X_train: np.ndarray, y_train: np.ndarray) -> int:
        return poisoning_size(X_train, y_train, self.removed, self.added_X, self.added_y)

    def check(self, X_train: np.ndarray, y_train: np.ndarray) -> None:
        """Refuse a set that does not fit the clean training set, its threat model or its budget."""
        X_train, y_train = np.asarray(X_train), np.asarray(y_train)
        removed = np.asarray(self.removed)
        if removed.ndim != 1 or (removed.size and removed.dtype.kind not in "iu"):
            raise ValueError(f"removed must be a 1-D array of row indices, got {removed.dtype} {removed.shape}")
        if removed.size and (removed.min() < 0 or removed.max() >= len(X_train)):
            bad = removed[(removed < 0) | (removed >= len(X_train))][0]
            raise ValueError(f"removed holds row {bad}, outside the training set's rows 0..{len(X_train) - 1}")
        if len(np.unique(removed)) != len(removed):
            raise ValueError("removed lists a row more than once")
        added_X = np.asarray(self.added_X)
        if added_X.ndim != 2 or added_X.shape[1] != X_train.shape[1]:
            raise ValueError(f"added_X must have shape (m, {X_train.shape[1]}), got {added_X.shape}")
        if added_X.size and not np.all(np.isfinite(added_X)):
            raise ValueError("added_X contains NaN or infinite values")
        added_y = np.asarray(self.added_y)
        if added_y.shape != (len(added_X),):
            raise ValueError(f"added_y must hold one label per added example ({len(added_X)}), got {added_y.shape}")
        unknown = np.setdiff1d(added_y, y_train)
        if unknown.size:
            raise ValueError(f"added_y holds label {unknown[0]!r}, which the training set does not have")
        if self.threat_model not in THREAT_MODELS:
            raise ValueError(f"unknown threat model {self.threat_model!r}")
        if self.threat_model == "insertion" and removed.size:
            raise ValueError("an insertion-only poisoned set removes nothing")
        if self.threat_model == "deletion" and len(added_X):
            raise ValueError("a deletion-only poisoned set adds nothing")
        if self.threat_model == "label-flip":
            if len(added_X) != len(removed) or not np.array_equal(
                    np.asarray(added_X, dtype=np.float64), np.asarray(X_train[removed], dtype=np.float64)):
                raise ValueError("a label-flip poisoned set re-adds exactly the removed rows' features")
        size = self.poisoning_size(X_train, y_train)
        if size > self.e:
            raise ValueError(f"the poisoned set has poisoning size {size} (spec section 1), over its budget "
                             f"e = {self.e}")

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Write ``removed``, ``added_X`` (float32), ``added_y`` and ``e`` to an ``.npz``, atomically."""
        added_y = np.asarray(self.added_y)
        with atomic_write(path, "wb") as handle:
            np.savez(handle, removed=np.asarray(self.removed, dtype=np.int64),
                     added_X=np.asarray(self.added_X, dtype=np.float32), added_y=added_y,
                     e=np.int64(self.e), threat_model=np.str_(self.threat_model),
                     strategy=np.str_(self.strategy))
        if metadata is not None:
            write_json(Path(path).with_suffix(".json"), metadata)

    @classmethod
    def load(cls, path: str | Path, X_train: np.ndarray, y_train: np.ndarray) -> PoisonedSet:
        """Read a set written by :meth:`save` and :meth:`check` it against the clean training set."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"poisoned set file not found: {path}")
        with np.load(path, allow_pickle=False) as archive:
            missing = {"removed", "added_X", "added_y", "e"} - set(archive.files)
            if missing:
                raise ValueError(f"{path} lacks the arrays {sorted(missing)}")
            poisoned = cls(removed=archive["removed"], added_X=archive["added_X"], added_y=archive["added_y"],
                           e=int(archive["e"]),
                           threat_model=str(archive["threat_model"]) if "threat_model" in archive.files
                           else "general",
                           strategy=str(archive["strategy"]) if "strategy" in archive.files else "")
        poisoned.check(X_train, y_train)
        return poisoned


# --------------------------------------------------------------------------------------------------------------
# Verification by refitting
# --------------------------------------------------------------------------------------------------------------


@dataclass
class VerifiedAttack:
    """A poisoned set and the accuracy of the classifier refitted on it: an upper bound of CA(e), not estimated.

    Attributes
    ----------
    poisoned : PoisonedSet
    accuracy : float
        Fraction of the test set the refitted classifier classifies correctly.
    n_correct, n_test : int
    poisoning_size : int
        Spec section 1's size of the set (<= ``poisoned.e``).
    predictions : ndarray
        The refitted classifier's predictions (label values).
    classifier : str
    seconds : float
        Search and verification time.
    search_accuracy : float or None
        What the search's own vote bookkeeping predicted (before refitting), for diagnostics.
    """

    poisoned: PoisonedSet
    accuracy: float
    n_correct: int
    n_test: int
    poisoning_size: int
    predictions: np.ndarray
    classifier: str
    seconds: float = 0.0
    search_accuracy: float | None = None
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """JSON-ready description: budget, threat model, verified accuracy, run time, strategy, versions."""
        import platform

        return {
            "kind": "verified attack (spec section 8): the classifier refitted on the poisoned set",
            "classifier": self.classifier,
            "e": int(self.poisoned.e),
            "threat_model": self.poisoned.threat_model,
            "poisoning_size": int(self.poisoning_size),
            "removed": int(len(self.poisoned.removed)),
            "added": int(len(self.poisoned.added_X)),
            "verified_accuracy": float(self.accuracy),
            "n_correct": int(self.n_correct),
            "n_test": int(self.n_test),
            "search_accuracy": self.search_accuracy,
            "strategy": self.poisoned.strategy,
            "run_time_s": round(float(self.seconds), 3),
            "notes": list(self.notes),
            "poisoncert_version": __version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        }


def _refit(estimator: Any, X: np.ndarray, y: np.ndarray) -> Any:
    """The same classifier (same parameters, engine and metric) fitted from scratch on ``(X, y)``."""
    from sklearn.base import clone

    model = clone(estimator)
    if hasattr(model, "n_neighbors") and model.n_neighbors > len(X):
        # kNN on fewer than k examples votes with all of them (spec section 3): that is k = |D*|.
        model.set_params(n_neighbors=len(X))
    return model.fit(X, y)


def verify(estimator: Any, X_train: np.ndarray, y_train: np.ndarray, poisoned: PoisonedSet, X_test: np.ndarray,
           y_test: np.ndarray, *, seconds: float = 0.0, search_accuracy: float | None = None) -> VerifiedAttack:
    """Refit ``estimator``'s classifier on the poisoned training set and measure its test accuracy.

    ``poisoned`` is checked first (indices, labels, threat model, and its poisoning size against its budget), so
    a reported number is always that of a valid poisoned set within budget.
    """
    start = time.perf_counter()
    poisoned.check(X_train, y_train)
    X_star, y_star = poisoned.training_set(X_train, y_train)
    model = _refit(estimator, X_star, y_star)
    predictions = model.predict(X_test)
    correct = int(np.count_nonzero(predictions == np.asarray(y_test)))
    label = getattr(model, "_method", type(model).__name__)
    params = f"k={estimator.n_neighbors}" if hasattr(estimator, "n_neighbors") else f"r={estimator.radius:g}"
    return VerifiedAttack(
        poisoned=poisoned, accuracy=correct / len(predictions), n_correct=correct, n_test=len(predictions),
        poisoning_size=poisoned.poisoning_size(X_train, y_train), predictions=predictions,
        classifier=f"{'kNN' if label == 'knn' else 'rNN'} ({params})",
        seconds=seconds + time.perf_counter() - start, search_accuracy=search_accuracy,
    )


# --------------------------------------------------------------------------------------------------------------
# Witnesses of the individual certificates
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Witness:
    """A poisoned set that flips one test input with ``certified_size + 1`` poisoned examples, or why none
    exists for this threat model (``poisoned`` is None and ``reason`` says which corner)."""

    index: int
    threat_model: str
    certified_size: int
    poisoned: PoisonedSet | None
    reason: str = ""


def _votes_rule(votes: np.ndarray) -> tuple[int, int, int]:
    """Prediction a, runner-up b and margin ``s_a - s_b + [a > b]`` of one vote vector (ties to larger)."""
    c = len(votes)
    a = c - 1 - int(np.argmax(votes[::-1]))
    masked = votes.astype(np.int64).copy()
    masked[a] = -(1 << 60)
    b = c - 1 - int(np.argmax(masked[::-1]))
    return a, b, int(votes[a] - votes[b] + (a > b))


def witness(estimator: Any, X_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, threat_model: str = "general",
            index: int = 0) -> Witness:
    """The attack behind the exact individual certificate of one test input ``x`` (spec section 4).

    With the certified size ``e*`` of ``x``'s prediction under ``threat_model``, returns a poisoned set of size
    ``e* + 1`` built the way the certificate's exactness argument says: remove neighbours of the predicted label
    ``a`` and/or add examples of the flipping label at ``x`` itself (distance 0), or relabel ``a``-neighbours.
    For the corners where no attack of that kind can flip ``x`` (rNN deletion-only when ``x`` predicts the
    largest label with no neighbour of another label; rNN label-flip without neighbours) ``poisoned`` is None.
    Check a witness with :func:`flips`.
    """
    from .certify import certified_poisoning_size, knn_certified_poisoning_size, knn_deletion_scan

    x = check_features(np.asarray(x).reshape(1, -1), "x", n_features=estimator.n_features_in_)
    classes = estimator.classes_
    X_train = np.asarray(X_train)
    c = len(classes)
    if hasattr(estimator, "n_neighbors"):
        k = int(estimator.n_neighbors)
        n = estimator.n_train_
        if threat_model == "deletion":
            width = min(n, 2 * k)
            while True:
                indices, _ = estimator.index_.ordered_neighbors(x, width)
                labels = estimator._y_index[indices]
                sizes, decided = knn_deletion_scan(
                    labels, predict(np.bincount(labels[0, :k], minlength=c)[None, :]), k, c, n)
                if decided[0] or width == n:
                    break
                width = min(n, 2 * width)
            size = int(sizes[0])
        else:
            indices, _ = estimator.index_.ordered_neighbors(x, min(n, k))
            labels = estimator._y_index[indices]
            size = int(knn_certified_poisoning_size(labels, k, c, threat_model, n_train=n)[0])
        votes = np.bincount(labels[0, :k], minlength=c)
        a, b, margin = _votes_rule(votes)
        return _knn_witness(estimator, X_train, x, indices[0], labels[0], a, b, margin, size, k, threat_model,
                            index)
    indptr, members = estimator.index_.radius_neighbors(x, float(estimator.radius))
    member_labels = estimator._y_index[members]
    votes = np.bincount(member_labels, minlength=c)
    a, b, margin = _votes_rule(votes)
    size = int(certified_poisoning_size(votes[None, :], threat_model)[0])
    m = size + 1
    own = members[member_labels == a]
    point = x.astype(X_train.dtype)
    if threat_model == "general":
        removed = own[: min(m, len(own))]
        return Witness(index, threat_model, size, PoisonedSet(removed, np.repeat(point, m, 0),
                                                              np.repeat(classes[b], m), m, threat_model,
                                                              "witness: remove a-neighbours, add runner-up at x"))
    if threat_model == "insertion":
        return Witness(index, threat_model, size, PoisonedSet(np.zeros(0, np.int64), np.repeat(point, m, 0),
                                                              np.repeat(classes[b], m), m, threat_model,
                                                              "witness: add runner-up at x"))
    if threat_model == "deletion":
        if len(own) < m:
            return Witness(index, threat_model, size, None,
                           "corner: the input predicts the largest label and has no neighbour of another label; "
                           "no deletion can flip it")
        return Witness(index, threat_model, size, PoisonedSet(own[:m], np.zeros((0, X_train.shape[1])),
                                                              classes[:0], m, threat_model,
                                                              "witness: delete a-neighbours"))
    if len(own) < m:
        return Witness(index, threat_model, size, None,
                       "corner: the input has too few neighbours of its label to relabel (no neighbour at all)")
    flipped = own[:m]
    return Witness(index, threat_model, size, PoisonedSet(flipped, X_train[flipped], np.repeat(classes[b], m), m,
                                                          threat_model, "witness: relabel a-neighbours to b"))


def _knn_witness(estimator: Any, X_train: np.ndarray, x: np.ndarray, order: np.ndarray, labels: np.ndarray, a: int,
                 b: int, margin: int, size: int, k: int, threat_model: str, index: int) -> Witness:
    classes = estimator.classes_
    m = size + 1
    point = x.astype(X_train.dtype)
    window = labels[:k]
    if threat_model in ("general", "label-flip"):
        own = order[:k][window == a][:m]  # a-neighbours from the front of the window
        if threat_model == "general":
            poisoned = PoisonedSet(own, np.repeat(point, m, 0), np.repeat(classes[b], m), m, threat_model,
                                   "witness: remove front a-neighbours, add runner-up at x (distance 0)")
        else:
            poisoned = PoisonedSet(own, X_train[own], np.repeat(classes[b], len(own)), m, threat_model,
                                   "witness: relabel front a-neighbours to the runner-up")
        return Witness(index, threat_model, size, poisoned)
    c = len(classes)
    if threat_model == "insertion":
        # q = e* + 1 added examples of label l at x push out the last q neighbours (spec section 4).
        counts = np.zeros(c, np.int64)
        np.add.at(counts, window[: k - m], 1)
        rival = np.argmax(np.where(np.arange(c) == a, -(1 << 60), counts + m + (np.arange(c) > a)))
        return Witness(index, threat_model, size, PoisonedSet(np.zeros(0, np.int64), np.repeat(point, m, 0),
                                                              np.repeat(classes[rival], m), m, threat_model,
                                                              "witness: add the flipping label at x"))
    # Deletion-only: j = e* + 1 deletions, label a first, then labels other than the flipping one.
    n = len(order)
    span = min(k + m, n)
    counts = np.bincount(labels[:span], minlength=c)
    rival = int(np.argmax(np.where(np.arange(c) == a, -(1 << 60), counts + (np.arange(c) > a))))
    deletable = np.flatnonzero(labels[:span] == a)[:m]
    if len(deletable) < m:
        others = np.flatnonzero((labels[:span] != a) & (labels[:span] != rival))
        deletable = np.r_[deletable, others[: m - len(deletable)]]
    if len(deletable) < m:
        return Witness(index, threat_model, size, None,
                       "corner: no deletion set of this size flips the input (every training example carries the "
                       "predicted label)")
    return Witness(index, threat_model, size, PoisonedSet(order[deletable], np.zeros((0, X_train.shape[1])),
                                                          classes[:0], m, threat_model,
                                                          "witness: delete a-neighbours first, then non-rivals"))


def witnesses(estimator: Any, X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray,
              threat_model: str = "general", indices: np.ndarray | None = None) -> list[Witness]:
    """:func:`witness` for every test input (or those in ``indices``)."""
    X_test = np.asarray(X_test)
    rows = range(len(X_test)) if indices is None else np.asarray(indices).tolist()
    return [witness(estimator, X_train, y_train, X_test[i], threat_model, index=int(i)) for i in rows]


def flips(estimator: Any, X_train: np.ndarray, y_train: np.ndarray, poisoned: PoisonedSet, x: np.ndarray) -> bool:
    """Whether the classifier refitted on the poisoned set predicts ``x`` differently from the clean one."""
    poisoned.check(X_train, y_train)
    X_star, y_star = poisoned.training_set(X_train, y_train)
    x = np.asarray(x).reshape(1, -1)
    return bool(_refit(estimator, X_star, y_star).predict(x)[0] != estimator.predict(x)[0])


# --------------------------------------------------------------------------------------------------------------
# The budgeted joint attack
# --------------------------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def _margin(votes, a):  # pragma: no cover - compiled
    """``s_a - max_{l != a}(s_l + [l > a]) + 1``: votes that must move before ``a`` loses (<= 0: it has lost)."""
    rival = -(1 << 40)
    for lab in range(votes.shape[0]):
        if lab != a:
            value = votes[lab] + (1 if lab > a else 0)
            if value > rival:
                rival = value
    return votes[a] - rival + 1


@numba.njit(cache=True)
def _prediction(votes):  # pragma: no cover - compiled
    best = 0
    for lab in range(votes.shape[0]):
        if votes[lab] >= votes[best]:
            best = lab
    return best


@numba.njit(cache=True)
def _score(votes, y, a, cap):  # pragma: no cover - compiled
    """The search's potential of one input (``a``: its clean prediction).

    An input the clean classifier gets right scores 1 when flipped and ``(cap - margin) / (cap + 1)`` while its
    margin is within ``cap`` (the budget left), 0 beyond: linear, so every unit that brings a reachable input
    closer to flipping counts the same, and a unit that protects one costs the same. An input the clean
    classifier gets wrong scores 1 while still wrong and 0 once made correct.
    """
    if a != y:
        return 1.0 if _prediction(votes) != y else 0.0
    if _prediction(votes) != y:
        return 1.0
    margin = max(_margin(votes, a), 0)
    if margin > cap:
        return 0.0
    return (cap - margin) / (cap + 1.0)


@numba.njit(cache=True)
def _simulate(kind, action, apply, votes, end, removed_flags, y, a, labels, indices, act_ptr, act_inputs,
              act_pos, act_label, act_train, scratch, cap=1 << 40, weight=None):  # pragma: no cover - compiled
    """Gain in the potential of one action (and, when ``apply``, carry it out).

    ``kind`` 0: rNN additions/removals change the votes of the inputs they reach by one. ``kind`` 1: kNN, each
    input's window is the clean order up to ``end[i]`` minus the removed examples; an added example entering it
    pushes out the window's last survivor, a removal inside it pulls in the next survivor. ``act_label[action]``
    is the label added (-1 for a removal), ``act_train[action]`` the removed training example (-1 for an
    addition; both set for a label flip, which keeps the example's place). ``weight[i]`` scales input ``i``'s
    change in the potential (None: all 1).
    """
    gain = 0.0
    label = act_label[action]
    train = act_train[action]
    for j in range(act_ptr[action], act_ptr[action + 1]):
        i = act_inputs[j]
        before = _score(votes[i], y[i], a[i], cap)
        for lab in range(votes.shape[1]):
            scratch[lab] = votes[i, lab]
        new_end = end[i]
        if kind == 0:
            if train >= 0:
                scratch[act_pos[j]] -= 1  # rNN: act_pos holds the removed example's label index
            if label >= 0:
                scratch[label] += 1
        else:
            position = act_pos[j]
            if train >= 0 and label >= 0:  # label flip: the example keeps its place in the window
                if position < new_end:
                    scratch[labels[i, position]] -= 1
                    scratch[label] += 1
            elif train >= 0:  # removal: inside the window, the next survivor comes in
                if position < new_end:
                    scratch[labels[i, position]] -= 1
                    q = new_end
                    while q < labels.shape[1] and removed_flags[indices[i, q]]:
                        q += 1
                    if q < labels.shape[1]:
                        scratch[labels[i, q]] += 1
                        new_end = q + 1
            else:  # addition inside the window: the last survivor goes out
                scratch[label] += 1
                q = new_end - 1
                while q >= 0 and removed_flags[indices[i, q]]:
                    q -= 1
                if q >= 0:
                    scratch[labels[i, q]] -= 1
                    new_end = q
        delta = _score(scratch, y[i], a[i], cap) - before
        gain += delta if weight is None else weight[i] * delta
        if apply:
            for lab in range(votes.shape[1]):
                votes[i, lab] = scratch[lab]
            end[i] = new_end
    if apply and train >= 0:
        removed_flags[train] = True
    return gain


@numba.njit(cache=True)
def _copies_needed(kind, votes, end, removed_flags, y, a, labels, indices, rows, label, limit, out):
    """Copies of ``label`` at a site reaching each listed input that flip it, ``limit + 1`` beyond ``limit``.

    Exact on the current state: rNN adds one vote per copy; kNN adds one and pushes the window's last survivor
    out, copy by copy. Inputs already misclassified, or predicting ``label``, get ``limit + 1``.
    """  # pragma: no cover - compiled
    c = votes.shape[1]
    scratch = np.empty(c, np.int64)
    for j in range(rows.shape[0]):
        i = rows[j]
        out[j] = limit + 1
        if a[i] == label or _prediction(votes[i]) != y[i]:
            continue
        if kind == 0:
            need = votes[i, a[i]] - votes[i, label] + (1 if a[i] > label else 0)
            if need <= limit:
                out[j] = max(need, 1)
            continue
        for lab in range(c):
            scratch[lab] = votes[i, lab]
        q = end[i] - 1
        for m in range(1, limit + 1):
            scratch[label] += 1
            while q >= 0 and removed_flags[indices[i, q]]:
                q -= 1
            if q >= 0:
                scratch[labels[i, q]] -= 1
                q -= 1
            if _prediction(scratch) != a[i]:
                out[j] = m
                break


@numba.njit(cache=True)
def _wrong_after(kind, votes, end, removed_flags, y, a, labels, indices, rows, label, copies):
    """How many listed inputs are misclassified after ``copies`` copies of ``label`` at a site reaching them."""
    c = votes.shape[1]
    scratch = np.empty(c, np.int64)
    wrong = 0
    for j in range(rows.shape[0]):
        i = rows[j]
        for lab in range(c):
            scratch[lab] = votes[i, lab]
        scratch[label] += copies
        if kind == 1:  # each copy pushes the window's last survivor out
            q = end[i] - 1
            for _ in range(copies):
                while q >= 0 and removed_flags[indices[i, q]]:
                    q -= 1
                if q < 0:
                    break
                scratch[labels[i, q]] -= 1
                q -= 1
        if _prediction(scratch) != y[i]:
            wrong += 1
    return wrong


def _all_in_candidates(context, state, fixed, candidates, budget, top):
    """The ``top`` addition actions whose ``budget`` copies at one site misclassify the most inputs (exact)."""
    kind, y, a, labels, indices, ptr, act_inputs, act_pos, act_label, act_train = context
    votes, end, flags = _replay(*_replay_args(context, state), fixed)
    n = len(y)
    rival_margin = votes[np.arange(n), a][:, None] - votes + (a[:, None] > np.arange(votes.shape[1])[None, :])
    correct = predict(votes) == y
    # A cheap proxy first (reached correct inputs within the budget's margin; a kNN copy moves it by 1 or 2),
    # then the exact count for the best few.
    proxy = np.empty(len(candidates), np.int64)
    for j, action in enumerate(candidates.tolist()):
        rows = act_inputs[ptr[action]:ptr[action + 1]]
        rows = rows[correct[rows]]
        proxy[j] = np.count_nonzero(rival_margin[rows, act_label[action]] <= (2 if kind else 1) * budget)
    shortlist = candidates[np.argsort(-proxy, kind="stable")[: 4 * top]]
    exact = []
    for action in shortlist.tolist():
        rows = act_inputs[ptr[action]:ptr[action + 1]]
        before = np.count_nonzero(~correct[rows])
        after = _wrong_after(kind, votes, end, flags, y, a, labels, indices, rows, int(act_label[action]), budget)
        exact.append((after - before, action))
    exact.sort(key=lambda item: (-item[0], item[1]))
    return [action for gain, action in exact[:top] if gain > 0]


def _label_split_removals(context, state, additions, candidates, budget, focus, correct, removed_label,
                          start_time, time_budget, steps: int = 20) -> list[int]:
    """Removals split over labels by a knapsack (spec 5d/5e's attacker splits its budget the same way).

    Per label ``l``, a greedy order of the removals of ``l``-examples for the focused targets predicting ``l``;
    the misclassified inputs after each prefix of ``budget * j / steps`` removals give a value table, and a
    knapsack over the labels picks the prefixes. Unlike one greedy over all labels, this sees that a class's
    targets flip only once enough of their shared neighbours are gone.
    """
    kind, y, a, labels, indices, ptr, act_inputs, act_pos, act_label, act_train = context
    n_labels = int(a.max()) + 1 if len(a) else 0
    n_labels = max(n_labels, int(removed_label.max()) + 1 if len(removed_label) else 0)
    orders: dict[int, list[int]] = {}
    value = np.zeros((n_labels, steps + 1), np.int64)
    # Removing examples of a label that is being added near the same targets takes back the votes the
    # additions give: on MNIST rNN (e = 1000) the knapsack spent 35 % of its budget on them for no net flip.
    added = {int(act_label[x]) for x in additions if act_label[x] >= 0 and act_train[x] < 0}
    for lab in range(n_labels):
        if _over(start_time, time_budget):
            break
        aimed = focus & correct & (a == lab)
        pool = candidates[removed_label[candidates] == lab]
        if lab in added or not aimed.any() or not len(pool):
            continue
        order = _greedy_phase(context, state, additions, pool, budget, budget, start_time, time_budget,
                              aimed.astype(np.float64))
        orders[lab] = order
        votes, end, flags = _replay(*_replay_args(context, state), additions)
        scratch = np.zeros(votes.shape[1], np.int64)
        rows = np.flatnonzero(aimed)
        done = 0
        for j in range(steps + 1):
            upto = min(len(order), budget * j // steps)
            for action in order[done:upto]:
                _simulate(kind, action, True, votes, end, flags, y, a, labels, indices, ptr, act_inputs, act_pos,
                          act_label, act_train, scratch)
            done = upto
            value[lab, j] = np.count_nonzero(predict(votes[rows]) != y[rows])
    # Knapsack over labels in units of budget / steps.
    chosen: list[int] = []
    for lab, j in enumerate(_knapsack(value).tolist()):
        if j and lab in orders:
            chosen.extend(orders[lab][: budget * j // steps])
    return chosen


def _split_at_site(context, state, fixed, site_actions: dict[int, int], budget: int, steps: int = 12) -> list[int]:
    """Copies per label at one site, summing to ``budget``, that misclassify the most inputs it reaches.

    The copies each reached input needs of each label (:func:`_copies_needed`, exact given ``fixed``) are
    computed once; splits of the budget over the three most useful labels are tried on a grid.
    """
    kind, y, a, labels, indices, ptr, act_inputs, act_pos, act_label, act_train = context
    votes, end, flags = _replay(*_replay_args(context, state), fixed)
    actions = list(site_actions.values())
    rows = act_inputs[ptr[actions[0]]:ptr[actions[0] + 1]]  # every label's action at a site reaches the same rows
    need = np.empty((len(actions), len(rows)), np.int64)
    for j, action in enumerate(actions):
        _copies_needed(kind, votes, end, flags, y, a, labels, indices, rows, int(act_label[action]), budget, need[j])
    top = np.argsort(-(need <= budget).sum(axis=1), kind="stable")[:3]
    best, best_copies = -1, None
    for i in range(steps + 1):
        for j in range(steps + 1 - i):
            shares = np.array([i, j, steps - i - j])[: len(top)]
            if shares.sum() != steps:
                continue
            copies = budget * shares // steps
            copies[0] += budget - copies.sum()
            covered = int(np.count_nonzero(np.any(need[top] <= copies[:, None], axis=0)))
            if covered > best:
                best, best_copies = covered, copies
    return [actions[t] for t, n_copies in zip(top.tolist(), best_copies.tolist(), strict=True)
            for _ in range(n_copies)]


def _site_medians(X: np.ndarray, groups: list[np.ndarray], per_group: int, rng: np.random.Generator,
                  min_size: int = 8) -> np.ndarray:
    """L1 medians of up to ``per_group`` clusters (of at least ``min_size`` members) of each group of target
    inputs, by a few k-medians rounds."""
    sites = []
    for members in groups:
        if len(members) < 2:
            continue
        n_clusters = max(1, min(per_group, len(members) // min_size))
        centres = X[rng.choice(members, n_clusters, replace=False)].astype(np.float64)
        for _ in range(4):
            distance = np.abs(X[members, None, :] - centres[None, :, :]).sum(axis=2)
            assign = np.argmin(distance, axis=1)
            for j in range(n_clusters):
                chosen = members[assign == j]
                if len(chosen):
                    centres[j] = np.median(X[chosen], axis=0)
        sites.append(centres)
    return np.concatenate(sites) if sites else np.zeros((0, X.shape[1]))


@numba.njit(cache=True)
def _counting_order(keys, n_keys):  # pragma: no cover - compiled
    """The stable sorting permutation of integer ``keys`` in ``0..n_keys-1`` (a counting sort, O(n))."""
    counts = np.zeros(n_keys + 1, np.int64)
    for key in keys:
        counts[key + 1] += 1
    for j in range(n_keys):
        counts[j + 1] += counts[j]
    order = np.empty(len(keys), np.int64)
    for i in range(len(keys)):
        order[counts[keys[i]]] = i
        counts[keys[i]] += 1
    return order


@dataclass
class _Actions:
    """Candidate actions as CSR lists of the test inputs each one touches."""

    label: list[int] = field(default_factory=list)
    train: list[int] = field(default_factory=list)
    inputs: list[np.ndarray] = field(default_factory=list)
    pos: list[np.ndarray] = field(default_factory=list)
    site: list[int] = field(default_factory=list)

    def add(self, label: int, train: int, inputs: np.ndarray, pos: np.ndarray, site: int = -1) -> None:
        if len(inputs):
            self.label.append(label)
            self.train.append(train)
            self.inputs.append(inputs.astype(np.int64))
            self.pos.append(pos.astype(np.int64))
            self.site.append(site)

    def copy(self) -> _Actions:
        return _Actions(list(self.label), list(self.train), list(self.inputs), list(self.pos), list(self.site))

    def arrays(self) -> tuple[np.ndarray, ...]:
        lengths = np.array([len(v) for v in self.inputs], dtype=np.int64)
        ptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
        def cat(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, np.int64)

        return (ptr, cat(self.inputs), cat(self.pos), np.array(self.label, np.int64),
                np.array(self.train, np.int64), np.array(self.site, np.int64))


@dataclass
class AttackPreparation:
    """What the attacks at every budget up to ``e_max`` share: the clean neighbour state, the removal candidates
    and the addition sites (see :func:`prepare_attack`)."""

    X_test: np.ndarray
    y_index: np.ndarray
    state: dict[str, Any]
    a: np.ndarray
    removals: _Actions
    sites: np.ndarray
    e_max: int
    threat_model: str
    central: np.ndarray  # the sites that are medians of clusters of all targets (reach the most inputs)


def prepare_attack(estimator: Any, X_test: np.ndarray, y_test: np.ndarray, e_max: int,
                   threat_model: str = "general", *, seed: int = 0) -> AttackPreparation:
    """The neighbour state and candidate moves that :func:`attack` needs, for every budget ``e <= e_max``."""
    if threat_model not in THREAT_MODELS:
        raise ValueError(f"unknown threat model {threat_model!r}; choose one of {', '.join(THREAT_MODELS)}")
    X_test = check_features(X_test, "X_test", n_features=estimator.n_features_in_)
    y_index = _encode(estimator.classes_, y_test)
    knn = hasattr(estimator, "n_neighbors")
    state = _knn_state(estimator, X_test, e_max) if knn else _rnn_state(estimator, X_test)
    a = predict(state["votes"])
    targets = np.flatnonzero(a == y_index)
    c = len(estimator.classes_)
    removals = _Actions()
    if threat_model != "insertion":
        # Removals (and label flips): training examples of a target's label in many targets' neighbourhoods.
        _removal_actions(state, a, targets, e_max, threat_model == "label-flip", c, removals)
    sites = np.zeros((0, X_test.shape[1]), dtype=X_test.dtype)
    n_central = 0
    if threat_model in ("general", "insertion"):
        sites, n_central = _addition_sites(X_test, a, targets, c, np.random.default_rng(seed))
    return AttackPreparation(X_test, y_index, state, a, removals, sites, int(e_max), threat_model,
                             sites[len(sites) - n_central:])


def attack(
    estimator: Any,
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    e: int,
    threat_model: str = "general",
    *,
    seed: int = 0,
    time_budget: float | None = 180.0,
    progress: bool = False,
    guide: dict[str, Any] | None = None,
    rounds: int = 3,
    top_sites: int = 3,
    strategies: tuple[str, ...] = ("cover", "concentrated", "spread"),
    prepared: AttackPreparation | None = None,
) -> VerifiedAttack:
    """One poisoned training set of poisoning size ``<= e`` that lowers the test accuracy, verified by refitting.

    Parameters
    ----------
    estimator : fitted CertifiedKNeighborsClassifier or CertifiedRadiusNeighborsClassifier
        Fitted on ``(X_train, y_train)``; the refit uses its parameters, engine and metric.
    X_train, y_train, X_test, y_test : arrays
        The clean training set as loaded (removed rows index it) and the labelled test set.
    e : int
        Budget: at most ``e`` removals and ``e`` additions (general), ``e`` additions (insertion), ``e`` removals
        (deletion) or ``e`` relabelled examples (label-flip).
    threat_model : {"general", "insertion", "deletion", "label-flip"}
    seed : int
        Seeds the site clustering; the attack is deterministic for a given seed.
    time_budget : float or None
        Seconds for the search (verification comes on top); the best set found by then is verified.
    guide : dict, optional
        ``{"additions": [...], "removals": [...]}`` per label index, e.g. the split certificate's worst-case
        label-level attack (:meth:`CertificationResult.split_attack`): additions beyond a label's share are
        discouraged. Without it every label may take the whole budget.
    rounds : int
        Drop-and-refill rounds after the greedy pass.
    top_sites : int
        How many of the best single (site, label) pairs the concentrated strategy tries.
    strategies : tuple of {"cover", "concentrated", "spread"}
        "cover" (first; kNN only for e < k): the whole addition budget at one central site, split over
        labels, with removals chosen per label as a threshold cover (every target needs a known number of its
        neighbours of its label removed: rNN's counts, kNN's spec 5e window) and split over labels by a
        knapsack, the site (coordinate ascent on the count it misclassifies), the split and the removals
        refined in turn; "concentrated": the whole addition budget at one site, removals for the inputs it
        reaches; "spread": a lazy greedy over many sites and labels alternating with removals. The best set
        found by the search's votes is kept; strategies after "cover" only run while the time budget lasts.
    prepared : AttackPreparation, optional
        From :func:`prepare_attack` for this estimator and test set, to share the neighbour state and the
        candidates between several budgets (the CLI does this).

    Returns
    -------
    VerifiedAttack
        Its ``accuracy`` is an upper bound of CA(e): a poisoned set that achieves it exists and was checked.
    """
    if threat_model not in THREAT_MODELS:
        raise ValueError(f"unknown threat model {threat_model!r}; choose one of {', '.join(THREAT_MODELS)}")
    if isinstance(e, bool) or not isinstance(e, int | np.integer) or e < 0:
        raise ValueError(f"e must be a poisoning size >= 0, got {e!r}")
    start_time = time.perf_counter()
    e = int(e)
    X_train = np.asarray(X_train)
    if prepared is None:
        prepared = prepare_attack(estimator, X_test, y_test, e, threat_model, seed=seed)
    elif prepared.e_max < e or prepared.threat_model != threat_model:
        raise ValueError(f"the preparation is for e <= {prepared.e_max} under {prepared.threat_model!r}, not "
                         f"e = {e} under {threat_model!r}")
    X_test, y_index, state, a = prepared.X_test, prepared.y_index, prepared.state, prepared.a
    labels, indices = state["labels"], state["indices"]
    correct = a == y_index
    targets = np.flatnonzero(correct)
    add_budget = 0 if threat_model == "deletion" else e
    remove_budget = 0 if threat_model == "insertion" else e
    flip = threat_model == "label-flip"
    knn = hasattr(estimator, "n_neighbors")
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=4, desc=f"attack e={e} ({threat_model})", unit="step")
    else:
        bar = None
    unknown = set(strategies) - {"cover", "concentrated", "spread"}
    if unknown or not strategies:
        raise ValueError(f"strategies must name 'cover', 'concentrated' and/or 'spread', got {strategies!r}")
    c = len(estimator.classes_)
    # 0. Cover (rNN): one site, covering removals split over labels, refined in turn on exact votes.
    cover = None
    # kNN with k <= e: more copies than k cannot all count, which the cover's window does not model.
    if "cover" in strategies and not flip and (not knn or e < int(estimator.n_neighbors)):
        cover = _cover_attack(estimator, prepared, X_train.dtype, e, add_budget, remove_budget, start_time,
                              time_budget)
    legacy = {"concentrated", "spread"} & set(strategies)
    if cover is not None and (not legacy or _over(start_time, time_budget)):
        legacy = set()
    elif cover is None and not legacy:
        legacy = {"spread"}  # kNN and label flips have no cover strategy: the greedy search always runs
    actions = prepared.removals.copy()
    # Additions: shared sites near many targets; their reach follows the classifier's own distances (for kNN
    # it depends on e, so it is found per budget).
    sites = prepared.sites
    if add_budget and not flip and legacy:
        _addition_actions(estimator, state, X_test, a, targets, c, sites, actions, e)
    if bar:
        bar.update(1)
    ptr, act_inputs, act_pos, act_label, act_train, act_site = actions.arrays()
    kind = 1 if knn else 0
    share = None
    if guide is not None and "additions" in guide:
        share = np.maximum(np.asarray(guide["additions"], dtype=np.int64), 0)
    context = (kind, y_index, a, labels, indices, ptr, act_inputs, act_pos, act_label, act_train)
    is_addition = (act_label >= 0) & (act_train < 0)
    chosen, best_wrong = [], -1 if cover is None else cover[0]
    n_test = len(y_index)
    # Removals (and flips) are chosen for the targets the additions reach ("focus", weight 1); the harm a move
    # does to other inputs weighs `harm`. A few settings are tried and the best set by exact votes is kept.
    # 1. Concentrated: the whole addition budget at the one (site, label) that misclassifies the most inputs,
    #    removals chosen for the inputs it reaches, then the site re-chosen given the removals.
    if add_budget and not flip and "concentrated" in legacy:
        additions_at = np.flatnonzero(is_addition)
        by_site: dict[int, dict[int, int]] = {}
        for action in additions_at.tolist():
            by_site.setdefault(int(act_site[action]), {})[int(act_label[action])] = action
        removed_label = np.where(act_train >= 0, state["train_labels"][np.maximum(act_train, 0)], -1)
        pool = [*_all_in_candidates(context, state, [], additions_at, add_budget, top_sites),
                *_all_in_candidates(context, state, [], additions_at, add_budget + remove_budget, top_sites)]
        for action in dict.fromkeys(pool):
            site = int(act_site[action])
            focus = np.zeros(n_test, dtype=bool)
            focus[act_inputs[ptr[action]:ptr[action + 1]]] = True
            additions = [action] * add_budget
            for _ in range(3):
                if _over(start_time, time_budget) and best_wrong >= 0:
                    break
                removals = []
                if remove_budget:
                    split_removals = _label_split_removals(
                        context, state, additions, np.flatnonzero(~is_addition), remove_budget, focus, correct,
                        removed_label, start_time, time_budget)
                    removals = _greedy_phase(context, state, additions, np.flatnonzero(~is_addition), remove_budget,
                                             remove_budget, start_time, time_budget,
                                             np.where(focus & correct, 1.0, 0.3))
                    if (_misclassified_after(context, state, additions + split_removals)
                            > _misclassified_after(context, state, additions + removals)):
                        removals = split_removals
                # Given the removals, the addition budget split over the site's labels (targets predicting the
                # site's first label need another one).
                split = _split_at_site(context, state, removals, by_site[site], add_budget)
                for trial in (additions, split):
                    candidate = trial + removals
                    wrong = _misclassified_after(context, state, candidate)
                    if wrong > best_wrong:
                        chosen, best_wrong = candidate, wrong
                if not remove_budget or sorted(split) == sorted(additions):
                    break
                additions = split
                if time_budget is not None and time.perf_counter() - start_time > time_budget / 2:
                    break
            if time_budget is not None and time.perf_counter() - start_time > time_budget / 2:
                break
    # 2. Spread: lazy greedy over many sites and labels, alternating with removals.
    for harm in (1.0, 0.3, 0.0) if "spread" in legacy or (flip or not add_budget) and legacy else ():
        additions: list[int] = []
        removals: list[int] = []
        for round_ in range(max(1, rounds)):
            if _over(start_time, time_budget) and best_wrong >= 0:
                break
            if flip:
                weight = np.where(correct, 1.0, harm)
                candidate = _greedy_phase(context, state, [], np.flatnonzero(~is_addition), e, e, start_time,
                                          time_budget, weight)
            else:
                if add_budget:  # additions given the current removals
                    # First round: plan as if the removal budget will back every target (then realise it).
                    additions = _plan_additions(context, state, removals, np.flatnonzero(is_addition), add_budget,
                                                share, start_time, time_budget,
                                                credit=remove_budget if round_ == 0 else 0)
                if remove_budget:  # removals given the current additions
                    focus = np.zeros(n_test, dtype=bool)
                    for action in set(additions):
                        focus[act_inputs[ptr[action]:ptr[action + 1]]] = True
                    if not additions:
                        focus = correct.copy()
                    weight = np.where(focus & correct, 1.0, harm)
                    removals = _greedy_phase(context, state, additions, np.flatnonzero(~is_addition), remove_budget,
                                             remove_budget, start_time, time_budget, weight)
                candidate = additions + removals
            wrong = _misclassified_after(context, state, candidate)
            if wrong > best_wrong:
                chosen, best_wrong = candidate, wrong
            if flip or time_budget is not None and time.perf_counter() - start_time > time_budget:
                break
        if not remove_budget and not flip:
            break  # insertion-only: the weights play no part
    if bar:
        bar.update(2)
    found = []  # (poisoned set, its search accuracy)
    if cover is not None:
        wrong, removed, added_X, added_y = cover
        found.append((PoisonedSet(removed, added_X, estimator.classes_[added_y], e, threat_model,
                                  "one central site split over labels, removals by a per-label cover and a "
                                  f"knapsack (alternating refinement on {'kNN window' if knn else 'exact rNN'} "
                                  "votes)"), 1 - wrong / n_test))
    if chosen or cover is None:
        final_votes, _, _ = _replay(*_replay_args(context, state), chosen)
        found.append((_materialise(chosen, act_label, act_train, act_site, sites, X_train, estimator.classes_, e,
                                   threat_model, knn), float(np.mean(predict(final_votes) == y_index))))
    if len(found) > 1 and not knn:
        found = found[1:]  # rNN votes are exact: the other strategy's set misclassifies more
    # kNN windows are modelled differently by the two searches (the refit decides near each input's k-th
    # neighbour), so both sets are refitted and the lower verified accuracy is kept.
    results = [verify(estimator, X_train, y_train, poisoned, X_test, y_test, search_accuracy=search_accuracy)
               for poisoned, search_accuracy in found]
    result = min(results, key=lambda item: item.accuracy)
    result.seconds = time.perf_counter() - start_time
    if bar:
        bar.update(1)
        bar.close()
    return result


# --------------------------------------------------------------------------------------------------------------
# The cover strategy: one central site, covering removals split over labels, alternating refinement
# --------------------------------------------------------------------------------------------------------------
#
# rNN votes are plain counts, so a poisoned set's effect is additive: copies of label l at a site add one vote
# of l to every test input within r of it, and a removed example takes one vote of its label from every test
# input within r of it. A correctly classified input i with prediction a flips once its removed a-neighbours
# reach need_i = min over l != a of (s_a + adds_a - s_l - adds_l + [a > l]). For the removals this is a
# threshold cover per label (choose examples of label a so that as many a-targets as possible get need_i of
# their neighbours removed); the labels share one budget, which a knapsack splits. kNN is the same with spec
# 5e's window: need_i counts removals among i's first k - copies clean entries, each of which pulls in the next.


@numba.njit(cache=True)
def _cover_greedy(tptr, tlist, inv_ptr, inv, need, budget, n_cand):  # pragma: no cover - compiled
    """Candidates to remove (a mask) for one label's threshold cover within ``budget`` removals.

    Target ``j`` (neighbour candidates ``tlist[tptr[j]:tptr[j + 1]]``) flips once ``need[j]`` of them are
    removed. Each step removes the candidate shared by the most *open* targets: those that still need removals
    but no more than the budget left. Closing the targets out of reach as the budget runs down is what makes
    this better than ranking by shared neighbours alone: the removals concentrate on targets that can still be
    completed.
    """
    n_targets = len(tptr) - 1
    left_need = need.copy()
    is_open = np.zeros(n_targets, np.bool_)
    degree = np.zeros(n_cand, np.int64)
    for j in range(n_targets):
        if 0 < need[j] <= budget:
            is_open[j] = True
            for q in range(tptr[j], tptr[j + 1]):
                degree[tlist[q]] += 1
    chosen = np.zeros(n_cand, np.bool_)
    left = budget
    while left > 0:
        best, best_degree = -1, 0
        for t in range(n_cand):
            if not chosen[t] and degree[t] > best_degree:
                best, best_degree = t, degree[t]
        if best < 0:
            break
        chosen[best] = True
        left -= 1
        for q in range(inv_ptr[best], inv_ptr[best + 1]):
            left_need[inv[q]] -= 1
        for j in range(n_targets):
            if is_open[j] and (left_need[j] <= 0 or left_need[j] > left):
                is_open[j] = False
                for q in range(tptr[j], tptr[j + 1]):
                    degree[tlist[q]] -= 1
    return chosen


@numba.njit(cache=True)
def _covered(tptr, tlist, chosen, need):  # pragma: no cover - compiled
    """How many targets have at least ``need`` of their candidates in ``chosen``."""
    count = 0
    for j in range(len(tptr) - 1):
        removed = 0
        for q in range(tptr[j], tptr[j + 1]):
            removed += chosen[tlist[q]]
        if removed >= need[j]:
            count += 1
    return count


@numba.njit(cache=True)
def _removed_votes(indptr, members, train_labels, removed, c):  # pragma: no cover - compiled
    """Votes each test input loses (per label) when the training examples flagged in ``removed`` go."""
    out = np.zeros((len(indptr) - 1, c), np.int64)
    for i in range(len(indptr) - 1):
        for q in range(indptr[i], indptr[i + 1]):
            t = members[q]
            if removed[t]:
                out[i, train_labels[t]] += 1
    return out


@dataclass
class _CoverGroup:
    """One label's threshold-cover instance: its correctly classified targets and their neighbours of the label
    (as positions into ``candidates``, the training rows), in both directions."""

    label: int
    targets: np.ndarray
    candidates: np.ndarray
    tptr: np.ndarray
    tlist: np.ndarray
    inv_ptr: np.ndarray
    inv: np.ndarray


def _cover_groups(state: dict[str, Any], a: np.ndarray, correct: np.ndarray, c: int) -> list[_CoverGroup]:
    """Per label, the neighbours of that label of every correctly classified input predicting it."""
    rows, members, train_labels = state["rows"], state["members"], state["train_labels"]
    own = correct[rows] & (train_labels[members] == a[rows])
    rows, members = rows[own], members[own]
    groups = []
    for lab in range(c):
        pick = a[rows] == lab
        target_rows, neighbours = rows[pick], members[pick]  # rows ascending: one contiguous list per target
        targets, counts = np.unique(target_rows, return_counts=True)
        candidates, local = np.unique(neighbours, return_inverse=True)
        local = local.ravel().astype(np.int64)
        tptr = np.r_[0, np.cumsum(counts)].astype(np.int64)
        owner = np.repeat(np.arange(len(targets), dtype=np.int64), counts)
        order = _counting_order(local, len(candidates))
        inv_ptr = np.r_[0, np.cumsum(np.bincount(local, minlength=len(candidates)))].astype(np.int64)
        groups.append(_CoverGroup(lab, targets, candidates, tptr, local, inv_ptr, owner[order]))
    return groups


def _removal_need(votes: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Removals of label ``a`` each input needs to lose its prediction ``a`` (0: already lost).

    ``a`` holds while ``s_a >= rival`` (:func:`poisoncert.votes.rival_counts`; fitted models have >= 2 labels).
    """
    return np.maximum(votes[np.arange(len(votes)), a] - rival_counts(votes, a) + 1, 0)


def _knapsack(value: np.ndarray) -> np.ndarray:
    """Steps per label (rows of ``value``: gain after 0..steps steps) maximising the total within ``steps``."""
    n_labels, width = value.shape
    steps = width - 1
    best = np.full(width, -1, np.int64)
    best[0] = 0
    pick = np.zeros((n_labels, width), np.int64)
    for lab in range(n_labels):
        new = best.copy()
        for used in range(width):
            if best[used] < 0:
                continue
            for j in range(1, steps + 1 - used):
                if best[used] + value[lab, j] - value[lab, 0] > new[used + j]:
                    new[used + j] = best[used] + value[lab, j] - value[lab, 0]
                    pick[lab, used + j] = j
        pick[lab] = np.where(new > best, pick[lab], 0)  # 0: this label takes nothing at that capacity
        best = new
    used = int(np.argmax(best))
    share = np.zeros(n_labels, np.int64)
    for lab in range(n_labels - 1, -1, -1):
        share[lab] = pick[lab, used]
        used -= share[lab]
    return share


def _cover_removals(groups: list[_CoverGroup], need: np.ndarray, budget: int, forbid: set[int], steps: int,
                    start_time: float, time_budget: float | None) -> np.ndarray:
    """Training rows to remove: per label the cover greedy at ``budget * j / steps`` removals, split by a
    knapsack over the labels."""
    if budget <= 0:
        return np.zeros(0, np.int64)
    value = np.zeros((len(groups), steps + 1), np.int64)
    picks: dict[tuple[int, int], np.ndarray] = {}
    for g, group in enumerate(groups):
        if group.label in forbid or not len(group.targets):
            continue
        target_need = need[group.targets]
        value[g, 0] = np.count_nonzero(target_need <= 0)
        for j in range(1, steps + 1):
            if _over(start_time, time_budget):
                break
            chosen = _cover_greedy(group.tptr, group.tlist, group.inv_ptr, group.inv, target_need,
                                   budget * j // steps, len(group.candidates))
            value[g, j] = _covered(group.tptr, group.tlist, chosen, target_need)
            picks[g, j] = group.candidates[chosen]
            if not chosen.any() or j > 1 and value[g, j] == value[g, j - 1] == value[g, 0]:
                break  # nothing within reach
        value[g] = np.maximum.accumulate(value[g])
    share = _knapsack(value)
    rows = []
    for g, j in enumerate(share.tolist()):
        # The best prefix that is at most j steps (value was made non-decreasing).
        while j > 0 and (g, j) not in picks:
            j -= 1
        if j:
            while j > 1 and value[g, j - 1] == value[g, j] and (g, j - 1) in picks:
                j -= 1
            rows.append(picks[g, j])
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int64)


@numba.njit(cache=True)
def _window_votes(labels, indices, removed, inside, k, c):  # pragma: no cover - compiled
    """kNN votes of the clean survivors: per input the first ``k - inside[i]`` examples of its clean order that
    are not removed (``inside[i]`` added examples sit in its top k)."""
    n, width = labels.shape
    out = np.zeros((n, c), np.int64)
    for i in range(n):
        take = k - inside[i]
        q = 0
        got = 0
        while got < take and q < width:
            if not removed[indices[i, q]]:
                out[i, labels[i, q]] += 1
                got += 1
            q += 1
    return out


@numba.njit(cache=True)
def _knn_removal_need(labels, a, correct, inside, reached, alpha, k, e):  # pragma: no cover - compiled
    """Removals of label ``a`` inside its window that flip each correctly classified kNN input (``e + 1``: none
    within ``e``), given ``inside[i]`` added examples in its top k (``alpha`` per label where ``reached``).

    Spec 5e's count: removing rho examples of label a from the first p = k - inside + rho clean entries leaves
    ``A(p) - rho`` votes for a and ``C_l(p)`` for every other label l (the window pulls in the next entries).
    """
    n, width = labels.shape
    c = len(alpha)
    out = np.full(n, e + 1, np.int64)
    counts = np.zeros(c, np.int64)
    for i in range(n):
        if not correct[i]:
            continue
        counts[:] = 0
        span = k - inside[i]
        for q in range(min(span, width)):
            counts[labels[i, q]] += 1
        for rho in range(e + 1):
            if rho > 0 and span + rho - 1 < width:
                counts[labels[i, span + rho - 1]] += 1
            own = counts[a[i]] - rho + (alpha[a[i]] if reached[i] else 0)
            flipped = False
            for lab in range(c):
                if lab != a[i] and counts[lab] + (alpha[lab] if reached[i] else 0) - own >= (1 if a[i] > lab else 0):
                    flipped = True
                    break
            if flipped:
                out[i] = rho
                break
    return out


@numba.njit(cache=True)
def _knn_cover_lists(labels, indices, local, targets, inside, k, lab):  # pragma: no cover - compiled
    """Per target, its examples of label ``lab`` that stay inside its top k whatever is removed (the first
    ``k - inside`` clean entries), as positions ``local`` among that label's training rows."""
    width = labels.shape[1]
    tptr = np.zeros(len(targets) + 1, np.int64)
    for j in range(len(targets)):
        i = targets[j]
        count = 0
        for q in range(min(k - inside[i], width)):
            if labels[i, q] == lab:
                count += 1
        tptr[j + 1] = tptr[j] + count
    tlist = np.empty(tptr[-1], np.int64)
    for j in range(len(targets)):
        i = targets[j]
        at = tptr[j]
        for q in range(min(k - inside[i], width)):
            if labels[i, q] == lab:
                tlist[at] = local[indices[i, q]]
                at += 1
    return tptr, tlist


class _CoverSearch:
    """Vote bookkeeping for the covering attack: exact for rNN (counts are additive), the spec 5e window for
    kNN (copies closer than an input's (k - e)-th clean neighbour push out its last survivors, removals pull in
    the next ones; the refit decides near the boundary)."""

    def __init__(self, estimator: Any, prepared: AttackPreparation, dtype: np.dtype, e: int):
        from .neighbours import NeighbourIndex

        self.state, self.a, self.y = prepared.state, prepared.a, prepared.y_index
        self.correct = self.a == self.y
        self.X_test = prepared.X_test
        # Sites are written in the training set's dtype, so their reach is measured from the rounded point.
        self.dtype = dtype
        self.knn = hasattr(estimator, "n_neighbors")
        self.metric = estimator.index_.metric
        self.c = len(estimator.classes_)
        self.e = e
        if self.knn:
            self.k = int(estimator.n_neighbors)
            self.radii = _knn_inner(self.state, e)
            train_labels = self.state["train_labels"]
            self.local = np.zeros(len(train_labels), np.int64)
            for lab in range(self.c):  # each training row's position among the rows of its label
                rows = np.flatnonzero(train_labels == lab)
                self.local[rows] = np.arange(len(rows))
            self.label_rows = [np.flatnonzero(train_labels == lab) for lab in range(self.c)]
        else:
            self.radii = np.full(len(self.y), float(estimator.radius))
            if "cover_groups" not in self.state:
                self.state["cover_groups"] = _cover_groups(self.state, self.a, self.correct, self.c)
        self.probe = NeighbourIndex(self.X_test, np.zeros(len(self.X_test), np.int64),
                                    metric=estimator.index_.metric, backend="numba")
        self.clean_gain: dict[tuple[int, ...], np.ndarray] = {}

    def reach(self, site: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Test inputs the site reaches (rNN: within r; kNN: strictly closer than the (k - e)-th clean
        neighbour), by the engine's own distances; ``scale`` widens the reach."""
        if self.knn:
            return self.probe.within(site[None, :], self.radii * scale)[1]
        return self.probe.radius_neighbors(site[None, :], self.radii[0] * scale)[1]

    def window(self, removed: np.ndarray, inside: np.ndarray | int) -> np.ndarray:
        """Votes of the clean survivors of every input, ``inside`` added examples sitting in each kNN top k."""
        flags = np.zeros(self.state["n_train"], np.bool_)
        flags[removed] = True
        if self.knn:
            inside = np.broadcast_to(np.asarray(inside, np.int64), self.y.shape).copy()
            return _window_votes(self.state["labels"], self.state["indices"], flags, inside, self.k, self.c)
        return self.state["votes"] - _removed_votes(self.state["indptr"], self.state["members"],
                                                    self.state["train_labels"], flags, self.c)

    def wrong(self, votes: np.ndarray, rows: np.ndarray | None = None) -> int:
        """Misclassified inputs among ``rows`` (default all), given their votes."""
        return int(np.count_nonzero(predict(votes) != (self.y if rows is None else self.y[rows])))

    def evaluate(self, ball: np.ndarray, alpha: np.ndarray, removed: np.ndarray) -> int:
        """Misclassified inputs after ``alpha`` copies at a site reaching ``ball`` and the removals."""
        inside = np.zeros(len(self.y), np.int64)
        inside[ball] = alpha.sum()
        votes = self.window(removed, inside)
        votes[ball] += alpha[None, :]
        return self.wrong(votes)

    def removal_need(self, ball: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        if self.knn:
            inside = np.zeros(len(self.y), np.int64)
            inside[ball] = alpha.sum()
            reached = np.zeros(len(self.y), np.bool_)
            reached[ball] = True
            return _knn_removal_need(self.state["labels"], self.a, self.correct, inside, reached, alpha, self.k,
                                     self.e)
        added = np.zeros_like(self.state["votes"])
        added[ball] += alpha[None, :]
        return _removal_need(self.state["votes"] + added, self.a)

    def groups(self, ball: np.ndarray, alpha: np.ndarray, need: np.ndarray, budget: int) -> list[_CoverGroup]:
        """The per-label cover instances (kNN: of the targets within reach of the budget, for this site)."""
        if not self.knn:
            return self.state["cover_groups"]
        inside = np.zeros(len(self.y), np.int64)
        inside[ball] = alpha.sum()
        groups = []
        for lab in range(self.c):
            targets = np.flatnonzero(self.correct & (self.a == lab) & (need <= budget))
            tptr, tlist = _knn_cover_lists(self.state["labels"], self.state["indices"], self.local, targets,
                                           inside, self.k, lab)
            n_cand = len(self.label_rows[lab])
            order = _counting_order(tlist, n_cand)
            owner = np.repeat(np.arange(len(targets), dtype=np.int64), np.diff(tptr))
            inv_ptr = np.r_[0, np.cumsum(np.bincount(tlist, minlength=n_cand))].astype(np.int64)
            groups.append(_CoverGroup(lab, targets, self.label_rows[lab], tptr, tlist, inv_ptr, owner[order]))
        return groups

    def gain(self, removed: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """+1 for an input the copies would misclassify if they reached it (given the removals), -1 for one
        they would make correct, 0 otherwise."""
        before = predict(self.window(removed, 0)) == self.y
        after = predict(self.window(removed, int(alpha.sum())) + alpha[None, :]) == self.y
        return (before & ~after).astype(np.int64) - (~before & after)

    def best_single_label(self, ball: np.ndarray, copies: int) -> tuple[np.ndarray, int]:
        """All ``copies`` on the one label that misclassifies the most more inputs of ``ball``, and how many."""
        best, best_gain = np.zeros(self.c, np.int64), -1
        for lab in range(self.c):
            alpha = np.zeros(self.c, np.int64)
            alpha[lab] = copies
            gain = int(self.gain_for(alpha)[ball].sum())
            if gain > best_gain:
                best, best_gain = alpha, gain
        return best, best_gain

    def gain_for(self, alpha: np.ndarray) -> np.ndarray:
        """:meth:`gain` without removals, computed once per split (every start site reuses it)."""
        key = tuple(alpha.tolist())
        if key not in self.clean_gain:
            self.clean_gain[key] = self.gain(np.zeros(0, np.int64), alpha)
        return self.clean_gain[key]

    def refine_split(self, removed: np.ndarray, ball: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """Moves of copies between labels (coarse to fine) while they misclassify more inputs of ``ball``."""
        alpha = alpha.copy()
        total = int(alpha.sum())
        base = self.window(removed, total)[ball]  # the copies' number is fixed, so is the window
        current = self.wrong(base + alpha[None, :], ball)
        for delta in sorted({max(total // d, 1) for d in (4, 10, 20, 50)}, reverse=True):
            improved = True
            while improved:
                improved = False
                for source in range(self.c):
                    for sink in range(self.c):
                        if sink == source or alpha[source] < delta:
                            continue
                        trial = alpha.copy()
                        trial[source] -= delta
                        trial[sink] += delta
                        wrong = self.wrong(base + trial[None, :], ball)
                        if wrong > current:
                            alpha, current, improved = trial, wrong, True
        return alpha

    def ascend(self, site: np.ndarray, gain: np.ndarray, sweeps: int = 4) -> np.ndarray:
        """Coordinate ascent of the site on the count of inputs its copies misclassify (l1 only).

        With the other coordinates fixed, input i stays within its reach while coordinate k lies in an interval
        around ``x_ik`` whose half-width is what its distance leaves over; the best value of the coordinate is a
        deepest point of these intervals weighted by ``gain``, found by one sweep over the endpoints. Every move
        strictly raises the count; the new coordinate is the middle of the best segment, so rounding to the
        training set's dtype keeps it inside.
        """
        rows = np.flatnonzero(gain)
        if not len(rows):
            return site
        X, weight = self.X_test[rows].astype(np.float64), gain[rows].astype(np.float64)
        radius = self.radii[rows] * (1 - 1e-6)  # a margin for the engine's float32 sums (and kNN's strict <)
        point = site.astype(np.float64)
        distance = np.abs(X - point).sum(axis=1)
        current = float(weight[distance <= radius].sum())
        for _ in range(sweeps):
            moved = False
            for k in range(X.shape[1]):
                column = X[:, k]
                slack = radius - (distance - np.abs(point[k] - column))
                ok = slack >= 0
                if not ok.any():
                    continue
                starts, stops = column[ok] - slack[ok], column[ok] + slack[ok]
                positions = np.r_[starts, stops]
                order = np.lexsort((np.r_[np.zeros(len(starts)), np.ones(len(stops))], positions))
                depth = np.cumsum(np.r_[weight[ok], -weight[ok]][order])
                j = int(np.argmax(depth))
                if depth[j] <= current + 0.5 or j + 1 == len(depth):
                    continue
                value = 0.5 * (positions[order[j]] + positions[order[j + 1]])
                distance += np.abs(value - column) - np.abs(point[k] - column)
                point[k] = value
                current = float(weight[distance <= radius].sum())
                moved = True
            if not moved:
                break
        return point.astype(self.dtype)

    def recentre(self, site: np.ndarray, gain: np.ndarray, rounds: int = 4, pull: float = 1.125) -> np.ndarray:
        """Move the site to the coordinate-wise median of the inputs its copies would misclassify near it.

        The inputs considered are those within ``pull`` times the reach: a median of only the reached ones never
        moves towards the flippable inputs just outside. Keeps the best site by the count of ``gain``.
        """
        best_site, best_gain = site, int(gain[self.reach(site)].sum())
        for _ in range(rounds):
            near = self.reach(site, pull)
            near = near[gain[near] > 0]
            if not len(near):
                break
            site = np.median(self.X_test[near], axis=0).astype(self.dtype)
            value = int(gain[self.reach(site)].sum())
            if value > best_gain:
                best_site, best_gain = site, value
        return best_site


def _cover_attack(estimator: Any, prepared: AttackPreparation, dtype: np.dtype, e: int, add_budget: int,
                  remove_budget: int, start_time: float, time_budget: float | None, rounds: int = 6,
                  n_sites: int = 3, pulls: tuple[float, ...] = (1.25, 1.125, 1.5), steps: int = 20):
    """The covering attack: the whole addition budget at one site (split over labels), removals by a per-label
    threshold cover and a knapsack, the site, the split and the removals refined in turn, from several starts
    while the time budget lasts.

    Starts: the ``n_sites`` central sites (medians of clusters of all correctly classified inputs) whose reach
    the best single label misclassifies the most, each with every ``pull`` of :meth:`_CoverSearch.recentre`
    (local optima of the site differ by a few tenths of a point on MNIST; the starts are cheap next to them).
    Returns ``(wrong, removed rows, added_X, added_y)`` of the best poisoned set found (label indices), with
    ``wrong`` as the search counts it (exact for rNN).
    """
    search = _CoverSearch(estimator, prepared, dtype, e)
    c = search.c
    none = np.zeros(0, np.int64)
    no_site = np.zeros(prepared.X_test.shape[1], dtype)
    best = (search.evaluate(none, np.zeros(c, np.int64), none), none, no_site, np.zeros(c, np.int64))
    central = prepared.central.astype(dtype) if add_budget and len(prepared.central) else no_site[None, :]
    ranked = []
    for s, site in enumerate(central):
        ball = search.reach(site) if add_budget else none
        alpha, gain = search.best_single_label(ball, add_budget)
        ranked.append((-gain, s, alpha))
    ranked.sort(key=lambda item: (item[0], item[1]))
    starts = [(s, alpha, pull) for _, s, alpha in ranked[:n_sites] for pull in (pulls if add_budget else pulls[:1])]
    for s, alpha, pull in starts:
        if _over(start_time, time_budget):
            break
        site = central[s]
        removed = none
        previous = -1
        for _ in range(rounds):
            if _over(start_time, time_budget):
                break
            ball = none
            if add_budget:
                gain = search.gain(removed, alpha)
                site = search.recentre(site, gain, pull=pull)
                if search.metric == "l1":
                    site = search.ascend(site, gain)
                ball = search.reach(site)
            need = search.removal_need(ball, alpha)
            # Never remove examples of a label being added: that takes back the votes the copies give.
            removed = _cover_removals(search.groups(ball, alpha, need, remove_budget), need, remove_budget,
                                      set(np.flatnonzero(alpha).tolist()), steps, start_time, time_budget)
            wrong = search.evaluate(ball, alpha, removed)
            if wrong > best[0]:
                best = (wrong, removed, site, alpha.copy())
            if add_budget:
                alpha = search.refine_split(removed, ball, alpha)
                refined = search.evaluate(ball, alpha, removed)
                if refined > best[0]:
                    best = (refined, removed, site, alpha.copy())
            if wrong <= previous:
                break
            previous = wrong
    wrong, removed, site, alpha = best
    added_X = np.repeat(site[None, :], int(alpha.sum()), axis=0)
    added_y = np.repeat(np.arange(c), alpha)
    return wrong, removed, added_X, added_y

def _encode(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    from ._validation import encode_test_labels

    return encode_test_labels(classes, y, len(np.asarray(y)))


def _rnn_state(estimator: Any, X_test: np.ndarray) -> dict[str, Any]:
    indptr, members = estimator.index_.radius_neighbors(X_test, float(estimator.radius))
    c = len(estimator.classes_)
    member_labels = estimator._y_index[members]
    rows = np.repeat(np.arange(len(X_test)), np.diff(indptr))
    votes = np.zeros((len(X_test), c), np.int64)
    np.add.at(votes, (rows, member_labels), 1)
    return {"votes": votes, "end": np.zeros(len(X_test), np.int64), "labels": np.zeros((1, 1), np.int16),
            "indices": np.zeros((1, 1), np.int64), "indptr": indptr, "members": members, "rows": rows,
            "train_labels": estimator._y_index, "n_train": estimator.n_train_}


def _knn_state(estimator: Any, X_test: np.ndarray, e: int) -> dict[str, Any]:
    k = int(estimator.n_neighbors)
    n = estimator.n_train_
    width = min(n, k + e)
    indices = np.empty((len(X_test), width), np.int32)
    # The distances at positions max(k - e, 1) for every e <= e_max: an addition strictly closer than the
    # (k - e)-th clean neighbour stays in the top k whatever else the budget adds or removes (for k <= e,
    # strictly closer than the first; then at most k such additions count).
    top = min(k, n)
    first = max(top - e, 1) - 1
    near = np.empty((len(X_test), top - first), np.float64)
    for lo in range(0, len(X_test), 1024):  # chunks: the engine's int64 indices and distances stay small
        rows, distances = estimator.index_.ordered_neighbors(X_test[lo:lo + 1024], width)
        indices[lo:lo + len(rows)] = rows
        near[lo:lo + len(rows)] = distances[:, first:top]
    labels = estimator._y_index[indices].astype(np.int16 if len(estimator.classes_) < 32768 else np.int32)
    c = len(estimator.classes_)
    votes = np.zeros((len(X_test), c), np.int64)
    np.add.at(votes, (np.repeat(np.arange(len(X_test)), top), labels[:, :k].ravel()), 1)
    return {"votes": votes, "end": np.full(len(X_test), top, np.int64), "labels": labels,
            "indices": indices, "near": near, "near_first": first, "k": k, "n_train": n,
            "train_labels": estimator._y_index}


def _knn_inner(state: dict[str, Any], e: int) -> np.ndarray:
    """Per input, the clean distance an addition must beat to stay in the top k under budget ``e``."""
    top = int(state["end"][0]) if len(state["end"]) else 0
    column = max(top - e, 1) - 1 - state["near_first"]
    if column < 0:
        raise ValueError(f"the kNN state was prepared for a smaller budget than e = {e}")
    return np.ascontiguousarray(state["near"][:, column])


def _removal_actions(state: dict[str, Any], a: np.ndarray, targets: np.ndarray, budget: int, flip: bool, c: int,
                     actions: _Actions) -> None:
    """Candidate removals: training examples of a target's label shared by many targets' neighbourhoods."""
    if "members" in state:  # rNN: every training example within r of a target
        rows, members = state["rows"], state["members"]
        is_target = np.zeros(len(a), dtype=bool)
        is_target[targets] = True
        order = _counting_order(members, state["n_train"])
        rows, members = rows[order], members[order]
        uniq, starts = np.unique(members, return_index=True)
        stops = np.r_[starts[1:], len(members)]
        # Ranked by the targets of its own label it reaches; every test input it reaches is in its list.
        own = is_target[rows] & (a[rows] == state["train_labels"][members])
        counts = np.add.reduceat(own.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
        # The best candidates of every label (not overall: the densest class would crowd out the others).
        uniq_labels = state["train_labels"][uniq]
        best = np.concatenate([
            np.flatnonzero(uniq_labels == lab)[np.argsort(-counts[uniq_labels == lab], kind="stable")]
            [: max(4 * budget, 64)] for lab in range(c)])
        best = best[counts[best] > 0]
        for j in best.tolist():
            t = int(uniq[j])
            touched = rows[starts[j]:stops[j]]
            label_t = int(state["train_labels"][t])
            pos = np.full(len(touched), label_t)  # rNN: the removed example's label
            if flip:
                for lab in range(c):
                    if lab != label_t:
                        actions.add(lab, t, touched, pos)
            else:
                actions.add(-1, t, touched, pos)
        return
    # kNN: training examples inside the first k of many targets (their position in each target's order).
    labels, indices, k = state["labels"], state["indices"], state["k"]
    own = labels[targets, :k] == a[targets, None]
    candidates, counts = np.unique(indices[targets, :k][own], return_counts=True)
    train_labels = state["train_labels"][candidates]
    # The best candidates of every label (not overall: the densest class would crowd out the others).
    best = np.sort(np.concatenate([
        candidates[train_labels == lab][np.argsort(-counts[train_labels == lab], kind="stable")][: max(3 * budget, 64)]
        for lab in range(c)]))
    # Every test input whose window holds a candidate is in that candidate's list (with the position).
    rows_list, cols_list = [], []
    is_best = np.zeros(state["n_train"], dtype=bool)
    is_best[best] = True
    for lo in range(0, len(indices), 1024):
        block = indices[lo:lo + 1024, :k]
        hit = is_best[block]
        r, col = np.nonzero(hit)
        rows_list.append(r + lo)
        cols_list.append(col)
    rows, cols = np.concatenate(rows_list), np.concatenate(cols_list)
    train = indices[rows, cols]
    order = _counting_order(train, state["n_train"])
    rows, cols, train = rows[order], cols[order], train[order]
    uniq, starts = np.unique(train, return_index=True)
    stops = np.r_[starts[1:], len(train)]
    for t, lo, hi in zip(uniq.tolist(), starts.tolist(), stops.tolist(), strict=True):
        label_t = int(labels[rows[lo], cols[lo]])
        if flip:
            for lab in range(c):
                if lab != label_t:
                    actions.add(lab, t, rows[lo:hi], cols[lo:hi])
        else:
            actions.add(-1, t, rows[lo:hi], cols[lo:hi])


def _addition_sites(X_test: np.ndarray, a: np.ndarray, targets: np.ndarray, c: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Candidate places for added examples: every target itself, L1 medians of clusters of targets that share
    their predicted label, and medians of a few clusters of all targets (the last ones; their number is
    returned with the sites)."""
    groups = [targets[a[targets] == lab] for lab in range(c)]
    medians = _site_medians(X_test, groups, per_group=40, rng=rng)
    # Central sites reach the most inputs (on MNIST's HOG features the median of all targets is within r = 4 of
    # ~45 % of the test set).
    central = np.concatenate([_site_medians(X_test, [targets], per_group=n_clusters, rng=rng, min_size=1)
                              for n_clusters in (1, 2, 4, 8, 16)])
    return np.concatenate([X_test[targets], medians, central]).astype(X_test.dtype), len(central)


def _addition_actions(estimator: Any, state: dict[str, Any], X_test: np.ndarray, a: np.ndarray, targets: np.ndarray,
                      c: int, sites: np.ndarray, actions: _Actions, e: int) -> None:
    """Candidate additions: each site with each label that is the cheapest rival of some target it reaches."""
    from .neighbours import NeighbourIndex

    # Every test input a site reaches is affected (a misclassified one may become correct).
    probe = NeighbourIndex(X_test, np.zeros(len(X_test), np.int64), metric=estimator.index_.metric, backend="numba")
    if "members" in state:  # rNN: a site reaches the inputs within r of it
        indptr, reached = probe.radius_neighbors(sites, float(estimator.radius))
    else:  # kNN: strictly inside the input's (k - e)-th clean distance, so inside its top k whatever else is added
        indptr, reached = probe.within(sites, _knn_inner(state, e))
    is_target = np.zeros(len(X_test), dtype=bool)
    is_target[targets] = True
    for s in range(len(sites)):
        touched = reached[indptr[s]:indptr[s + 1]]
        aimed = touched[is_target[touched]]
        if not len(aimed):
            continue
        rivals = np.unique(_cheapest_rivals(state["votes"][aimed], a[aimed]))
        if len(aimed) * 20 >= len(targets):  # a central site: every label, for the concentrated split
            rivals = np.arange(c)
        for lab in rivals.tolist():
            actions.add(lab, -1, touched, np.zeros(len(touched), np.int64), site=s)


def _cheapest_rivals(votes: np.ndarray, a: np.ndarray) -> np.ndarray:
    classes = np.arange(votes.shape[1])
    score = np.where(classes[None, :] == a[:, None], -(1 << 40), votes + (classes[None, :] > a[:, None]))
    return np.argmax(score, axis=1)


def _replay_args(context, state):
    kind, y, a, labels, indices, ptr, act_inputs, act_pos, act_label, act_train = context
    return kind, state, y, a, labels, indices, ptr, act_inputs, act_pos, act_label, act_train


def _replay(kind, state, y, a, labels, indices, ptr, act_inputs, act_pos, act_label, act_train, chosen):
    """The votes, windows and removed flags after carrying out ``chosen`` on the clean state."""
    votes = state["votes"].copy()
    end = state["end"].copy()
    flags = np.zeros(state["n_train"], np.bool_)
    scratch = np.zeros(votes.shape[1], np.int64)
    for action in chosen:
        _simulate(kind, action, True, votes, end, flags, y, a, labels, indices, ptr, act_inputs, act_pos, act_label,
                  act_train, scratch)
    return votes, end, flags


def _plan_additions(context, state, fixed, candidates, budget, share, start_time, time_budget, credit=0):
    """Additions given the fixed actions: repeatedly the (site, label) whose copies flip the most inputs per copy.

    For each candidate, the copies each reached input still needs (:func:`_copies_needed`, exact) are sorted; the
    best ratio ``flipped / copies`` over their prefixes is the candidate's value (lazily re-scored). The chosen
    candidate gets that many copies, which are carried out before the next choice. With ``credit > 0`` the needs
    are counted as if ``credit`` removals were still to come for every target (the label-level view of the split
    certificate: additions and removals add up against a margin); the targets a choice covers that way are
    claimed, so that later choices look for other targets, and the removal phase then tries to deliver the
    credit.
    """
    kind, y, a, labels, indices, ptr, act_inputs, act_pos, act_label, act_train = context
    votes, end, flags = _replay(*_replay_args(context, state), fixed)
    scratch = np.zeros(votes.shape[1], np.int64)
    chosen: list[int] = []
    remaining = budget
    claimed = np.zeros(len(y), dtype=bool)

    def value(action: int) -> tuple[float, int, np.ndarray]:
        rows = act_inputs[ptr[action]:ptr[action + 1]]
        rows = rows[~claimed[rows]]
        need = np.empty(len(rows), np.int64)
        _copies_needed(kind, votes, end, flags, y, a, labels, indices, rows, int(act_label[action]),
                       remaining + credit, need)
        cost = np.maximum(need - credit, 1)
        inside = need <= remaining + credit
        cost, rows = cost[inside], rows[inside]
        order = np.argsort(cost, kind="stable")
        cost, rows = cost[order], rows[order]
        if not len(cost) or cost[0] > remaining:
            return 0.0, 0, rows[:0]
        ratio = np.arange(1, len(cost) + 1) / cost
        ratio[cost > remaining] = 0
        best = int(np.argmax(ratio))
        weight = 1.0
        if share is not None and share[act_label[action]] == 0:
            weight = 0.5  # a label the label-level worst case gives no addition: discouraged, not forbidden
        return float(ratio[best]) * weight, int(cost[best]), rows[: best + 1]

    heap = []
    for action in candidates.tolist():
        if time_budget is not None and time.perf_counter() - start_time > time_budget:
            return chosen  # scoring every candidate exactly is the costly part for kNN (a walk per input)
        score, copies, _ = value(action)
        if copies:
            heap.append((-score, action))
    heapq.heapify(heap)
    while heap and remaining > 0:
        if time_budget is not None and time.perf_counter() - start_time > time_budget:
            break
        _, action = heapq.heappop(heap)
        score, copies, covered = value(action)
        if not copies:
            continue
        if heap and score < -heap[0][0] - 1e-12:
            heapq.heappush(heap, (-score, action))
            continue
        for _ in range(copies):
            _simulate(kind, action, True, votes, end, flags, y, a, labels, indices, ptr, act_inputs, act_pos,
                      act_label, act_train, scratch)
        chosen.extend([action] * copies)
        remaining -= copies
        if credit:
            claimed[covered] = True
        heapq.heappush(heap, (-score, action))
    return chosen


def _greedy_phase(context, state, fixed, candidates, budget, cap, start_time, time_budget, weight=None):
    """Removals (or label flips) given the fixed actions: lazy greedy on the potential of :func:`_score`, each
    training example used once; inputs farther than ``cap`` from flipping do not attract moves."""
    kind, y, a, labels, indices, ptr, act_inputs, act_pos, act_label, act_train = context
    votes, end, flags = _replay(*_replay_args(context, state), fixed)
    scratch = np.zeros(votes.shape[1], np.int64)
    heap = []
    if _over(start_time, time_budget):
        return []
    for action in candidates.tolist():
        gain = _simulate(kind, action, False, votes, end, flags, y, a, labels, indices, ptr, act_inputs, act_pos,
                         act_label, act_train, scratch, cap, weight)
        if gain > 0:
            heap.append((-gain, action))
    heapq.heapify(heap)
    chosen: list[int] = []
    used: set[int] = set()
    while heap and len(chosen) < budget:
        if time_budget is not None and time.perf_counter() - start_time > time_budget:
            break
        _, action = heapq.heappop(heap)
        if int(act_train[action]) in used:
            continue
        gain = _simulate(kind, action, False, votes, end, flags, y, a, labels, indices, ptr, act_inputs, act_pos,
                         act_label, act_train, scratch, cap, weight)
        if gain <= 0:
            continue
        if heap and gain < -heap[0][0] - 1e-12:
            heapq.heappush(heap, (-gain, action))
            continue
        _simulate(kind, action, True, votes, end, flags, y, a, labels, indices, ptr, act_inputs, act_pos, act_label,
                  act_train, scratch, cap)
        chosen.append(action)
        used.add(int(act_train[action]))
    return chosen


def _over(start_time: float, time_budget: float | None) -> bool:
    return time_budget is not None and time.perf_counter() - start_time > time_budget


def _misclassified_after(context, state, actions: list[int]) -> int:
    """Misclassified test inputs once ``actions`` are carried out on the clean state (exact vote bookkeeping)."""
    votes = _replay(*_replay_args(context, state), actions)[0]
    return int(np.count_nonzero(predict(votes) != context[1]))


def _materialise(chosen, act_label, act_train, act_site, sites, X_train, classes, e, threat_model, knn):
    removed = sorted({int(act_train[x]) for x in chosen if act_train[x] >= 0})
    if threat_model == "label-flip":
        labels_of = {int(act_train[x]): int(act_label[x]) for x in chosen if act_train[x] >= 0}
        rows = np.array(removed, dtype=np.int64)
        return PoisonedSet(rows, X_train[rows], classes[[labels_of[r] for r in removed]] if removed else classes[:0],
                           e, threat_model, "label flips of shared neighbours (greedy on exact votes)")
    added = [x for x in chosen if act_label[x] >= 0]
    added_X = sites[[int(act_site[x]) for x in added]] if added else np.zeros((0, X_train.shape[1]))
    added_y = classes[[int(act_label[x]) for x in added]] if added else classes[:0]
    what = {"general": "shared addition sites and shared removals", "insertion": "shared addition sites",
            "deletion": "shared removals"}[threat_model]
    return PoisonedSet(np.array(removed, dtype=np.int64), np.asarray(added_X, dtype=np.float32), added_y, e,
                       threat_model, f"{what} (lazy greedy on exact {'kNN window' if knn else 'rNN'} votes, "
                                     "drop-and-refill rounds)")
