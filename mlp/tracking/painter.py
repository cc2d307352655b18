"""A run's figures as PNG bytes, drawn in a process of their own at the lowest CPU priority
while the next job of a sweep trains.

In a sweep run by the basic launcher, a run's tail (its figures among it) is recorded on
a helper thread while the next job trains (`tracking.deferred`). Drawn on that thread,
the figures took a core from the training's BLAS threads, which then wait for each other
at every GEMM: on 2 cores a 3072-100-10 step took 11.7 ms instead of 2.9 ms while they
were drawn, 9.5 ms with them drawn in another process at normal priority, 3.5 ms at
`nice 19` (`experiments/bench_sweep.py` shows the sweep's share). Lowering the helper
thread's priority does not help: it holds the GIL the training thread waits for.

So while tails are deferred, `submit` asks one painter process (`python -m
mlp.tracking.painter`, started on first use, at nice 19) to draw; it uses what the
training leaves of the cores. Otherwise (a single run, whose figures are its last
work) `submit` draws here. The request is an .npz of the arguments' arrays with the rest as
JSON (nothing is unpickled); the answer is the PNG. A painter that dies or stops answering
(`ANSWER_WITHIN`) is stopped, named in a warning, and the figures are drawn here from
then on: a figure is never lost to its painter. The painter ignores Ctrl-C (the sweep's
tails still need it) and ends when its stdin closes: at `stop`, at exit, or when the
sweep's process dies.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np

from mlp.tracking import plots

log = logging.getLogger("mlp")

# The figures a painter draws: `png`'s `figure` names one.
FIGURES = {
    "curves": plots.curves_figure,
    "glance": plots.glance_figure,
    "confusion_matrix": plots.confusion_figure,
    "per_class_accuracy": plots.per_class_figure,
    "first_layer_weights": plots.weights_figure,
}
NICE = 19
# Seconds one figure may take before its painter counts as hung: far above the ~0.3 s a
# figure takes, to leave room for a painter starved by a training on every core.
ANSWER_WITHIN = 600.0
_LENGTH = struct.Struct("<Q")
_OK, _ERROR = b"P", b"E"


class PainterGone(RuntimeError):
    """The painter process died, hung or spoke out of turn."""


class FigureFailed(RuntimeError):
    """The figure's own code raised in the painter (the message names the error)."""


def draw(figure: str, args: list[Any], dpi: int | None = None) -> bytes:
    """FIGURES[figure](*args) as PNG bytes at `dpi` (matplotlib's default when None)."""
    return plots.png(FIGURES[figure](*args), dpi)


def _pack(figure: str, args: list[Any], dpi: int | None) -> bytes:
    """A request: the arrays among `args` as .npz entries, the rest as JSON."""
    arrays, spec = {}, []
    for i, arg in enumerate(args):
        if isinstance(arg, np.ndarray):
            arrays[f"a{i}"] = arg
            spec.append({"array": f"a{i}"})
        else:
            spec.append({"json": arg})
    header = json.dumps({"figure": figure, "args": spec, "dpi": dpi}, default=_plain)
    buffer = io.BytesIO()
    np.savez(buffer, header=np.array(header), **arrays)
    return buffer.getvalue()


