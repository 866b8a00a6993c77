"""The command line: demo on embedded data, certify on user files, and clear errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from poisoncert.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    """Each test's cache folder (neighbour tables, features) is its own, never the user's."""
    monkeypatch.setenv("POISONCERT_CACHE", str(tmp_path_factory.mktemp("cache")))


def _csv_rows(path):
    return list(csv.DictReader(line for line in path.read_text().splitlines() if not line.startswith("#")))


def _assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


def test_demo_writes_table_csv_plot_and_json(tmp_path):
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "certified accuracy" in result.output and "kNN (k=50)" in result.output
    rows = _csv_rows(tmp_path / "curves.csv")
    curves = {(row["classifier"], row["certification"]) for row in rows}
    assert ("rNN (r=10.0)", "island") in curves and ("kNN (k=50)", "global") in curves
    for key in curves:
        values = [float(row["certified_accuracy"]) for row in rows if (row["classifier"], row["certification"]) == key]
        assert values[0] > 0.8 and all(b <= a for a, b in zip(values, values[1:], strict=False))
    _assert_png(tmp_path / "curves.png")
    meta = json.loads((tmp_path / "curves.json").read_text())
    assert meta["settings"]["dataset"].startswith("digits")
    assert {r["metadata"]["method"] for r in meta["results"]} == {"knn", "rnn"}
    rnn = next(r for r in meta["results"] if r["metadata"]["method"] == "rnn")
    removals = np.array(rnn["global_worst_case_removals"]["removals"])
    assert removals.shape == (len(rnn["global_worst_case_removals"]["e"]), 10)
    assert np.all(removals.sum(axis=1) <= np.array(rnn["global_worst_case_removals"]["e"]))


@pytest.fixture
def user_files(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    X = np.eye(3)[y] * 2 + rng.normal(scale=0.5, size=(90, 3))
    np.savez(tmp_path / "train.npz", X=X[:60], y=y[:60])
    np.savez(tmp_path / "test.npz", X=X[60:], y=y[60:])
    np.save(tmp_path / "train_X.npy", X[:60])
    np.save(tmp_path / "train_y.npy", y[:60])
    names = np.array(["a", "b", "c"])
    with open(tmp_path / "test.csv", "w") as handle:
        handle.write("f1,f2,f3,label\n")
        for row, label in zip(X[60:], names[y[60:]], strict=True):
            handle.write(",".join(f"{v:.6f}" for v in row) + f",{label}\n")
    with open(tmp_path / "train.csv", "w") as handle:
        for row, label in zip(X[:60], names[y[:60]], strict=True):
            handle.write(",".join(f"{v:.6f}" for v in row) + f",{label}\n")
    return tmp_path


def test_certify_on_npz_files(user_files):
    out = user_files / "out"
    result = runner.invoke(app, ["certify", "--train", str(user_files / "train.npz"), "--test",
                                 str(user_files / "test.npz"), "--knn", "5", "--knn", "11", "--rnn", "1.5",
                                 "--e-max", "6", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = _csv_rows(out / "curves.csv")
    assert {row["classifier"] for row in rows} == {"kNN (k=5)", "kNN (k=11)", "rNN (r=1.5)"}
    assert sorted({int(row["e"]) for row in rows}) == list(range(7))


def test_certify_on_npy_and_csv_files(user_files):
    out = user_files / "out2"
    result = runner.invoke(app, ["certify", "--train", str(user_files / "train.csv"), "--test",
                                 str(user_files / "test.csv"), "--knn", "5", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["certify", "--train", str(user_files / "train_X.npy"), "--train-labels",
                                 str(user_files / "train_y.npy"), "--test", str(user_files / "test.npz"),
                                 "--rnn", "2", "--threat-model", "deletion", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert {row["threat_model"] for row in _csv_rows(out / "curves.csv")} == {"deletion"}


def test_labels_are_read_alike_across_files_and_single_row_csv(tmp_path):
    rng = np.random.default_rng(1)
    y = rng.integers(1, 3, 40)
    X = y[:, None] * 2.0 + rng.normal(scale=0.3, size=(40, 2))
    with open(tmp_path / "train.csv", "w") as handle:  # float-formatted labels
        handle.writelines(f"{a:.4f},{b:.4f},{label:.1f}\n" for (a, b), label in zip(X, y, strict=True))
    with open(tmp_path / "test.csv", "w") as handle:  # one row, integer label, no header
        handle.write(f"{X[0, 0]:.4f},{X[0, 1]:.4f},{y[0]}\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["certify", "--train", str(tmp_path / "train.csv"), "--test",
                                 str(tmp_path / "test.csv"), "--knn", "3", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "curves.json").read_text())["results"][0]["metadata"]["n_test"] == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["certify", "--train", "missing.npz", "--test", "missing.npz", "--knn", "3"], "not found"),
        (["certify", "--train", "TRAIN", "--test", "TEST"], "at least one classifier"),
        (["certify", "--train", "TRAIN", "--test", "TEST", "--knn", "999"], "larger than the training set"),
        (["certify", "--train", "TRAIN", "--test", "TEST", "--rnn", "-1"], "> 0"),
        (["certify", "--train", "TRAIN", "--test", "TEST", "--bagging", "10"], "N:XI"),
        (["certify", "--train", "TRAIN", "--test", "TEST", "--knn", "3", "--metric", "hamming"], "unknown metric"),
        (["certify", "--train", "TRAIN", "--test", "TEST", "--knn", "3", "--e-max", "-2"], "e-max"),
    ],
)
def test_certify_errors_are_clear_and_write_nothing(user_files, args, message):
    out = user_files / "never"
    args = [a.replace("TRAIN", str(user_files / "train.npz")).replace("TEST", str(user_files / "test.npz"))
            for a in args]
    result = runner.invoke(app, [*args, "--out", str(out), "--no-progress"])
    assert result.exit_code == 2
    assert message in result.output
    assert not out.exists()


def _bad_files(folder):
    rng = np.random.default_rng(3)
    X, y = rng.random((20, 3)), rng.integers(0, 2, 20)
    np.savez(folder / "objects.npz", X=X, y=np.array(["a", "b"], dtype=object)[y])
    (folder / "garbage.npz").write_text("not a zip file")
    (folder / "garbage.npy").write_bytes(b"\x00\x01 not numpy")
    (folder / "ragged.csv").write_text("1,2,3,0\n1,2,0\n4,5,6,1\n")
    (folder / "empty_label.csv").write_text("f1,f2,label\n0.1,0.2,a\n0.3,0.4,\n")
    np.save(folder / "features.npy", X)
    np.savez(folder / "four_features.npz", X=rng.random((5, 4)), y=y[:5])
    np.savez(folder / "three_d.npz", X=rng.random((5, 2, 2)), y=y[:5])
    (folder / "a_folder.npz").mkdir()


@pytest.mark.parametrize(
    ("train", "extra", "message"),
    [
        ("objects.npz", [], "holds object arrays"),
        ("garbage.npz", [], "not a valid .npz file"),
        ("garbage.npy", ["--train-labels", "TEST"], "not a valid .npy file"),
        ("ragged.csv", [], "not a regular CSV"),
        ("empty_label.csv", [], "line 3 has an empty label"),
        ("features.npy", ["--train-labels", "missing_labels.npy"], "train labels file not found"),
        ("four_features.npz", [], "has 3 features but --train"),
        ("three_d.npz", [], "must be a 2-D array"),
        ("a_folder.npz", [], "is a folder, not a file"),
    ],
)
def test_bad_files_give_one_line_errors(user_files, train, extra, message):
    _bad_files(user_files)
    out = user_files / "never"
    extra = [str(user_files / "test.npz") if a == "TEST" else a for a in extra]
    result = runner.invoke(app, ["certify", "--train", str(user_files / train), "--test", str(user_files / "test.npz"),
                                 *extra, "--knn", "3", "--out", str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_unwritable_output_fails_before_work_and_never_mixes_old_and_new_files(user_files):
    args = ["certify", "--train", str(user_files / "train.npz"), "--test", str(user_files / "test.npz"),
            "--knn", "3", "--no-progress"]
    (user_files / "a_file").write_text("x")
    result = runner.invoke(app, [*args, "--out", str(user_files / "a_file" / "out")])
    assert result.exit_code == 2 and "is not a folder" in result.output
    assert "kNN (k=3)" not in result.output  # nothing was certified
    out = user_files / "out"
    (out / "curves.png").mkdir(parents=True)
    (out / "curves.json").write_text("old")
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2 and "not a regular file" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["curves.json", "curves.png"]
    assert (out / "curves.json").read_text() == "old"


def test_per_example_results_and_empty_neighbourhoods_are_reported(user_files):
    out = user_files / "out"
    result = runner.invoke(app, ["certify", "--train", str(user_files / "train.npz"), "--test",
                                 str(user_files / "test.npz"), "--knn", "3", "--rnn", "0.01", "--out", str(out),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "30 of 30 test inputs have no training example within the radius" in result.output
    rows = _csv_rows(out / "examples.csv")
    assert len(rows) == 60 and {row["classifier"] for row in rows} == {"kNN (k=3)", "rNN (r=0.01)"}
    knn = [row for row in rows if row["classifier"] == "kNN (k=3)"]
    assert all(sum(int(row[f"votes_{c}"]) for c in range(3)) == 3 for row in knn)
    assert all((row["prediction"] == row["y_true"]) == (int(row["certified_size"]) >= 0) for row in knn)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_demo_refuses_bad_parameters_before_work(tmp_path):
    for args, message in ((["--knn", "0"], "must be >= 1"), (["--knn", "5000"], "larger than the training set"),
                          (["--rnn", "-1"], "> 0")):
        result = runner.invoke(app, ["demo", *args, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "e_max, expected",
    [(2600, [0, 500, 1000, 1500, 2000]), (124, [0, 20, 40, 60, 80]), (10, [0, 2, 4, 6, 8]), (1, [0]), (0, [0])],
)
def test_table_points_are_round_and_inside_the_grid(e_max, expected):
    from poisoncert.experiments import table_points

    assert table_points(np.arange(e_max + 1)) == expected


def test_attack_writes_poisoned_sets_and_a_bracket_that_holds(user_files):
    from poisoncert.attacks import PoisonedSet

    out = user_files / "attacks"
    result = runner.invoke(app, ["attack", "--train", str(user_files / "train.npz"), "--test",
                                 str(user_files / "test.npz"), "--knn", "5", "--rnn", "1.5", "--e", "2,4",
                                 "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "verified attack accuracy" in result.output
    rows = _csv_rows(out / "bracket.csv")
    assert {(row["classifier"], row["e"]) for row in rows} == {
        ("kNN (k=5)", "2"), ("kNN (k=5)", "4"), ("rNN (r=1.5)", "2"), ("rNN (r=1.5)", "4")}
    for row in rows:
        assert float(row["attack_accuracy"]) >= float(row["certified_accuracy"])
    with np.load(user_files / "train.npz") as data:
        X, y = data["X"], data["y"]
    for name in ("attack-knn-k5-e4", "attack-rnn-r1.5-e2"):
        poisoned = PoisonedSet.load(out / f"{name}.npz", X, y)
        record = json.loads((out / f"{name}.json").read_text())
        assert record["poisoning_size"] == poisoned.poisoning_size(X, y) <= poisoned.e
        assert record["threat_model"] == "general" and "verified_accuracy" in record
    _assert_png(out / "bracket.png")


def test_certify_with_attack_adds_the_upper_bounds(user_files):
    out = user_files / "both"
    result = runner.invoke(app, ["certify", "--train", str(user_files / "train.npz"), "--test",
                                 str(user_files / "test.npz"), "--rnn", "1.5", "--e-max", "6", "--attack", "3",
                                 "--threat-model", "deletion", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (out / "curves.csv").is_file() and (out / "attack-rnn-r1.5-e3.npz").is_file()
    rows = _csv_rows(out / "bracket.csv")
    assert [row["threat_model"] for row in rows] == ["deletion"]


@pytest.mark.parametrize(("args", "message"), [
    (["--knn", "5"], "--e"),
    (["--knn", "5", "--e", "2,x"], "whole numbers"),
    (["--e", "2"], "choose at least one classifier"),
    (["--knn", "5", "--e", "-3"], ">= 0"),
    (["--knn", "5", "--e", "2", "--backend", "gpu"], "unknown --backend 'gpu'"),
])
def test_attack_errors_are_clear(user_files, args, message):
    result = runner.invoke(app, ["attack", "--train", str(user_files / "train.npz"), "--test",
                                 str(user_files / "test.npz"), "--out", str(user_files / "bad"), "--no-progress",
                                 *args])
    assert result.exit_code == 2
    assert message in result.output
    assert not (user_files / "bad").exists()


def test_certify_reuses_the_neighbour_tables_of_the_same_search(user_files, tmp_path, monkeypatch):
    from poisoncert.neighbours import NeighbourIndex

    args = ["certify", "--train", str(user_files / "train.npz"), "--test", str(user_files / "test.npz"),
            "--knn", "5", "--rnn", "2", "--no-progress"]
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "first")])
    assert first.exit_code == 0, first.output
    assert "read from the cache" not in first.output

    def no_search(*args, **kwargs):
        raise AssertionError("searched again")

    monkeypatch.setattr(NeighbourIndex, "search", no_search)
    second = runner.invoke(app, [*args, "--out", str(tmp_path / "second")])
    assert second.exit_code == 0, second.output
    assert "read from the cache" in second.output
    assert _csv_rows(tmp_path / "first" / "curves.csv") == _csv_rows(tmp_path / "second" / "curves.csv")
    records = [json.loads((tmp_path / name / "curves.json").read_text())["results"] for name in ("first", "second")]
    assert [r["metadata"]["neighbour_tables_from_cache"] for r in records[0]] == [False, False]
    assert [r["metadata"]["neighbour_tables_from_cache"] for r in records[1]] == [True, True]
    # Another radius is another search; --no-neighbour-cache searches whatever is cached.
    for extra in (["--rnn", "3"], ["--no-neighbour-cache"]):
        result = runner.invoke(app, [*args, *extra, "--out", str(tmp_path / "third")])
        assert result.exit_code == 1 and "searched again" in repr(result.exception)


def test_certify_imports_neither_scikit_learn_nor_pyplot(user_files, tmp_path):
    """Start-up time: ``certify`` needs neither (importing scikit-learn took about a second of the MNIST command)."""
    script = ("import sys\nfrom poisoncert.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit as stop:\n"
              "    assert not stop.code, stop.code\n"
              "print(sorted(name for name in ('sklearn', 'matplotlib.pyplot') if name in sys.modules))")
    args = ["certify", "--train", str(user_files / "train.npz"), "--test", str(user_files / "test.npz"),
            "--knn", "5", "--rnn", "2.0", "--out", str(tmp_path / "out"), "--no-progress"]
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "curves.png").exists()
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_console_entry_point_exit_status_and_streams(user_files, tmp_path):
    """``main`` (the ``poisoncert`` script, ``python -m poisoncert.cli``) ends without the interpreter's teardown:
    exit statuses, piped output and atexit handlers are still what ``sys.exit`` would give."""
    args = ["certify", "--train", str(user_files / "train.npz"), "--test", str(user_files / "test.npz"),
            "--knn", "5", "--out", str(tmp_path / "out"), "--no-progress"]
    done = subprocess.run([sys.executable, "-m", "poisoncert.cli", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout.splitlines()[-1]  # the last line reached the pipe: stdout was flushed
    assert (tmp_path / "out" / "curves.json").exists()
    bad = subprocess.run([sys.executable, "-m", "poisoncert.cli", "certify", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "choose at least one classifier" in bad.stderr
    # sys.exit("message") inside a command, and an atexit handler registered by one, behave as in a normal exit.
    script = ("import atexit, sys, poisoncert.cli as cli\n"
              "@cli.app.command('bye')\n"
              "def bye():\n"
              "    atexit.register(lambda: print('atexit ran', flush=True))\n"
              "    print('partial line', end='')\n"
              "    sys.exit('leaving: ' + sys.argv[-1])\n"
              "cli.main()\n")
    done = subprocess.run([sys.executable, "-c", script, "bye"], capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert done.stdout == "partial lineatexit ran\n" and "leaving: bye" in done.stderr
    # A command that closes stdout, or exits with a status beyond a C long, ends as Python would end it.
    for body, status in (("print('x'); sys.stdout.close()", 0), ("sys.exit(2**70)", 255), ("sys.exit(-1)", 255)):
        script = f"import sys, poisoncert.cli as cli\n@cli.app.command('bye')\ndef bye():\n    {body}\ncli.main()\n"
        done = subprocess.run([sys.executable, "-c", script, "bye"], capture_output=True, text=True, check=False)
        assert done.returncode == status, (body, done.returncode, done.stderr)


def test_certify_in_process_leaves_the_cyclic_collector_as_it_was(user_files):
    """Only the console script's own process tunes the collector (no collection while numba is imported, the
    survivors frozen); called in-process, certify neither re-enables nor freezes anything."""
    import gc

    args = ["certify", "--train", str(user_files / "train.npz"), "--test", str(user_files / "test.npz"), "--knn", "3",
            "--out", str(user_files / "out"), "--no-progress"]
    frozen = gc.get_freeze_count()
    gc.disable()
    try:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert not gc.isenabled() and gc.get_freeze_count() == frozen
    finally:
        gc.enable()
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and gc.isenabled() and gc.get_freeze_count() == frozen


def test_the_console_script_pauses_the_collector_while_numba_is_imported(monkeypatch):
    import gc

    from poisoncert import cli

    monkeypatch.setattr(cli, "_OWN_PROCESS", True)
    frozen_before = gc.get_freeze_count()
    try:
        with cli._collector_paused():
            assert not gc.isenabled()
            created = [[] for _ in range(100)]  # noqa: F841 - tracked objects made inside the block
        assert gc.isenabled() and gc.get_freeze_count() >= frozen_before + 100
    finally:
        gc.unfreeze()


def test_certify_backend_option_is_recorded_and_checked(user_files, monkeypatch):
    out = user_files / "numba"
    result = runner.invoke(app, ["certify", "--train", str(user_files / "train.npz"), "--test",
                                 str(user_files / "test.npz"), "--knn", "5", "--rnn", "1.5", "--backend", "numba",
                                 "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "curves.json").read_text())
    assert meta["settings"]["neighbour_backend"] == "numba"
    assert {r["metadata"]["backend"] for r in meta["results"]} == {"numba"}
    for args, message in ((["--backend", "cuda"], "unknown --backend 'cuda'"),
                          (["--backend", "numba", "--scheduler", "local:2"], "give one of the two")):
        result = runner.invoke(app, ["certify", "--train", str(user_files / "train.npz"), "--test",
                                     str(user_files / "test.npz"), "--knn", "5", *args, "--out",
                                     str(user_files / "never"), "--no-progress"])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (user_files / "never").exists()
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real_find_spec(name, *a))
    result = runner.invoke(app, ["certify", "--train", str(user_files / "train.npz"), "--test",
                                 str(user_files / "test.npz"), "--knn", "5", "--backend", "torch", "--out",
                                 str(user_files / "never"), "--no-progress"])
    assert result.exit_code == 2 and "poisoncert[torch]" in result.output, result.output
    assert not (user_files / "never").exists()


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_attacks_search_with_the_chosen_backend(user_files, backend):
    """--backend reaches the attacks' classifiers (their certificates and refits), from certify and attack alike."""
    if backend == "torch":
        pytest.importorskip("torch")
    from poisoncert import estimators

    chosen = []
    real_fit = estimators.CertifiedKNeighborsClassifier.fit

    def fit(self, *args, **kwargs):
        chosen.append(self.backend)
        return real_fit(self, *args, **kwargs)

    for command in (["attack", "--e", "2"], ["certify", "--attack", "2", "--no-neighbour-cache"]):
        chosen.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(estimators.CertifiedKNeighborsClassifier, "fit", fit)
            result = runner.invoke(app, [*command, "--train", str(user_files / "train.npz"), "--test",
                                         str(user_files / "test.npz"), "--knn", "5", "--backend", backend, "--out",
                                         str(user_files / command[0]), "--no-progress"])
        assert result.exit_code == 0, result.output
        assert chosen and set(chosen) == {backend}, chosen
        record = json.loads((user_files / command[0] / "bracket.json").read_text())
        assert record["settings"]["neighbour_backend"] == backend


def test_certify_torch_backend_gives_the_numba_results(user_files):
    pytest.importorskip("torch")
    curves = {}
    for backend in ("numba", "torch"):
        out = user_files / backend
        result = runner.invoke(app, ["certify", "--train", str(user_files / "train.npz"), "--test",
                                     str(user_files / "test.npz"), "--knn", "5", "--rnn", "1.5", "--backend",
                                     backend, "--no-neighbour-cache", "--out", str(out), "--no-progress"])
        assert result.exit_code == 0, result.output
        curves[backend] = _csv_rows(out / "curves.csv")  # the rows; the comment lines name the backend
        assert {r["metadata"]["backend"] for r in json.loads((out / "curves.json").read_text())["results"]} == {
            backend}
    assert curves["numba"] == curves["torch"]
