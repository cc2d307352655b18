"""The glance (`mlp.tracking.glance`): a description that shows whole on the first screen,
its figures sized under the fold, its headline said again in place."""

from __future__ import annotations

import io
import struct

import pytest

from mlp.sweeps import figures as sweep_figures
from mlp.tracking import glance, keys, plots

HISTORY = {"train_acc": [0.3, 0.5, 0.7], "val_acc": [0.28, 0.41, 0.39],
           "train_loss": [2.0, 1.5, 1.0], "val_loss": [2.1, 1.7, 1.8]}


def _png_size(fig) -> tuple[int, int]:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=glance.IMAGE_DPI)
    return struct.unpack(">II", buffer.getvalue()[16:24])


def test_the_figures_are_drawn_under_the_fold_at_their_size():
    rows = [{"run": "lr=1e-2", "run_id": "a", "status": "FINISHED", "val_acc": 0.41},
            {"run": "lr=1e-3", "run_id": "b", "status": "FINISHED", "val_acc": 0.35},
            {"run": "lr=1", "run_id": "c", "status": "FAILED", "val_acc": None}]
    curves = {"a": {keys.ACC_VAL: [(1, 0.3), (2, 0.41)]}, "b": {keys.ACC_VAL: [(2, 0.35)]}}
    for fig in (plots.glance_figure(HISTORY), sweep_figures.glance_figure(rows, curves)):
        width, height = _png_size(fig)
        assert (width, height) == (220, 96) and height + 2 < glance.FOLD_PX  # + cell padding
    best_first = sweep_figures.glance_figure(rows, curves).axes[0].lines
    assert [line.get_color() for line in best_first] == ["0.6", "tab:orange"]  # best on top
    assert sweep_figures.glance_figure(rows[2:], curves) is None  # nothing finished


@pytest.mark.parametrize("train, val", [([0.3, 0.5, 0.7], [0.28, 0.41, 0.39]),
                                        ([0.2], [0.19]), ([0.9, 0.95], [0.3, 0.31])])
def test_the_runs_glance_keeps_its_legend_above_the_curves(train, val):
    fig = plots.glance_figure({"train_acc": train, "val_acc": val})
    _png_size(fig)  # drawn, at its size
    ax = fig.axes[0]
    top = max(train + val)
    legend = ax.get_legend().get_window_extent()
    assert legend.y0 > ax.transData.transform((1, top))[1]  # over no curve
    assert max(ax.get_yticks()) <= top  # no tick up in the legend's room (no acc 1.2)
    assert len(ax.lines[0].get_xdata()) == len(train)  # one epoch drawn as a point


def test_a_glance_is_its_lines_beside_a_linked_figure_or_its_lines_alone():
    assert glance.band("a<br>b") == "a<br>b"
    shown = glance.band("a<br>b", glance.image("r1", glance.PATH), "#/experiments/1/x?y=1&z")
    assert shown == ('<table><tr><td><a href="#/experiments/1/x?y=1&amp;z"><img src="get-'
                     'artifact?path=plots/glance.png&amp;run_uuid=r1"></a></td><td>a<br>b</td>'
                     "</tr></table>")
    assert glance.rows([["<b>x</b>", "val 0.4100"]]) == (
        "<table><tr><td><b>x</b></td><td>&ensp;val 0.4100</td></tr></table>")
    assert glance.escape('lr=1 <"a">') == "lr=1 &lt;&quot;a&quot;&gt;"
    assert glance.page("3", "runs/r/artifacts/report.html") == (
        "#/experiments/3/runs/r/artifacts/report.html?workflowType=machine_learning")


@pytest.mark.parametrize("before", ["", "Sweep **x**: the table"])
def test_the_headline_is_said_once_in_its_place(before: str):
    first = glance.with_headline(before, "<b>Outcome: 1 of 2 failed</b>")
    assert glance.headline(first) == "<b>Outcome: 1 of 2 failed</b>"
    assert first.endswith(before) and glance.headline(before) is None
    again = glance.with_headline(first, "<b>Outcome: 2 of 2 finished</b>")
    assert again == first.replace("1 of 2 failed", "2 of 2 finished")
    inside = "<table><tr><td>" + glance.slot() + "rows</td></tr></table>"
    assert glance.with_headline(inside, "x") == inside.replace(glance.slot(), glance.slot("x"))
