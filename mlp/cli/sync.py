"""`mlp-sync`: send what runs kept in their spool files to the tracking store.

Exit codes: 0 when everything read from the spools was stored; 1 when a store still does
not answer (what is left stays in its file: run mlp-sync again) or when a damaged record
(a line torn by a crash, or changed on disk) was skipped: everything else was sent, but
that record is lost and the run's record is incomplete; 2 when a path holds no spool file.

After a spool is sent, each run it held is checked against what it produced (its
`mlp.record.expected`) and tagged `mlp.record=complete` once the store holds everything
(`receipt`); a run still incomplete is named, and mlp-sync exits 1. A sweep parent of
those runs says its outcome again (`mlp.sweep.outcome`, its description's first line).

A spool keeps its store's URI without credentials. For a password-protected server give
the login as MLflow reads it, in the environment:

    MLFLOW_TRACKING_USERNAME=alice MLFLOW_TRACKING_PASSWORD=... mlp-sync outputs/
    MLFLOW_TRACKING_TOKEN=... mlp-sync outputs/

or the store's URI with its credentials in MLFLOW_TRACKING_URI (used for the records of
that store) or `--tracking-uri` (used for every record). Nothing mlp-sync prints shows a
password (`masking`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from mlp.sweeps import callback
from mlp.tracking import masking, receipt, store
from mlp.tracking.spool import SPOOL_NAME, Sent, Spool, SpoolError, credentialed, find

EPILOG = __doc__.split("\n\n", 1)[1]


def main(argv: list[str] | None = None) -> int:
    """`mlp-sync PATH... [--tracking-uri URI]`: send what runs kept in spool files.

    Exit 0 when everything was stored, 1 when a store still does not answer (what is left
    stays in its file) or a damaged record was skipped (lost), 2 when a path holds no spool
    file."""
    masking.install()
    parser = argparse.ArgumentParser(
        prog="mlp-sync", description="Send the metrics, tags and final statuses that runs "
        f"could not send to their tracking store ({SPOOL_NAME} files beside checkpoints).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="spool files, or directories to search")
    parser.add_argument("--tracking-uri", help="send to this store instead of the recorded one")
    args = parser.parse_args(argv)
    logging.basicConfig(format="mlp-sync: %(message)s", level=logging.WARNING)
    store.apply_http_policy()
    files = find(args.paths)
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        print(f"mlp-sync: no spool file ({SPOOL_NAME}) at {missing or args.paths}",
              file=sys.stderr)
        return 2
    failed = False
    for f in files:
        runs = {r["run_id"]: r["uri"] for r in Spool(f).read()}
        try:
            sent = Spool(f).send(args.tracking_uri)
        except SpoolError as e:
            failed = True
            print(f"mlp-sync: {e}", file=sys.stderr)
            continue
        except store.STORE_ERRORS as e:
            failed = True
            print(f"{f}: sent {getattr(e, 'sent', Sent())} before the store failed "
                  f"({type(e).__name__}: {str(e).splitlines()[0]}); "
                  f"{len(Spool(f).read())} records left in the file; run mlp-sync again",
                  file=sys.stderr)
            continue
        print(f"{f}: sent {sent}; nothing left")
        if sent.damaged:
            failed = True
            print(f"{f}: {len(sent.damaged)} damaged record(s) skipped and lost (line(s) "
                  f"{', '.join(str(d.line) for d in sent.damaged)}): what they held is "
                  "missing from the record", file=sys.stderr)
        failed |= not _recheck(runs, args.tracking_uri)
    return 1 if failed else 0


def _recheck(runs: dict[str, str], uri: str | None) -> bool:
    """Check each run {run id: its recorded store} whose spool was sent and set its
    `mlp.record`, then say the outcome again on the sweep parents of those runs (a sweep
    that ended `1 of 4 incomplete` says `4 of 4 finished` once its jobs' records are
    whole); whether every run with a receipt is complete."""
    whole, parents = True, {}
    for run_id, recorded in runs.items():
        try:
            client = store.open_client(uri or credentialed(recorded))
            done = receipt.recheck(client, run_id)
            parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
        except store.STORE_ERRORS as e:
            whole = False
            print(f"run {run_id}: its record could not be checked ({type(e).__name__})",
                  file=sys.stderr)
            continue
        if parent:
            parents[parent] = client
        if done is None:
            continue
        print(f"run {run_id}: record {done.tag()}")
        whole &= done.complete
    for parent, client in parents.items():
        try:
            print(f"sweep parent {parent}: {callback.recheck_outcome(client, parent).tag()}")
        except store.STORE_ERRORS as e:
            whole = False
            print(f"sweep parent {parent}: its outcome could not be updated "
                  f"({type(e).__name__})", file=sys.stderr)
    return whole
