"""The comparison of runs: a table and figures from what MLflow recorded, for one sweep
(a parent run and its children) or for every training run of an experiment.

`build_report` reads the runs and makes a `Report`: one row per run (name, status, the
params that differ between the runs, val_acc, test_acc, gap_acc, gradient check,
duration), best val_acc first, unfinished runs last. `figures` reads the best runs'
learning curves and has `compare_plots` draw what applies (the val_acc heatmap over
learning rate x regularization, the curves, the gap against the hidden sizes, the
accuracy per activation). `write_report` writes report.md, a standalone report.html and
the PNGs; `log_sweep_report` makes the sweep's parent a summary of it. `mlp-report`
(`main`) does it from the command line.
"""

from __future__ import annotations

import os

# Before mlflow is imported: no usage telemetry unless the user asks for it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import base64
import html
import re
import shlex
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from mlp.config.schema import is_bookkeeping
from mlp.sweeps import figures as plots
from mlp.tracking import glance, keys
from mlp.tracking.keys import CONFIG_HASH_TAG, PARENT_TAG, SWEEP_NAME_TAG, SWEEP_TAG

METRIC_COLUMNS = ("val_acc", "test_acc", "gap_acc", "gradcheck", "duration_s")
NUMBER_COLUMNS = {"val_acc", "test_acc", "gap_acc", "duration_s"}  # right-aligned
CHAMPION = "champion"  # the registry alias of a sweep's best model


