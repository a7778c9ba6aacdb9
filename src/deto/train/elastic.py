"""Starting the ranks of a simulated cluster on this machine, through torch's own launcher.

``deto train`` without torchrun spawns ``nodes x ranks_per_node`` processes with
:func:`torch.distributed.launcher.api.elastic_launch` (c10d rendezvous on 127.0.0.1, a free
port chosen by the OS). Every worker runs the same per-rank entry function that a torchrun
launch calls directly, so both paths train identically (see :mod:`deto.train.launch`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

class RankFailure(RuntimeError):
    """One or more ranks failed; ``message`` is the first failing rank's error, one line."""

    def __init__(self, rank: int, message: str, exitcode: int, traceback: str = "") -> None:
        self.rank = rank
        self.message = message
        self.exitcode = exitcode
        self.traceback = traceback
        super().__init__(f"rank {rank} failed (exit code {exitcode}): {message}")


def _failure_message(failure: Any) -> str:
    """The exception of a failed rank (``"Type: message"``), or the signal that killed it."""
    message = failure.message
    if isinstance(message, dict):  # the rank's error file: {"message": ..., "extraInfo": ...}
        message = message.get("message", "")
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if failure.exitcode >= 0 and not failure.error_file_data:
        return "see the messages above"  # it exited without an error file: no message of ours
    return lines[0] if lines else "no message"


def _failure_traceback(failure: Any) -> str:
    message = failure.message
    if isinstance(message, dict):
        return str(message.get("extraInfo", {}).get("py_callstack", ""))
    return ""


def _quiet_elastic_loggers() -> None:
    """torch elastic narrates every start and stop (each of its loggers has its own level);
    the failures that matter are reported by :func:`launch_local` instead."""
    for name, log in list(logging.root.manager.loggerDict.items()):
        quiet = name.startswith(("torch.distributed.elastic", "torch.multiprocessing"))
        if quiet and isinstance(log, logging.Logger):
            log.setLevel(logging.CRITICAL)


def launch_local(
    entry: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    world_size: int,
    monitor_interval: float = 0.1,
) -> dict[int, Any]:
    """Run ``entry(*args)`` on ``world_size`` local ranks; return ``{rank: return value}``.

    ``entry`` must be a module-level (picklable) function; workers start with the ``spawn``
    method and ``OMP_NUM_THREADS=1``. Raises :class:`RankFailure` when a rank fails and
    ``KeyboardInterrupt`` on SIGINT/SIGTERM, after every rank has been stopped.
    """
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ["OMP_NUM_THREADS"] = "1"
    _quiet_elastic_loggers()
    with tempfile.TemporaryDirectory(prefix="deto-launch-") as log_dir:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=world_size,
            run_id=f"deto-{uuid.uuid4().hex[:12]}",
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",
            local_addr="127.0.0.1",
            max_restarts=0,
            monitor_interval=monitor_interval,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=log_dir),
        )
        try:
            return elastic_launch(config, entry)(*args)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            raise RankFailure(
                rank, _failure_message(failure), failure.exitcode, _failure_traceback(failure)
            ) from None
        except Exception as exc:  # SignalException: SIGINT/SIGTERM reached the launcher
            if type(exc).__name__ == "SignalException":
                raise KeyboardInterrupt from None
            raise
