"""Starting the ranks of a simulated cluster on this machine, through torch's own launcher.

``deto train`` without torchrun spawns ``nodes x ranks_per_node`` processes with
:func:`torch.distributed.launcher.api.elastic_launch` (c10d rendezvous on 127.0.0.1, a free
port chosen by the OS). Every worker runs the same per-rank entry function that a torchrun
launch calls directly, so both paths train identically (see :mod:`deto.launch.dispatch`).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deto.launch.failures import RankError

logger = logging.getLogger(__name__)

ERROR_LOG = "error.log"


class RankFailure(RuntimeError):
    """One or more ranks failed; ``message`` is the first failing rank's error, one line.

    ``log_file``: where the failing rank's full traceback was written, if anywhere.
    """

    def __init__(self, rank: int, message: str, exitcode: int, traceback: str = "") -> None:
        self.rank = rank
        self.exitcode = exitcode
        self.traceback = traceback
        self.log_file: Path | None = None
        told = f"{RankError.__name__}: "
        if message.startswith(told):  # the rank told its own story: node, rank, cause
            self.message = message[len(told) :]
            super().__init__(self.message)
        else:
            self.message = message
            super().__init__(f"rank {rank} failed (exit code {exitcode}): {message}")

    def write_log(self, run_dir: Path) -> None:
        """Keep the full traceback in ``run_dir/error.log`` (the terminal gets one line)."""
        if not self.traceback:
            return
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            path = run_dir / ERROR_LOG
            path.write_text(f"rank {self.rank} (exit code {self.exitcode}):\n{self.traceback}")
        except OSError as exc:
            logger.debug("could not write %s: %s", run_dir / ERROR_LOG, exc)
            (run_dir / ERROR_LOG).unlink(missing_ok=True)  # no empty log left to mislead
            return
        self.log_file = path


def _failure_message(failure: Any) -> str:
    """The exception of a failed rank (``"Type: message"``), or the signal that killed it."""
    message = failure.message
    if isinstance(message, dict):  # the rank's error file: {"message": ..., "extraInfo": ...}
        message = message.get("message", "")
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if failure.exitcode < 0:
        return f"killed by {signal.Signals(-failure.exitcode).name}"
    if not failure.error_file_data:
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
    max_restarts: int = 0,
    monitor_interval: float = 0.1,
) -> dict[int, Any]:
    """Run ``entry(*args)`` on ``world_size`` local ranks; return ``{rank: return value}``.

    ``entry`` must be a module-level (picklable) function; workers start with the ``spawn``
    method and ``OMP_NUM_THREADS=1``. When a rank fails, every rank is stopped and, up to
    ``max_restarts`` times, all are started again (torch elastic's restarts; each worker sees
    ``TORCHELASTIC_RESTART_COUNT``). Raises :class:`RankFailure` when a rank fails for good,
    ``KeyboardInterrupt`` on SIGINT and ``SystemExit(143)`` on SIGTERM, after every rank has
    been stopped.
    """
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ["OMP_NUM_THREADS"] = "1"
    # Restarted workers must not find the first attempt's keys: with the rendezvous store
    # shared (torch's default) every attempt's workers use the same store without a prefix,
    # and gloo's start-up then reads the dead ranks' addresses. A fresh store per attempt.
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
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
            max_restarts=max_restarts,
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
                if getattr(exc, "sigval", None) == signal.SIGTERM:
                    raise SystemExit(128 + signal.SIGTERM) from None
                raise KeyboardInterrupt from None
            raise
