"""mlp-report on a store built with MlflowClient alone (no training): which runs a report
takes, its table, figures and files, logging on the parent, and the command line."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
from helpers import glance_rows
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from mlp.cli import report as report_cli
from mlp.sweeps import figures as compare_plots
from mlp.sweeps import report as rp
from mlp.tracking import glance, keys

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

T0 = 1_800_000_000_000  # ms
COMMON = {"model.hidden_sizes": "[100]", "model.activation": "relu", "optim.name": "momentum",
          "trainer.epochs": "3", "seed": "0", "tracking.experiment": "mlp-lab"}
# (lr, reg) -> best_val_acc of sweep_lr_reg's children; test_acc = val - 0.01
GRID = {("0.001", "0.0001"): 0.40, ("0.001", "0.01"): 0.35,
        ("0.01", "0.0001"): 0.52, ("0.01", "0.01"): 0.45}


def _run(client: MlflowClient, exp: str, name: str, *, start: float, parent: str | None = None,
         params: dict | None = None, final: dict | None = None, history: dict | None = None,
         tags: dict | None = None, status: str | None = "FINISHED", duration: float = 10.0
         ) -> str:
    tags = dict(tags or {})
    if parent is not None:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(exp, start_time=T0 + int(start * 1000), tags=tags,
                               run_name=name).info.run_id
    metrics = [Metric(k, v, T0, 0) for k, v in (final or {}).items()]
    metrics += [Metric(k, v, T0, step) for k, values in (history or {}).items()
                for step, v in enumerate(values, 1)]
    client.log_batch(run_id, metrics=metrics,
                     params=[Param(k, v) for k, v in (params or {}).items()])
    if status is not None:
        client.set_terminated(run_id, status, end_time=T0 + int((start + duration) * 1000))
    return run_id


def _trained(client: MlflowClient, exp: str, name: str, val: float, gap: float,
             params: dict, start: float, parent: str | None, duration: float = 10.0) -> str:
    """A finished training run whose best_val_acc is `val`."""
    history = {keys.ACC_VAL: [val - 0.1, val, val - 0.02],
               keys.ACC_TRAIN: [val - 0.05, val + 0.05, val - 0.02 + gap],
               keys.ACC_GAP: [0.05, 0.05, gap]}
    final = {keys.ACC_BEST_VAL: val, keys.ACC_TEST: val - 0.01, keys.BEST_EPOCH: 2,
             keys.GRADCHECK_MAX: 1e-9}
    tags = {"gradcheck.passed": "true", "gradcheck.verdict": "good",
            "mlp.config_hash": f"hash-{name}",
            "mlp.overrides": " ".join(f"{k}={v}" for k, v in params.items())}
    return _run(client, exp, name, start=start, parent=parent, params={**COMMON, **params},
                final=final, history=history, tags=tags, duration=duration)


def _sweep_tags(name: str, overrides: str) -> dict:
    return {"mlp.sweep": "true", "mlp.sweep.name": name, "mlp.sweep.overrides": overrides}


def build_store(db: Path) -> dict:
    """Experiment mlp-lab: sweep_lr_reg (4 children over lr x reg, a superseded failed
    attempt, a gradcheck child), sweep_act twice (an old parent, and a new one named
    sweep-act-parent with 3 children over activation x hidden sizes and a FAILED job),
    a standalone run and a standalone gradcheck run; experiment other: one run."""
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.create_experiment("mlp-lab", artifact_location=str(db.parent / "artifacts"))
    ids: dict = {"uri": f"sqlite:///{db}", "lr_reg": {}}
    ids["parent"] = _run(client, exp, "sweep_lr_reg", start=0, status=None,
                         tags=_sweep_tags("sweep_lr_reg", "optim.lr=1e-3,1e-2 "
                                          "model.reg=1e-4,1e-2"))
    for i, ((lr, reg), val) in enumerate(GRID.items()):
        params = {"optim.lr": lr, "model.reg": reg, "trainer.progress": str(i % 2 == 0),
                  "trial.number": str(i)}
        name = f"relu-h100-lr{lr}-reg{reg}"
        ids["lr_reg"][lr, reg] = _trained(client, exp, name, val, 0.02 * (i + 1), params,
                                          start=10 + 20 * i, parent=ids["parent"],
                                          duration=10.0 + i)
    ids["superseded"] = _run(client, exp, "relu-h100-lr0.01-reg0.0001", start=5,
                             parent=ids["parent"], status="FAILED",
                             tags={"mlp.config_hash": "hash-relu-h100-lr0.01-reg0.0001"})
    _run(client, exp, "gradcheck-relu", start=6, parent=ids["parent"],
         tags={"mlp.kind": "gradcheck"}, params={**COMMON, "optim.lr": "0.5"})

    old = _run(client, exp, "sweep_act", start=100,
               tags=_sweep_tags("sweep_act", "model.activation=relu,tanh"))
    ids["old_act_parent"] = old
    ids["old_act_child"] = _trained(client, exp, "old-relu", 0.3, 0.1,
                                    {"model.activation": "relu"}, start=101, parent=old)
    ids["act_parent"] = _run(client, exp, "sweep-act-parent", start=200, status=None,
                             tags=_sweep_tags("sweep_act", "model.activation=relu,tanh "
                                              "model.hidden_sizes=[100],[200,100]"))
    for i, (act, hidden, val, gap) in enumerate([("relu", "[100]", 0.50, 0.10),
                                                 ("tanh", "[100]", 0.44, 0.05),
                                                 ("relu", "[200, 100]", 0.48, 0.20)]):
        ids[act, hidden] = _trained(client, exp, f"{act}-{hidden}", val, gap,
                                    {"model.activation": act, "model.hidden_sizes": hidden},
                                    start=201 + i, parent=ids["act_parent"])
    client.set_tag(ids["tanh", "[100]"], "gradcheck.passed", "false")
    client.set_tag(ids["tanh", "[100]"], "gradcheck.verdict", "suspicious")
    client.log_metric(ids["tanh", "[100]"], keys.GRADCHECK_MAX, 2e-5, T0 + 1)
    ids["failed"] = _run(client, exp, "tanh-h200x100", start=210, parent=ids["act_parent"],
                         status="FAILED",
                         tags={"mlp.overrides": "model.activation=tanh "
                                                "model.hidden_sizes=[200,100]",
                               "error.type": "DivergenceError",
                               "error.message": "loss exploded at epoch 1\nmore"})
    ids["empty_parent"] = _run(client, exp, "multirun-2026-11-28_13-40-00", start=250,
                               tags=_sweep_tags("multirun-2026-11-28_13-40-00", "seed=1"))
    ids["standalone"] = _trained(client, exp, "standalone", 0.2, 0.0, {"optim.lr": "0.1"},
                                 start=300, parent=None)
    ids["gradcheck"] = _run(client, exp, "gradcheck-alone", start=301,
                            tags={"mlp.kind": "gradcheck"})
    other = client.create_experiment("other", artifact_location=str(db.parent / "artifacts"))
    _run(client, other, "elsewhere", start=0)
    return ids


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_store(tmp_path_factory.mktemp("store") / "mlflow.db")


@pytest.fixture(scope="module")
def client(store: dict) -> MlflowClient:
    return MlflowClient(store["uri"])


def _ids(runs: list) -> set[str]:
    return {r.info.run_id for r in runs}


def test_a_sweep_report_has_the_swept_params_and_is_sorted_by_val_acc(client, store):
    report = rp.build_report(client, "mlp-lab", "sweep_lr_reg")
    assert report.swept == ["model.reg", "optim.lr"]  # not trainer.progress nor trial.*
    assert report.columns == ["run", "status", "model.reg", "optim.lr", "val_acc", "test_acc",
                              "gap_acc", "gradcheck", "duration_s"]
    assert [r["val_acc"] for r in report.rows] == [0.52, 0.45, 0.40, 0.35]
    assert all(r["status"] == "FINISHED" for r in report.rows)  # the old attempt is dropped
    best = report.best
    assert best is report.rows[0]
    assert (best["optim.lr"], best["model.reg"]) == ("0.01", "0.0001")
    assert best["run_id"] == store["lr_reg"]["0.01", "0.0001"]
    assert best["test_acc"] == pytest.approx(0.51)
    assert best["gap_acc"] == pytest.approx(0.06)  # the last epoch's
    assert best["duration_s"] == pytest.approx(12.0)
    assert best["gradcheck"] == "good 1.0e-09"
    assert report.parent_run_id == store["parent"]
    assert "sweep_lr_reg" in report.title


def test_collect_runs_by_parent_id_run_name_and_sweep_name(client, store):
    by_id = _ids(rp.collect_runs(client, "mlp-lab", store["parent"]))
    assert by_id == set(store["lr_reg"].values())
    assert _ids(rp.collect_runs(client, "mlp-lab", "sweep_lr_reg")) == by_id
    by_run_name = _ids(rp.collect_runs(client, "mlp-lab", "sweep-act-parent"))
    assert len(by_run_name) == 4 and store["failed"] in by_run_name
    # two parents carry mlp.sweep.name=sweep_act: the most recent one counts
    assert _ids(rp.collect_runs(client, "mlp-lab", "sweep_act")) == by_run_name
    assert _ids(rp.collect_runs(client, "mlp-lab", store["old_act_parent"])) == {
        store["old_act_child"]}


def test_without_a_sweep_every_training_run_but_parents_and_gradchecks(client, store):
    ids = _ids(rp.collect_runs(client, "mlp-lab"))
    assert store["standalone"] in ids and set(store["lr_reg"].values()) <= ids
    assert store["superseded"] in ids  # retries are merged only within a sweep
    for excluded in ("parent", "act_parent", "old_act_parent", "empty_parent", "gradcheck"):
        assert store[excluded] not in ids
    assert len(ids) == 4 + 1 + 1 + 4 + 1
    report = rp.build_report(client, "mlp-lab")
    assert report.parent_run_id is None and report.title.startswith("Experiment mlp-lab")


def test_a_failed_run_comes_last_with_its_status_and_error(client, store):
    report = rp.build_report(client, "mlp-lab", "sweep_act")
    assert report.swept == ["model.activation", "model.hidden_sizes"]
    assert [r["status"] for r in report.rows] == ["FINISHED"] * 3 + ["FAILED"]
    failed = report.rows[-1]
    assert failed["run_id"] == store["failed"] and failed["val_acc"] is None
    # it failed before logging params: its swept values come from its overrides
    assert (failed["model.activation"], failed["model.hidden_sizes"]) == ("tanh", "[200,100]")
    assert report.best["run"] == "relu-[100]"
    assert report.rows[2]["gradcheck"] == "suspicious 2.0e-05 (failed)"
    text = str(report)
    assert text.splitlines()[-1].strip() == ("tanh-h200x100: FAILED: loss exploded at "
                                             "epoch 1")
    assert "FAILED" in text.splitlines()[2 + 4]


@pytest.mark.parametrize("experiment, sweep, words", [
    ("nope", None, ["'nope'", "mlp-lab", "other"]),
    ("mlp-lab", "nope", ["'nope'", "sweep_lr_reg", "sweep_act"]),
])
def test_an_unknown_experiment_or_sweep_names_what_exists(client, experiment, sweep, words):
    with pytest.raises(ValueError) as e:
        rp.collect_runs(client, experiment, sweep)
    for word in words:
        assert word in str(e.value)


def test_a_run_that_is_not_a_parent_is_not_a_sweep(client, store):
    with pytest.raises(ValueError, match="not a sweep"):
        rp.collect_runs(client, "mlp-lab", store["standalone"])
    with pytest.raises(ValueError, match="--experiment 'mlp-lab'"):
        rp.collect_runs(client, "other", store["parent"])


def test_markdown_terminal_and_html_tables(client):
    report = rp.build_report(client, "mlp-lab", "sweep_lr_reg")
    md = report.to_markdown(["val_acc_heatmap"])
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 4
    assert table[0] == ("| run | status | model.reg | optim.lr | val_acc | test_acc | gap_acc "
                        "| gradcheck | duration_s |")
    assert "| 0.5200 | 0.5100 | +0.0600 |" in table[2]
    assert "![val_acc_heatmap](val_acc_heatmap.png)" in md
    lines = str(report).splitlines()
    assert lines[1].split() == report.columns
    assert len({len(line) for line in lines[3:7]}) == 1  # aligned
    page = report.to_html({"x": b"\x89PNG"})
    assert page.startswith("<!DOCTYPE html>") and "<table>" in page
    assert page.count("<tr class=") == 4 and '<tr class="best"' in page
    assert "data:image/png;base64,iVBORw==" in page


def test_figures_of_a_lr_x_reg_sweep(client):
    runs = rp.collect_runs(client, "mlp-lab", "sweep_lr_reg")
    report = rp.build_report(client, "mlp-lab", "sweep_lr_reg")
    figs = rp.figures(client, runs, report)
    assert set(figs) == {"val_acc_heatmap", "top_curves"}
    ax = figs["val_acc_heatmap"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1e-3", "1e-2"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1e-4", "1e-2"]
    assert {t.get_text() for t in ax.texts} == {"0.400", "0.350", "0.520", "0.450"}
    curves = figs["top_curves"].axes[0]
    assert len(curves.lines) == 2 * 4
    assert list(curves.lines[0].get_ydata()) == pytest.approx([0.42, 0.52, 0.50])
    assert set(rp.figures(client, runs, report, top=1)) == {"val_acc_heatmap", "top_curves"}
    assert len(rp.figures(client, runs, report, top=1)["top_curves"].axes[0].lines) == 2


def test_figures_of_an_activation_x_hidden_sweep(client):
    runs = rp.collect_runs(client, "mlp-lab", "sweep_act")
    report = rp.build_report(client, "mlp-lab", "sweep_act")
    figs = rp.figures(client, runs, report)
    assert set(figs) == {"top_curves", "gap_vs_hidden", "acc_by_activation"}
    gap = figs["gap_vs_hidden"].axes[0]
    assert [t.get_text() for t in gap.get_xticklabels()] == ["100\n(100 units)",
                                                            "200x100\n(300 units)"]
    bars = figs["acc_by_activation"].axes[0]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["relu", "tanh"]
    assert [p.get_height() for p in bars.patches] == pytest.approx([0.50, 0.44, 0.49, 0.43])


def test_the_heatmap_marks_cells_whose_runs_all_failed():
    def row(lr: str, reg: str, val: float | None, status: str = "FINISHED") -> dict:
        return {"optim.lr": lr, "model.reg": reg, "val_acc": val, "status": status}

    report = rp.Report("t", [], [row("0.001", "0", 0.4), row("0.001", "0.01", 0.3),
                                 row("0.1", "0", None, "FAILED"), row("0.1", "0.01", 0.2)],
                       ["model.reg", "optim.lr"], None)
    ax = compare_plots.heatmap_figure(report.rows, report.swept).axes[0]
    assert {t.get_text() for t in ax.texts} == {"0.400", "0.300", "FAILED", "0.200"}
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1e-2"]


def test_write_report_writes_markdown_html_and_pngs(client, tmp_path: Path):
    runs = rp.collect_runs(client, "mlp-lab", "sweep_lr_reg")
    report = rp.build_report(client, "mlp-lab", "sweep_lr_reg")
    paths = rp.write_report(report, rp.pngs(rp.figures(client, runs, report)),
                            tmp_path / "out")
    assert [p.name for p in paths] == ["report.md", "report.html", "val_acc_heatmap.png",
                                       "top_curves.png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    assert paths[2].read_bytes().startswith(b"\x89PNG")
    assert paths[1].read_text().count("data:image/png;base64,") == 2


def _artifacts(client: MlflowClient, run_id: str, path: str | None) -> set[str]:
    return {f.path for f in client.list_artifacts(run_id, path)}


def test_the_report_on_disk_and_on_the_parent_draw_each_figure_once(client, store, tmp_path,
                                                                    monkeypatch):
    drawn: list[object] = []
    real = rp.plots.png
    monkeypatch.setattr(rp.plots, "png", lambda fig, *a, **k: drawn.append(fig) or real(fig, *a,
                                                                                      **k))
    logged: dict[str, bytes] = {}
    monkeypatch.setattr(rp, "log_on_parent", lambda client, parent, report, runs, images:
                        logged.update(images))  # the store stays as the other tests expect
    rp.log_sweep_report(client, store["parent"], tmp_path / "report")
    assert len(drawn) == len(set(map(id, drawn))) == 2  # the heatmap and the curves, once
    assert logged.keys() == {"val_acc_heatmap", "top_curves"}
    for name, png in logged.items():
        assert (tmp_path / "report" / f"{name}.png").read_bytes() == png


def test_log_sweep_report_puts_the_report_on_the_parent(client, store):
    report = rp.log_sweep_report(client, store["parent"])
    assert report.best["run_id"] == store["lr_reg"]["0.01", "0.0001"]
    assert _artifacts(client, store["parent"], None) == {
        "report.md", "report.html", "val_acc_heatmap.png", "top_curves.png", "plots"}
    assert _artifacts(client, store["parent"], "plots") == {glance.PATH}
    parent = client.get_run(store["parent"])
    assert parent.data.tags["mlp.sweep.best_run_id"] == report.best["run_id"]
    assert parent.data.tags["mlp.sweep.best_run_name"] == "relu-h100-lr0.01-reg0.0001"
    best = client.get_run(report.best["run_id"])
    assert parent.data.metrics == best.data.metrics  # the children's keys, the best's values
    assert parent.data.metrics[keys.ACC_BEST_VAL] == pytest.approx(0.52)
    # the curves' last values at the best child's last epoch, where its curves end, not at
    # step 0; its summary once at step 0, as the children have it (bars in the charts)
    assert {m.step for m in client.get_metric_history(store["parent"], keys.ACC_VAL)} == {3}
    for key in (keys.ACC_TEST, keys.ACC_BEST_VAL, keys.BEST_EPOCH, keys.GRADCHECK_MAX):
        assert [m.step for m in client.get_metric_history(store["parent"], key)] == [0], key
    assert parent.data.params == {k: v for k, v in COMMON.items()}  # the shared config
    assert "mlp.sweep.champion" not in parent.data.tags  # no child logged a model
    # the description is the sweep at a glance, all on the Overview's first screen: the
    # best children (val, test, gap, status) beside the figure,
    # links to the report and to the children's curves overlaid
    note = parent.data.tags["mlflow.note.content"]
    assert glance.image(store["parent"], glance.PATH).replace("&", "&amp;") in note
    assert glance_rows(note) == [
        ["relu-h100-lr0.01-reg0.0001", "val 0.5200", "test 0.5100", "gap +0.0600", ""],
        ["relu-h100-lr0.01-reg0.01", "val 0.4500", "test 0.4400", "gap +0.0800", ""],
        ["relu-h100-lr0.001-reg0.0001", "val 0.4000", "test 0.3900", "gap +0.0200", ""]]
    report_page = glance.page(parent.info.experiment_id,
                              f"runs/{parent.info.run_id}/artifacts/report.html")
    assert f'href="{report_page}"'.replace("&", "&amp;") in note
    assert "all 4 runs, figures: report" in note and "curves overlaid" in note
    assert parent.info.status == "RUNNING"  # ending the parent is the sweep's job


def test_the_parents_glance_names_the_failed_children_in_a_one_line_headline(client, store):
    from mlp.sweeps import callback

    report = rp.log_sweep_report(client, store["act_parent"])
    parent = store["act_parent"]
    callback.record_outcome(client, parent, callback.SweepOutcome.of(report.rows))
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    # the error is in the report the glance links to: a second line would fold the glance
    assert glance.headline(note) == "<b>Outcome: 1 of 4 failed</b>: tanh-h200x100"
    rows = glance_rows(note)
    assert note.index(glance.HEADLINE[1]) < note.index(rows[0][0])  # then the rows
    # the three best finished; the third's gradient check failed, in its row
    assert [r[-1] for r in rows] == ["", "", "gradient check failed"]
    before = glance_rows(note)
    many = callback.SweepOutcome(total=60, failed=[f"lr=1e{i} <{i}>: boom" for i in range(60)])
    callback.record_outcome(client, parent, many)  # said in place of the first, one line
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    said = glance.headline(note)
    assert said.startswith("<b>Outcome: 60 of 60 failed</b>: lr=1e0 &lt;0&gt;, lr=1e1 &lt;1&gt;")
    assert said.endswith(" more") and "<br>" not in said
    assert len(html.unescape(re.sub("<[^>]+>", "", said))) <= glance.LINE_CHARS
    assert note.count(glance.HEADLINE[0]) == 1 and glance_rows(note) == before


@pytest.mark.parametrize("failed, said", [
    ([], "<b>Outcome: 4 of 4 finished</b>"),
    (["a: x", "b: y"], "<b>Outcome: 2 of 4 failed</b>: a, b"),
    (["n" * 200 + ": x", "b: y"], "<b>Outcome: 2 of 4 failed</b>: " + "n" * 39 + "… +1 more"),
])
def test_the_headline_is_one_line_whatever_the_names(failed, said):
    from mlp.sweeps import callback

    outcome = callback.SweepOutcome(total=4, finished=4 - len(failed), failed=failed)
    assert callback.headline(outcome) == said
    assert len(html.unescape(re.sub("<[^>]+>", "", said))) <= glance.LINE_CHARS


def test_a_sweep_whose_jobs_all_ran_elsewhere_gets_an_empty_report(client, store):
    report = rp.log_sweep_report(client, store["empty_parent"])
    assert report.rows == [] and report.best is None
    assert "best: none" in str(report)
    assert _artifacts(client, store["empty_parent"], None) == {"report.md", "report.html"}
    assert "mlp.sweep.best_run_id" not in client.get_run(store["empty_parent"]).data.tags


def test_cli_writes_the_report_and_prints_the_best_configuration(store, tmp_path, capsys):
    out = tmp_path / "out"
    assert report_cli.main(["--uri", store["uri"], "--sweep", "sweep_act", "--out", str(out),
                    "--log"]) == 0
    printed = capsys.readouterr().out
    assert "relu-[100]" in printed.splitlines()[3]
    assert f"wrote {out / 'report.md'}" in printed
    assert "model.activation = relu" in printed and "test_acc 0.4900" in printed
    assert "reproduce: mlp-train model.activation=relu 'model.hidden_sizes=[100]'" in printed
    assert {p.name for p in out.iterdir()} == {"report.md", "report.html", "top_curves.png",
                                               "gap_vs_hidden.png", "acc_by_activation.png"}
    client = MlflowClient(store["uri"])
    assert "gap_vs_hidden.png" in _artifacts(client, store["act_parent"], None)


def test_cli_finds_the_default_store_in_the_working_directory(store, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.chdir(Path(store["uri"].removeprefix("sqlite:///")).parent)
    assert report_cli.main(["--sweep", store["parent"], "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "best configuration: run relu-h100-lr0.01-reg0.0001" in printed
    assert "reproduce: mlp-train optim.lr=0.01 model.reg=0.0001\n" in printed  # no trial.*


def test_cli_exit_2_for_an_unknown_sweep_or_a_missing_store(store, tmp_path, monkeypatch,
                                                             capsys):
    assert report_cli.main(["--uri", store["uri"], "--sweep", "nope", "--out", str(tmp_path)]) == 2
    assert "no sweep 'nope'" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert report_cli.main([]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "report").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert report_cli.main(["--experiment", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "no experiment named 'nope'" in capsys.readouterr().err


def test_reproduce_command_keeps_whole_overrides_and_drops_placement_ones():
    tag = ("experiment=cs231n_two_layer model.hidden_sizes=[100, 50] optim.lr=0.01 "
           "+trial.id=3 tracking.uri=http://h:5000 trainer.patience=2")
    assert rp.reproduce_command(tag) == ("mlp-train experiment=cs231n_two_layer "
                                         "'model.hidden_sizes=[100, 50]' optim.lr=0.01 "
                                         "trainer.patience=2")
    assert rp.reproduce_command("") == "mlp-train"


def test_a_sweep_whose_best_child_lacks_its_test_metrics_is_reported(tmp_path: Path):
    """A child whose record is incomplete (its final metrics still in its spool) still gets
    the sweep a report and a description, with `-` for what is missing."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("mlp-lab")
    parent = _run(client, exp, "partial", start=0, status=None,
                  tags=_sweep_tags("partial", "optim.lr=0.01"))
    _run(client, exp, "lr=1e-2", start=1, parent=parent, params={"optim.lr": "0.01"},
         history={keys.ACC_VAL: [0.3], keys.ACC_BEST_VAL: [0.3]},
         tags={keys.RECORD_TAG: "incomplete: 2 points, 0 tags in /x/tracking-spool.jsonl"})
    report = rp.log_sweep_report(client, parent)
    assert report.best["test_acc"] is None
    assert report.rows[0]["record"].startswith("incomplete: ")
    assert "test -" in client.get_run(parent).data.tags["mlflow.note.content"]
