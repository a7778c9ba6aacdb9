"""What a run shows on the terminal: log lines, and rank 0's progress bar above them.

Every process of a run configures its logging here: the ``deto`` command itself, and every
rank (spawned for a simulated cluster or started by torchrun). Ranks other than 0 report
errors only, so a cluster's terminal reads like one program's.
"""

from __future__ import annotations

import logging
import sys
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


def progress_bar(total: int, initial: int) -> Any:
    """A tqdm bar on a terminal; ``None`` when not interactive (logs carry the progress)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(
        total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, leave=True
    )
