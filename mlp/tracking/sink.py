"""How a run's metric points, tags and final status get to the tracking store.

A `Sink` buffers points and tags and sends them with `log_batch` when asked to flush (one
call per epoch instead of one per point: per-point calls cost ~4 ms each on SQLite), from
a background thread, so that the training loop never waits for the store. A failed send
keeps what it could not send for a later one, so a tracking server that blips or dies
does not stop training: with a spool file (`mlp-train`'s runs keep one beside the
checkpoint: `mlp.tracking.spool`) what is not sent goes there, the store is left alone
for RETRY_AFTER seconds, and the spool is sent first as soon as the store answers again,
at the run's end, or with `mlp-sync`; every HTTP call gives up within a bounded time
(`store.HTTP_POLICY`). Without a spool it stays in the buffer for the next flush. Params
take the same way (spooled as `param` records), so a run's config logged while the store
blips is not lost either.

Every batch's outcome is handled in the sender thread: a failure it does not expect (a bug,
an error of another kind than the store's) is logged and what the batch held is kept like
a store failure's, so that no error waits unread in a future; a spool that cannot be
written (a full disk) is raised to the next flush that waits: the run stops rather than go
on unrecorded. The sink also counts what it was given (`produced`, `produced_tags`): the
run's receipt (`receipt`) compares that with the store at the run's end.

A SQLite store that answers "database is locked" is busy, not gone: the call is tried
again briefly (LOCKED_TRIES over ~2 s: a locked write is rolled back whole, so a retry
cannot double it) before the store counts as failed. MLflow's SQLite sessions already wait
20 s for a lock (`PRAGMA busy_timeout`: a lock held 2 s by another connection was waited
out), so the error comes when SQLite refuses to wait (a lock upgrade that would deadlock)
or after those 20 s.

The sink knows nothing of what the points mean: the records a run writes
(`recorder.RunRecorder`) decide that, and hand it over.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from mlp.tracking import spool as spoollib
from mlp.tracking import store

log = logging.getLogger("mlp")
T = TypeVar("T")

BATCH = 1000  # MLflow's limit of metric points in one log_batch
BATCH_KEYS = 100  # MLflow's limit of tags, and of params, in one log_batch
LOCKED_TRIES, LOCKED_WAIT = 3, 0.7  # a locked SQLite store: waits of 0.7 s and 1.4 s


class Sink:
    """The way of one run's points, tags and status to the store of `client` (see the
    module docstring). `order` sorts the points of each flush (a stable sort: each key's
    steps stay in order), e.g. in the order a reviewer reads the keys."""

    RETRY_AFTER = 30.0  # seconds without trying the store after a failed send

    def __init__(self, client: MlflowClient, run_id: str, spool_path: Path | None = None,
                 order: Callable[[str], object] | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.uri = client.tracking_uri
        self.spool = None if spool_path is None else spoollib.Spool(spool_path)
        self._order = order
        self._buffer: list[Metric] = []
        self._tags: dict[str, str] = {}
        self._params: dict[str, str] = {}
        self._lock = threading.Lock()
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlp-tracking")
        self._sending: Future | None = None
        self._offline_until = 0.0  # time.monotonic() before which the store is not tried
        # What the run handed over: each distinct point (the store keeps one of two equal
        # ones) and each tag key, for the run's receipt.
        self.produced: set[tuple[str, int, int, str]] = set()
        self.produced_tags: set[str] = set()

    def add(self, points: Sequence[Metric] = (), tags: Mapping[str, str] | None = None,
            params: Mapping[str, str] | None = None) -> None:
        """Buffer points, tags and params (a tag set twice keeps its last value) until a
        flush."""
        self._count(points, tags or {})
        with self._lock:
            self._buffer += points
            self._tags |= dict(tags or {})
            self._params |= dict(params or {})

    def flush(self, wait: bool = False, strict: bool = False) -> None:
        """Hand the buffered points, tags and params to the sender thread; with `wait`,
        block until they are stored or spooled (on disk: `Spool.append`; a SpoolError,
        e.g. a full disk, is raised here), and with `strict` also retry what failed once
        more now: without a spool raising on error, with one sending the spool."""
        points, tags, params = self._take()
        if self._order is not None:
            points.sort(key=lambda point: self._order(point.key))
        if points or tags or params:
            self._sending = self._sender.submit(self._send, points, tags, params)
        if wait:
            sending, self._sending = self._sending, None  # its error is raised once
            if sending is not None:
                sending.result()
            if strict:
                self._send(*self._take(), strict=True)

    def _take(self) -> tuple[list[Metric], dict[str, str], dict[str, str]]:
        """Empty the buffer: (points, tags, params)."""
        with self._lock:
            taken = self._buffer, self._tags, self._params
            self._buffer, self._tags, self._params = [], {}, {}
        return taken

    def send_now(self, points: list[Metric]) -> None:
        """Send these points after everything buffered, waiting until they are stored: kept
        in the spool when the store fails (or failed a moment ago), raised without one."""
        self._count(points, {})
        self.flush(wait=True)
        self._sending = self._sender.submit(self._send, points, strict=self.spool is None)
        self._sending.result()

    def send_or_keep(self, send: Callable[[], T], staged: Path, kind: str, what: str,
                     **fields: object) -> T | None:
        """`send()`, which stores what the folder `staged` holds (files, or a model:
        `kind` and `fields` as for `Spool.keep_folder`), unless the store failed a moment
        ago (`offline`). When it fails, or was not tried, `staged` is kept beside the spool
        and sent with it, a warning names `what` and where it is, and None is returned;
        without a spool the store's error propagates."""
        error = None
        if not self.offline():
            try:
                return send()
            except store.STORE_ERRORS as e:
                if self.spool is None:
                    raise
                error = e
        self._keep_folder(staged, kind, what, error, **fields)
        return None

    def _keep_folder(self, staged: Path, kind: str, what: str, error: BaseException | None,
                     **fields: object) -> None:
        """Keep the folder `staged` beside the spool (`error`: why; None when the store
        failed a moment ago and was not tried), said once per outage."""
        assert self.spool is not None  # offline, or a failure with a spool: send_or_keep
        folder = self.spool.keep_folder(self.uri, self.run_id, staged, kind, **fields)
        message = (f"{what} not recorded yet: the MLflow store does not answer"
                   f"{f' ({type(error).__name__})' if error is not None else ''}; kept in "
                   f"{folder}, sent with the run's spool (mlp-sync {self.spool.path})")
        if self.offline():  # said once per outage; the run's end counts them all
            log.info("%s", message)
            return
        warnings.warn(message, stacklevel=4)
        if error is not None:
            self._offline_until = time.monotonic() + self.RETRY_AFTER

    def offline(self) -> bool:
        """Whether the store failed less than RETRY_AFTER seconds ago (with a spool only)."""
        return self.spool is not None and time.monotonic() < self._offline_until

    @contextlib.contextmanager
    def unless_offline(self, what: str, kept: str | None = None) -> Iterator[None]:
        """Run the block; when the store fails in it and the run has a spool, warn that
        `what` is not recorded and where it is `kept` instead (default: the trained
        parameters, in the checkpoint), instead of failing the run."""
        try:
            yield
        except store.STORE_ERRORS as e:
            if self.spool is None:
                raise
            self._offline_until = time.monotonic() + self.RETRY_AFTER
            kept = kept or f"the trained parameters are in the checkpoint beside {self.spool.path}"
            warnings.warn(f"{what} not recorded: the MLflow store does not answer "
                          f"({type(e).__name__}); {kept}", stacklevel=3)

    def end(self, status: str) -> None:
        """Send what is left, one forced try included, and end the run with `status`
        (FINISHED, FAILED or KILLED), then, when the store took the end, what the spool
        keeps beside it (files, a model). Without a spool a store that fails raises, except
        what a FAILED or KILLED run could not send (its own error must not be hidden: it
        is warned about); with one, what is left goes to the spool, the status too when the
        store does not take it, and a warning says what is kept where and how to send it
        (`mlp-sync`). The status is set whenever the store takes it: it says how training
        ended, and the run's receipt (`mlp.record`) whether its record is whole."""
        try:
            self.flush(wait=True, strict=status == "FINISHED" or self.spool is not None)
        finally:
            self._sender.shutdown(wait=True)
            ended = True
            try:
                _unlocked(self.client.set_terminated, self.run_id, status=status)
            except store.STORE_ERRORS:
                if self.spool is None:
                    raise
                ended = False
            if self.spool is not None and ended and self.spool.pending():
                # The store answers: the files and model kept beside the spool (which the
                # points did not wait for) go now; a store that still refuses them is
                # warned about and they stay for mlp-sync.
                spoollib.send_pending(self.spool.path, known=(self.client.tracking_uri,))
            if self.spool is not None and (not ended or self.spool.pending()):
                self._spool_end(status, ended)

    def _count(self, points: Sequence[Metric], tags: Mapping[str, str]) -> None:
        """Count what the run hands over (see `produced`)."""
        with self._lock:
            self.produced.update((p.key, int(p.step), int(p.timestamp), repr(float(p.value)))
                                 for p in points)
            self.produced_tags.update(tags)

    def expected(self) -> dict[str, int]:
        """The distinct points handed over, per metric key."""
        with self._lock:
            return dict(Counter(key for key, *_ in self.produced))

    def _send(self, points: list[Metric], tags: Mapping[str, str] | None = None,
              params: Mapping[str, str] | None = None, strict: bool = False) -> None:
        """`_try_send`, with every failure handled here, in the sender thread, instead of
        left in a future that nobody may read: one it does not expect (not the store's) is
        logged and the batch kept as for a store failure (`_keep`: the spool, or the buffer
        for the next flush). A spool that cannot be written (SpoolError, e.g. a full disk)
        is logged and raised to the next flush that waits: the run must stop, since what it
        produces is no longer kept. Only a strict send without a spool raises the store's
        error, to the caller that waits for it."""
        try:
            self._try_send(points, tags, params, strict)
        except spoollib.SpoolError as e:
            log.error("%s", e)
            raise
        except Exception as e:
            if strict and self.spool is None and isinstance(e, store.STORE_ERRORS):
                raise
            log.error("sending %d metric points, %d tags and %d params of run %s failed: "
                      "%s: %s", len(points), len(tags or {}), len(params or {}), self.run_id,
                      type(e).__name__, e)
            self._keep(points, dict(tags or {}), dict(params or {}), e)

    def _try_send(self, points: list[Metric], tags: Mapping[str, str] | None = None,
                  params: Mapping[str, str] | None = None, strict: bool = False) -> None:
        """The spool first (oldest first), then log_batch in chunks within MLflow's limits.
        On failure what is left goes to the spool, or without one back to the front of the
        buffer, for the next flush (one sender thread keeps the order)."""
        tags, params = dict(tags or {}), dict(params or {})
        if not strict and self.offline():
            self._keep(points, tags, params)
            return
        try:
            if self.spool is not None and self.spool.pending():
                # Files wait for the run's end (`RunRecorder.finish`) or mlp-sync: an
                # artifact store that refuses uploads must not hold the points back.
                self.spool.send(known=(self.client.tracking_uri,), files=False)
        except store.STORE_ERRORS as e:
            self._keep(points, tags, params, e)
            return
        calls = _calls(points, [RunTag(k, v) for k, v in tags.items()],
                       [Param(k, v) for k, v in params.items()])
        for i, (metrics, tag_list, param_list) in enumerate(calls):
            try:
                _unlocked(self.client.log_batch, self.run_id, metrics=metrics,
                          params=param_list, tags=tag_list)
            except store.STORE_ERRORS as e:
                if strict and self.spool is None:
                    raise
                rest = calls[i:]
                self._keep([m for c in rest for m in c[0]], {t.key: t.value for c in rest
                                                            for t in c[1]},
                           {p.key: p.value for c in rest for p in c[2]}, e)
                return

    def _keep(self, points: list[Metric], tags: dict[str, str], params: dict[str, str],
              error: BaseException | None = None) -> None:
        """Keep what could not be sent: in the spool (and stay away from the store for
        RETRY_AFTER seconds), or without one in the buffer."""
        if self.spool is None:
            with self._lock:
                self._buffer[:0] = points
                self._tags = tags | self._tags
                self._params = params | self._params
            warnings.warn(f"MLflow logging failed, will retry at the next flush: {error}",
                          stacklevel=3)
            return
        self.spool.append(spoollib.metric_records(self.uri, self.run_id, points)
                          + spoollib.tag_records(self.uri, self.run_id, tags)
                          + spoollib.tag_records(self.uri, self.run_id, params, kind="param"))
        if error is not None:
            if time.monotonic() >= self._offline_until:
                warnings.warn(f"the MLflow store does not answer ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); training "
                              f"goes on, what is not sent is kept in {self.spool.path}",
                              stacklevel=3)
            self._offline_until = time.monotonic() + self.RETRY_AFTER

    def _spool_end(self, status: str, ended: bool) -> None:
        """Say what the spool keeps of the run; unless the run `ended` in the store, keep
        its final status there too (after its last points)."""
        assert self.spool is not None
        if not ended:
            self.spool.append([spoollib.status_record(self.uri, self.run_id, status,
                                                      int(time.time() * 1000))])
        records = [r for r in self.spool.read() if r["run_id"] == self.run_id]
        counts = {kind: sum(r["kind"] == kind for r in records)
                  for kind in ("metric", "tag", "status")}
        files, models = (len(kept) for kept in self.spool.kept(self.run_id))
        status_kept = "" if ended else " and its final status"
        warnings.warn(f"the MLflow store {self.uri} did not take everything: run {self.run_id} "
                      f"ended {status}, but {counts['metric']} metric points, {counts['tag']} "
                      f"tags, {files} files, {models} models{status_kept} are kept in "
                      f"{self.spool.path} (files and models beside it). Send them when the "
                      f"store is back with: mlp-sync {self.spool.path}", stacklevel=3)


def _calls(points: list[Metric], tags: list[RunTag], params: list[Param]
           ) -> list[tuple[list[Metric], list[RunTag], list[Param]]]:
    """The log_batch calls that send these, each within MLflow's limits."""
    n = max(-(-len(points) // BATCH), -(-len(tags) // BATCH_KEYS), -(-len(params) // BATCH_KEYS))
    return [(points[i * BATCH:(i + 1) * BATCH], tags[i * BATCH_KEYS:(i + 1) * BATCH_KEYS],
             params[i * BATCH_KEYS:(i + 1) * BATCH_KEYS]) for i in range(n)]


def _unlocked(call: Callable, *args, **kwargs) -> None:
    """`call` (a write to the store), tried again briefly while a SQLite store answers
    "database is locked" (see the module docstring)."""
    for attempt in range(LOCKED_TRIES):
        try:
            call(*args, **kwargs)
            return
        except store.STORE_ERRORS as e:
            if attempt == LOCKED_TRIES - 1 or "database is locked" not in str(e):
                raise
            time.sleep(LOCKED_WAIT * (attempt + 1))