@dataclass
class Report:
    """A comparison table. rows: one dict per run with the keys of `columns` (raw values:
    param strings as logged, floats, None when missing) plus `run_id`, `overrides` (the
    run's Hydra overrides) and `error` (why it failed); sorted by val_acc, best first,
    runs that did not finish last."""

    title: str
    columns: list[str]
    rows: list[dict]
    swept: list[str]
    best: dict | None
    experiment: str = ""
    parent_run_id: str | None = None

    def best_summary(self) -> str:
        """One line: the best run, its swept values, val_acc and test_acc."""
        if self.best is None:
            return "best: none (no finished run has a val_acc)"
        b = self.best
        values = ", ".join(f"{k}={b[k]}" for k in self.swept)
        return (f"best: {b['run']}{f' ({values})' if values else ''}: val_acc "
                f"{cell('val_acc', b['val_acc'])}, test_acc {cell('test_acc', b['test_acc'])}")

    def _unfinished(self) -> list[str]:
        return [f"{r['run']}: {r['status']}" + (f": {r['error']}" if r.get("error") else "")
                for r in self.rows if r["status"] != "FINISHED"]

    def __str__(self) -> str:
        """The terminal table: aligned text, numbers right-aligned."""
        cells = [self.columns] + [[cell(c, r[c]) for c in self.columns] for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        right = [c in NUMBER_COLUMNS for c in self.columns]

        def line(row: list[str]) -> str:
            return "  ".join(v.rjust(w) if r else v.ljust(w)
                             for v, w, r in zip(row, widths, right, strict=True)).rstrip()

        out = [self.title, line(cells[0]), "  ".join("-" * w for w in widths)]
        out += [line(row) for row in cells[1:]]
        out += ["", f"{len(self.rows)} runs; {self.best_summary()}"]
        out += [f"  {u}" for u in self._unfinished()]
        return "\n".join(out)

    def to_markdown(self, images: Iterable[str] = ()) -> str:
        """A Markdown page: the table, the best run, then the figures `images` (names of
        PNGs next to the page, without .png)."""
        def md(value: str) -> str:
            return value.replace("|", "\\|")

        out = [f"# {self.title}", "", self.best_summary(), ""]
        out.append("| " + " | ".join(self.columns) + " |")
        out.append("| " + " | ".join("---:" if c in NUMBER_COLUMNS else "---"
                                     for c in self.columns) + " |")
        out += ["| " + " | ".join(md(cell(c, r[c])) for c in self.columns) + " |"
                for r in self.rows]
        unfinished = self._unfinished()
        if unfinished:
            out += ["", "Runs that did not finish:", ""] + [f"- {md(u)}" for u in unfinished]
        for name in images:
            out += ["", f"![{name}]({name}.png)"]
        return "\n".join(out) + "\n"

    def to_html(self, images: Mapping[str, bytes] | None = None) -> str:
        """A standalone HTML page: the table (best row highlighted, unfinished runs
        marked) and the figures `images` (name -> PNG bytes) embedded as base64."""
        esc = html.escape
        head = "".join(f'<th class="{"num" if c in NUMBER_COLUMNS else ""}">{esc(c)}</th>'
                       for c in self.columns)
        body = []
        for r in self.rows:
            cls = "best" if r is self.best else ("bad" if r["status"] != "FINISHED" else "")
            tds = "".join(f'<td class="{"num" if c in NUMBER_COLUMNS else ""}">'
                          f"{esc(cell(c, r[c]))}</td>" for c in self.columns)
            body.append(f'<tr class="{cls}" title="run {esc(r["run_id"])}">{tds}</tr>')
        unfinished = "".join(f"<li>{esc(u)}</li>" for u in self._unfinished())
        figs = "".join(
            f'<figure><img alt="{esc(name)}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode()}"><figcaption>{esc(name)}</figcaption></figure>'
            for name, png in (images or {}).items())
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(self.title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; }}
th {{ background: #f4f4f4; }}
td.num, th.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
tr.best {{ background: #e6f4ea; font-weight: 600; }}
tr.bad {{ color: #a33; }}
figure {{ margin: 2em 0; }} img {{ max-width: 100%; }}
</style></head>
<body>
<h1>{esc(self.title)}</h1>
<p>{esc(self.best_summary())}</p>
<table><thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
{f"<p>Runs that did not finish:</p><ul>{unfinished}</ul>" if unfinished else ""}
{figs}
</body></html>
"""


def cell(column: str, value: object) -> str:
    """The text of one table cell."""
    if value is None:
        return "-"
    if column in ("val_acc", "test_acc"):
        return f"{value:.4f}"
    if column == "gap_acc":
        return f"{value:+.4f}"
    if column == "duration_s":
        return f"{value:.1f}"
    return str(value)


# -- reading the runs ------------------------------------------------------------------------


def _search(client: MlflowClient, experiment_id: str, filter_string: str = "") -> list[Run]:
    """Every active run of the experiment matching filter_string, newest first."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs += page
        token = page.token
        if not token:
            return runs


def _is_training_run(run: Run) -> bool:
    tags = run.data.tags
    return tags.get(SWEEP_TAG) != "true" and tags.get("mlp.kind") != "gradcheck"


def _experiment_id(client: MlflowClient, experiment: str) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no experiment named {experiment!r} in {client.tracking_uri}; "
                         f"experiments there: {', '.join(names) or 'none'}")
    return found.experiment_id


def _find_parent(client: MlflowClient, experiment: str, experiment_id: str, sweep: str) -> Run:
    """The parent run whose id, run name or mlp.sweep.name tag is `sweep` (the most
    recent one when several match)."""
    try:
        run = client.get_run(sweep)
    except MlflowException:
        run = None
    if run is not None:
        if run.info.experiment_id != experiment_id:
            other = client.get_experiment(run.info.experiment_id).name
            raise ValueError(f"run {sweep} is in experiment {other!r}, not {experiment!r}: "
                             f"pass --experiment {other!r}")
        return run
    parents = _search(client, experiment_id, f"tags.`{SWEEP_TAG}` = 'true'")
    for parent in parents:  # newest first
        if sweep in (parent.info.run_name, parent.data.tags.get(SWEEP_NAME_TAG)):
            return parent
    known = [f"{p.data.tags.get(SWEEP_NAME_TAG, p.info.run_name)} (run {p.info.run_id})"
             for p in parents]
    raise ValueError(f"no sweep {sweep!r} in experiment {experiment!r} (looked for a parent "
                     f"run with that id or run name, or tag {SWEEP_NAME_TAG}={sweep!r}); "
                     f"sweeps there: {', '.join(known) or 'none'}")


def _attempt_key(run: Run) -> str | None:
    """What identifies a job of a sweep: its config hash, else (a job that failed before
    hashing its config) its overrides."""
    tags = run.data.tags
    return tags.get(CONFIG_HASH_TAG) or (tags.get("mlp.overrides") and "overrides: "
                                         + tags["mlp.overrides"])


def _latest_attempts(runs: list[Run]) -> list[Run]:
    """Drop retries' leftovers: of the runs of one job, a FINISHED one (else the newest)
    stands for it. runs: newest first."""
    kept, seen = [], set()
    finished = {_attempt_key(r) for r in runs if r.info.status == "FINISHED"}
    for run in runs:
        key = _attempt_key(run)
        if key is None:
            kept.append(run)
        elif key not in seen and (run.info.status == "FINISHED" or key not in finished):
            seen.add(key)
            kept.append(run)
    return kept


def _collect(client: MlflowClient, experiment: str, sweep: str | None
             ) -> tuple[list[Run], Run | None]:
    """collect_runs, and the sweep's parent run."""
    experiment_id = _experiment_id(client, experiment)
    if sweep is None:
        return [r for r in _search(client, experiment_id) if _is_training_run(r)], None
    parent = _find_parent(client, experiment, experiment_id, sweep)
    children = _search(client, experiment_id, f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    if not children and parent.data.tags.get(SWEEP_TAG) != "true":
        raise ValueError(f"run {parent.info.run_id} ({parent.info.run_name}) in experiment "
                         f"{experiment!r} is not a sweep: it has no child runs")
    return _latest_attempts([r for r in children if _is_training_run(r)]), parent


def collect_runs(client: MlflowClient, experiment: str, sweep: str | None = None) -> list[Run]:
    """The training runs to compare, newest first: the children of the sweep's parent run
    (`sweep` is the parent's run id, its run name, or its mlp.sweep.name tag; the most
    recent parent when several have that name), or, with sweep=None, every run of the
    experiment but sweep parents and mlp-gradcheck runs. In a sweep, a job that ran
    more than once (a retry) counts once: its FINISHED run, else its newest.
    Raises ValueError naming what was looked for and what exists."""
    return _collect(client, experiment, sweep)[0]


def _swept(runs: Sequence[Run]) -> list[str]:
    """The params with more than one value among the runs (missing values aside),
    except those that do not change what a run computes."""
    values: dict[str, set[str]] = {}
    for run in runs:
        for key, value in run.data.params.items():
            values.setdefault(key, set()).add(value)
    return sorted(k for k, v in values.items() if len(v) > 1 and not is_bookkeeping(k))


def _split_overrides(tag: str) -> list[str]:
    """The mlp.overrides tag (overrides joined by spaces) back into overrides: split only
    before `key=`, so that `model.hidden_sizes=[100, 50]` stays whole."""
    return [item for item in re.split(r"\s+(?=[+~]*[\w.]+=)", tag.strip()) if item]


def _overrides(tag: str) -> dict[str, str]:
    """`optim.lr=1e-2 +x=1` -> {"optim.lr": "1e-2", "x": "1"}."""
    pairs = (item.partition("=") for item in _split_overrides(tag))
    return {k.lstrip("+~"): v for k, eq, v in pairs if eq}


def reproduce_command(overrides_tag: str) -> str:
    """The mlp-train command line that trains a run again, from its mlp.overrides tag,
    without the overrides that only place or report it (tracking.*, trial.*, resume)."""
    kept = [o for o in _split_overrides(overrides_tag)
            if not is_bookkeeping(o.partition("=")[0].lstrip("+~"))]
    return shlex.join(["mlp-train", *kept])


def _row(run: Run, swept: Sequence[str]) -> dict:
    m, p, t, info = run.data.metrics, run.data.params, run.data.tags, run.info
    # A job that failed before logging its config still has its overrides.
    given = _overrides(t.get("mlp.overrides", ""))
    gradcheck = None
    check_failed = t.get("gradcheck.passed", "true") != "true"
    if "gradcheck.passed" in t:  # the verdict, the max relative error, failed or not
        error = m.get(keys.GRADCHECK_MAX)
        gradcheck = " ".join(part for part in (
            t.get("gradcheck.verdict"), error is not None and f"{error:.1e}",
            check_failed and "(failed)") if part)
    message = (t.get("error.message") or "").strip().split("\n")[0]
    status = "PRUNED" if t.get("optuna.pruned") == "true" else info.status
    duration = (info.end_time - info.start_time) / 1000 if info.end_time else None
    return {"run": info.run_name, "run_id": info.run_id, "status": status,
            **{k: p.get(k, given.get(k)) for k in swept},
            "val_acc": m.get(keys.ACC_BEST_VAL, m.get(keys.ACC_VAL)),
            "test_acc": m.get(keys.ACC_TEST), "gap_acc": m.get(keys.ACC_GAP),
            "gradcheck": gradcheck, "gradcheck_failed": check_failed,
            "duration_s": duration,
            "overrides": t.get("mlp.overrides", ""), "record": t.get(keys.RECORD_TAG),
            "error": message if len(message) <= 120 else message[:117] + "..."}


def _sort_key(row: dict) -> tuple:
    val = row["val_acc"]
    return (row["status"] != "FINISHED", val is None, -(val or 0.0), row["run"] or "")


def make_report(client: MlflowClient, experiment: str, sweep: str | None
                 ) -> tuple[Report, list[Run]]:
    runs, parent = _collect(client, experiment, sweep)
    swept = _swept(runs)
    rows = sorted((_row(r, swept) for r in runs), key=_sort_key)
    best = next(iter(plots.finished(rows[:1])), None)
    parent_id = title = None
    if parent is not None:
        parent_id = parent.info.run_id
        name = parent.data.tags.get(SWEEP_NAME_TAG, parent.info.run_name)
        swept_text = ", ".join(swept) if swept else "no varying param"
        title = f"Sweep {name} (experiment {experiment}): {len(rows)} runs over {swept_text}"
    columns = ["run", "status", *swept, *METRIC_COLUMNS]
    return Report(title=title or f"Experiment {experiment}: {len(rows)} runs", columns=columns,
                  rows=rows, swept=swept, best=best, experiment=experiment,
                  parent_run_id=parent_id), runs


def build_report(client: MlflowClient, experiment: str, sweep: str | None = None) -> Report:
    """The comparison table of a sweep or of a whole experiment (see `collect_runs`)."""
    return make_report(client, experiment, sweep)[0]


def figures(client: MlflowClient, runs: list[Run], report: Report, top: int = 5
            ) -> dict[str, Figure]:
    """The report's figures, those that apply: "val_acc_heatmap", "top_curves" (the `top`
    best runs among `runs`), "gap_vs_hidden", "acc_by_activation"."""
    rows, swept = _rows_of(report, runs), report.swept
    histories = _histories(client, plots.finished(rows)[:top])
    made = {"val_acc_heatmap": plots.heatmap_figure(rows, swept),
            "top_curves": plots.curves_figure(rows, swept, histories, top),
            "gap_vs_hidden": plots.gap_figure(rows, swept),
            "acc_by_activation": plots.activation_figure(rows, swept)}
    return {name: fig for name, fig in made.items() if fig is not None}


def _rows_of(report: Report, runs: Sequence[Run]) -> list[dict]:
    """The report's rows of `runs`, best first."""
    ids = {r.info.run_id for r in runs}
    return [r for r in report.rows if r["run_id"] in ids]


def _histories(client: MlflowClient, rows: Iterable[dict]
               ) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """The accuracy curves of the runs of `rows`: {run id: {key: [(step, value), ...]}}."""
    return {r["run_id"]: {key: [(m.step, m.value) for m in
                                client.get_metric_history(r["run_id"], key)]
                          for key in (keys.ACC_VAL, keys.ACC_TRAIN)} for r in rows}


# -- output --------------------------------------------------------------------------------


def pngs(figs: Mapping[str, Figure]) -> dict[str, bytes]:
    """The report's figures as PNG bytes, drawn once for every copy of the report (on
    disk and on the parent: half a second per drawing of a sweep's figures)."""
    return {name: plots.png(fig) for name, fig in figs.items()}


def write_report(report: Report, images: Mapping[str, bytes], out_dir: Path) -> list[Path]:
    """report.md, report.html (the figures `images`, PNG bytes from `pngs`, embedded) and
    <figure>.png in out_dir (created); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.md", out_dir / "report.html"]
    paths[0].write_text(report.to_markdown(images), encoding="utf-8")
    paths[1].write_text(report.to_html(images), encoding="utf-8")
    for name, png in images.items():
        paths.append(out_dir / f"{name}.png")
        paths[-1].write_bytes(png)
    return paths


def _shared_params(runs: Sequence[Run], swept: Sequence[str]) -> dict[str, str]:
    """The params every run of the sweep has with one value: the sweep's shared config."""
    finished = [r for r in runs if r.data.params] or runs
    shared = dict(finished[0].data.params) if finished else {}
    for run in finished[1:]:
        shared = {k: v for k, v in shared.items() if run.data.params.get(k) == v}
    return {k: v for k, v in shared.items() if k not in swept}


GLANCE_RUNS = 5  # the runs whose validation curves the parent's glance figure draws


def _trouble(row: dict) -> str:
    """What a glance row says went wrong: the status when the run did not finish (as the
    outcome words it), a failed gradient check; "" when nothing did."""
    return ", ".join(part for part in (
        row["status"] != "FINISHED" and row["status"].lower(),
        row["gradcheck_failed"] and "<b>gradient check failed</b>") if part)


def _describe_sweep(report: Report, parent: Run, registration: Registration | None,
                    figure: bool) -> str:
    """The parent's description, its glance (`glance.band`, all of it on the Overview's
    first screen): the outcome's place (`glance.slot`, kept from the parent's description;
    `callback.record_outcome` fills it), the best children one row each (val, test, gap,
    what went wrong (`_trouble`: the outcome says how many finished), the registered
    version of the best), and links to the report of every run (report.html under the
    parent's Artifacts) and to the children's curves overlaid; beside the small validation
    curves (`glance.PATH`, when `figure`), a link to the report."""
    eid, run_id = parent.info.experiment_id, parent.info.run_id
    first = [[glance.escape(row["run"]), *(f"{what} {cell(c, row[c])}" for what, c in (
                 ("val", "val_acc"), ("test", "test_acc"), ("gap", "gap_acc"))),
              _trouble(row)] for row in report.rows[:glance.LINES - 2]]
    if report.best is not None and first:
        first[0][0] = f"<b>{first[0][0]}</b>"
        if registration is not None:
            first[0][-1] = ", ".join(part for part in (first[0][-1], f"v{registration.version}"
                                     + (f" @{CHAMPION}" if registration.won else "")) if part)
    report_page = glance.page(eid, f"runs/{run_id}/artifacts/report.html")
    links = (glance.link(report_page, f"all {len(report.rows)} runs, figures: report")
             + " · " + glance.link(glance.children_chart(eid, run_id), "curves overlaid"))
    lines = (glance.slot(glance.headline(parent.data.tags.get(MLFLOW_RUN_NOTE, "")) or "")
             + glance.rows(first) + links)
    return glance.band(lines, glance.image(run_id, glance.PATH) if figure else None,
                       report_page)


@dataclass
class Registration:
    """Where a sweep's best model went: registered model `name`, its `version` (validation
    accuracy `val_acc`), the version that was @champion before (`previous`, None when
    there was none or it was this one) with its validation accuracy (`previous_val`), and
    whether this version is @champion now (`won`)."""

    name: str
    version: str
    val_acc: float
    previous: str | None
    previous_val: float | None
    won: bool

    @property
    def champion(self) -> str | None:
        """The version that is @champion after this sweep."""
        return self.version if self.won else self.previous

    def __str__(self) -> str:
        """`mlp-lab-lr_reg version 3 (val 0.4520) is @champion, beating version 2
        (val 0.4310)`, or `...; @champion stays with version 2 (val 0.4610)`."""
        this = f"{self.name} version {self.version} (val {self.val_acc:.4f})"
        if self.previous is None:
            return f"{this} is @{CHAMPION}"
        before = f"version {self.previous} (" + (
            "no val_acc" if self.previous_val is None else f"val {self.previous_val:.4f}") + ")"
        if self.won:
            return f"{this} is @{CHAMPION}, beating {before}"
        return f"{this}; @{CHAMPION} stays with {before}"


def registered_name(experiment: str, search: str) -> str:
    """The registered model of a search in an experiment, one for every sweep of it:
    `mlp-lab-<experiment>-<search>` (`<experiment>-<search>` when the experiment's name
    already starts with mlp-lab, as the default does: `mlp-lab-lr_reg`), with what
    MLflow refuses in a name replaced."""
    from mlp.tracking.names import model_name

    prefix = experiment if experiment.startswith("mlp-lab") else f"mlp-lab-{experiment}"
    return model_name(f"{prefix}-{search}")


def _register_best(client: MlflowClient, report: Report, name: str) -> Registration | None:
    """Register the best run's model as a version of `name` (created the first time; the
    version the run already has when a sweep is run again) and move the alias @champion
    to it when its validation accuracy beats the current champion's (or there is none).
    None when no run finished or the best run has no model READY."""
    if report.best is None or report.best["val_acc"] is None:
        return None
    best = report.best
    parent = client.get_run(report.parent_run_id) if report.parent_run_id else None
    experiment_ids = [parent.info.experiment_id] if parent else []
    # READY only: an upload that failed leaves a model without its files (the run keeps
    # it beside its spool, and mlp-sync logs it again).
    models = [m for m in client.search_logged_models(
        experiment_ids, filter_string=f"source_run_id = '{best['run_id']}'")
        if str(m.status).endswith("READY")]
    if not models:
        return None
    try:
        client.create_registered_model(name, description=(
            f"The best model of each sweep {name} (experiment {report.experiment}), one version "
            f"a sweep; @{CHAMPION} is the best of them by validation accuracy."))
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise  # a registered model that exists gets a new version
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{best['run_id']}'")
    # The logged model's own location as the source: a `models:/<id>` source would be
    # looked up through MLflow's process-wide store, not this client's.
    version = existing[0] if existing else client.create_model_version(
        name, models[0].artifact_location, run_id=best["run_id"], model_id=models[0].model_id,
        description=f"The best run of a sweep: {best['run']} (run {best['run_id']}), "
                    f"validation accuracy {best['val_acc']:.4f}.")
    previous = current if current is not None and current.version != version.version else None
    previous_val = (client.get_run(previous.run_id).data.metrics.get(keys.ACC_BEST_VAL)
                    if previous is not None else None)
    won = previous is None or previous_val is None or best["val_acc"] > previous_val
    if won:
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return Registration(name, str(version.version), best["val_acc"],
                        previous and str(previous.version), previous_val, won)


def log_on_parent(client: MlflowClient, parent: Run, report: Report, runs: Sequence[Run],
                  images: Mapping[str, bytes]) -> Registration | None:
    """The parent is the sweep's comparison: the shared config as params, the best child's
    metrics under the children's keys, its curves' last values at its last epoch (where
    its curves end in the charts, not a stray point at step 0) and its summary at
    keys.SUMMARY_STEP as the children have it (bars in the charts), the figures as
    top-level artifacts beside report.html / report.md, the best model registered
    (`_register_best`, tag mlp.sweep.registered_model), and a description that is the
    sweep at a glance (`_describe_sweep`, its figure `glance.PATH`). Returns the
    registration."""
    parent_run_id = parent.info.run_id
    rows = plots.finished(_rows_of(report, runs))[:GLANCE_RUNS]
    first = plots.glance_figure(rows, _histories(client, rows))
    with tempfile.TemporaryDirectory() as tmp:
        write_report(report, images, Path(tmp))
        if first is not None:
            (Path(tmp) / glance.PATH).parent.mkdir()
            (Path(tmp) / glance.PATH).write_bytes(plots.png(first, dpi=glance.IMAGE_DPI))
        client.log_artifacts(parent_run_id, tmp)
    logged = parent.data.params
    params = [Param(k, v) for k, v in _shared_params(runs, report.swept).items()
              if k not in logged]
    for i in range(0, len(params), 100):
        client.log_batch(parent_run_id, params=params[i:i + 100])
    registration = None
    if report.best is not None:
        best = client.get_run(report.best["run_id"])
        last = max((m.step for m in client.get_metric_history(best.info.run_id, keys.ACC_VAL)),
                   default=0)
        now = int(time.time() * 1000)
        metrics = [Metric(k, best.data.metrics[k], now,
                          keys.SUMMARY_STEP if keys.is_summary(k) else last)
                   for k in sorted(best.data.metrics, key=keys.reading_order)
                   if not k.startswith("system/")]
        tags = [RunTag("mlp.sweep.best_run_id", best.info.run_id),
                RunTag("mlp.sweep.best_run_name", best.info.run_name or "")]
        client.log_batch(parent_run_id, metrics=metrics, tags=tags)
        search = parent.data.tags.get(SWEEP_NAME_TAG, parent.info.run_name)
        registration = _register_best(client, report, registered_name(report.experiment, search))
        if registration:
            client.set_tag(parent_run_id, "mlp.sweep.registered_model",
                           f"{registration.name}@{CHAMPION} (version {registration.champion})")
            client.set_tag(parent_run_id, "mlp.sweep.model_version", registration.version)
            client.set_tag(parent_run_id, "mlp.sweep.champion", str(registration))
    client.set_tag(parent_run_id, MLFLOW_RUN_NOTE, _describe_sweep(
        report, client.get_run(parent_run_id), registration, first is not None))
    return registration


def log_sweep_report(client: MlflowClient, parent_run_id: str, out_dir: Path | None = None
                     ) -> Report:
    """Build the report of the sweep under `parent_run_id` and log it on that run (see
    `log_on_parent`), and write it to `out_dir` too when given (`write_report`). Returns
    the report."""
    parent = client.get_run(parent_run_id)
    experiment = client.get_experiment(parent.info.experiment_id).name
    report, runs = make_report(client, experiment, parent_run_id)
    images = pngs(figures(client, runs, report))
    if out_dir is not None:
        write_report(report, images, out_dir)
    log_on_parent(client, parent, report, runs, images)
    return report
