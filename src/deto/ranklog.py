"""Log a line once per run, not once per rank: a warning four ranks print four times hides the
one line that matters among its copies."""

from __future__ import annotations

import logging

import torch.distributed as dist

_said: set[str] = set()


def warn_once(logger: logging.Logger, message: str, *args: object) -> None:
    """``logger.warning(message, *args)`` on global rank 0 (or without a process group), at
    most once per process for the same message."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    if message in _said:
        return
    _said.add(message)
    logger.warning(message, *args)
