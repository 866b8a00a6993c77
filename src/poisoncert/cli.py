"""The ``poisoncert`` command line. Heavy imports are deferred so that ``--help`` is instant."""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="poisoncert",
    help="Certified robustness of nearest neighbours (kNN, rNN), DPA and Bagging against data poisoning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

OutOption = Annotated[Path, typer.Option("--out", "-o", help="Folder for the CSV, PNG and JSON outputs.")]
MetricOption = Annotated[str, typer.Option(help="Distance: l1 (the paper's), l2 or cosine.")]
ThreatOption = Annotated[
    str,
    typer.Option(help="Threat model: general (remove/add/modify up to e), insertion, deletion or label-flip."),
]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
AttackBudgetOption = Annotated[float, typer.Option(help="Seconds of attack search per classifier and budget "
                                                         "(verification by refitting comes on top).")]
SeedOption = Annotated[int, typer.Option(help="Seed of the attack's site clustering (deterministic per seed).")]


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.strerror}: {error.filename}"
    text = str(error) or type(error).__name__
    plain = (ValueError, TypeError, ImportError, FileNotFoundError, FileExistsError, NotADirectoryError,
             PermissionError)
    return text if isinstance(error, plain) else f"{type(error).__name__}: {text}"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn bad input and bad files (not bugs) into a one-line ``error: ...`` and exit code 2.

    Set ``POISONCERT_DEBUG=1`` to see the traceback instead.
    """
    import pickle
    import tarfile
    import zipfile

    try:
        yield
    except (ValueError, TypeError, OSError, EOFError, ImportError, pickle.UnpicklingError, tarfile.TarError,
            zipfile.BadZipFile) as error:
        if os.environ.get("POISONCERT_DEBUG"):
            raise
        _fail(_describe(error))


def _friendly(command: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        with user_errors():
            command(*args, **kwargs)

    return wrapper


def _cache_folder(cache_dir: Path | None) -> Path:
    from .cache import cache_dir as resolve

    return resolve(cache_dir)


def _parse_bagging(specs: list[str]) -> list[tuple[int, int]]:
    parsed = []
    for spec in specs:
        try:
            n_estimators, subsample = (int(part) for part in spec.split(":"))
        except ValueError:
            _fail(f"--bagging expects N:XI such as 1000:27 (N base classifiers, XI examples each), got {spec!r}")
        parsed.append((n_estimators, subsample))
    return parsed


#: True while :func:`main` runs a command in its own process, which ends when the command returns: only then may the
#: cyclic collector be tuned for the command (not when the commands are called in-process, by tests or notebooks).
_OWN_PROCESS = False


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No cyclic collection inside the block, and what it created frozen (:func:`gc.freeze`) after it.

    Importing numba creates some 10^5 long-lived objects and no garbage: the collector would walk them in full
    collections (0.03 s) during the command's one-core start-up. Only in the command's own process.
    """
    if not _OWN_PROCESS:
        yield
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def _freeze_survivors() -> None:
    """:func:`gc.freeze` in the command's own process (everything alive stays until it ends)."""
    if _OWN_PROCESS:
        gc.freeze()


@contextlib.contextmanager
def _plotter(wanted: bool) -> Iterator[Any]:
    """A :class:`poisoncert.plots.BackgroundPlotter` when a plot will be drawn, else None."""
    if not wanted:
        yield None
        return
    from .plots import BackgroundPlotter

    with BackgroundPlotter() as plotter:
        yield plotter


def _check_e_grid(e_max: int | None, e_step: int | None) -> None:
    if e_max is not None and e_max < 0:
        _fail(f"--e-max must be >= 0, got {e_max}")
    if e_step is not None and e_step < 1:
        _fail(f"--e-step must be >= 1, got {e_step}")


