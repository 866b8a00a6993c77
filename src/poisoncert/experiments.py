"""Pipelines: features -> neighbour tables -> votes -> certificates -> curves -> tables and plots.

The CLI and the paper reproduction are thin wrappers over these functions.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from ._io import write_json
from .results import CertificationResult, write_curves_csv

if TYPE_CHECKING:
    from .plots import BackgroundPlotter


def check_methods(
    n_train: int | None,
    *,
    knn: Sequence[int] = (),
    rnn: Sequence[float] = (),
    dpa: Sequence[int] = (),
    bagging: Sequence[tuple[int, int]] = (),
    alpha: float = 0.001,
    metric: str = "l1",
    threat_model: str = "general",
) -> None:
    """Check every parameter of a :func:`certify_methods` call, so that bad input fails before any work.

    ``n_train`` (None: not known yet) adds the check that no k exceeds the training set.
    """
    from ._validation import check_metric, check_positive_int, check_radii
    from .certify import _check_threat_model

    for k in knn:
        check_positive_int(k, "k (--knn)")
        if n_train is not None and k > n_train:
            raise ValueError(f"k={k} is larger than the training set ({n_train} examples)")
    if rnn:
        check_radii(list(rnn))
    for zeta in dpa:
        check_positive_int(zeta, "DPA partitions (--dpa)")
    for n_estimators, subsample_size in bagging:
        check_positive_int(n_estimators, "Bagging base classifiers N")
        check_positive_int(subsample_size, "Bagging subsample size XI")
    if bagging and (isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1):
        raise ValueError(f"alpha must be a number in (0, 1), got {alpha!r}")
    check_metric(metric)
    if _check_threat_model(threat_model) != "general" and (dpa or bagging):
        raise ValueError("DPA and Bagging are certified under the general threat model only")


def certify_methods(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray | None,
    *,
    knn: Sequence[int] = (),
    rnn: Sequence[float] = (),
    dpa: Sequence[int] = (),
    bagging: Sequence[tuple[int, int]] = (),
    alpha: float = 0.001,
    metric: str = "l1",
    threat_model: str = "general",
    backend: str = "auto",
    progress: bool = False,
    metadata: dict[str, Any] | None = None,
    max_e: int | None = None,
    time_limit: float | None = None,
    neighbour_cache: str | os.PathLike[str] | None = None,
) -> list[CertificationResult]:
    """Certify every requested classifier on one train/test split (``y_test`` None: predictions only).

    kNN for every k and rNN for every radius come from one neighbour pass (:func:`certify_neighbours`); the kNN
    table reaches ``max(k) + max_e`` for the joint certificates (``max_e`` default: ``max(k)``). ``time_limit``
    bounds the split certificates' search per poisoning size. Each result records its run time and ``metadata``.
    ``neighbour_cache``: a cache folder that keeps and reuses that pass's tables (None: search every time).
    """
    from ._classifiers import certify_neighbours

    check_methods(len(X_train), knn=knn, rnn=rnn, dpa=dpa, bagging=bagging, alpha=alpha, metric=metric,
                  threat_model=threat_model)
    results: list[CertificationResult] = []
    if knn or rnn:
        start = time.perf_counter()
        knn_results, rnn_results = certify_neighbours(
            X_train, y_train, X_test, y_test, knn=list(knn), rnn=list(rnn), threat_model=threat_model,
            max_e=max_e, time_limit=time_limit, metric=metric, backend=backend, progress=progress,
            neighbour_cache=neighbour_cache)
        both = "kNN and rNN" if knn and rnn else ("kNN" if knn else "rNN")
        found = [*knn_results.values(), *rnn_results.values()]
        cached = " (neighbour tables read from the cache)" if found[0].metadata["neighbour_tables_from_cache"] else ""
        _stamp(found, time.perf_counter() - start,
               f"one neighbour pass for {both}, every k and r, and the individual certificates{cached}", metadata)
        results.extend(knn_results.values())
        results.extend(rnn_results.values())
    for n_partitions in dpa:
        from .baselines import DPA

        start = time.perf_counter()
        result = DPA(n_partitions=n_partitions, progress=progress).fit(X_train, y_train).certify(X_test, y_test)
        _stamp([result], time.perf_counter() - start, "DPA fit + certify", metadata)
        results.append(result)
    for n_estimators, subsample_size in bagging:
        from .baselines import Bagging

        start = time.perf_counter()
        model = Bagging(n_estimators=n_estimators, subsample_size=subsample_size, alpha=alpha, progress=progress)
        result = model.fit(X_train, y_train).certify(X_test, y_test)
        _stamp([result], time.perf_counter() - start, "Bagging fit + certify", metadata)
        results.append(result)
    return results


def _stamp(results: Any, seconds: float, what: str, metadata: dict[str, Any] | None) -> None:
    for result in results:
        result.metadata.update(metadata or {})
        result.metadata["run_time_s"] = round(seconds, 3)
        result.metadata["run_time_covers"] = what


def default_e_grid(results: Sequence[CertificationResult], n_points: int = 101) -> np.ndarray:
    """An even grid of poisoning sizes from 0 to just past where every curve has reached zero.

    A kNN result whose neighbour table supports the split certificate only up to ``max_e`` caps the grid there.
    """
    largest = 0
    probes = []
    for result in results:
        if not result.has_labels:  # only the certified share of predictions: it is zero past the largest size
            largest = max(largest, int(np.max(result.certified_size, initial=0)) + 1)
            continue
        # rNN joint certificates (5b, 5d) reach zero by the largest vote margin, at most 2 * (individual size + 1).
        end = 2 * int(np.max(result.certified_size, initial=0)) + 2
        if result.method == "knn" and result.available_methods != ("individual",):
            # kNN's joint curves can outlast that (an input becomes free to flip only near (k - M + 1) / 2).
            k = int(result.params["k"])
            cap = 2 * k if result.max_e is None else min(2 * k, result.max_e)
            probes.append((result, min(end, cap), cap))
            continue
        largest = max(largest, end)
    for result, end, cap in probes:
        method = "split" if "split" in result.available_methods else "global"
        # Probe at round values (multiples of 100 past 1000), which the grid usually contains as well; a curve
        # that could not reach past the other curves' end needs no probe (its certificate can be costly).
        while end < cap and cap > largest and result.certified_accuracy([end], method=method)[0] > 0:
            end = min(cap, int(end * 1.5) + 1)
            end = end if end < 1000 else min(cap, -(-end // 100) * 100)
        largest = max(largest, end)
    step = max(1, int(np.ceil(largest / (n_points - 1))))
    grid = np.arange(0, largest + step, step, dtype=np.int64)
    caps = [r.max_e for r in results if r.method == "knn" and r.max_e is not None and r.has_labels]
    return grid[grid <= min(caps)] if caps else grid


def compute_curves(results: Sequence[CertificationResult], e: np.ndarray) -> None:
    """Compute (and keep in each result) every available curve of every result on the grid ``e``.

    Each curve is computed once on the whole grid (one split search over the sizes in order). Two curves are
    computed at a time, side by side, where numba's threading layer allows it, the split curves first and the
    kNN ones first among them: a split curve's branch and bound keeps both cores busy only part of the time (its
    profiles are built and its last sizes run on one), and the other curves fill that time. On MNIST with kNN and
    rNN the kNN split curve is 2.5 of the 3.6 CPU-seconds; started after its result's other curves, as when results
    were the unit of work, it ran alone at the end. Two, not all: a sweep's split certifiers would otherwise hold
    their profiles in memory all at once.
    """
    from .joint_split import _threadsafe_workers

    # Curves of one result are independent (each method its own cache and certifier), so they may run side by side.
    tasks = [(result, method) for result in results for method in result.available_methods]
    tasks.sort(key=lambda task: (task[1] != "split", task[0].method != "knn"))  # stable: the given order otherwise
    if len(tasks) < 2 or _threadsafe_workers(2) < 2:
        for result, method in tasks:
            result.curve(e, method)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(result.curve, e, method) for result, method in tasks]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()  # the curves not started yet; a running one finishes first
            raise


def plot_layout(results: Sequence[CertificationResult], e: np.ndarray) -> list[dict[str, Any]]:
    """The layout of the plot :func:`write_outputs` draws for these results on the grid ``e``
    (:func:`poisoncert.plots.curve_layout`), known before any curve is computed."""
    from .plots import curve_layout

    return curve_layout([{**result.curve_fields(method), "e": size} for result in results
                         for method in result.available_methods for size in np.asarray(e).tolist()])


def table_points(e: np.ndarray, n_columns: int = 5) -> list[int]:
    """Round poisoning sizes for a printed table: 0 and multiples of a 1-2-2.5-5 step up to half the grid.

    The grid of :func:`default_e_grid` runs to where every curve is zero; its first half is where the curves
    differ, so the table spreads ``n_columns`` round values (e.g. 0, 500, ..., 2000) over it.
    """
    half = int(np.max(e, initial=0)) / 2
    if half < 1:
        return [0]
    raw = half / (n_columns - 1)
    magnitude = 10.0 ** np.floor(np.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    step = max(1, int(round(step)))
    return [i * step for i in range(n_columns) if i * step <= 2 * half]


def summary_table(results: Sequence[CertificationResult], e_points: Sequence[int]) -> str:
    """Plain-text table of certified accuracy (%) at a few poisoning sizes, one row per curve.

    The certification column names the spec section of each curve; a value marked ``*`` is sound but not exact
    (a split certificate's search stopped at its time or node limit, or used a coarsened table).
    """
    header = ["classifier", "certification", "CA(0) clean"] + [f"e={e}" for e in e_points]
    rows = []
    loose = False
    for result in results:
        for method in result.available_methods:
            values, exact = result.curve(list(e_points), method=method)
            name = f"{method} ({result.spec_section(method)})"
            if result.guarantee == "probabilistic":
                name += f" prob. {result.confidence}"
            cells = [f"{100 * v:.1f}" + ("" if ok else "*") for v, ok in zip(values, exact, strict=True)]
            loose |= not exact.all()
            rows.append([result.label(), name, f"{100 * result.clean_accuracy:.1f}", *cells])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in [header, *rows]]
    table = "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])
    if loose:
        table += "\n* sound lower bound, not exact (search limit or coarsened table)"
    return table


def write_outputs(
    results: Sequence[CertificationResult],
    e: np.ndarray,
    out_dir: str | Path,
    *,
    title: str,
    subtitle: str,
    settings: dict[str, Any],
    stem: str = "curves",
    plotter: BackgroundPlotter | None = None,
) -> dict[str, Path]:
    """Write ``<stem>.csv`` (tidy curves + metadata), ``<stem>.png``, ``<stem>.json`` and ``examples.csv``.

    The files are written as a set: all of them go to a staging folder inside ``out_dir`` first and are
    renamed into place only when every one is complete, so a failure leaves the previous outputs as they were
    (never a new CSV next to an old JSON). Without any labelled result there are no curves: only the JSON
    (metadata, certified sizes) and ``examples.csv`` are written. With a ``plotter``
    (:class:`poisoncert.plots.BackgroundPlotter`, started earlier) the PNG is drawn by its helper process while
    the other files are written; otherwise here.
    """
    from .plots import plot_curves

    out_dir = Path(out_dir)
    paths = prepare_output_folder(out_dir, stem, create=True)
    curves = [result.curve_rows(e) for result in results]  # computed once for the CSV, the plot and the JSON
    rows = [row for result_rows in curves for row in result_rows]
    if not rows:
        paths = {kind: path for kind, path in paths.items() if kind in ("json", "examples")}
    with _staged(out_dir) as staging:
        staged = {kind: staging / path.name for kind, path in paths.items()}
        if rows:
            if plotter is not None:
                plotter.plot_curves(rows, staged["png"], title=title, subtitle=subtitle)
            write_curves_csv(staged["csv"], list(results), e, extra_metadata=settings, rows=rows)
            if plotter is None:
                plot_curves(rows, staged["png"], title=title, subtitle=subtitle)
        write_json(
            staged["json"],
            {
                "poisoncert_version": __version__,
                "settings": settings,
                "results": [_result_record(result, e, result_rows)
                            for result, result_rows in zip(results, curves, strict=True)],
            },
        )
        write_examples_csv(staged["examples"], results)
        if rows and plotter is not None:
            plotter.wait()
    return paths


@contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """A staging folder inside ``out_dir`` whose files are renamed into ``out_dir`` when the block completes.

    Results are written as a set: an error inside the block leaves ``out_dir`` as it was (the staging folder is
    removed), never a new file next to an old one.
    """
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".poisoncert-staging-") as staging:
        yield Path(staging)
        for path in sorted(Path(staging).iterdir()):
            os.replace(path, out_dir / path.name)


def _output_names(stem: str) -> dict[str, str]:
    return {"csv": f"{stem}.csv", "png": f"{stem}.png", "json": f"{stem}.json", "examples": "examples.csv"}


def prepare_output_folder(out_dir: str | Path, stem: str = "curves", create: bool = False) -> dict[str, Path]:
    """Check that :func:`write_outputs` can write into ``out_dir`` (and create it if asked); return the paths.

    Called before any work as well (``create=False``: nothing is written), so that an output folder that cannot
    exist, or holds a folder where a result file goes, fails at once rather than after the certification.
    """
    out_dir = Path(out_dir)
    paths = {kind: out_dir / name for kind, name in _output_names(stem).items()}
    blocked = [str(path) for path in paths.values() if path.exists() and not path.is_file()]
    if blocked:
        raise FileExistsError(f"cannot write results over {', '.join(blocked)}: not a regular file")
    existing = out_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"cannot create the output folder {out_dir}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the output folder {out_dir}: {existing} is not writable")
    if create:
        out_dir.mkdir(parents=True, exist_ok=True)
    return paths


def write_examples_csv(path: str | Path, results: Sequence[CertificationResult]) -> None:
    """Per-example certificates of every result, one row per (classifier, test input), atomically.

    Columns: classifier, index, y_true, prediction, certified_size (individual, general or the chosen threat
    model; -1 where misclassified or not certified), then one vote count per class (``votes_<class>``).
    """
    from ._io import atomic_write

    buffer = io.StringIO()
    buffer.write(f"# poisoncert {__version__}: per-example individual certificates; certified_size -1 = "
                 "misclassified or not certified; votes are neighbour (kNN/rNN) or base-classifier (DPA, Bagging) "
                 "counts\n")
    header: list[str] | None = None
    for result in results:
        classes = np.asarray(result.classes).tolist()
        if header is None:
            header = ["classifier", "threat_model", "index", "y_true", "prediction", "certified_size",
                      *(f"votes_{name}" for name in classes)]
            buffer.write(_csv_fields(header) + "\r\n")
        n_votes = len(header) - 6  # later results are written under the first one's vote columns
        if result.n_test == 0:
            continue
        votes = result.votes[:, :n_votes]
        # csv.writer's rows, written by one string formatting per result: the class names quoted by csv.writer
        # itself, everything else str() as csv.writer writes it. A Python tuple per row cost more than the numbers.
        # Each name written beside an empty field, as in a row (alone, an empty field would be written as "").
        names = np.array([_csv_fields([name, ""])[:-1] for name in classes], dtype=object)
        columns = np.empty((result.n_test, 4 + votes.shape[1]), dtype=object)
        columns[:, 0] = range(result.n_test)
        columns[:, 1] = "" if result.y_true is None else names[result.y_true]
        columns[:, 2] = names[result.prediction_indices]
        columns[:, 3] = result.certified_size.tolist()
        columns[:, 4:] = votes.tolist()
        prefix = _csv_fields([result.label(), result.threat_model]).replace("%", "%%")
        row = ",".join([prefix, *(["%s"] * columns.shape[1]), *([""] * (n_votes - votes.shape[1]))]) + "\r\n"
        buffer.write((row * result.n_test) % tuple(columns.ravel().tolist()))
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())


def _csv_fields(fields: Sequence[Any]) -> str:
    """``fields`` as csv.writer writes them (quoted where needed), without the line end."""
    buffer = io.StringIO()
    csv.writer(buffer).writerow(fields)  # its own line end: a field holding a line break is quoted for it
    return buffer.getvalue()[:-2]


def _result_record(result: CertificationResult, e: np.ndarray, rows: list[dict[str, Any]]) -> dict[str, Any]:
    record: dict[str, Any] = {"metadata": result.describe(), "curves": rows}
    if result.method == "rnn" and result.threat_model == "general" and result.has_labels:
        record["global_worst_case_removals"] = {
            "meaning": "removals per label of the label-level attacker behind the global joint certificate (5b)",
            "classes": np.asarray(result.classes).tolist(),
            "e": e.tolist(),
            "removals": result.worst_case_removals(e).tolist(),
        }
    if "split" in result.available_methods:
        record["split_worst_case_attack"] = {
            "meaning": f"additions and removals per label of the label-level attacker behind the split joint "
                       f"certificate (spec {result.spec_section('split')}); flips = inputs it flips, max_flips = "
                       "the proved bound (equal where exact); it shows where the model is weakest, not a poisoned "
                       "training set that realises the bound",
            **result.split_attack(e),
        }
    if not result.has_labels:
        record["certified_predictions"] = {
            "meaning": "share of test inputs whose prediction provably survives every poisoned training set of "
                       "size e (individual certificate; no labels, so no accuracy)",
            "e": e.tolist(),
            "share": accuracy_from_sizes(result.certified_size, e).tolist(),
        }
    return record


def accuracy_from_sizes(sizes: np.ndarray, e: np.ndarray) -> np.ndarray:
    from .certify import accuracy_from_certified_sizes

    return accuracy_from_certified_sizes(sizes, e)


def prediction_table(results: Sequence[CertificationResult], e_points: Sequence[int]) -> str:
    """Plain-text table, for unlabelled results, of the share (%) of predictions certified at each e."""
    header = ["classifier", "threat model"] + [f"e={e}" for e in e_points]
    rows = [[r.label(), r.threat_model, *(f"{100 * v:.1f}" for v in accuracy_from_sizes(r.certified_size,
                                                                                        np.asarray(e_points)))]
            for r in results]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
                     for row in [header, *rows])


# --------------------------------------------------------------------------------------------------------------
# Brackets: certified lower bounds next to verified attacks (spec section 8)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AttackRun:
    """One classifier's certificate and its verified attacks at several budgets.

    Attributes
    ----------
    name : str
        File-name form of the classifier, e.g. ``knn-k5000`` or ``rnn-r4``.
    result : CertificationResult
        The certificate of the clean classifier (its default joint curve is the lower bound).
    attacks : list of VerifiedAttack
        One per budget, in the order asked for.
    """

    name: str
    result: CertificationResult
    attacks: list[Any] = field(default_factory=list)

    def bracket_rows(self) -> list[dict[str, Any]]:
        """One row per budget: the certified lower bound, the verified upper bound and the band between."""
        method = self.result.default_method
        budgets = np.array([attack.poisoned.e for attack in self.attacks], dtype=np.int64)
        lower, exact = self.result.curve(budgets, method) if len(budgets) else (np.zeros(0), np.zeros(0, bool))
        rows = []
        for attack, bound, is_exact in zip(self.attacks, lower, exact, strict=True):
            rows.append({
                "classifier": self.result.label(),
                "e": int(attack.poisoned.e),
                "threat_model": attack.poisoned.threat_model,
                "certificate": method,
                "spec_section": self.result.spec_section(method),
                "certified_accuracy": float(bound),
                "certificate_exact": bool(is_exact),
                "attack_accuracy": float(attack.accuracy),
                "band": float(attack.accuracy - bound),
                "poisoning_size": int(attack.poisoning_size),
                "removed": int(len(attack.poisoned.removed)),
                "added": int(len(attack.poisoned.added_X)),
                "attack_seconds": round(float(attack.seconds), 2),
                "strategy": attack.poisoned.strategy,
            })
        return rows


def parse_budgets(text: str) -> list[int]:
    """``"500,1000"`` -> ``[500, 1000]``: distinct poisoning sizes >= 0, in the order given."""
    budgets: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise ValueError(
                f"budgets must be whole numbers separated by commas, such as 500,1000; got {text!r}") from None
        if value < 0:
            raise ValueError(f"a poisoning size must be >= 0, got {value}")
        if value not in budgets:
            budgets.append(value)
    if not budgets:
        raise ValueError("give at least one budget e")
    return budgets


def run_attacks(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    e: Sequence[int],
    *,
    knn: Sequence[int] = (),
    rnn: Sequence[float] = (),
    metric: str = "l1",
    threat_model: str = "general",
    seed: int = 0,
    time_budget: float | None = 180.0,
    progress: bool = False,
    results: Sequence[CertificationResult] | None = None,
    metadata: dict[str, Any] | None = None,
    backend: str = "auto",
) -> list[AttackRun]:
    """Certify each kNN/rNN classifier and attack it at every budget in ``e``, verifying each attack by refitting.

    ``results`` may hold certificates already computed for the same classifiers (e.g. by ``certify``); a
    classifier without one is certified here (kNN out to ``k + max(e)``). ``backend``: the estimators' neighbour
    engine (:class:`poisoncert.neighbours.NeighbourIndex`), for their certificates and the refits alike.
    """
    from .attacks import attack, prepare_attack
    from .estimators import CertifiedKNeighborsClassifier, CertifiedRadiusNeighborsClassifier

    if y_test is None:
        raise ValueError("attacks need a labelled test set: the verified accuracy is measured on its labels")
    budgets = [int(value) for value in e]
    known = {(r.method, float(r.params.get("k", r.params.get("r", -1)))): r for r in results or ()}
    runs = []
    classifiers = [("knn", float(k), CertifiedKNeighborsClassifier(n_neighbors=int(k), metric=metric,
                                                                    backend=backend)) for k in knn]
    classifiers += [("rnn", float(r), CertifiedRadiusNeighborsClassifier(radius=float(r), metric=metric,
                                                                         backend=backend)) for r in rnn]
    for method, value, estimator in classifiers:
        estimator.fit(X_train, y_train)
        result = known.get((method, value))
        if result is None:
            kwargs = {"max_e": max(budgets)} if method == "knn" else {}
            result = estimator.certify(X_test, y_test, threat_model, **kwargs)
            result.metadata.update(metadata or {})
        name = f"knn-k{int(value)}" if method == "knn" else f"rnn-r{value:g}"
        run = AttackRun(name, result)
        # The neighbour state and the candidate moves are shared by every budget.
        prepared = prepare_attack(estimator, X_test, y_test, max(budgets), threat_model, seed=seed)
        for budget in budgets:
            run.attacks.append(attack(estimator, X_train, y_train, X_test, y_test, budget, threat_model, seed=seed,
                                      time_budget=time_budget, progress=progress, prepared=prepared))
        runs.append(run)
    return runs


def write_attack_outputs(
    runs: Sequence[AttackRun],
    out_dir: str | Path,
    *,
    title: str,
    subtitle: str,
    settings: dict[str, Any],
) -> dict[str, Path]:
    """Write every poisoned set (``attack-<classifier>-e<e>.npz`` + ``.json``) and the bracket table
    (``bracket.csv``, ``bracket.json``) and plot (``bracket.png``), as a set (staged, then renamed)."""
    from .plots import plot_bracket

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [row for run in runs for row in run.bracket_rows()]
    with _staged(out_dir) as staged:
        for run in runs:
            for attack in run.attacks:
                stem = f"attack-{run.name}-e{attack.poisoned.e}"
                record = {**attack.record(), "certificate": run.result.describe(), "settings": settings}
                attack.poisoned.save(staged / f"{stem}.npz", metadata=record)
        _write_bracket_csv(staged / "bracket.csv", rows, settings)
        write_json(staged / "bracket.json", {"poisoncert_version": __version__, "settings": settings,
                                             "kind": "certified lower bound <= CA(e) <= verified attack accuracy "
                                                     "(spec section 8)", "rows": rows})
        curves = []
        for run in runs:
            top = max([attack.poisoned.e for attack in run.attacks] or [0])
            grid = np.unique(np.r_[np.linspace(0, top, 101).round().astype(np.int64),
                                   [attack.poisoned.e for attack in run.attacks]])
            lower, _ = run.result.curve(grid)
            curves.append((run.result.label(), run.result.spec_section(run.result.default_method), grid, lower,
                           run.result.clean_accuracy, [(a.poisoned.e, a.accuracy) for a in run.attacks]))
        plot_bracket(curves, staged / "bracket.png", title=title, subtitle=subtitle)
        names = sorted(path.name for path in staged.iterdir())
    return {name: out_dir / name for name in names}


def _write_bracket_csv(path: Path, rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    from ._io import atomic_write

    buffer = io.StringIO()
    buffer.write(f"# poisoncert {__version__}: certified lower bound <= CA(e) <= verified attack accuracy (spec "
                 "section 8); attack accuracy = the classifier refitted on the poisoned set, not estimated\n")
    for key, value in settings.items():
        buffer.write(f"# {key}: {value}\n")
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_write(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(buffer.getvalue())


def bracket_table(runs: Sequence[AttackRun]) -> str:
    """Plain-text table: per classifier and budget, certified lower bound, verified upper bound, band (points)."""
    header = f"{'classifier':<22}{'e':>7}{'certified':>11}{'attack':>9}{'band':>7}  certificate"
    lines = [header, "-" * len(header)]
    for run in runs:
        for row in run.bracket_rows():
            lines.append(f"{row['classifier']:<22}{row['e']:>7}{100 * row['certified_accuracy']:>10.1f}%"
                         f"{100 * row['attack_accuracy']:>8.1f}%{100 * row['band']:>7.1f}  {row['certificate']} "
                         f"(spec {row['spec_section']}){'' if row['certificate_exact'] else ', not exact'}")
    return "\n".join(lines)
