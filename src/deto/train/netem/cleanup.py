"""Leaving no namespace behind: the clusters of this process, and leftovers of killed runs.

Live clusters are registered here and closed at interpreter exit and on SIGTERM; a run killed
with SIGKILL cannot clean up, so :func:`cleanup_stale` removes namespaces whose creating
process is gone (the PID is part of every name).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
from collections.abc import Callable, Iterable
from types import FrameType
from typing import TYPE_CHECKING, Any

from deto.train.netem.commands import (
    DEFAULT_PREFIX,
    Runner,
    run_checked,
    run_command,
    teardown_commands,
)

if TYPE_CHECKING:
    from deto.train.netem.cluster import EmulatedCluster

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
# Cleanup on exit and on SIGTERM

_LIVE: dict[str, EmulatedCluster] = {}
_atexit_registered = False
_previous_sigterm: Any = None
_sigterm_installed = False


def _close_all() -> None:
    for cluster in list(_LIVE.values()):
        cluster.close()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Remove the namespaces, then behave as the previous handler would have."""
    global _sigterm_installed
    log.warning("netem: SIGTERM, removing emulated network namespaces")
    _close_all()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _sigterm_installed = False
    os.kill(os.getpid(), signal.SIGTERM)


def register(cluster: EmulatedCluster) -> None:
    global _atexit_registered, _previous_sigterm, _sigterm_installed
    _LIVE[cluster.run_id] = cluster
    if not _atexit_registered:
        atexit.register(_close_all)
        _atexit_registered = True
    if not _sigterm_installed:
        try:
            current = signal.getsignal(signal.SIGTERM)
            # SIG_IGN means the process chose to survive SIGTERM; None means a handler set
            # outside Python that could not be restored afterwards: leave both alone.
            if current is signal.SIG_DFL or callable(current):
                signal.signal(signal.SIGTERM, _on_sigterm)
                _previous_sigterm = current
                _sigterm_installed = True
        except ValueError:  # not the main thread: atexit and __exit__ still clean up
            log.debug("netem: SIGTERM handler not installed outside the main thread")


def unregister(cluster: EmulatedCluster) -> None:
    global _sigterm_installed
    _LIVE.pop(cluster.run_id, None)
    if not _LIVE and _sigterm_installed:
        with contextlib.suppress(ValueError):
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                signal.signal(signal.SIGTERM, _previous_sigterm)
            _sigterm_installed = False


def cleanup_stale(
    prefix: str = DEFAULT_PREFIX,
    runner: Runner | None = None,
    is_alive: Callable[[int], bool] = pid_alive,
) -> list[str]:
    """Delete namespaces left by earlier runs whose creating process no longer exists.

    A run killed with SIGKILL (or a crashed machine-level OOM kill) cannot clean up after
    itself; its namespaces would keep addresses and veths around forever. Returns the names
    deleted (those that failed to delete are logged and omitted).
    """
    run = runner or run_command
    listing = run_checked(run, ["ip", "netns", "list"])
    stale = stale_namespaces(parse_netns_list(listing.stdout), is_alive, prefix)
    if stale:
        log.info("netem: removing stale namespaces %s", ", ".join(stale))
    failed = set(delete_namespaces(run, stale))
    return [ns for ns in stale if ns not in failed]

