"""`mlp-sync`: send what runs kept in their spool files to the tracking store."""

from __future__ import annotations

import argparse
import sys

from mlp.tracking import store
from mlp.tracking.spool import SPOOL_NAME, Sent, Spool, find


def main(argv: list[str] | None = None) -> int:
    """`mlp-sync PATH... [--tracking-uri URI]`: send what runs kept in spool files.

    Exit 0 when everything was stored, 1 when a store still does not answer (what is left
    stays in its file), 2 when a path holds no spool file."""
    parser = argparse.ArgumentParser(
        prog="mlp-sync", description="Send the metrics, tags and final statuses that runs "
        f"could not send to their tracking store ({SPOOL_NAME} files beside checkpoints).")
    parser.add_argument("paths", nargs="+", help="spool files, or directories to search")
    parser.add_argument("--tracking-uri", help="send to this store instead of the recorded one")
    args = parser.parse_args(argv)
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
            print(f"{f}: sent {sent}; nothing left")
        except store.STORE_ERRORS as e:
            failed = True
            print(f"{f}: sent {getattr(e, 'sent', Sent())} before the store failed "
                  f"({type(e).__name__}: {str(e).splitlines()[0]}); "
                  f"{len(Spool(f).read())} records left in the file; run mlp-sync again",
                  file=sys.stderr)
    return 1 if failed else 0
