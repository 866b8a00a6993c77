"""Certified-accuracy curves as PNG plots (matplotlib, headless)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from ._io import _json_default, atomic_write

_NAMES = {
    "individual": "individual (spec 4)",
    "rd": "joint RD (paper, Thm 4)",
    "island": "joint ISLAND (paper, Thm 4)",
    "global": "joint global (poisoncert, spec {section})",
    "split": "joint split (poisoncert, spec {section})",
}
_STYLES = {
    "individual": "-",
    "global": "-.",
    "split": "-",
    "island": "--",
    "rd": ":",
}


def plot_curves(
    rows: Iterable[dict[str, Any]],
    path: str | os.PathLike[str],
    title: str = "Certified accuracy under data poisoning",
    subtitle: str | None = None,
) -> None:
    """Plot certified accuracy against poisoning size, one line per (classifier, certification method).

    Parameters
    ----------
    rows : iterable of dict
        Tidy rows as produced by :meth:`CertificationResult.curve_rows` (keys ``classifier``,
        ``certification``, ``e``, ``certified_accuracy``, ``guarantee``, ``confidence``; optionally
        ``spec_section`` and ``exact``). Values that are not exact (a split certificate stopped by a limit) are
        marked with hollow circles.
    path : path-like
        PNG file to write (atomically).
    title, subtitle : str
        The subtitle typically names dataset, features, metric and threat model.
    """
    rows = list(rows)
    CurvesFigure(curve_layout(rows), title, subtitle, rows).draw(rows, path)


def curve_layout(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """What :func:`plot_curves` lays out before it reads a single accuracy: the lines in order of first appearance,
    each with its classifier, certification, spec section, guarantee, confidence and ``e`` values ascending.

    The rows need no ``certified_accuracy``: the layout of curves not yet computed is known from the grid.
    """
    lines: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (str(row["classifier"]), str(row["certification"]))
        line = lines.get(key)
        if line is None:
            line = lines[key] = {"classifier": key[0], "certification": key[1],
                                 "spec_section": row.get("spec_section", "?"), "guarantee": row.get("guarantee"),
                                 "confidence": row.get("confidence"), "e": []}
        line["e"].append(int(row["e"]))
    for line in lines.values():
        line["e"].sort()
    # As it reads back from JSON (the helper process compares a layout it was sent with its rows' own).
    return json.loads(json.dumps(list(lines.values()), default=_json_default))


def _line_points(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, float, bool]]]:
    """Each line's (e, certified accuracy, exact) by ascending e."""
    lines: dict[tuple[str, str], list[tuple[int, float, bool]]] = {}
    for row in rows:
        lines.setdefault((str(row["classifier"]), str(row["certification"])), []).append(
            (int(row["e"]), float(row["certified_accuracy"]), bool(row.get("exact", True))))
    return {key: sorted(points, key=lambda point: point[0]) for key, points in lines.items()}


