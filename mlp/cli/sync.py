"""`mlp-sync`: send what runs kept in their spool files to the tracking store.

Exit codes: 0 when everything read from the spools was stored; 1 when a store still does
not answer (what is left stays in its file: run mlp-sync again) or when a damaged record
(a line torn by a crash, or changed on disk) was skipped: everything else was sent, but
that record is lost and the run's record is incomplete; 2 when a path holds no spool file.

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

from mlp.tracking import masking, store
from mlp.tracking.spool import SPOOL_NAME, Sent, Spool, SpoolError, find

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
    return 1 if failed else 0
