"""Plots: the background plotter draws what plot_curves draws, reports failures, and never leaves a process behind."""

from __future__ import annotations

import numpy as np
import pytest

from poisoncert.plots import BackgroundPlotter, curve_layout, plot_curves


def _rows() -> list[dict]:
    rows = []
    for certification, scale in (("individual", 1.0), ("split", 1.2)):
        for e in range(0, 60, 6):
            rows.append({"classifier": "kNN (k=5)", "certification": certification, "e": np.int64(e),
                         "certified_accuracy": np.float64(max(0.0, 0.9 - scale * e / 70)), "guarantee":
                         "deterministic", "confidence": None, "spec_section": "5e", "exact": np.bool_(e != 54)})
    return rows


def test_the_helper_process_draws_the_same_png(tmp_path) -> None:
    plot_curves(_rows(), tmp_path / "here.png", subtitle="toy")
    with BackgroundPlotter() as plotter:
        plotter.plot_curves(_rows(), tmp_path / "there.png", subtitle="toy")
        plotter.wait()
    assert (tmp_path / "there.png").read_bytes() == (tmp_path / "here.png").read_bytes()


@pytest.mark.parametrize("layout_rows", [slice(None), slice(0, 13)])
@pytest.mark.parametrize("all_exact", [True, False])
def test_a_helper_sent_the_layout_first_draws_the_same_png(tmp_path, layout_rows, all_exact) -> None:
    """The layout comes before the accuracies (the CLI sends it before computing the curves); one that does not fit
    the rows (here: lines cut short, or values not exact, whose markers it lacks) is built again from them. Either
    way the PNG is plot_curves' own."""
    rows = [{**row, "exact": True} if all_exact else row for row in _rows()]
    plot_curves(rows, tmp_path / "here.png", subtitle="toy")
    skeleton = [{key: value for key, value in row.items() if key != "certified_accuracy"} for row in rows]
    with BackgroundPlotter() as plotter:
        plotter.prepare(curve_layout(skeleton[layout_rows]), subtitle="toy")
        plotter.plot_curves(rows, tmp_path / "there.png", subtitle="toy")
        plotter.wait()
    assert (tmp_path / "there.png").read_bytes() == (tmp_path / "here.png").read_bytes()


def test_a_plot_that_cannot_be_written_is_an_error_naming_it(tmp_path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with BackgroundPlotter() as plotter:
        plotter.plot_curves(_rows(), tmp_path / "file" / "curves.png")
        with pytest.raises(OSError, match="could not write the plot.*file"):
            plotter.wait()
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_bad_requests_are_refused_in_this_process() -> None:
    with BackgroundPlotter() as plotter:
        with pytest.raises(ValueError, match="nothing to plot"):
            plotter.plot_curves([], "never.png")
        with pytest.raises(RuntimeError, match="no plot was requested"):
            plotter.wait()


def test_a_helper_given_no_request_exits_quietly() -> None:
    plotter = BackgroundPlotter()
    process = plotter._process
    plotter.close()
    assert process is not None and process.returncode == 0
    plotter.close()  # closing twice is harmless


def test_lines_drawn_over_the_prerendered_background_match_a_full_render(tmp_path) -> None:
    """draw() renders only the lines and spines over a background rendered with the layout; the picture is what
    savefig renders from scratch, up to where the crop falls within a pixel (text antialiasing shifts with it)."""
    from PIL import Image

    from poisoncert.plots import CurvesFigure

    rows = _rows()
    figure = CurvesFigure(curve_layout(rows), "title", "toy", rows)
    assert figure._background is not None
    figure.draw(rows, tmp_path / "fast.png")
    figure._background = None  # savefig's full render of the same figure
    figure.draw(rows, tmp_path / "full.png")
    fast = np.asarray(Image.open(tmp_path / "fast.png").convert("L"), dtype=np.float64)
    full = np.asarray(Image.open(tmp_path / "full.png").convert("L"), dtype=np.float64)
    assert abs(fast.shape[0] - full.shape[0]) <= 2 and abs(fast.shape[1] - full.shape[1]) <= 2

    def blocks(image: np.ndarray, size: int = 6) -> np.ndarray:  # means of 6 x 6 pixels: blind to sub-pixel shifts
        h, w = image.shape[0] // size * size, image.shape[1] // size * size
        return image[:h, :w].reshape(h // size, size, w // size, size).mean(axis=(1, 3))

    h, w = min(fast.shape[0], full.shape[0]) - 2, min(fast.shape[1], full.shape[1]) - 2
    mismatch = min(float(np.abs(blocks(fast[dy : dy + h, dx : dx + w]) - blocks(full[1 : 1 + h, 1 : 1 + w])).max())
                   for dy in range(3) for dx in range(3))
    assert mismatch < 60  # about 26 here; 145 with half the lines left out
    # The lines are there: their heights changed, so did the picture.
    lowered = [{**row, "certified_accuracy": row["certified_accuracy"] / 2} for row in rows]
    figure = CurvesFigure(curve_layout(rows), "title", "toy", rows)
    figure.draw(lowered, tmp_path / "lowered.png")
    assert (tmp_path / "lowered.png").read_bytes() != (tmp_path / "fast.png").read_bytes()


@pytest.mark.parametrize("setting", [{"savefig.dpi": 200}, {"savefig.facecolor": "yellow"},
                                     {"savefig.transparent": True}, {"axes.axisbelow": False}])
def test_matplotlib_settings_that_savefig_honours_keep_savefig(tmp_path, setting) -> None:
    import matplotlib
    from PIL import Image

    from poisoncert.plots import CurvesFigure

    rows = _rows()
    with matplotlib.rc_context(setting):
        figure = CurvesFigure(curve_layout(rows), "title", "toy", rows)
        assert figure._background is None
        figure.draw(rows, tmp_path / "set.png")
    if "savefig.dpi" in setting:
        default = CurvesFigure(curve_layout(rows), "title", "toy", rows)
        assert default._background is not None
        default.draw(rows, tmp_path / "default.png")
        assert Image.open(tmp_path / "set.png").size[0] > 1.5 * Image.open(tmp_path / "default.png").size[0]


def test_a_block_that_fails_ends_the_helper_at_once() -> None:
    """A bad parameter fails before any plot is asked for: the helper is killed, not waited for."""
    with pytest.raises(ValueError, match="bad parameter"):
        with BackgroundPlotter() as plotter:
            process = plotter._process
            raise ValueError("bad parameter")
    assert process is not None and process.returncode is not None and process.returncode < 0
