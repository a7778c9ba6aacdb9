"""Replica integrity: are the nodes' copies of each shard still bit for bit the same?

Every syncing scheme promises identical replicas (every node decodes the same bytes with the
same operations), but a flipped bit in memory, a bad host or a bug breaks that silently, and the
nodes then train different models without a word. :func:`check_replicas` compares a cheap
digest of each shard across the nodes, as PCCL does: one tiny all-gather of one 64-bit integer
per tensor over the ``replicate`` group, then, on divergence, a warning and (``repair=True``)
a broadcast of the shard from a node holding the majority's bytes.

What is compared is what must be equal: the parameters and the base optimizer's state (AdamW's
moments see the same gradients on every node). The replicators' node-local residuals (DeMo's
``delta``) differ by design and are left out.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from deto.comm import Comm
from deto.optim import DecoupledOptimizer
from deto.ranklog import warn
from deto.replicators.base import local_tensor

logger = logging.getLogger(__name__)

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def tensor_digest(t: torch.Tensor) -> torch.Tensor:
    """A 64-bit digest of ``t``'s bytes, computed where ``t`` lives (no copy to the host).

    ``sum(bits[i] * (2i + 1)) mod 2**64``: integer arithmetic, so every device and every
    reduction order gives the same value, and any change to a single element changes it
    (the odd multiplier is invertible modulo 2**64).
    """
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=t.device)
    bits = flat.view(_INT_OF_SIZE[flat.element_size()]).to(torch.int64)
    odd = torch.arange(1, 2 * flat.numel(), 2, dtype=torch.int64, device=t.device)
    return (bits * odd).sum()


@dataclass
class ReplicaCheck:
    """The outcome of one :func:`check_replicas` call on this rank.

    ``diverged``: nodes whose copy of this rank's shard differed from the majority's (any shard
    of the node, when the node's ranks were consulted); ``tensors``: names of the tensors that
    differed here; ``source``: the node the repair copied from; ``repaired``: whether it did.
    """

    diverged: list[int] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    source: int | None = None
    repaired: bool = False

    @property
    def identical(self) -> bool:
        return not self.diverged


def shared_tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> list[tuple[str, torch.Tensor]]:
    """``(name, local shard)`` of everything every node must hold identically, in an order
    that is the same on every node: the parameters, then the base optimizer's state."""
    out = [(name, local_tensor(p)) for name, p in model.named_parameters()]
    base = optimizer.base if isinstance(optimizer, DecoupledOptimizer) else optimizer
    names = {id(p): n for n, p in model.named_parameters()}
    for group in base.param_groups:
        for p in group["params"]:
            for key, value in sorted(base.state.get(p, {}).items()):
                if isinstance(value, torch.Tensor):
                    out.append((f"{names.get(id(p), '?')}:{key}", local_tensor(value)))
    return out


def majority(rows: list[tuple[int, ...]]) -> int:
    """The lowest index holding the most common row (ties go to the lowest index)."""
    counts = Counter(rows)
    best = max(counts.values())
    return next(i for i, row in enumerate(rows) if counts[row] == best)


def check_replicas(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    comm: Comm | None = None,
    repair: bool = True,
    node_group: dist.ProcessGroup | None = None,
) -> ReplicaCheck:
    """Compare this rank's shards across the nodes; on divergence warn and, with ``repair``,
    copy the majority's bytes (ties: the lowest node's) to every node.

    A collective: every rank of every node calls it at the same point, between steps. ``comm``
    defaults to the optimizer's (a :class:`DecoupledOptimizer`); pass one for a plain torch
    optimizer. ``node_group`` (default: the optimizer's) shares the diverged nodes among the
    ranks of a node, so each of them reports the same.
    """
    if comm is None:
        if not isinstance(optimizer, DecoupledOptimizer):
            raise TypeError("check_replicas needs comm= for an optimizer that is not deto's")
        comm = optimizer.comm
    if node_group is None and isinstance(optimizer, DecoupledOptimizer):
        node_group = optimizer.node_group
    named = shared_tensors(model, optimizer)
    digests = (
        torch.stack([tensor_digest(t) for _, t in named])
        if named
        else torch.zeros(0, dtype=torch.int64)
    )
    rows = [tuple(d.tolist()) for (d,) in comm.all_gather([digests])]
    source = majority(rows)
    here = [node for node, row in enumerate(rows) if row != rows[source]]
    differing = sorted(
        {named[i][0] for node in here for i in _differences(rows[node], rows[source])}
    )
    # every node holds one rank of each replicate group, so every rank gets the same union
    diverged = _union_over_node(here, len(rows), node_group, digests.device)
    result = ReplicaCheck(diverged=diverged, tensors=differing, source=source if diverged else None)
    if not diverged:
        return result
    warn(  # the replicate group saw the same rows: node 0's ranks each name their shard's
        logger,
        "replicas differ: node(s) %s hold other bytes than node %d (%s)%s",
        ", ".join(map(str, diverged)), source, ", ".join(differing[:5]) or "another rank's shard",
        f"; repairing from node {source}" if repair else "",
        group=comm,
    )
    if repair:
        if here:  # the whole replicate group saw the same rows, so it agrees on this
            with torch.no_grad():
                comm.broadcast([t for _, t in named], src=source)
        result.repaired = True
    return result


def _differences(row: tuple[int, ...], reference: tuple[int, ...]) -> list[int]:
    return [i for i, (a, b) in enumerate(zip(row, reference, strict=True)) if a != b]


def _union_over_node(
    diverged: list[int], nodes: int, group: dist.ProcessGroup | None, device: torch.device
) -> list[int]:
    """The nodes any rank of this node found diverged (one tiny all-reduce inside the node)."""
    if group is None or dist.get_world_size(group) == 1:
        return diverged
    mask = torch.zeros(nodes, dtype=torch.int32, device=device)
    mask[diverged] = 1
    dist.all_reduce(mask, op=dist.ReduceOp.MAX, group=group)
    return [i for i, bad in enumerate(mask.tolist()) if bad]
