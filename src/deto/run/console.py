"""What a run shows on the terminal: log lines, and rank 0's progress (a bar above them, or
log lines where no bar can be drawn: after the first step, then periodically).

Every process of a run configures its logging here: the ``deto`` command itself, and every
rank (spawned for a simulated cluster or started by torchrun). Ranks other than 0 report
errors only, so a cluster's terminal reads like one program's.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any


class _ProgressAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Write log lines above a tqdm progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def configure_logging(level: int, rank: int | None = None) -> None:
    """Configure the root logger once per process; ranks other than 0 only report errors."""
    prefix = f"[rank {rank}] " if rank not in (None, 0) else ""
    handler = _ProgressAwareHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if rank in (None, 0) else max(level, logging.ERROR))
    for noisy in ("torch.distributed.elastic", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


MIN_BAR_COLUMNS = 40
"""A terminal narrower than this (some report 0 columns) gets log lines instead of a bar."""
PROGRESS_LOG_S = 10.0
"""Without a bar, a progress line is logged after the first step, then at most this often."""


class _Bar:
    """tqdm's bar, drawn on an interactive terminal."""

    def __init__(self, tqdm: Any, total: int, initial: int) -> None:
        self._bar = tqdm(
            total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
            leave=True,
        )

    def update(self, step: int, **fields: str) -> None:
        self._bar.update(1)
        self._bar.set_postfix(**fields)

    def close(self) -> None:
        self._bar.close()


class _LogLines:
    """Progress as log lines where no bar can be drawn (a file, a pipe, a terminal that reports
    no width, no tqdm): one after the first step (so a run shows it is going at once), then one
    every :data:`PROGRESS_LOG_S` seconds, and one after the last step."""

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._total, self._clock = total, clock
        self._last: float | None = None  # when the last line was logged; None: none yet

    def update(self, step: int, **fields: str) -> None:
        now = self._clock()
        due = self._last is None or now - self._last >= PROGRESS_LOG_S
        if not due and step != self._total:
            return
        self._last = now
        shown = " ".join(f"{k} {v}" for k, v in fields.items())
        logging.getLogger("deto.run").info("step %d/%d: %s", step, self._total, shown)

    def close(self) -> None:
        pass


def progress(total: int, initial: int) -> _Bar | _LogLines:
    """Rank 0's progress: a bar where the terminal can draw one, else periodic log lines."""
    if sys.stderr.isatty() and shutil.get_terminal_size((0, 0)).columns >= MIN_BAR_COLUMNS:
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return _Bar(tqdm, total, initial)
    return _LogLines(total)
