"""Input checks shared by the certificates, the engine and the estimators.

Every check raises before any work is done, with a message that names the argument and the problem.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def check_votes(votes: np.ndarray, name: str = "votes") -> np.ndarray:
    """A 2-D, non-negative integer vote matrix with at least two columns."""
    array = np.asarray(votes)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_test, n_classes), got shape {array.shape}")
    if array.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 classes (columns), got {array.shape[1]}")
    if array.dtype.kind == "b" or array.dtype.kind not in "iu":
        if array.dtype.kind == "f" and array.size and np.all(np.isfinite(array)) and np.all(
            array == np.round(array)
        ):
            array = array.astype(np.int64)
        else:
            raise TypeError(f"{name} must hold integer counts, got dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"{name} must be non-negative counts, found {array.min()}")
    return array


def check_poisoning_sizes(e: np.ndarray | int | list[int], name: str = "e") -> np.ndarray:
    """A 1-D int64 array of non-negative poisoning sizes."""
    array = np.asarray(e)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of poisoning sizes, got shape {array.shape}")
    if array.size and array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"{name} must hold whole numbers of poisoned examples")
        array = array.astype(np.int64)
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and array.min() < 0:
        raise ValueError(f"{name} must be >= 0 (a poisoning size), found {array.min()}")
    return array


def check_label_indices(y: np.ndarray, n_rows: int, n_classes: int, name: str = "y") -> np.ndarray:
    """A 1-D int64 array of label indices in ``0..n_classes-1`` with one entry per row."""
    array = np.asarray(y)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if len(array) != n_rows:
        raise ValueError(f"{name} has {len(array)} entries but there are {n_rows} test inputs")
    if array.size and array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"{name} must hold integer label indices")
        array = array.astype(np.int64)
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer label indices 0..{n_classes - 1}, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and (array.min() < 0 or array.max() >= n_classes):
        bad = array[(array < 0) | (array >= n_classes)][0]
        raise ValueError(f"{name} holds label index {bad}, outside 0..{n_classes - 1}")
    return array


def check_features(X: np.ndarray, name: str = "X", n_features: int | None = None) -> np.ndarray:
    """A finite, 2-D, non-empty float array (float32 kept, everything else converted to float64)."""
    if hasattr(X, "tocsr") and hasattr(X, "nnz"):  # a SciPy sparse matrix or array
        raise TypeError(f"{name} is a sparse matrix; poisoncert needs dense features (use {name}.toarray())")
    array = np.asarray(X)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be numeric, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_samples, n_features), got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty: it has 0 samples")
    if array.shape[1] == 0:
        raise ValueError(f"{name} has 0 features")
    if array.dtype != np.float32:
        array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values")
    if n_features is not None and array.shape[1] != n_features:
        raise ValueError(f"{name} has {array.shape[1]} features but the model was fitted with {n_features}")
    return array


def check_positive_int(value: object, name: str, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


METRICS = ("l1", "l2", "cosine")
METRIC_ALIASES = {"l1": "l1", "manhattan": "l1", "cityblock": "l1", "l2": "l2", "euclidean": "l2",
                  "cosine": "cosine"}


def check_metric(metric: str) -> str:
    """Canonical metric name (``l1``, ``l2`` or ``cosine``)."""
    if not isinstance(metric, str) or metric.lower() not in METRIC_ALIASES:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    return METRIC_ALIASES[metric.lower()]


def normalise_labels(y: Any, name: str = "y") -> np.ndarray:
    """Labels as a 1-D integer or string array: whole-number floats become int64, object arrays of str or int
    become str or int64; NaN, fractional values, mixed types and 2-D arrays are refused.
    """
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per sample), got shape {labels.shape}")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)):
            raise ValueError(f"{name} contains NaN or infinite labels")
        if not np.all(labels == np.round(labels)):
            raise ValueError(f"{name} holds non-integer labels such as {labels[labels != np.round(labels)][0]}")
        labels = labels.astype(np.int64)
    elif labels.dtype.kind == "O":
        kinds = {type(value) for value in labels.tolist()}
        if not (kinds <= {str} or kinds <= {int}):
            raise TypeError(f"{name} must hold integers or strings, found {sorted(k.__name__ for k in kinds)}")
        labels = labels.astype(str if kinds <= {str} else np.int64)
    elif labels.dtype.kind not in "iuUSb":
        raise TypeError(f"{name} must hold integer or string labels, got dtype {labels.dtype}")
    return labels


def encode_labels(y: Any, name: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """Map labels to indices ``0..c-1`` through their sorted unique values, as scikit-learn does.

    Integer and string labels are accepted (gaps and negative integers are fine: they are mapped);
    float labels must be whole numbers (see :func:`normalise_labels`).
    """
    labels = normalise_labels(y, name)
    if labels.size == 0:
        raise ValueError(f"{name} is empty")
    classes, indices = np.unique(labels, return_inverse=True)
    return classes, indices.astype(np.int64)


def check_training_set(X: Any, y: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated training features, the sorted label values ``classes`` and each example's label index."""
    X = check_features(X, "X")
    classes, y_index = encode_labels(y)
    if len(y_index) != X.shape[0]:
        raise ValueError(f"X has {X.shape[0]} samples but y has {len(y_index)} labels")
    if len(classes) < 2:
        raise ValueError(f"y has a single class ({classes[0].item()!r}); certification needs at least 2 classes")
    return X, classes, y_index


def encode_test_labels(classes: np.ndarray, y: Any, n_rows: int) -> np.ndarray:
    """Index into ``classes`` of each test label; unknown labels, NaN and mismatched lengths are refused."""
    labels = normalise_labels(y)
    if len(labels) != n_rows:
        raise ValueError(f"X has {n_rows} samples but y has {len(labels)} labels")
    if (labels.dtype.kind in "US") != (classes.dtype.kind in "US"):
        raise TypeError(f"y holds {labels.dtype} labels but the model was fitted on {classes.dtype} labels "
                        f"(classes_: {classes.tolist()})")
    positions = np.clip(np.searchsorted(classes, labels), 0, len(classes) - 1)
    unknown = classes[positions] != labels
    if np.any(unknown):
        raise ValueError(f"y holds label {labels[unknown][0].item()!r}, unknown to the model "
                         f"(classes_: {classes.tolist()})")
    return positions.astype(np.int64)


def check_radii(radii: Any) -> np.ndarray:
    """Radii as a 1-D float64 array: at least one, each finite and > 0."""
    values = np.asarray(radii, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("radius list is empty: give at least one radius")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"radius must be a finite number > 0, got {values[(~np.isfinite(values)) | (values <= 0)][0]}")
    return values
