"""Log a line once per run, not once per rank: a warning four ranks print four times hides the
one line that matters among its copies.

The rule: a line every rank would write alike is written by global rank 0; a line whose
content differs between groups of ranks (per node, or per rank of a node) is written by rank
0 of the ``group`` whose members would write it alike: a node's ``shard`` group where each
node says its own, the replicate group (a :class:`~deto.comm.Comm`, whose rank 0 is node 0)
where each of a node's ranks says its own. Without a process group (one process), every
caller writes; on :class:`deto.testing.FakeComm`'s nodes, a ``Comm`` picks node 0's thread.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

from deto.comm import Comm

Group = dist.ProcessGroup | Comm | None

_said: set[str] = set()


def speaks(group: Group = None) -> bool:
    """Whether this rank writes the lines that every rank of ``group`` (default: the world)
    would write alike: its rank 0 does, or every caller where no process group is set up."""
    if isinstance(group, Comm):
        return group.rank == 0
    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank(group) == 0


def warn(
    logger: logging.Logger, message: str, *args: object, group: Group = None
) -> None:
    """``logger.warning(message, *args)`` on rank 0 of ``group`` only (see :func:`speaks`)."""
    if speaks(group):
        logger.warning(message, *args)


def warn_once(
    logger: logging.Logger, message: str, *args: object, group: Group = None
) -> None:
    """:func:`warn`, at most once per process for the same message."""
    if not speaks(group) or message in _said:
        return
    _said.add(message)
    logger.warning(message, *args)