def _plain(value: object) -> object:
    """A NumPy scalar in a JSON argument (a history's float32) as Python's own."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _unpack(request: bytes) -> tuple[str, list[Any], int | None]:
    with np.load(io.BytesIO(request), allow_pickle=False) as npz:
        header = json.loads(str(npz["header"]))
        args = [npz[a["array"]] if "array" in a else a["json"] for a in header["args"]]
    if header["figure"] not in FIGURES:
        raise ValueError(f"no figure {header['figure']!r}: one of {sorted(FIGURES)}")
    return header["figure"], args, header["dpi"]


def _write(stream: IO[bytes], *parts: bytes) -> None:
    stream.write(b"".join(parts))
    stream.flush()


def _read(stream: IO[bytes], n: int) -> bytes:
    data = stream.read(n)
    if data is None or len(data) != n:
        raise EOFError(f"expected {n} bytes, got {0 if data is None else len(data)}")
    return data


def serve(requests: IO[bytes], answers: IO[bytes]) -> None:
    """The painter's loop: one framed request in, one framed PNG (or error) out, until
    `requests` ends."""
    while True:
        head = requests.read(_LENGTH.size)
        if not head:
            return
        try:
            png = draw(*_unpack(_read(requests, _LENGTH.unpack(head)[0])))
        except Exception as e:  # told to the caller, who raises it as drawn here would
            _write(answers, _ERROR, _encoded(f"{type(e).__name__}: {e}"))
        else:
            _write(answers, _OK, _LENGTH.pack(len(png)), png)


def _encoded(text: str) -> bytes:
    data = text.encode()
    return _LENGTH.pack(len(data)) + data


class _Painter:
    """One painter process, asked by one thread (`_client`): one request at a time."""

    def __init__(self) -> None:
        # The painter imports this package from where this process did, whatever the
        # job's working directory (hydra.job.chdir) or how it was found here.
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
        # One BLAS thread: a figure's arrays are small, and the cores are the training's.
        env = {**os.environ, "MPLBACKEND": "agg", "PYTHONPATH": path,
               **dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"),
                               "1")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlp.tracking.painter"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env)

    def ask(self, request: bytes) -> bytes:
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        try:
            _write(proc.stdin, _LENGTH.pack(len(request)), request)
            ready, _, _ = select.select([proc.stdout], [], [], ANSWER_WITHIN)
            if not ready:
                raise PainterGone(f"no answer within {ANSWER_WITHIN:g} s")
            status = _read(proc.stdout, 1)
            body = _read(proc.stdout, _LENGTH.unpack(_read(proc.stdout, _LENGTH.size))[0])
        except (OSError, EOFError, struct.error) as e:
            raise PainterGone(f"{type(e).__name__}: {e}") from e
        if status == _ERROR:
            raise FigureFailed(body.decode())
        if status != _OK:
            raise PainterGone(f"answered {status!r}")
        return body

    def stop(self, kill: bool = False) -> None:
        """End the painter: its stdin closed (it ends once the figure it draws is done),
        or `kill`ed (one that failed)."""
        proc = self.proc
        try:
            if kill:
                proc.kill()
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


_lock = threading.Lock()
_painter: _Painter | None = None
_client: ThreadPoolExecutor | None = None  # the thread that talks to the painter
_given_up = False  # a painter failed: draw here for the rest of this process


def _the_painter() -> _Painter | None:
    global _painter
    with _lock:
        if _painter is None and not _given_up:
            _painter = _Painter()
        return _painter


def submit(figure: str, *args: Any, dpi: int | None = None) -> Future[bytes]:
    """FIGURES[figure](*args) as PNG bytes, to come: while tails are deferred
    (`deferred.allowed`: the next job trains meanwhile) the painter draws it, in the order
    asked, while the caller goes on (a run's tail logs its model meanwhile); else it is
    drawn here, now. The arguments are copied before this returns. An error in the
    figure's own code is the future's, as its own: the painter's failure is drawn again
    here."""
    from mlp.tracking import deferred

    if not deferred.allowed():
        return _now(figure, list(args), dpi)
    request = _pack(figure, list(args), dpi)
    global _client
    with _lock:
        if _client is None:
            _client = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlp-painter")
        client = _client
    return client.submit(_ask, request, figure, list(args), dpi)


def _now(figure: str, args: list[Any], dpi: int | None) -> Future[bytes]:
    done: Future[bytes] = Future()
    try:
        done.set_result(draw(figure, args, dpi))
    except Exception as e:
        done.set_exception(e)
    return done


def _ask(request: bytes, figure: str, args: list[Any], dpi: int | None) -> bytes:
    """The painter's PNG for `request`; drawn here when there is no painter (any more)."""
    painter = _the_painter()
    if painter is not None:
        try:
            return painter.ask(request)
        except PainterGone as e:
            _give_up(painter, e)
        except FigureFailed:
            pass  # drawn here, the figure raises its own error, with its traceback
    return draw(figure, args, dpi)


def _give_up(painter: _Painter, error: PainterGone) -> None:
    global _painter, _given_up
    with _lock:
        if _painter is painter:
            _painter, _given_up = None, True
            log.warning("the figure painter stopped (%s): drawing the figures here from "
                        "now on", error)
    painter.stop(kill=True)


def stop() -> None:
    """End the painter, if one runs, once the figures asked of it are drawn (the next
    `submit` starts another)."""
    global _painter, _client
    with _lock:
        client, _client = _client, None
    if client is not None:
        client.shutdown(wait=True)
    with _lock:
        painter, _painter = _painter, None
    if painter is not None:
        painter.stop()


atexit.register(stop)  # a painter ends with the process that asked it (a no-op without one)


def _main() -> None:
    os.nice(NICE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the sweep's tails still need the painter
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a stray print can't garble an answer
    try:
        serve(sys.stdin.buffer, answers)
    except BrokenPipeError:  # the sweep's process is gone: nobody is waiting
        pass


if __name__ == "__main__":
    _main()
