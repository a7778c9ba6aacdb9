"""Buffers (BatchNorm running statistics and the like) kept equal on every rank.

FSDP2 shards parameters, not buffers: every rank keeps a whole copy of each buffer and updates
it from its own batches, so without help the copies drift apart inside a node and across
nodes. Whenever a step synchronises the parameters across nodes, :class:`BufferSync` replaces
every floating persistent buffer by its mean over all ranks: one all-reduce inside the node,
then one across nodes (through :class:`~deto.comm.Comm`, so its bytes are counted). Integer
buffers (``num_batches_tracked``) advance alike everywhere; non-persistent buffers (rotary
tables, masks) are derived, not learned, and are left alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deto.comm import Comm


def synced_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The floating buffers of ``model`` that its ``state_dict`` holds (each once)."""
    out, seen = [], set()
    for module in model.modules():
        for name, b in module._buffers.items():
            if (
                b is None
                or not b.is_floating_point()
                or name in module._non_persistent_buffers_set
                or id(b) in seen
            ):
                continue
            seen.add(id(b))
            out.append(b)
    return out


@torch.no_grad()
def average_buffers(
    buffers: list[torch.Tensor], comm: Comm, node_group: dist.ProcessGroup | None
) -> None:
    """Replace each buffer, in place, by its mean over every rank (node, then nodes).

    One collective per dtype and level; all-reduce hands every rank the same reduced bytes, so
    the results are bitwise identical everywhere.
    """
    node_size = dist.get_world_size(node_group) if node_group is not None else 1
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in buffers:
        by_dtype.setdefault(b.dtype, []).append(b)
    for group in by_dtype.values():
        flat = torch.cat([b.reshape(-1) for b in group])
        if node_size > 1:
            dist.all_reduce(flat, group=node_group)
            flat.div_(node_size)
        (flat,) = comm.all_reduce_mean([flat])
        for b, new in zip(group, flat.split([b.numel() for b in group]), strict=True):
            b.copy_(new.view_as(b))


def syncs_parameters(optimizer: Any) -> bool:
    """Whether the step about to run brings the nodes' parameters together: a replicator
    syncs on it (:meth:`~deto.replicators.Replicator.syncs_at`; any step, for torch's HSDP)."""
    replicators = getattr(optimizer, "replicators", None)
    if replicators is None:
        return True  # a torch optimizer under HSDP: gradients are all-reduced every step
    step = optimizer.step_count + 1
    return any(r.syncs_at(step) for r in replicators)


class BufferSync:
    """An optimizer step pre-hook: average the buffers on steps that sync the parameters.

    It runs before the step, so its traffic counts in that step's ``stats()``; the buffers were
    last changed by the step's forward, so after the step parameters and buffers agree.
    """

    def __init__(
        self, buffers: list[torch.Tensor], comm: Comm, node_group: dist.ProcessGroup | None
    ) -> None:
        self.buffers = buffers
        self.comm = comm
        self.node_group = node_group

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.buffers and syncs_parameters(optimizer):
            average_buffers(self.buffers, self.comm, self.node_group)
