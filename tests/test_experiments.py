"""The automatic poisoning-size grid of the reports."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from poisoncert._classifiers import certify_neighbours
from poisoncert.experiments import compute_curves, default_e_grid, plot_layout
from poisoncert.plots import curve_layout


def _probing_every_knn_curve(results, n_points: int) -> np.ndarray:
    """The grid's rule with every kNN curve probed, whatever the other curves' ends (the reference)."""
    largest = 0
    for result in results:
        end = 2 * int(np.max(result.certified_size, initial=0)) + 2
        if result.method == "knn":
            method = "split" if "split" in result.available_methods else "global"
            k = int(result.params["k"])
            cap = 2 * k if result.max_e is None else min(2 * k, result.max_e)
            end = min(end, cap)
            while end < cap and result.certified_accuracy([end], method=method)[0] > 0:
                end = min(cap, int(end * 1.5) + 1)
                end = end if end < 1000 else min(cap, -(-end // 100) * 100)
        largest = max(largest, end)
    step = max(1, int(np.ceil(largest / (n_points - 1))))
    grid = np.arange(0, largest + step, step, dtype=np.int64)
    caps = [r.max_e for r in results if r.method == "knn" and r.max_e is not None]
    return grid[grid <= min(caps)] if caps else grid


@pytest.mark.parametrize(("knn", "rnn", "max_e"), [([9], [9.0], None), ([5, 15], [6.0, 12.0], 12),
                                                   ([15], [], None), ([3], [20.0], 4), ([3], [20.0], 40),
                                                   ([3], [2.0], None)])
def test_the_grid_runs_to_where_every_curve_is_zero(knn, rnn, max_e) -> None:
    X, y = load_digits(return_X_y=True)
    X, y = X[:400] / 16, y[:400]
    results = certify_neighbours(X[:300], y[:300], X[300:], y[300:], knn=knn, rnn=rnn, max_e=max_e)
    results = [*results[0].values(), *results[1].values()]
    grid = default_e_grid(results, n_points=21)
    # Fresh results for the reference, so that no curve value is shared between the two computations.
    fresh = certify_neighbours(X[:300], y[:300], X[300:], y[300:], knn=knn, rnn=rnn, max_e=max_e)
    assert grid.tolist() == _probing_every_knn_curve([*fresh[0].values(), *fresh[1].values()], 21).tolist()
    # Unless a kNN table's reach (max_e) cut it short, the grid ends where every curve is zero.
    last, step = int(grid[-1]), int(grid[1] - grid[0])
    caps = [r.max_e for r in results if r.method == "knn" and r.max_e is not None]
    if caps and last + step > min(caps):
        return
    for result in results:
        for method in result.available_methods:
            assert result.certified_accuracy([last], method=method)[0] == 0, (result.label(), method)


def test_a_knn_curve_that_outlasts_the_individual_end_extends_the_grid() -> None:
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(4)
    n = int(rng.integers(60, 300))
    rows = rng.choice(len(X), n + 40, replace=False)
    X, y = X[rows] / 16, y[rows]
    knn, rnn = certify_neighbours(X[:n], y[:n], X[n:], y[n:], knn=[54], rnn=[1.0], max_e=108)
    result = knn[54]
    individual_end = 2 * int(result.certified_size.max()) + 2
    assert result.certified_accuracy([individual_end], method="split")[0] > 0  # the case this test is about
    grid = default_e_grid([result, rnn[1.0]], n_points=21)
    assert grid[-1] > individual_end
    fresh = certify_neighbours(X[:n], y[:n], X[n:], y[n:], knn=[54], rnn=[1.0], max_e=108)
    assert grid.tolist() == _probing_every_knn_curve([fresh[0][54], fresh[1][1.0]], 21).tolist()


def test_curves_computed_side_by_side_equal_curves_computed_one_by_one() -> None:
    X, y = load_digits(return_X_y=True)
    X, y = X[:500] / 16, y[:500]

    def results():
        knn, rnn = certify_neighbours(X[:350], y[:350], X[350:], y[350:], knn=[5, 15], rnn=[6.0, 9.0],
                                      max_e=60)
        return [*knn.values(), *rnn.values()]

    e = np.arange(0, 60, 3)
    together = results()
    compute_curves(together, e)
    for alone, result in zip(results(), together, strict=True):
        assert result.available_methods == alone.available_methods
        for method in alone.available_methods:
            assert set(result._cache[method]) >= set(e.tolist()), "compute_curves keeps the curves in the results"
            values, exact = result.curve(e, method)
            reference, reference_exact = alone.curve(e, method)
            np.testing.assert_array_equal(values, reference, err_msg=f"{result.label()} {method}")
            np.testing.assert_array_equal(exact, reference_exact)


def test_the_plot_layout_known_before_the_curves_fits_their_rows() -> None:
    """The CLI sends the plot's layout to its helper before computing the curves; it must be the rows' layout
    (else the helper builds the figure again, after the curves, on the critical path)."""
    X, y = load_digits(return_X_y=True)
    X, y = X[:300] / 16, y[:300]
    knn, rnn = certify_neighbours(X[:200], y[:200], X[200:], y[200:], knn=[5], rnn=[6.0], max_e=20)
    unlabelled = certify_neighbours(X[:200], y[:200], X[200:], None, knn=[5])[0][5]
    results = [*knn.values(), unlabelled, *rnn.values()]
    e = np.arange(0, 20, 4)
    layout = plot_layout(results, e)
    assert layout == curve_layout([row for result in results for row in result.curve_rows(e)])
    assert [(line["classifier"], line["certification"]) for line in layout] == [
        ("kNN (k=5)", method) for method in knn[5].available_methods] + [
        ("rNN (r=6.0)", method) for method in rnn[6.0].available_methods]


def test_a_curve_that_fails_side_by_side_raises_its_error() -> None:
    X, y = load_digits(return_X_y=True)
    X, y = X[:300] / 16, y[:300]
    knn, rnn = certify_neighbours(X[:200], y[:200], X[200:], y[200:], knn=[5], rnn=[6.0, 9.0], max_e=20)
    results = [*knn.values(), *rnn.values()]

    def broken(e, method=None):
        raise ValueError("curve failed on purpose")

    results[1].curve = broken
    with pytest.raises(ValueError, match="on purpose"):
        compute_curves(results, np.arange(0, 20, 4))


def _examples_csv_by_csv_writer(results) -> str:
    """What write_examples_csv wrote with csv.writer row by row (the oracle of the formatted version)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = None
    for result in results:
        classes = np.asarray(result.classes).tolist()
        if header is None:
            header = ["classifier", "threat_model", "index", "y_true", "prediction", "certified_size",
                      *(f"votes_{name}" for name in classes)]
            writer.writerow(header)
        n_votes = len(header) - 6
        truth = [""] * result.n_test if result.y_true is None else [classes[t] for t in result.y_true.tolist()]
        rows = zip(truth, result.prediction_indices.tolist(), result.certified_size.tolist(), result.votes.tolist(),
                   strict=True)
        for index, (t, p, size, votes) in enumerate(rows):
            writer.writerow((result.label(), result.threat_model, index, t, classes[p], size, *votes[:n_votes],
                             *([""] * (n_votes - len(votes)))))
    return buffer.getvalue()