def _report(results: list, e_max: int | None, e_step: int | None, out: Path, title: str, subtitle: str,
            settings: dict, plotter: Any = None) -> None:
    import numpy as np

    from .experiments import (
        compute_curves,
        default_e_grid,
        plot_layout,
        prediction_table,
        summary_table,
        table_points,
        write_outputs,
    )

    _check_e_grid(e_max, e_step)
    labelled = [result for result in results if result.has_labels]
    if e_max is None:
        e = default_e_grid(results, n_points=51)
    else:
        step = e_step or max(1, e_max // 50)
        e = np.arange(0, e_max + 1, step, dtype=np.int64)
    points = table_points(e)
    # The table's round values join the grid, so every curve is computed once, for the table and the files alike.
    e = np.union1d(e, np.asarray(points, dtype=np.int64))
    if plotter is not None and labelled:
        # The plot's helper lays out its figure (lines, grid, legend, titles) while the curves are computed.
        plotter.prepare(plot_layout(results, e), title=title, subtitle=subtitle)
    compute_curves(labelled, e)
    typer.echo(f"\n{title} -- {subtitle}")
    if labelled:
        typer.echo("certified accuracy (%), a provable lower bound; threat model: "
                   f"{settings.get('threat_model', 'general')}; spec section of each certificate in brackets\n")
        typer.echo(summary_table(labelled, points))
    if len(labelled) < len(results):
        typer.echo("\nwithout labels: predictions certified (%) -- share of test inputs whose prediction provably "
                   "survives every poisoned training set of size e (individual certificate)\n")
        typer.echo(prediction_table([r for r in results if not r.has_labels], points))
    for result in results:
        empty = int(result.metadata.get("n_no_neighbour", 0))
        if empty:
            typer.secho(f"note: {result.label()}: {empty} of {result.n_test} test inputs have no training example "
                        "within the radius; they predict the largest label by the tie rule", fg="yellow", err=True)
    paths = write_outputs(results, e, out, title=title, subtitle=subtitle, settings=settings, plotter=plotter)
    typer.echo("\nwrote " + ", ".join(str(path) for path in paths.values()))


@app.command()
@_friendly
def demo(
    out: OutOption = Path("poisoncert-out"),
    knn: Annotated[list[int], typer.Option(help="k values (repeat the option for a sweep).")] = [50],  # noqa: B006
    rnn: Annotated[list[float], typer.Option(help="radii (repeat the option for a sweep).")] = [10.0],  # noqa: B006
    progress: ProgressOption = False,
) -> None:
    """Certify kNN and rNN on scikit-learn's bundled digits (embedded data, seconds), print a table, write CSV+PNG."""
    from .datasets import load
    from .experiments import certify_methods, prepare_output_folder
    from .features import raw_pixels

    prepare_output_folder(out)
    with _plotter(True) as plotter:
        data = load("digits")
        X_train, X_test = raw_pixels(data.X_train), raw_pixels(data.X_test)
        raw = raw_pixels(data.X_train[:1])
        settings = {"dataset": "digits (scikit-learn, bundled)", "split": data.metadata().get("split", ""),
                    "features": "raw pixels scaled to [0, 1]", "metric": "l1", "threat_model": "general",
                    "n_features": int(raw.shape[1])}
        results = certify_methods(X_train, data.y_train, X_test, data.y_test, knn=knn, rnn=rnn, metric="l1",
                                  progress=progress, metadata={"dataset": "digits", "features": "raw pixels"})
        _report(results, None, None, out, "poisoncert demo: certified accuracy on digits",
                f"digits (n_train={len(X_train)}, n_test={len(X_test)}), raw pixels, l1, general threat model",
                settings, plotter)


_OBJECT_ARRAYS = ("{path} holds object arrays (such as labels from pandas), which poisoncert does not unpickle; "
                  "save them as strings or integers, e.g. np.asarray(y, dtype=str)")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Report a .npy/.npz file that NumPy cannot read safely in one line, naming the file."""
    import zipfile

    try:
        yield
    except ValueError as error:
        if "Object arrays" in str(error):
            _fail(_OBJECT_ARRAYS.format(path=path))
        # numpy reads anything without its magic number as a pickle, which allow_pickle=False refuses.
        reason = "not a NumPy file" if "pickled" in str(error) else str(error)
        _fail(f"{path} is not a valid {path.suffix} file ({reason})")
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        _fail(f"{path} is not a valid {path.suffix} file ({_describe(error)})")


def _load_array(path: Path):
    import numpy as np

    with _reading(path):
        return np.load(path, allow_pickle=False)


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        _fail(f"{what} file not found: {path}")
    if not path.is_file():
        _fail(f"{what} {path} is a folder, not a file")


def _load_table(path: Path, labels: Path | None, role: str, unlabelled: bool = False):
    """Features and labels of a train/test file; the test labels may be absent (then None: predictions only)."""
    import numpy as np

    _check_file(path, role)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        # Arrays are read lazily from the archive, so reading them is inside the same error report.
        with _reading(path), np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            if role == "test" and "X" in keys and ("y" not in keys or unlabelled):
                return archive["X"], None
            if not {"X", "y"} <= keys:
                _fail(f"{path} must hold arrays named X and y, found {sorted(keys)}")
            return archive["X"], archive["y"]
    if suffix == ".npy":
        X = _load_array(path)
        if labels is None and role == "test":
            return X, None
        if labels is None:
            _fail(f"{role} features {path} are a .npy file: give the labels with --{role}-labels FILE")
        _check_file(labels, f"{role} labels")
        if labels.suffix.lower() == ".npy":
            return X, _load_array(labels)
        return X, _read_text_labels(labels)
    if suffix in (".csv", ".txt"):
        try:
            rows = np.genfromtxt(path, delimiter=",", dtype=str, ndmin=2)
        except ValueError as error:
            _fail(f"{path} is not a regular CSV (every row needs the same number of columns): {error}")
        if unlabelled and role == "test":
            try:
                float(rows[0, 0])
            except ValueError:
                rows = rows[1:]
            try:
                return rows.astype(np.float64), None
            except ValueError as error:
                _fail(f"{path}: with --unlabelled every column is a feature and must be numeric ({error})")
        if rows.ndim != 2 or rows.shape[1] < 2 or rows.shape[0] == 0:
            _fail(f"{path} must be a CSV with feature columns and the label in the last column")
        header = 0
        try:
            float(rows[0, 0])
        except ValueError:
            rows, header = rows[1:], 1
        empty = np.flatnonzero(np.char.strip(rows[:, -1]) == "")
        if empty.size:
            _fail(f"{path}: line {int(empty[0]) + 1 + header} has an empty label (last column)")
        try:
            X = rows[:, :-1].astype(np.float64)
        except ValueError as error:
            _fail(f"{path}: feature columns must be numeric ({error})")
        return X, rows[:, -1]
    _fail(f"{path}: unsupported file type {suffix!r}; use .npz (X, y), .npy (+ labels) or .csv (label last)")
    raise AssertionError


def _read_text_labels(path: Path):
    import numpy as np

    labels = np.array([line.strip() for line in path.read_text().splitlines()])
    if labels.size == 0:
        _fail(f"{path} holds no labels")
    if np.any(labels == ""):
        _fail(f"{path}: line {int(np.flatnonzero(labels == '')[0]) + 1} is empty (one label per line)")
    return labels


def _harmonise_labels(y_train, y_test):
    """Read train and test labels the same way: integers when every label of both is a whole number, else text.

    Files are parsed separately, so without this "1.0" in one file and "1" in the other would be different labels.
    ``y_test`` may be None (an unlabelled test set).
    """
    import numpy as np

    if y_test is None:
        return _harmonise_labels(y_train, np.array([], dtype=str))[0], None
    text = np.concatenate([np.asarray(y_train).astype(str), np.asarray(y_test).astype(str)])
    try:
        numbers = text.astype(np.float64)
    except ValueError:
        labels = text
    else:
        if not np.all(np.isfinite(numbers)):
            _fail("labels contain NaN or infinite values")
        labels = numbers.astype(np.int64) if np.all(numbers == np.round(numbers)) else text
    return labels[: len(y_train)], labels[len(y_train):]


@dataclass
class _Inputs:
    """Training and test data of a command, with what they are (results metadata) and a short source name."""

    X_train: Any
    y_train: Any
    X_test: Any
    y_test: Any
    info: dict[str, Any]
    source: str

    def subtitle(self, metric: str, threat_model: str) -> str:
        return (f"{self.source}, n_train={len(self.X_train)}, n_test={len(self.X_test)}, {metric}, {threat_model} "
                "threat model")


def _load_inputs(*, train: Path | None, test: Path | None, train_labels: Path | None, test_labels: Path | None,
                 dataset: str | None, features: str, data_path: Path | None, checkpoint: Path | None,
                 cache_dir: Path | None, unlabelled: bool, progress: bool) -> _Inputs:
    """Features and labels from --dataset or --train/--test files, checked, with a description of their source."""
    import numpy as np

    if dataset is not None:
        if train is not None or test is not None:
            _fail("give either --dataset or --train/--test files, not both")
        from .features import dataset_features

        X_train, y_train, X_test, y_test, info = dataset_features(
            dataset, features, path=data_path, checkpoint=checkpoint, cache_dir=cache_dir, progress=progress)
        source = f"{dataset} ({features} features)"
    else:
        if train is None or test is None:
            _fail("give --train and --test files (or --dataset NAME)")
        X_train, y_train = _load_table(train, train_labels, "train")
        X_test, y_test = _load_table(test, test_labels, "test", unlabelled=unlabelled)
        if y_test is None:
            typer.secho(f"note: {test} has no labels: certifying the predictions only (no accuracy curves)",
                        fg="yellow", err=True)
        for path, X in ((train, X_train), (test, X_test)):
            if np.ndim(X) != 2:
                _fail(f"{path}: features must be a 2-D array (n_samples, n_features), got shape {np.shape(X)}")
        if X_train.shape[1] != X_test.shape[1]:
            _fail(f"--test {test} has {X_test.shape[1]} features but --train {train} has {X_train.shape[1]}")
        y_train, y_test = _harmonise_labels(y_train, y_test)
        info = {"dataset": f"user files: {train}, {test}", "features": "as given"}
        source = f"{train.name} / {test.name}"
    return _Inputs(X_train, y_train, X_test, y_test, info, source)


# Inputs shared by `certify` and `attack`.
TrainInput = Annotated[Path | None, typer.Option(help="Training set: .npz with X and y, .csv (label in the last "
                                                      "column) or .npy features (then --train-labels).")]
TestInput = Annotated[Path | None, typer.Option(help="Test set, same formats as --train.")]
TrainLabelsInput = Annotated[Path | None, typer.Option(help="Labels for .npy training features: .npy, or a text "
                                                             "file with one label per line.")]
TestLabelsInput = Annotated[Path | None, typer.Option(help="Labels for .npy test features (as --train-labels)."
                                                            )]
DatasetInput = Annotated[str | None, typer.Option(help="A registry dataset instead of files (see `poisoncert "
                                                     "datasets`): mnist, fashion-mnist, cifar10, digits.")]
FeaturesInput = Annotated[str, typer.Option(help="Feature extractor for --dataset: hog, raw, clip or "
                                               "efficientnet-lite0.")]
DataPathInput = Annotated[Path | None, typer.Option(help="Local file/folder for datasets that need one "
                                                        "(CIFAR10, Fashion-MNIST).")]
CheckpointInput = Annotated[Path | None, typer.Option(help="Local CLIP checkpoint for --features clip: a Hugging "
                                                         "Face CLIP folder or an open_clip file.")]
CacheDirInput = Annotated[Path | None, typer.Option(help="Cache folder (default: $POISONCERT_CACHE or the "
                                                        "user cache dir).")]


BACKENDS = ("auto", "numba", "torch")
BackendOption = Annotated[str, typer.Option(help="Neighbour search engine of this process (its certificates and "
                                                 "attack refits): auto (PyTorch on a CUDA GPU where PyTorch is "
                                                 "installed and finds one, else numba), numba (every CPU core) or "
                                                 "torch (PyTorch: the GPU where there is one, else the CPU). "
                                                 "Results are bit-identical.")]


def _check_backend(backend: str, scheduler: str | None) -> None:
    if backend not in BACKENDS:
        _fail(f"unknown --backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if scheduler is not None and backend != "auto":
        _fail("--backend chooses the engine of this process; with --scheduler the search runs on the Dask "
              "workers (each picks its own, as 'auto' does): give one of the two")
    if backend == "torch":
        if importlib.util.find_spec("torch") is None:
            _fail("--backend torch needs PyTorch: pip install 'poisoncert[torch]'")
        try:  # the search imports it anyway: a broken install is reported now, before the output folder exists
            import torch  # noqa: F401
        except Exception as error:  # whatever the failure, it is the user's to see
            _fail(f"--backend torch: PyTorch does not import ({type(error).__name__}: {error})")


@contextlib.contextmanager
def _neighbour_backend(scheduler: str | None, backend: str = "auto") -> Iterator[str]:
    """``backend`` (this process), or "dask" with a client connected to ``scheduler`` for the duration."""
    if scheduler is None:
        yield backend
        return
    from .distributed import connect

    with connect(scheduler):
        yield "dask"


@app.command()
@_friendly
def certify(
    train: TrainInput = None,
    test: TestInput = None,
    train_labels: TrainLabelsInput = None,
    test_labels: TestLabelsInput = None,
    dataset: DatasetInput = None,
    features: FeaturesInput = "hog",
    data_path: DataPathInput = None,
    checkpoint: CheckpointInput = None,
    cache_dir: CacheDirInput = None,
    knn: Annotated[list[int], typer.Option(help="kNN with this k (repeat for a sweep).")] = [],  # noqa: B006
    rnn: Annotated[list[float], typer.Option(help="rNN with this radius (repeat for a sweep).")] = [],  # noqa: B006
    dpa: Annotated[list[int], typer.Option(help="DPA with this many partitions.")] = [],  # noqa: B006
    bagging: Annotated[list[str], typer.Option(help="Bagging N:XI (N base classifiers on XI examples "
                                                    "each), e.g. 1000:27.")] = [],  # noqa: B006
    alpha: Annotated[float, typer.Option(help="Bagging: certificates hold with probability >= 1 - alpha.")] = 0.001,
    metric: MetricOption = "l1",
    threat_model: ThreatOption = "general",
    e_max: Annotated[int | None, typer.Option(help="Largest poisoning size on the curve (default: automatic). kNN's "
                                                   "neighbour table reaches k + e-max for the joint certificates "
                                                   "(default k + k).")] = None,
    e_step: Annotated[int | None, typer.Option(help="Step of the poisoning-size grid.")] = None,
    unlabelled: Annotated[bool, typer.Option("--unlabelled", help="The --test file has no labels (a CSV whose every "
                                                                  "column is a feature): certify the predictions "
                                                                  "only.")] = False,
    split_time_limit: Annotated[float | None, typer.Option(help="Seconds of search per poisoning size for the "
                                                                "split joint certificates (values left open stay "
                                                                "sound and are marked not exact). Default: exact."
                                                                )] = None,
    attack: Annotated[str | None, typer.Option(help="Also attack every kNN/rNN at these budgets, e.g. 500,1000: "
                                                    "verified poisoned sets (upper bounds) next to the certified "
                                                    "lower bounds (bracket.csv/png, attack-*.npz).")] = None,
    attack_time_budget: AttackBudgetOption = 180.0,
    seed: SeedOption = 0,
    scheduler: Annotated[str | None, typer.Option(help="Run the kNN/rNN neighbour search on a Dask cluster: "
                                                       "tcp://HOST:PORT of a running scheduler, or local:N to "
                                                       "start N local worker processes (pip install "
                                                       "'poisoncert[dask]'). Results are bit-identical.")] = None,
    backend: BackendOption = "auto",
    neighbour_cache: Annotated[bool, typer.Option(
        "--neighbour-cache/--no-neighbour-cache",
        help="Keep the kNN/rNN neighbour tables in the cache folder, keyed by content (training and test features, "
             "metric, k + e-max, radii), and reuse them when the same search comes again (MNIST, k = 5000: 200 MB)."
    )] = True,
    out: OutOption = Path("poisoncert-out"),
    progress: ProgressOption = True,
) -> None:
    """Certify classifiers on your own features/labels or on a registry dataset; write curves as CSV, PNG, JSON.

    Test inputs without labels (an .npz without y, a .npy without --test-labels, or --unlabelled) get certified
    sizes for their predictions, which need no label, and no accuracy curves.
    """

    from .experiments import certify_methods, check_methods, parse_budgets, prepare_output_folder

    budgets = None if attack is None else parse_budgets(attack)
    if budgets is not None and not (knn or rnn):
        _fail("--attack needs a kNN or rNN classifier (--knn K or --rnn R)")
    if not (knn or rnn or dpa or bagging):
        _fail("choose at least one classifier: --knn K, --rnn R, --dpa ZETA or --bagging N:XI")
    bagging_specs = _parse_bagging(bagging)
    _check_e_grid(e_max, e_step)
    _check_backend(backend, scheduler)
    if split_time_limit is not None and not split_time_limit > 0:
        _fail(f"--split-time-limit must be a positive number of seconds, got {split_time_limit}")
    prepare_output_folder(out)  # an output folder that cannot be written fails before any work
    methods = {"knn": knn, "rnn": rnn, "dpa": dpa, "bagging": bagging_specs, "alpha": alpha, "metric": metric,
               "threat_model": threat_model}
    # The plot's helper process imports matplotlib (0.6 s of one core) while this one imports numba and loads the
    # data (one core is idle then): started first, it is done about when the neighbour search takes both cores.
    with _plotter(not unlabelled) as plotter:
        with _collector_paused():  # numba is imported by the first check
            check_methods(None, **methods)  # every parameter is checked before any data is read
        with _neighbour_backend(scheduler, backend) as search_backend:
            inputs = _load_inputs(train=train, test=test, train_labels=train_labels, test_labels=test_labels,
                                  dataset=dataset, features=features, data_path=data_path, checkpoint=checkpoint,
                                  cache_dir=cache_dir, unlabelled=unlabelled, progress=progress)
            settings = {**inputs.info, "metric": metric, "threat_model": threat_model,
                        "alpha": alpha if bagging else None, "split_time_limit_s": split_time_limit,
                        "neighbour_backend": search_backend, "scheduler": scheduler}
            results = certify_methods(inputs.X_train, inputs.y_train, inputs.X_test, inputs.y_test, **methods,
                                      backend=search_backend, progress=progress, metadata=inputs.info, max_e=e_max,
                                      time_limit=split_time_limit,
                                      neighbour_cache=_cache_folder(cache_dir) if neighbour_cache else None)
            # What is alive now (modules, numba's kernels, the results) stays until the process ends: frozen, the
            # cyclic collector stops walking it (a full collection during the output files took 0.06 s on MNIST).
            _freeze_survivors()
            if any(result.metadata.get("neighbour_tables_from_cache") for result in results):
                typer.echo("neighbour tables read from the cache (same data, metric, k + e-max and radii as an earlier "
                           "run; --no-neighbour-cache searches again)", err=True)
            subtitle = inputs.subtitle(metric, threat_model)
            _report(results, e_max, e_step, out, "Certified accuracy under data poisoning", subtitle, settings,
                    plotter)  # without labels there is no plot, and the helper ends when the block does
            if budgets is not None:
                if inputs.y_test is None:
                    _fail("--attack needs test labels: an attack's verified accuracy is measured on them")
                _attack_report(inputs, budgets, knn=knn, rnn=rnn, metric=metric, threat_model=threat_model, seed=seed,
                               time_budget=attack_time_budget, progress=progress, results=results, settings=settings,
                               out=out, backend=backend)  # this process's engine ("auto" with a scheduler)


def _attack_report(inputs: _Inputs, budgets: list[int], *, knn: list[int], rnn: list[float], metric: str,
                   threat_model: str, seed: int, time_budget: float, progress: bool, results: list | None,
                   settings: dict[str, Any], out: Path, backend: str = "auto") -> None:
    """Attack every kNN/rNN at every budget, print the bracket table and write the attack files."""
    from .experiments import bracket_table, run_attacks, write_attack_outputs

    runs = run_attacks(inputs.X_train, inputs.y_train, inputs.X_test, inputs.y_test, budgets, knn=knn, rnn=rnn,
                       metric=metric, threat_model=threat_model, seed=seed, time_budget=time_budget,
                       progress=progress, results=[r for r in results or () if r.method in ("knn", "rnn")],
                       metadata=inputs.info, backend=backend)
    subtitle = inputs.subtitle(metric, threat_model)
    typer.echo("\nbracket: certified lower bound <= CA(e) <= verified attack accuracy (the classifier refitted on "
               f"the poisoned set); threat model: {threat_model}\n")
    typer.echo(bracket_table(runs))
    paths = write_attack_outputs(runs, out, title="Certified lower bounds and verified attacks", subtitle=subtitle,
                                 settings={**settings, "attack_seed": seed, "attack_time_budget_s": time_budget})
    typer.echo("\nwrote " + ", ".join(str(path) for path in paths.values()))


@app.command("attack")
@_friendly
def attack_command(
    train: TrainInput = None,
    test: TestInput = None,
    train_labels: TrainLabelsInput = None,
    test_labels: TestLabelsInput = None,
    dataset: DatasetInput = None,
    features: FeaturesInput = "hog",
    data_path: DataPathInput = None,
    checkpoint: CheckpointInput = None,
    cache_dir: CacheDirInput = None,
    knn: Annotated[list[int], typer.Option(help="Attack kNN with this k (repeatable).")] = [],  # noqa: B006
    rnn: Annotated[list[float], typer.Option(help="Attack rNN with this radius (repeatable).")] = [],  # noqa: B006
    e: Annotated[str, typer.Option("--e", help="Budgets, e.g. 500,1000,1500,2000.")] = "",
    metric: MetricOption = "l1",
    threat_model: ThreatOption = "general",
    time_budget: AttackBudgetOption = 180.0,
    seed: SeedOption = 0,
    backend: BackendOption = "auto",
    out: OutOption = Path("poisoncert-out"),
    progress: ProgressOption = True,
) -> None:
    """Verified poisoning attacks: for each classifier and budget e, one poisoned training set, refitted and tested.

    Writes attack-<classifier>-e<e>.npz (removed rows, added_X, added_y, e) with a JSON record each, and
    bracket.csv/json/png: the certified lower bound next to the verified accuracy, with the band between them.
    """
    from .experiments import check_methods, parse_budgets

    if not (knn or rnn):
        _fail("choose at least one classifier to attack: --knn K or --rnn R")
    if not e:
        _fail("give the budgets with --e, e.g. --e 500,1000")
    budgets = parse_budgets(e)
    if not time_budget > 0:
        _fail(f"--time-budget must be a positive number of seconds, got {time_budget}")
    check_methods(None, knn=knn, rnn=rnn, metric=metric, threat_model=threat_model)
    _check_backend(backend, None)
    inputs = _load_inputs(train=train, test=test, train_labels=train_labels, test_labels=test_labels,
                          dataset=dataset, features=features, data_path=data_path, checkpoint=checkpoint,
                          cache_dir=cache_dir, unlabelled=False, progress=progress)
    if inputs.y_test is None:
        _fail("attacks need test labels: an attack's verified accuracy is measured on them")
    settings = {**inputs.info, "metric": metric, "threat_model": threat_model, "neighbour_backend": backend}
    _attack_report(inputs, budgets, knn=knn, rnn=rnn, metric=metric, threat_model=threat_model, seed=seed,
                   time_budget=time_budget, progress=progress, results=None, settings=settings, out=out,
                   backend=backend)


CacheOption = Annotated[Path | None, typer.Option(help="Cache folder (default: $POISONCERT_CACHE or the user "
                                                        "cache dir).")]


@app.command("datasets")
@_friendly
def list_datasets(cache_dir: CacheOption = None) -> None:
    """List the datasets poisoncert can load and whether each is available on this machine now."""
    from .datasets import registry

    rows = registry(cache_dir=cache_dir)
    width = max(len(row.name) for row in rows)
    for row in rows:
        status = "available" if row.available else "not local"
        typer.echo(f"{row.name.ljust(width)}  {status:<10} {row.description}\n{' ' * width}  {'':<10} from: "
                   f"{row.location}")


@app.command("features")
@_friendly
def materialise_features(
    dataset: Annotated[str, typer.Argument(help="mnist, fashion-mnist, cifar10 or digits.")],
    extractor: Annotated[str, typer.Option(help="hog, raw, clip or efficientnet-lite0.")] = "hog",
    data_path: Annotated[Path | None, typer.Option(help="Local file/folder for the dataset.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Local checkpoint for --extractor clip.")] = None,
    cache_dir: CacheOption = None,
    progress: ProgressOption = True,
) -> None:
    """Extract (or reuse) the cached features of both splits of DATASET."""
    from .features import dataset_features

    X_train, _, X_test, _, info = dataset_features(dataset, extractor, path=data_path, checkpoint=checkpoint,
                                                   cache_dir=cache_dir, progress=progress)
    typer.echo(json.dumps({**info, "train_shape": list(X_train.shape), "test_shape": list(X_test.shape)},
                          indent=2))


@app.command()
def version() -> None:
    """Print the installed poisoncert version."""
    from . import __version__

    typer.echo(json.dumps({"poisoncert": __version__}))


def _register_subcommands() -> None:
    from .reproduce import register_cli

    register_cli(app)


_register_subcommands()


def main() -> None:
    """The ``poisoncert`` console script: :data:`app`, then exit without the interpreter's finalisation.

    When a command has returned, its files are written (atomically, fsynced) and what is left is Python's teardown,
    which after a certify run spends 0.25-0.35 s of CPU unloading Numba's compiled code and freeing some 10^5
    objects, about 5 % of the MNIST command. So the exit status is settled as ``sys.exit`` would settle it, the
    ``atexit`` handlers run, the standard streams are flushed, and the process ends at once; the OS reclaims the
    rest. Where another thread is still alive (a library's worker), the normal exit path is taken instead, which
    joins it. What finalisation alone would do is skipped: flushing file objects left open (poisoncert writes every
    file in a ``with`` block) and ``__del__`` methods. Only here does certify tune the cyclic collector for the
    command (:func:`_collector_paused`); called in-process (tests, notebooks) the commands leave it as it was.
    """
    import atexit
    import sys
    import threading

    global _OWN_PROCESS
    _OWN_PROCESS = True
    try:
        app()
        status: object = 0
    except SystemExit as done:
        status = done.code
    if threading.active_count() > 1:
        sys.exit(status)
    if status is None:
        code = 0
    elif isinstance(status, int):
        code = status if -(2**63) <= status < 2**63 else -1  # as CPython reads it: a C long, -1 on overflow
    else:  # sys.exit("message") prints the message and exits with 1
        print(status, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # what Python would run before finalising (no public API runs them early)
    for stream in (sys.stdout, sys.stderr):
        if stream is None or stream.closed:  # closed by the command: Python skips it at exit too
            continue
        try:
            stream.flush()
        except OSError:  # a closed pipe: nothing more can be delivered to it
            code = code or 120  # Python's own status when flushing standard streams fails at exit
    os._exit(code & 0xFF)


if __name__ == "__main__":  # pragma: no cover
    main()
