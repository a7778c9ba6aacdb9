"""SIGTERM of a process that owns children: the children are stopped first, never orphaned."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deto.proc.processes import sigterm_raises

CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    marker = Path(sys.argv[1])
    def stop(signum, frame):
        marker.write_text("terminated")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    marker.write_text("started")
    time.sleep(60)
    """
)

PARENT = textwrap.dedent(
    """
    import sys
    from deto.proc.processes import run_child
    sys.exit(run_child([sys.executable, "-c", sys.argv[1], sys.argv[2]], grace_s=10))
    """
)


def _wait_for(path: Path, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text() == text:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} never read {text!r}")


def test_sigterm_of_the_parent_stops_its_child_first(tmp_path):
    marker = tmp_path / "child"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(marker)])
    _wait_for(marker, "started")
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    assert marker.read_text() == "terminated"  # the child got SIGTERM and ran its clean-up


def test_run_child_returns_the_exit_status(tmp_path):
    from deto.proc.processes import run_child

    assert run_child([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3


def test_sigterm_raises_only_inside_the_block():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc, sigterm_raises():
        signal.raise_signal(signal.SIGTERM)
    assert exc.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_overlapping_blocks_restore_the_first_handler_once_all_are_left():
    before = signal.getsignal(signal.SIGTERM)
    outer, inner = sigterm_raises(), sigterm_raises()
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)  # left out of order, as a cluster and its nodes may be
    with pytest.raises(SystemExit) as exc:
        signal.raise_signal(signal.SIGTERM)
    assert exc.value.code == 128 + signal.SIGTERM
    inner.__exit__(None, None, None)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_process_that_ignores_sigterm_keeps_ignoring_it():
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with sigterm_raises():
            signal.raise_signal(signal.SIGTERM)  # ignored: no SystemExit
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_stopped_agent_leaves_with_the_signals_status_and_no_traceback(monkeypatch) -> None:
    """torchrun raises SignalException on SIGTERM (its traceback would reach the terminal); the
    node's agent turns it into the exit status a death by that signal reports."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from deto.launch import agent

    def stopped() -> None:
        raise SignalException("got signal: 15", sigval=signal.SIGTERM)

    monkeypatch.setattr(torch.distributed.run, "main", stopped)
    with pytest.raises(SystemExit) as exit_info:
        agent.main()
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert agent.argv()[-2:] == ["-m", "deto.launch.agent"]