@pytest.mark.parametrize("classes", [[0, 1, 2], ["a,b", 'say "hi"', "100%"], ["", "x\ny", "ü"], [-1.5, 2.0, 1e300]])
def test_examples_csv_is_what_csv_writer_writes(tmp_path, classes) -> None:
    from types import SimpleNamespace

    from poisoncert.experiments import write_examples_csv

    rng = np.random.default_rng(len(str(classes)))

    def result(label: str, n_test: int, n_classes: int, labelled: bool):
        return SimpleNamespace(
            classes=np.array(classes[:n_classes], dtype=object), label=lambda: label, threat_model="general%s",
            n_test=n_test, votes=rng.integers(0, 9, (n_test, n_classes)),
            y_true=rng.integers(0, n_classes, n_test) if labelled else None,
            prediction_indices=rng.integers(0, n_classes, n_test), certified_size=rng.integers(-1, 50, n_test))

    results = [result('kNN (k=5), "odd, %d label"', 7, 3, True), result("rNN", 5, 2, False), result("e", 0, 3, True)]
    write_examples_csv(tmp_path / "examples.csv", results)
    text = (tmp_path / "examples.csv").read_bytes().decode("utf-8")
    assert text.split("\n", 1)[1] == _examples_csv_by_csv_writer(results)
