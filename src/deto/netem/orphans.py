"""Stopping what a killed shaped run left running inside its network namespaces.

Removing a leftover namespace (``ip netns del``) only removes its name: processes inside keep
the namespace alive and go on training. Before the names go, :func:`stop_orphans` finds the
processes in each namespace (``ip netns pids``), keeps those it can identify as deto's (a node
agent, ``python -m torch.distributed.run``, or a rank, ``-m deto train``, or the link probe),
and stops them: SIGTERM, then SIGKILL after a grace period. Processes it cannot identify are
left alone and named in a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]
GRACE_S = 5.0
_DETO_MARKERS = ("torch.distributed.run", "-m deto", "deto train", "deto/netem/probe_peer.py")


def read_cmdline(pid: int) -> str | None:
    """``/proc/<pid>/cmdline`` as one string (arguments joined by spaces), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def is_deto_process(cmdline: str) -> bool:
    """Whether a command line is one deto starts inside a namespace."""
    return any(marker in cmdline for marker in _DETO_MARKERS)


def namespace_pids(namespace: str, runner: Runner) -> list[int]:
    """PIDs of the processes inside ``namespace`` (none when it or ``ip`` cannot tell)."""
    result = runner(["ip", "netns", "pids", namespace])
    if result.returncode != 0:
        return []
    return [int(tok) for tok in result.stdout.split() if tok.isdigit()]


def orphans(
    namespaces: Iterable[str],
    runner: Runner,
    cmdline: Callable[[int], str | None] = read_cmdline,
) -> tuple[list[int], list[int]]:
    """``(deto's, others)``: the PIDs inside ``namespaces``, split by whether they are deto's."""
    ours: list[int] = []
    others: list[int] = []
    for ns in namespaces:
        for pid in namespace_pids(ns, runner):
            line = cmdline(pid)
            if line is None:
                continue  # gone meanwhile
            (ours if is_deto_process(line) else others).append(pid)
    return ours, others


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def stop_pids(pids: list[int], grace_s: float = GRACE_S) -> None:
    """SIGTERM ``pids``; SIGKILL those still alive after ``grace_s``."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def stop_orphans(namespaces: list[str], runner: Runner, grace_s: float = GRACE_S) -> list[int]:
    """Stop deto's processes inside ``namespaces`` (before they are deleted); return their PIDs."""
    ours, others = orphans(namespaces, runner)
    if others:
        logger.warning(
            "processes %s inside deto's leftover namespaces are not deto's: left running",
            ", ".join(map(str, others)),
        )
    if ours:
        logger.info("stopping %d process(es) left running by an earlier run", len(ours))
        stop_pids(ours, grace_s)
    return ours
