"""Leaving no namespace behind: the clusters of this process, and leftovers of killed runs.

Live clusters are registered here and closed at interpreter exit; while one is open, SIGTERM
raises ``SystemExit`` (the launch path's one SIGTERM strategy, :mod:`deto.proc.processes`), so
a terminated process exits that way too. A run killed with SIGKILL cannot clean up, so
:func:`cleanup_stale` removes namespaces whose creating process is gone (the PID is part of
every name).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Protocol

from deto.netem.commands import (
    DEFAULT_PREFIX,
    Runner,
    run_checked,
    run_command,
    teardown_commands,
)
from deto.netem.orphans import stop_orphans
from deto.proc.processes import sigterm_raises

log = logging.getLogger(__name__)


def parse_netns_list(output: str) -> list[str]:
    """Names from ``ip netns list`` output (lines like ``name (id: 3)``)."""
    return [line.split()[0] for line in output.splitlines() if line.strip()]


def stale_namespaces(
    names: Iterable[str], is_alive: Callable[[int], bool], prefix: str = DEFAULT_PREFIX
) -> list[str]:
    """Those of ``names`` made by this module under ``prefix`` whose creating PID is gone.

    Only names matching the exact pattern this module generates are considered, so
    namespaces of other software are never touched.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}([0-9]+)-[0-9a-f]{{1,16}}-(?:n[0-9]+|br|chk)$")
    stale = []
    for name in names:
        m = pattern.match(name)
        if m is not None and not is_alive(int(m.group(1))):
            stale.append(name)
    return stale



def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (in our PID namespace)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def delete_namespaces(runner: Runner, namespaces: Iterable[str]) -> list[str]:
    """Delete namespaces, logging (not raising) failures: used on exit paths."""
    failed = []
    for argv in teardown_commands(namespaces):
        try:
            result = runner(argv)
        except Exception as exc:  # cleanup must go on
            log.warning("netem: %s raised %s", " ".join(argv), exc)
            failed.append(argv[-1])
            continue
        if result.returncode != 0 and "No such file" not in (result.stderr or ""):
            log.warning(
                "netem: could not delete namespace %s: %s", argv[-1], (result.stderr or "").strip()
            )
            failed.append(argv[-1])
    return failed


# --------------------------------------------------------------------------------------------
# The clusters of this process

class LiveCluster(Protocol):
    """What this module needs of a cluster (an :class:`~deto.netem.cluster.EmulatedCluster`,
    which imports this module to register itself)."""

    run_id: str

    def close(self) -> None: ...


_LIVE: dict[str, LiveCluster] = {}
_exit = contextlib.ExitStack()  # holds SIGTERM as an exception while any cluster is open


def _close_all() -> None:
    for cluster in list(_LIVE.values()):
        cluster.close()


atexit.register(_close_all)


def register(cluster: LiveCluster) -> None:
    """Close ``cluster`` at interpreter exit if nothing else does; while it is open, SIGTERM
    raises ``SystemExit`` (:func:`deto.proc.processes.sigterm_raises`), so the way out of a
    terminated process closes it too."""
    if not _LIVE:
        _exit.enter_context(sigterm_raises())
    _LIVE[cluster.run_id] = cluster


def unregister(cluster: LiveCluster) -> None:
    _LIVE.pop(cluster.run_id, None)
    if not _LIVE:
        _exit.close()


def cleanup_stale(
    prefix: str = DEFAULT_PREFIX,
    runner: Runner | None = None,
    is_alive: Callable[[int], bool] = pid_alive,
) -> list[str]:
    """Delete namespaces left by earlier runs whose creating process no longer exists.

    A run killed with SIGKILL (or a crashed machine-level OOM kill) cannot clean up after
    itself; its namespaces would keep addresses and veths around forever, and the processes
    inside them (node agents, ranks) would keep training: deto's are stopped first
    (:func:`deto.netem.orphans.stop_orphans`). Returns the names deleted (those that failed to
    delete are logged and omitted).
    """
    run = runner or run_command
    listing = run_checked(run, ["ip", "netns", "list"])
    stale = stale_namespaces(parse_netns_list(listing.stdout), is_alive, prefix)
    if stale:
        log.info("netem: removing stale namespaces %s", ", ".join(stale))
        stopped = stop_orphans(stale, run)
        if stopped:
            log.warning("stopped %d process(es) an earlier run left running", len(stopped))
    failed = set(delete_namespaces(run, stale))
    return [ns for ns in stale if ns not in failed]

