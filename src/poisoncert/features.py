"""Feature extractors for images, and an on-disk cache of extracted features.

The paper computes nearest neighbours (l1 distance) on features, not pixels:

- :func:`hog` -- histogram of oriented gradients, exactly ``skimage.feature.hog`` applied image by image
  (run in parallel processes);
- :func:`raw_pixels` -- flattened pixels scaled to [0, 1] (a baseline);
- :func:`clip_features` -- image embeddings of a pretrained CLIP encoder via ``open_clip``, from a *local*
  checkpoint (optional dependency, ``pip install poisoncert[clip]``).

:func:`extract` runs a named extractor on one split of a :class:`~poisoncert.datasets.Dataset` and caches
the result under a key made of the dataset's name and source checksum, the split, the extractor, its
fully resolved parameters and the poisoncert version.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._io import sha256_file
from .cache import cached_arrays

if TYPE_CHECKING:
    from .datasets import Dataset

__all__ = [
    "EXTRACTORS",
    "clip_features",
    "dataset_features",
    "extract",
    "hog",
    "raw_pixels",
    "resolve_params",
    "suggest_hog_params",
]

# Below this many images, HOG runs in the calling process: starting worker processes costs more.
_SERIAL_BELOW = 2000


def _check_images(images: Any, what: str = "images") -> np.ndarray:
    images = np.asarray(images)
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] != 3):
        raise ValueError(f"{what} must have shape (n, h, w) or (n, h, w, 3), got {images.shape}")
    if not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
        raise TypeError(f"{what} must be a numeric array, got dtype {images.dtype}")
    return images


# --------------------------------------------------------------------------------------------------------
# HOG
# --------------------------------------------------------------------------------------------------------


def _hog_chunk(images: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    from skimage.color import rgb2gray
    from skimage.feature import hog as sk_hog

    rgb = images.ndim == 4
    rows = [sk_hog(rgb2gray(image) if rgb else image, **params) for image in images]
    return np.asarray(rows, dtype=np.float32).reshape(len(images), -1)


def suggest_hog_params(image_shape: Sequence[int]) -> dict[str, Any]:
    """HOG parameters for images of ``image_shape``: scikit-image's defaults when the image is big enough.

    scikit-image's defaults (9 orientations, 8x8-pixel cells, 3x3-cell blocks, L2-Hys) need at least
    24x24 pixels (81 features on 28x28 MNIST, 324 on 32x32 CIFAR10). Smaller images (the 8x8 digits) get
    the largest cells that still give one 3x3-cell block, i.e. ``pixels_per_cell = (h // 3, w // 3)``,
    or 2x2 blocks of 1-pixel cells when even that does not fit.
    """
    h, w = int(image_shape[0]), int(image_shape[1])
    params: dict[str, Any] = {
        "orientations": 9,
        "pixels_per_cell": (8, 8),
        "cells_per_block": (3, 3),
        "block_norm": "L2-Hys",
    }
    if h >= 24 and w >= 24:
        return params
    if h >= 3 and w >= 3:
        params.update(pixels_per_cell=(h // 3, w // 3))
    else:
        params.update(pixels_per_cell=(1, 1), cells_per_block=(min(2, h), min(2, w)))
    return params


def hog(
    images: np.ndarray,
    *,
    orientations: int = 9,
    pixels_per_cell: tuple[int, int] = (8, 8),
    cells_per_block: tuple[int, int] = (3, 3),
    block_norm: str = "L2-Hys",
    n_jobs: int | None = None,
    progress: bool = False,
    **params: Any,
) -> np.ndarray:
    """Histogram-of-oriented-gradients features of each image, as ``skimage.feature.hog`` computes them.

    Row ``i`` equals ``skimage.feature.hog(image_i, orientations=..., pixels_per_cell=...,
    cells_per_block=..., block_norm=..., **params)`` cast to float32, where ``image_i`` is
    ``images[i]`` for grey images and ``skimage.color.rgb2gray(images[i])`` for RGB ones (the paper
    does not say how colour is handled; luminance ``0.2125 R + 0.7154 G + 0.0721 B`` is ours). Grey
    images are passed unchanged (uint8 values 0..255; the block normalisation makes HOG insensitive to
    that scale).

    Parameters
    ----------
    images : array of shape (n, h, w) or (n, h, w, 3)
    orientations, pixels_per_cell, cells_per_block, block_norm
        As in ``skimage.feature.hog``; the defaults are scikit-image's (81 features on 28x28 images).
    n_jobs : int or None
        Worker processes. None uses every core (``-1``); 1 runs in this process. Inputs under 2,000
        images always run in this process.
    progress : bool
        Show a tqdm progress bar over chunks of images.
    **params
        Further ``skimage.feature.hog`` keywords (e.g. ``transform_sqrt=True``). ``visualize`` and
        ``feature_vector`` are fixed (False, True).

    Returns
    -------
    numpy.ndarray of float32, shape (n, d)
    """
    images = _check_images(images)
    for fixed in ("visualize", "feature_vector", "channel_axis"):
        if fixed in params:
            raise TypeError(f"hog() does not accept {fixed!r}: images are converted to grey and flattened")
    ppc, cpb = tuple(int(v) for v in pixels_per_cell), tuple(int(v) for v in cells_per_block)
    h, w = images.shape[1:3]
    if h // ppc[0] < cpb[0] or w // ppc[1] < cpb[1]:
        raise ValueError(
            f"{h}x{w} images are too small for HOG with pixels_per_cell={ppc} and cells_per_block={cpb}: "
            f"need at least {ppc[0] * cpb[0]}x{ppc[1] * cpb[1]} pixels (see suggest_hog_params)"
        )
    kwargs = dict(
        orientations=int(orientations),
        pixels_per_cell=ppc,
        cells_per_block=cpb,
        block_norm=block_norm,
        **params,
    )
    n = images.shape[0]
    if n == 0:
        # Run one blank image through to learn the dimension, so empty input still has the right shape.
        d = _hog_chunk(np.zeros((1, *images.shape[1:]), dtype=images.dtype), kwargs).shape[1]
        return np.empty((0, d), dtype=np.float32)
    jobs = (os.cpu_count() or 1) if n_jobs is None or n_jobs < 0 else int(n_jobs)
    if jobs == 0:
        raise ValueError("n_jobs must be a positive integer, -1 or None, got 0")
    if n < _SERIAL_BELOW:
        jobs = 1
    # Chunks of a few thousand images: large enough to amortise process overhead, small enough for a
    # responsive progress bar and balanced workers.
    n_chunks = max(jobs * 4, -(-n // 5000)) if jobs > 1 else max(1, -(-n // 5000))
    bounds = np.linspace(0, n, min(n_chunks, n) + 1).astype(int)
    chunks = [images[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    from tqdm.auto import tqdm

    bar = tqdm(total=n, desc="HOG", unit="img", disable=not progress)
    if jobs == 1:
        results = []
        for chunk in chunks:
            results.append(_hog_chunk(chunk, kwargs))
            bar.update(len(chunk))
    else:
        from joblib import Parallel, delayed

        results = []
        parallel = Parallel(n_jobs=jobs, return_as="generator")
        for chunk, out in zip(chunks, parallel(delayed(_hog_chunk)(c, kwargs) for c in chunks), strict=True):
            results.append(out)
            bar.update(len(chunk))
    bar.close()
    return np.concatenate(results, axis=0)


# --------------------------------------------------------------------------------------------------------
# Raw pixels
# --------------------------------------------------------------------------------------------------------


def raw_pixels(images: np.ndarray) -> np.ndarray:
    """Flattened pixels as float32 in [0, 1]: ``images.reshape(n, -1) / 255`` for uint8 images.

    Float images are assumed to be in [0, 1] already and are only flattened and cast.
    """
    images = _check_images(images)
    flat = images.reshape(images.shape[0], -1)
    if images.dtype == np.uint8:
        return flat.astype(np.float32) / np.float32(255)
    if np.issubdtype(images.dtype, np.integer):
        raise TypeError(f"raw_pixels expects uint8 or float images in [0, 1], got {images.dtype}")
    return flat.astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# CLIP (open_clip), optional
# --------------------------------------------------------------------------------------------------------


def _optional_import(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is needed for this feature extractor: `pip install poisoncert[{extra}]`"
        ) from exc


def clip_features(
    images: np.ndarray,
    checkpoint: str | os.PathLike[str],
    *,
    model_name: str = "ViT-B-32",
    batch_size: int = 256,
    device: str | None = None,
    normalize: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """Image embeddings of a CLIP encoder loaded with ``open_clip`` from a local checkpoint.

    Nothing is downloaded: ``checkpoint`` must be a local open_clip state dict (``.bin``, ``.pt`` or
    ``.safetensors``, e.g. ``open_clip_pytorch_model.bin`` of a ViT-B-32 release) matching ``model_name``.
    Each image goes through the model's own evaluation preprocessing (resize, centre crop, grey -> RGB,
    CLIP's mean/std normalisation) and ``model.encode_image``.

    Parameters
    ----------
    images : array of shape (n, h, w) or (n, h, w, 3), uint8
    checkpoint : path-like
        Local weights file.
    model_name : str
        open_clip architecture name (``open_clip.list_models()``), or one registered with
        ``open_clip.add_model_config``.
    batch_size : int
        Images per forward pass.
    device : str or None
        Torch device; None picks ``"cuda"`` when available, else ``"cpu"``.
    normalize : bool
        L2-normalise each embedding (CLIP's own similarity geometry).
    progress : bool
        tqdm progress bar over batches.

    Returns
    -------
    numpy.ndarray of float32, shape (n, embed_dim)

    Raises
    ------
    ImportError
        open_clip (or torch) is not installed; the message gives the ``pip install`` command.
    FileNotFoundError
        ``checkpoint`` is not a file.
    """
    images = _check_images(images)
    if images.dtype != np.uint8:
        raise TypeError(f"clip_features expects uint8 images, got {images.dtype}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {checkpoint} does not exist (weights are never downloaded)")
    open_clip = _optional_import("open_clip", "clip")
    torch = _optional_import("torch", "clip")
    from PIL import Image
    from tqdm.auto import tqdm

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # A path (not a release tag) as `pretrained` makes open_clip load that file instead of downloading.
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=str(checkpoint), device=device
    )
    model.eval()
    out = []
    # An empty input still runs one blank image, so the result has the embedding's width.
    batches = images if images.shape[0] else np.zeros((1, *images.shape[1:]), dtype=np.uint8)
    starts = range(0, batches.shape[0], int(batch_size))
    with torch.inference_mode():
        for start in tqdm(starts, desc="CLIP", unit="batch", disable=not progress):
            batch = batches[start : start + int(batch_size)]
            pixels = torch.stack([preprocess(Image.fromarray(image)) for image in batch]).to(device)
            embedding = model.encode_image(pixels).float()
            if normalize:
                embedding = torch.nn.functional.normalize(embedding, dim=-1)
            out.append(embedding.cpu().numpy())
    features = np.concatenate(out).astype(np.float32, copy=False)
    return features[: images.shape[0]]


# --------------------------------------------------------------------------------------------------------
# Named extractors and the feature cache
# --------------------------------------------------------------------------------------------------------

#: Extractors available to :func:`extract` by name.
EXTRACTORS: dict[str, Callable[..., np.ndarray]] = {
    "hog": hog,
    "raw": raw_pixels,
    "clip": clip_features,
}

# Keywords that change how fast, not what, an extractor computes: left out of cache keys.
_EXECUTION_ONLY = {"n_jobs", "progress", "device", "batch_size"}


def resolve_params(
    extractor: str, params: Mapping[str, Any] | None = None, image_shape: Sequence[int] | None = None
) -> dict[str, Any]:
    """The complete, JSON-ready parameters ``extractor`` will run with: its defaults updated by ``params``.

    Execution-only keywords (``n_jobs``, ``progress``, ``device``, ``batch_size``) are dropped. For HOG
    with no explicit ``params`` the defaults come from :func:`suggest_hog_params` for ``image_shape``.
    Tuples become lists, so the result is exactly what is stored with features.

    Raises
    ------
    ValueError
        Unknown extractor or a keyword it does not take.
    """
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r}; choose one of {', '.join(EXTRACTORS)}")
    signature = inspect.signature(EXTRACTORS[extractor])
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    resolved: dict[str, Any] = {
        name: p.default
        for name, p in signature.parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    }
    if extractor == "hog" and image_shape is not None:
        resolved.update(suggest_hog_params(image_shape))
    # Required parameters after the images (CLIP's checkpoint) must come in `params`.
    required = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [n for n, p in signature.parameters.items() if p.kind in required and p.default is p.empty][
        1:
    ]
    for name, value in dict(params or {}).items():
        if name not in resolved and name not in positional and not accepts_any:
            raise ValueError(f"extractor {extractor!r} has no parameter {name!r}")
        resolved[name] = value
    missing = [n for n in positional if n not in resolved]
    if missing:
        raise ValueError(f"extractor {extractor!r} needs parameter(s) {', '.join(missing)}")
    out = {k: v for k, v in resolved.items() if k not in _EXECUTION_ONLY}
    return {k: (list(v) if isinstance(v, tuple) else os.fspath(v) if isinstance(v, os.PathLike) else v)
            for k, v in sorted(out.items())}  # fmt: skip


def _call_params(resolved: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in resolved.items()}


def extract(
    dataset: Dataset,
    split: str,
    extractor: str = "hog",
    params: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    *,
    n_jobs: int | None = None,
) -> np.ndarray:
    """Features of ``dataset``'s ``split`` ("train" or "test") by a named extractor, cached on disk.

    The cache key is (dataset name, dataset checksum, split, extractor, :func:`resolve_params` of
    ``params``, poisoncert version), plus the checkpoint's SHA-256 for CLIP; features are recomputed only
    when one of these changes. ``n_jobs`` (HOG) is passed through but not part of the key.

    Returns
    -------
    numpy.ndarray of float32, shape (n, d)
    """
    from . import __version__

    X, _ = dataset.split(split)
    resolved = resolve_params(extractor, params, X.shape[1:])
    key: dict[str, Any] = {
        "kind": "features",
        "dataset": dataset.name,
        "dataset_checksum": dataset.checksum,
        "split": split,
        "extractor": extractor,
        "params": resolved,
        "poisoncert_version": __version__,
    }
    if extractor == "clip":
        # The path alone could point at different weights later; the file's hash pins them.
        key["checkpoint_sha256"] = sha256_file(resolved["checkpoint"])

    def compute() -> dict[str, np.ndarray]:
        kwargs = _call_params(resolved)
        if extractor == "hog":
            kwargs.update(n_jobs=n_jobs, progress=progress)
        elif extractor == "clip":
            kwargs.update(progress=progress)
            return {"features": clip_features(X, **kwargs)}
        return {"features": EXTRACTORS[extractor](X, **kwargs)}

    return cached_arrays(key, compute, cache_dir)["features"]


def dataset_features(
    dataset: Dataset,
    extractor: str = "hog",
    params: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    *,
    n_jobs: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(F_train, y_train, F_test, y_test)``: cached features of both splits and the labels."""
    F_train = extract(dataset, "train", extractor, params, cache_dir, progress, n_jobs=n_jobs)
    F_test = extract(dataset, "test", extractor, params, cache_dir, progress, n_jobs=n_jobs)
    return F_train, dataset.y_train, F_test, dataset.y_test
