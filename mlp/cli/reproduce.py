"""`mlp-reproduce`: train a recorded run again and compare every metric point."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mlp.tracking import store
from mlp.tracking.reproduce import ReproduceError, compare_runs, difference_table, reproduce


def main(argv: list[str] | None = None) -> int:
    """`mlp-reproduce RUN_ID [--tracking-uri URI] [--workdir DIR]`."""
    parser = argparse.ArgumentParser(
        prog="mlp-reproduce", description="Train a recorded run again from its "
        "config/resolved.yaml and compare every metric point with the original's.")
    parser.add_argument("run_id")
    parser.add_argument("--tracking-uri", help="the store of the run (default: "
                        "$MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--workdir", type=Path, help="output directory of the reproduction "
                        "(default: ./outputs/reproduce/<run id>-<time>)")
    args = parser.parse_args(argv)
    uri = store.resolve_uri(args.tracking_uri, Path.cwd())
    workdir = args.workdir or Path("outputs", "reproduce",
                                   f"{args.run_id}-{time.strftime('%Y%m%d-%H%M%S')}")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    store.apply_http_policy()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        client = store.open_client(uri, create=False)
        new_id, checks = reproduce(client, args.run_id, workdir, Path.cwd())
        compared, diffs = compare_runs(client, args.run_id, new_id)
    except (ReproduceError, *store.STORE_ERRORS) as e:
        print(f"mlp-reproduce: {e}", file=sys.stderr)
        return 2
    print(f"run {args.run_id} reproduced as run {new_id} (outputs in {workdir})")
    print("\n".join(checks))
    if not diffs:
        print(f"all {compared} metric points are equal")
        return 0
    print(f"{len(diffs)} of {compared} metric points differ:\n{difference_table(diffs)}")
    return 1
