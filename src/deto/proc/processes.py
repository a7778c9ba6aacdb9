"""Child processes that must not outlive their parent: SIGTERM as an exception, and stopping.

A process that owns children (node agents, a ``deto train`` run, namespaces) must stop them
before it goes; by default SIGTERM ends it on the spot and orphans them. Everything on the
launch path uses the one strategy here: while a process owns children, SIGTERM raises
``SystemExit(128 + SIGTERM)``, so the ``except``/``finally`` clauses and context managers on
the way out stop the children and remove what was created, and the process then exits 143.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

CHILD_GRACE_S = 30.0  # a stopped child tears down its own ranks and namespaces first


_held = 0  # how many sigterm_raises blocks are open
_previous: Any = None  # the SIGTERM handler before the first of them


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block, SIGTERM raises ``SystemExit(128 + SIGTERM)`` in the main thread.

    Blocks may nest and overlap in any order (a cluster's lifetime, the node agents inside
    it): the handler is installed by the first and the previous one restored by the last. A
    process that ignores SIGTERM, or has a handler set outside Python, is left alone, and so
    are threads other than the main one (where handlers cannot be set).
    """
    held = _hold()
    try:
        yield
    finally:
        if held:
            _release()


def _hold() -> bool:
    global _held, _previous
    if threading.current_thread() is not threading.main_thread():
        return False
    if _held == 0:
        current = signal.getsignal(signal.SIGTERM)
        if current is signal.SIG_IGN or current is None:
            return False
        signal.signal(signal.SIGTERM, _raise_exit)
        _previous = current
    _held += 1
    return True


def _release() -> None:
    global _held
    _held -= 1
    if _held == 0:
        signal.signal(signal.SIGTERM, _previous)


def stop_processes(
    procs: list[subprocess.Popen[Any]], grace_s: float, *, process_group: bool = False
) -> None:
    """SIGTERM every process still running (its whole process group with ``process_group``),
    then SIGKILL whatever is left once ``grace_s`` has passed."""

    def send(p: subprocess.Popen[Any], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if process_group:
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)

    for p in procs:
        if p.poll() is None:
            send(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            send(p, signal.SIGKILL)
            p.wait()


def run_child(argv: list[str], grace_s: float = CHILD_GRACE_S) -> int:
    """Run ``argv`` to completion and return its exit status; if this process is interrupted
    or terminated meanwhile, stop the child (:func:`stop_processes`), then re-raise."""
    child = subprocess.Popen(argv)
    try:
        with sigterm_raises():
            return child.wait()
    except BaseException:
        stop_processes([child], grace_s)
        raise
