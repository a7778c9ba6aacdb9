"""Small object collectives of the application: what every rank calls to agree on a value.

They carry Python objects (digests, paths, memory figures), not tensors, so they go through
``all_gather_object``/``broadcast_object_list`` on the default (world) group.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def all_gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