def _loose_points(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """Each line's values that are not exact, as (e, accuracy) by ascending e."""
    loose = {key: [(x, value) for x, value, exact in points if not exact]
             for key, points in _line_points(rows).items()}
    return {key: points for key, points in loose.items() if points}


class CurvesFigure:
    """The figure of :func:`plot_curves`, laid out from :func:`curve_layout` before the accuracies are known.

    Everything but the lines' heights is fixed by the layout: the axes (accuracy from 0 to 1, ``e`` from 0),
    legend, title, the tight layout and the cropping box, and all of it is rendered then. :meth:`draw` sets the
    heights and renders only the lines (and the spines over them) on that background, so a helper process that
    built the figure while the curves were computed has little left to do (MNIST: 0.03 s instead of 0.14-0.2 s).
    """

    def __init__(self, layout: list[dict[str, Any]], title: str, subtitle: str | None,
                 rows: list[dict[str, Any]] | None = None) -> None:
        if not layout:
            raise ValueError("nothing to plot: no curve rows")
        self.layout, self.title, self.subtitle = layout, title, subtitle
        # Values that are not exact get hollow markers right after their line (and one legend entry): a layout
        # sent ahead of the rows has none, so rows with such values need a figure built from them.
        loose = {} if rows is None else _loose_points(rows)
        self.has_loose = bool(loose)
        figure, axes, colours = new_figure((8, 4.6 + 0.22 * ((len(layout) + 1) // 2)))
        self._figure = figure
        self._lines: list[Any] = []
        inexact_shown = False
        classifier_colour: dict[str, str] = {}
        for line in layout:
            colour = classifier_colour.setdefault(line["classifier"],
                                                  colours[len(classifier_colour) % len(colours)])
            name = _NAMES.get(line["certification"], line["certification"]).format(section=line["spec_section"])
            label = f"{line['classifier']}, {name}"
            if line["guarantee"] == "probabilistic":
                label += f" (prob. {line['confidence']})"
            width = {"split": 2.4, "global": 1.6}.get(line["certification"], 1.4)
            (artist,) = axes.plot(line["e"], [0.0] * len(line["e"]), _STYLES.get(line["certification"], "-."),
                                  color=colour, linewidth=width, label=label)
            self._lines.append(artist)
            points = loose.get((line["classifier"], line["certification"]))
            if points:
                axes.plot([x for x, _ in points], [value for _, value in points], "o", markerfacecolor="none",
                          markeredgecolor=colour, markersize=5,
                          label=None if inexact_shown else "not exact (search limit): sound, possibly loose")
                inexact_shown = True
        axes.set_xlabel("poisoning size e (training examples removed, added or modified)")
        axes.set_ylabel("certified accuracy CA(e)")
        axes.set_ylim(0, 1.0)
        axes.set_xlim(left=0)
        axes.grid(alpha=0.3)
        axes.set_title(title if subtitle is None else f"{title}\n{subtitle}", fontsize=10)
        # Below the axes, so the legend never hides a curve.
        axes.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
        figure.tight_layout()
        # The cropping box savefig(bbox_inches="tight") would find, found now: the heights of lines clipped to the
        # axes never move it, and saving with it skips the extra layout pass.
        import matplotlib

        figure.draw_without_rendering()
        self._crop = figure.get_tightbbox().padded(matplotlib.rcParams["savefig.pad_inches"])
        # Rendered now, once: everything but the lines (with their markers) and what is drawn over them, the
        # spines. draw() restores it and renders only those, in the order a full draw takes them; nothing else
        # drawn after them can overlap them (the legend is below the axes, the title above, and the lines are
        # clipped to the axes). Text was most of a full render. A crop reaching past the figure (an image
        # larger than the canvas) is left to savefig.
        self._axes = axes
        self._foreground = [*axes.lines, *axes.spines.values()]
        self._background = None
        canvas = figure.bbox_inches.padded(1e-9)
        if _savefig_draws_as_the_figure(figure) and canvas.contains(self._crop.x0, self._crop.y0) and \
                canvas.contains(self._crop.x1, self._crop.y1):
            for artist in self._foreground:
                artist.set_visible(False)
            figure.canvas.draw()
            self._background = figure.canvas.copy_from_bbox(figure.bbox)
            for artist in self._foreground:
                artist.set_visible(True)

    def fits(self, rows: list[dict[str, Any]], title: str, subtitle: str | None) -> bool:
        """Whether these rows and titles have this figure's layout (and its markers of values not exact)."""
        return ((title, subtitle) == (self.title, self.subtitle) and bool(_loose_points(rows)) == self.has_loose
                and curve_layout(rows) == self.layout)

    def draw(self, rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
        """Set the lines' heights from ``rows`` (of this layout; see :meth:`fits`) and write the PNG atomically."""
        heights = _line_points(rows)
        for line, artist in zip(self.layout, self._lines, strict=True):
            artist.set_ydata([value for _, value, _ in heights[(line["classifier"], line["certification"])]])
        buffer = io.BytesIO()
        if self._background is None:
            self._figure.savefig(buffer, format="png", bbox_inches=self._crop)
        else:
            self._draw_on_background(buffer)
        with atomic_write(path, "wb") as handle:
            handle.write(buffer.getvalue())

    def _draw_on_background(self, buffer: io.BytesIO) -> None:
        """The lines and spines over the background, cropped to whole pixels around the crop box, as PNG."""
        import math

        import numpy as np
        from matplotlib.image import imsave

        canvas = self._figure.canvas
        canvas.restore_region(self._background)
        for artist in self._foreground:
            self._axes.draw_artist(artist)
        pixels = np.asarray(canvas.buffer_rgba())
        dpi = self._figure.dpi
        height, width = pixels.shape[:2]
        left, right = max(0, math.floor(self._crop.x0 * dpi)), min(width, math.ceil(self._crop.x1 * dpi))
        bottom, top = max(0, math.floor(self._crop.y0 * dpi)), min(height, math.ceil(self._crop.y1 * dpi))
        # As savefig writes PNG (PIL, matplotlib's metadata, the figure's dpi); rows run top down.
        imsave(buffer, pixels[height - top : height - bottom, left:right], format="png", dpi=dpi)


def _savefig_draws_as_the_figure(figure: Any) -> bool:
    """Whether savefig would render what the figure's own canvas renders (the pre-rendered background's premise):
    matplotlib's defaults for the PNG's dpi and colours, and the grid below the lines. A user's matplotlibrc that
    changes them keeps savefig."""
    import matplotlib

    rc = matplotlib.rcParams
    return (rc["savefig.dpi"] in ("figure", figure.dpi) and rc["savefig.facecolor"] == "auto"
            and rc["savefig.edgecolor"] == "auto" and not rc["savefig.transparent"]
            and rc["axes.axisbelow"] in (True, "line"))


def plot_bracket(
    curves: Iterable[tuple[str, str, Any, Any, float, list[tuple[int, float]]]],
    path: str | os.PathLike[str],
    title: str = "Certified lower bound and verified attacks",
    subtitle: str | None = None,
) -> None:
    """Plot each classifier's certified curve, its verified attacks, and the band between them shaded.

    Parameters
    ----------
    curves : iterable of (classifier, spec_section, e, certified_accuracy, clean_accuracy, attacks)
        ``attacks`` lists ``(e, verified accuracy)`` pairs. The band runs from the certified curve up to the
        smallest verified accuracy at a budget ``<= e`` (CA never increases with e), or the clean accuracy.
    path : path-like
        PNG file to write (atomically).
    """
    import numpy as np

    figure, axes, colours = new_figure((8, 4.8))
    drawn = False
    for number, (classifier, section, e, lower, clean, attacks) in enumerate(curves):
        colour = colours[number % len(colours)]
        e, lower = np.asarray(e), np.asarray(lower)
        axes.plot(e, lower, "-", color=colour, linewidth=2, label=f"{classifier}: certified (spec {section})")
        if attacks:
            points = sorted(attacks)
            xs = np.array([x for x, _ in points])
            ys = np.array([y for _, y in points])
            axes.plot(xs, ys, "v", color=colour, markersize=7, label=f"{classifier}: verified attack (refitted)")
            # CA(e) never increases with e, so an attack at e_j bounds every e >= e_j: the upper edge is a step.
            upper = np.array([min([clean, *ys[xs <= value]]) for value in e])
            axes.step(e, upper, where="post", color=colour, linestyle="--", linewidth=0.9)
            axes.fill_between(e, lower, upper, step="post", color=colour, alpha=0.15, linewidth=0,
                              label=None if drawn else "band where CA(e) lies")
            drawn = True
    axes.set_xlabel("poisoning size e (training examples removed, added or modified)")
    axes.set_ylabel("accuracy under poisoning")
    axes.set_ylim(0, 1.0)
    axes.set_xlim(left=0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    axes.set_title(title if subtitle is None else f"{title}\n{subtitle}", fontsize=10)
    save_png(figure, path)


def new_figure(size: tuple[float, float], dpi: int = 120) -> tuple[Any, Any, list[str]]:
    """A figure with one axes on matplotlib's Agg canvas (PNG only, no display), and the default colour cycle.

    Built from ``matplotlib.figure`` without ``pyplot``, which costs about 0.4 s more to import and keeps every
    figure in a global registry until closed.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(figure)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return figure, figure.add_subplot(), colours


def save_png(figure: Any, path: str | os.PathLike[str], crop: bool = True) -> None:
    """Write a finished figure as PNG, atomically (``crop``: trimmed to what is drawn, legend below included)."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight" if crop else None)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())


class BackgroundPlotter:
    """Draws :func:`plot_curves` in a helper process that imports matplotlib while this one computes.

    Importing matplotlib takes about half a second of one core, on the critical path of a command that plots at
    its end. The helper (``python -m poisoncert.plots``) starts, imports it, and waits for requests; the caller
    keeps computing meanwhile. :meth:`prepare` (optional) sends the layout as soon as it is known (the lines and
    the grid of ``e``, before the curves are computed), and the helper builds the figure then; :meth:`plot_curves`
    sends the curve rows when they are ready (it returns at once) and :meth:`wait` collects the outcome. The PNG
    is the one :func:`plot_curves` draws in-process, byte for byte (a layout that does not match the rows is
    rebuilt from them), and it is written atomically by the helper. Use as a context manager: leaving the block
    ends a helper that got no request, or that is still running after an error.
    """

    def __init__(self) -> None:
        # The helper imports this very package (the folder above it goes first on its path), whatever is installed.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
        # One BLAS thread: NumPy's OpenBLAS otherwise starts a thread per core that spins for about 0.1 s after the
        # import, taking a core from the parent's start-up; the helper does no linear algebra.
        self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-m", "poisoncert.plots"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": path, "OPENBLAS_NUM_THREADS": "1"})
        self._sent = False

    def _send(self, request: dict[str, Any], last: bool) -> None:
        # One JSON document per line (json.dumps never writes a raw newline).
        assert self._process is not None
        stdin = self._process.stdin
        assert stdin is not None
        if last:
            self._process.stdin = None  # communicate() then only collects the output
        try:
            stdin.write(json.dumps(request, default=_json_default).encode() + b"\n")
            stdin.flush()
            if last:
                stdin.close()
        except BrokenPipeError:  # the helper died early; wait() reports why
            pass

    def prepare(self, layout: list[dict[str, Any]], title: str = "Certified accuracy under data poisoning",
                subtitle: str | None = None) -> None:
        """Send the figure's layout (:func:`curve_layout` of rows without accuracies) ahead of the rows."""
        if self._process is None or self._sent:
            raise RuntimeError("this BackgroundPlotter has already drawn its plot")
        self._send({"layout": layout, "title": title, "subtitle": subtitle}, last=False)

    def plot_curves(self, rows: Iterable[dict[str, Any]], path: str | os.PathLike[str],
                    title: str = "Certified accuracy under data poisoning", subtitle: str | None = None) -> None:
        """Send one :func:`plot_curves` request to the helper; :meth:`wait` reports how it went."""
        if self._process is None or self._sent:
            raise RuntimeError("this BackgroundPlotter has already drawn its plot")
        rows = list(rows)
        if not rows:
            raise ValueError("nothing to plot: no curve rows")
        self._sent = True
        self._send({"rows": rows, "path": os.fspath(path), "title": title, "subtitle": subtitle}, last=True)

    def wait(self, timeout: float = 300) -> None:
        """Wait for the requested plot; raise ``OSError`` (could not write it) or ``RuntimeError`` on failure."""
        if self._process is None or not self._sent:
            raise RuntimeError("no plot was requested from this BackgroundPlotter")
        process, self._process = self._process, None
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError(f"the plotting process did not finish within {timeout:g} s") from None
        if process.returncode != 0:
            try:
                failure = json.loads(stdout)
            except ValueError:  # it died before it could say why (killed, or out of memory)
                lines = stderr.decode(errors="replace").strip().splitlines()
                failure = {"error": "exit status", "message": lines[-1] if lines else str(process.returncode)}
            reason = f"{failure['error']}: {failure['message']}"
            if failure.get("os_error"):
                raise OSError(f"could not write the plot: {reason}")
            raise RuntimeError(f"the plotting process failed: {reason}")

    def close(self) -> None:
        """End the helper if it is still there (no request sent: it exits at once; otherwise it is killed)."""
        process, self._process = self._process, None
        if process is None:
            return
        if not self._sent and process.stdin is not None:
            stdin, process.stdin = process.stdin, None
            try:
                stdin.close()  # end of input without a request: the helper exits quietly
            except BrokenPipeError:
                pass
            try:
                process.communicate(timeout=10)
                return
            except subprocess.TimeoutExpired:
                pass
        process.kill()
        process.communicate()

    def __enter__(self) -> BackgroundPlotter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is not None and self._process is not None:
            # The command failed (often a bad parameter, before any work): end the helper now rather than wait
            # for it to finish importing matplotlib.
            self._process.kill()
        self.close()


def _serve() -> int:
    """The helper of :class:`BackgroundPlotter`: import matplotlib, build a figure from a layout if one comes
    first, then draw the one request for rows read from stdin."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401 - imported ahead of the request
    from matplotlib.figure import Figure  # noqa: F401

    figure = None
    for line in sys.stdin.buffer:
        request: dict[str, Any] = {}
        try:
            request = json.loads(line)
            if "layout" in request:
                figure = CurvesFigure(request["layout"], request["title"], request["subtitle"])
                continue
            rows = request["rows"]
            if figure is None or not figure.fits(rows, request["title"], request["subtitle"]):
                figure = CurvesFigure(curve_layout(rows), request["title"], request["subtitle"], rows)
            figure.draw(rows, request["path"])
        except Exception as error:  # reported to the parent, which raises it there
            if "layout" in request:
                continue  # the rows' own layout is built when they come
            json.dump({"error": type(error).__name__, "message": str(error), "os_error": isinstance(error, OSError)},
                      sys.stdout)
            return 1
        return 0
    return 0


if __name__ == "__main__":
    status = _serve()
    # The PNG is written (atomically) or the failure reported on stdout: what is left is the interpreter's teardown,
    # 0.15-0.2 s for a process that imported matplotlib, and the parent waits for this process to end.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
