"""`mlp-report`: the comparison of a sweep's (or an experiment's) runs, from the store."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException

from mlp.sweeps import report as rp
from mlp.tracking import store


def main(argv: list[str] | None = None) -> int:
    """`mlp-report`: print the comparison table of a sweep (or of every training run of an
    experiment), write it as Markdown, HTML and PNGs to --out, print the best
    configuration; with --log also log it on the sweep's parent run. Exit 0, or 2 when
    the store, experiment or sweep is not found."""
    parser = argparse.ArgumentParser(
        prog="mlp-report", description="Compare the runs of a sweep or an experiment "
        "from MLflow: a table, a val_acc heatmap over lr x reg, learning curves, the gap.")
    parser.add_argument("--uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                        "else sqlite:///<cwd>/mlflow.db, which must exist)")
    parser.add_argument("--experiment", default="mlp-lab", help="experiment name (mlp-lab)")
    parser.add_argument("--sweep", help="the sweep: its parent run id, parent run name or "
                        "mlp.sweep.name (default: every training run of the experiment)")
    parser.add_argument("--out", type=Path, help="directory for report.md, report.html and "
                        "the PNGs (default: outputs/reports/<sweep or experiment>, beside "
                        "Hydra's outputs/, which git ignores)")
    parser.add_argument("--top", type=int, default=5,
                        help="learning curves of the N best runs (5)")
    parser.add_argument("--log", action="store_true",
                        help="also log the report on the sweep's parent run (needs --sweep)")
    args = parser.parse_args(argv)
    if args.log and args.sweep is None:
        parser.error("--log needs --sweep: the report is logged on the sweep's parent run")
    if args.top < 1:
        parser.error(f"--top {args.top}: expected N >= 1")
    try:
        client = store.open_client(store.resolve_uri(args.uri, Path.cwd()), create=False)
        report, runs = rp.make_report(client, args.experiment, args.sweep)
    except (ValueError, MlflowException, store.StoreError) as e:
        print(f"mlp-report: {e}", file=sys.stderr)
        return 2
    images = rp.pngs(rp.figures(client, runs, report, top=args.top))
    print(report)
    print()
    out = args.out or Path("outputs", "reports", re.sub(r"[^\w.-]+", "_",
                                                         args.sweep or args.experiment))
    for path in rp.write_report(report, images, out):
        print(f"wrote {path}")
    if report.best is not None:
        b = report.best
        print(f"\nbest configuration: run {b['run']} ({b['run_id']})")
        for key in report.swept:
            print(f"  {key} = {b[key]}")
        print(f"  val_acc {rp.cell('val_acc', b['val_acc'])}, "
              f"test_acc {rp.cell('test_acc', b['test_acc'])}")
        if b["overrides"]:
            print(f"  reproduce: {rp.reproduce_command(b['overrides'])}")
    if args.log:
        rp.log_on_parent(client, client.get_run(report.parent_run_id), report, runs, images)
        print(f"\nlogged on parent run {report.parent_run_id}")
    return 0
