"""`exits.leave`: a command ends with its own exit code and everything Python's exit would
have finished (threads, thread pools, atexit handlers, buffered output), without the
teardown of its modules."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

COMMAND = textwrap.dedent("""
    import atexit, concurrent.futures, sys, threading, time
    from pathlib import Path
    from mlp.cli import exits

    out = Path(sys.argv[1])

    def late(name):
        time.sleep(0.3)
        (out / name).write_text("done")

    def main():
        pool = concurrent.futures.ThreadPoolExecutor(1)  # its workers are not daemons
        pool.submit(late, "pool")
        threading.Thread(target=late, args=("thread",)).start()
        atexit.register(lambda: (out / "atexit").write_text(
            str(sorted(p.name for p in out.iterdir()))))
        sys.stdout.write("no newline, still buffered")
        {end}

    exits.leave(main)
""")


def _leave(tmp_path: Path, end: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", COMMAND.format(end=end), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("end", "code"), [("sys.exit(4)", 4), ("return", 0),
                                           ("sys.exit(None)", 0)])
def test_the_exit_code_and_what_python_would_have_finished(tmp_path: Path, end: str,
                                                           code: int):
    done = _leave(tmp_path, end)
    assert done.returncode == code, done.stderr
    assert done.stdout == "no newline, still buffered"
    # the pool's task and the thread ended before the atexit handlers ran, as in Python
    assert (tmp_path / "atexit").read_text() == "['pool', 'thread']"


def test_an_exception_takes_pythons_own_way_out(tmp_path: Path):
    done = _leave(tmp_path, "raise RuntimeError('boom')")
    assert done.returncode == 1
    assert "RuntimeError: boom" in done.stderr and "Traceback" in done.stderr
    assert (tmp_path / "atexit").read_text() == "['pool', 'thread']"
