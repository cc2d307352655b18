"""A run's last records written while the next job of its sweep trains.

A run's tail (its figures, its model, the final metrics, the description, then the end of
the run and the receipt: `cli.train.record_result` and `RunRecorder.finishing`) needs
none of the next job's work, and the next job needs nothing of it. In a sweep whose jobs
run in the sweep's own process (Hydra's basic launcher), `SweepCallback` allows deferring
(`allow`): each job hands its tail to one helper thread (`run`) and the next job starts at
once. Tails run one at a time, in the order the jobs ended; their figures are drawn by
the painter process (`tracking.painter`), which leaves the cores to the training.

Nothing is lost or claimed early. The sweep waits for every tail (`wait`) before it reads
its outcome from the store: a tail that fails ends its run FAILED (with the error's tags,
as inline), and `wait` returns the failures, so the sweep counts them failed and exits 1
even when the store could not take the run's end; an incomplete record shows in the
run's `mlp.record` and the sweep exits 4. The helper thread is not a daemon: a process
that ends another way (an interrupted sweep) still finishes the tails before it exits.
Alone, or in a worker process of another launcher, `run` calls the tail inline.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger("mlp")

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pending: list[Future] = []


def allow() -> None:
    """Let the jobs of this process defer their tails (the sweep runs them here)."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlp-tail")


def allowed() -> bool:
    return _pool is not None


def run(tail: Callable[[], None], run_id: str, name: str) -> None:
    """`tail()` of run `run_id` (named `name`) on the helper thread when allowed, else now
    (its exception propagates). On the helper thread an exception is logged and kept for
    `wait`: the tail has recorded it on the run already, when the store took it."""
    pool = _pool
    if pool is None:
        tail()
        return

    def logged() -> tuple[str, str] | None:
        try:
            tail()
        except Exception as e:
            log.error("run %s (%s): its record failed: %s: %s", run_id, name,
                      type(e).__name__, e)
            return run_id, f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return None

    with _lock:
        _pending.append(pool.submit(logged))


def wait() -> dict[str, str]:
    """Block until every deferred tail has ended; returns the failed ones, {run id:
    `<name>: <error>`}."""
    with _lock:
        pending, _pending[:] = list(_pending), []
    return dict(failure for future in pending if (failure := future.result()) is not None)
