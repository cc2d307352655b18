"""The glance: a run's description, all of it on the Overview's first screen.

MLflow 3.17 shows the first 100 pixels of a run's description; when there is more, it
folds the rest under "Show more" and fades the lower 60 of those 100 pixels out (its
run page: `maxHeight:100` and a "truncation-gradient"). Its Markdown sanitizer keeps no
style, width, height or alt attribute, so nothing can be shrunk in the page: the glance
is sized where it is made, and it is the whole description, so that nothing folds and
nothing fades. It is one borderless HTML table row: on the left a small figure drawn at
IMAGE_INCHES x IMAGE_DPI (96 pixels tall), a link to what it summarizes; on the right at
most LINES lines of text or table rows (LINE_PX each in MLflow's 13 px font), the last
one linking to the detail (the full figures, the sweep's report). A run's glance is its
result (`recorder.describe_run`), a sweep parent's its outcome and its best children
(`sweeps.report`).
"""

from __future__ import annotations

import html
import urllib.parse
from typing import Any

FOLD_PX = 100  # the height of a description MLflow 3.17 shows before "Show more"
LINE_PX = 20  # a table row: an 18 px line of text and its cell's padding
LINES = FOLD_PX // LINE_PX  # lines or rows beside the figure, all above the fold
# Characters in one line beside the figure (the Overview's left column in a 1920 px window,
# MLflow's 13 px font: ~6 px a character, bold a little wider); a longer line wraps, and
# the glance folds.
LINE_CHARS = 72
IMAGE_DPI = 100
IMAGE_INCHES = (2.2, 0.96)  # 220 x 96 pixels: the figure's cell stays under FOLD_PX
NAME = "glance"
PATH = f"plots/{NAME}.png"  # the figure, an artifact of the run it describes
VIEW = "workflowType=machine_learning"  # MLflow 3.17's UI starts in its GenAI view else
# Where a glance's headline goes (a sweep's outcome), written apart from the rest (at the
# sweep's end, again by `mlp-sync`): invisible HTML comments around it.
HEADLINE = ("<!--headline-->", "<!--/headline-->")


def image(run_id: str, path: str) -> str:
    """The URL of a run's artifact relative to the MLflow UI's page (its server's
    `get-artifact` route), for an image in a description: MLflow keeps a tag up to 8000
    characters, too few for an image inline as base64. (The route sends a file as an
    attachment: a link to it downloads; `page` shows it.)"""
    return f"get-artifact?path={urllib.parse.quote(path)}&run_uuid={run_id}"


def page(experiment_id: str, route: str = "", query: str = "") -> str:
    """A page of the MLflow UI relative to its root, in the model-training view: the
    experiment's runs (route ""), a run (`runs/<id>`), an artifact of it
    (`runs/<id>/artifacts/<path>`)."""
    return (f"#/experiments/{experiment_id}/{route or 'runs'}?{VIEW}"
            + (f"&{query}" if query else ""))


def children_chart(experiment_id: str, run_id: str) -> str:
    """The UI's chart view of the children of `run_id`: their curves overlaid."""
    return page(experiment_id, query="compareRunsMode=CHART&searchFilter=" + urllib.parse.quote(
        f"tags.mlflow.parentRunId = '{run_id}'"))


def escape(text: str) -> str:
    """Text as HTML (a run name or an error message inside the glance)."""
    return html.escape(text, quote=True)


def link(url: str, text: str) -> str:
    """An HTML link to `url` (MLflow opens it in a new tab)."""
    return f'<a href="{escape(url)}">{text}</a>'


def band(lines: str, figure: str | None = None, target: str | None = None) -> str:
    """The glance (HTML): `lines` (HTML, at most LINES lines of LINE_PX) beside the image
    at URL `figure`, a link to `target`; `lines` alone without a figure."""
    if figure is None:
        return lines
    shown = f'<img src="{escape(figure)}">'
    return (f"<table><tr><td>{link(target, shown) if target else shown}</td>"
            f"<td>{lines}</td></tr></table>")


def rows(cells: list[list[str]]) -> str:
    """A headerless HTML table of `cells` (HTML each), one row per list; an en space
    before each cell but the first (MLflow pads a cell by 1 pixel)."""
    return "<table>" + "".join(
        "<tr>" + "".join(f"<td>{'&ensp;' if i else ''}{c}</td>" for i, c in enumerate(row))
        + "</tr>" for row in cells) + "</table>"


def slot(headline: str = "") -> str:
    """The headline's place in a glance, holding `headline` (HTML)."""
    return f"{HEADLINE[0]}{headline}{HEADLINE[1]}"


def headline(description: str) -> str | None:
    """The headline held in `description`, None when it has no headline's place."""
    start, end = (description.find(mark) for mark in HEADLINE)
    if start < 0 or end < start:
        return None
    return description[start + len(HEADLINE[0]):end]


def with_headline(description: str, text: str) -> str:
    """`description` with its headline replaced by `text` (HTML); with `text` as a first
    block when it has no headline's place."""
    if headline(description) is None:
        return slot(text) + (f"\n\n{description}" if description else "")
    before, _, rest = description.partition(HEADLINE[0])
    return before + slot(text) + rest.partition(HEADLINE[1])[2]


def small_axes(ax: Any) -> None:
    """Ticks and spines of a matplotlib Axes for a figure IMAGE_INCHES wide: small labels,
    no top or right spine."""
    ax.tick_params(labelsize=6, length=2, pad=1)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
