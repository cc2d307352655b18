"""How a run's metric points, tags and final status get to the tracking store.

A `Sink` buffers points and tags and sends them with `log_batch` when asked to flush (one
call per epoch instead of one per point: per-point calls cost ~4 ms each on SQLite), from
a background thread, so that the training loop never waits for the store. A failed send
keeps what it could not send for a later one, so a tracking server that blips or dies
does not stop training: with a spool file (`mlp-train`'s runs keep one beside the
checkpoint: `mlp.tracking.spool`) what is not sent goes there, the store is left alone
for RETRY_AFTER seconds, and the spool is sent first as soon as the store answers again,
at the run's end, or with `mlp-sync`; every HTTP call gives up within a bounded time
(`store.HTTP_POLICY`). Without a spool it stays in the buffer for the next flush.

Every batch's outcome is handled in the sender thread: a failure it does not expect (a bug,
an error of another kind than the store's) is logged and what the batch held is kept like
a store failure's, so that no error waits unread in a future. The sink also counts what it
was given (`produced`, `produced_tags`): the run's receipt (`receipt`) compares that with
the store at the run's end.

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

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from mlp.tracking import spool as spoollib
from mlp.tracking import store

BATCH = 1000  # MLflow's limit of metric points in one log_batch

log = logging.getLogger("mlp")


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
        self._lock = threading.Lock()
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlp-tracking")
        self._sending: Future | None = None
        self._offline_until = 0.0  # time.monotonic() before which the store is not tried
        # What the run handed over: each distinct point (the store keeps one of two equal
        # ones) and each tag key, for the run's receipt.
        self.produced: set[tuple[str, int, int, str]] = set()
        self.produced_tags: set[str] = set()

    def add(self, points: Sequence[Metric] = (), tags: Mapping[str, str] | None = None) -> None:
        """Buffer points and tags (a tag set twice keeps its last value) until a flush."""
        self._count(points, tags or {})
        with self._lock:
            self._buffer += points
            self._tags |= dict(tags or {})

    def flush(self, wait: bool = False, strict: bool = False) -> None:
        """Hand the buffered points and tags to the sender thread; with `wait`, block until
        they are stored (or spooled), and with `strict` also retry what failed once more
        now: without a spool raising on error, with one sending the spool."""
        with self._lock:
            points, self._buffer = self._buffer, []
            tags, self._tags = self._tags, {}
        if self._order is not None:
            points.sort(key=lambda point: self._order(point.key))
        if points or tags:
            self._sending = self._sender.submit(self._send, points, tags)
        if wait and self._sending is not None:
            self._sending.result()
            if strict:
                with self._lock:
                    points, self._buffer = self._buffer, []
                    tags, self._tags = self._tags, {}
                self._send(points, tags, strict=True)

    def send_now(self, points: list[Metric]) -> None:
        """Send these points after everything buffered, waiting until they are stored: kept
        in the spool when the store fails (or failed a moment ago), raised without one."""
        self._count(points, {})
        self.flush(wait=True)
        self._sending = self._sender.submit(self._send, points, {}, self.spool is None)
        self._sending.result()

    def offline(self) -> bool:
        """Whether the store failed less than RETRY_AFTER seconds ago (with a spool only)."""
        return self.spool is not None and time.monotonic() < self._offline_until

    @contextlib.contextmanager
    def unless_offline(self, what: str) -> Iterator[None]:
        """Run the block; when the store fails in it and the run has a spool, warn that
        `what` is not recorded instead of failing a run whose training is done."""
        try:
            yield
        except store.STORE_ERRORS as e:
            if self.spool is None:
                raise
            self._offline_until = time.monotonic() + self.RETRY_AFTER
            warnings.warn(f"{what} not recorded: the MLflow store does not answer "
                          f"({type(e).__name__}); the trained parameters are in the "
                          f"checkpoint beside {self.spool.path}", stacklevel=3)

    def end(self, status: str) -> None:
        """Send what is left, one forced try included, and end the run with `status`
        (FINISHED, FAILED or KILLED). Without a spool a store that fails raises, except
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
                self.client.set_terminated(self.run_id, status=status)
            except store.STORE_ERRORS:
                if self.spool is None:
                    raise
                ended = False
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
              strict: bool = False) -> None:
        """`_try_send`, with every failure handled here, in the sender thread, instead of
        left in a future that nobody may read: one it does not expect (not the store's) is
        logged and the batch kept as for a store failure (`_keep`: the spool, or the buffer
        for the next flush); one the spool cannot take is logged and the batch is lost
        (the run's receipt counts it missing). Only a strict send without a spool raises
        the store's error, to the caller that waits for it."""
        try:
            self._try_send(points, tags, strict)
        except Exception as e:
            if strict and self.spool is None and isinstance(e, store.STORE_ERRORS):
                raise
            log.error("sending %d metric points and %d tags of run %s failed: %s: %s",
                      len(points), len(tags or {}), self.run_id, type(e).__name__, e)
            if isinstance(e, spoollib.SpoolError):
                return
            try:
                self._keep(points, [RunTag(k, v) for k, v in (tags or {}).items()], e)
            except spoollib.SpoolError as lost:
                log.error("%s: they are lost", lost)

    def _try_send(self, points: list[Metric], tags: Mapping[str, str] | None = None,
                  strict: bool = False) -> None:
        """The spool first (oldest first), then log_batch in chunks of BATCH, the tags with
        the first. On failure what is left goes to the spool, or without one back to the
        front of the buffer, for the next flush (one sender thread keeps the order)."""
        tag_list = [RunTag(k, v) for k, v in (tags or {}).items()]
        if not strict and self.offline():
            self._keep(points, tag_list)
            return
        try:
            if self.spool is not None and self.spool.pending():
                self.spool.send(known=(self.client.tracking_uri,))
        except store.STORE_ERRORS as e:
            self._keep(points, tag_list, e)
            return
        starts = range(0, len(points), BATCH) if points else range(1 if tag_list else 0)
        for i in starts:
            try:
                self.client.log_batch(self.run_id, metrics=points[i:i + BATCH],
                                      tags=tag_list if i == 0 else [])
            except store.STORE_ERRORS as e:
                if strict and self.spool is None:
                    raise
                self._keep(points[i:], tag_list if i == 0 else [], e)
                return

    def _keep(self, points: list[Metric], tags: list[RunTag],
              error: BaseException | None = None) -> None:
        """Keep what could not be sent: in the spool (and stay away from the store for
        RETRY_AFTER seconds), or without one in the buffer."""
        if self.spool is None:
            with self._lock:
                self._buffer[:0] = points
                self._tags = {t.key: t.value for t in tags} | self._tags
            warnings.warn(f"MLflow logging failed, will retry at the next flush: {error}",
                          stacklevel=3)
            return
        self.spool.append(spoollib.metric_records(self.uri, self.run_id, points)
                          + spoollib.tag_records(self.uri, self.run_id,
                                                 {t.key: t.value for t in tags}))
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
        status_kept = "" if ended else " and its final status"
        warnings.warn(f"the MLflow store {self.uri} did not take everything: run {self.run_id} "
                      f"ended {status}, but {counts['metric']} metric points, {counts['tag']} "
                      f"tags{status_kept} are kept in {self.spool.path}. Send them when the "
                      f"store is back with: mlp-sync {self.spool.path}", stacklevel=3)
