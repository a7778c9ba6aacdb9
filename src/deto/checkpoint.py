"""Saving and loading a state through ``torch.distributed.checkpoint`` (DCP), one entry per node.

Nodes whose replicas differ (``none``, DiLoCo between synchronisations, each node's DeMo
``delta``) must each get their own state back, so every tensor not already spread over both
mesh axes is saved with a node dimension. Both ``deto train``'s checkpoints and the framework
integrations write their model and optimizer through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map

from deto.optim_state import per_node
from deto.replicators.base import local_tensor
from deto.topology import Topology


@torch.no_grad()
def one_entry_per_node(
    state: dict[str, Any], topo: Topology
) -> tuple[dict[str, Any], dict[int, torch.Tensor]]:
    """``state`` with every tensor not yet spread over both mesh axes given a node dimension.

    The new entries share memory with the old ones, so a DCP load into them restores the old
    ones in place; the second value maps each new entry back to the tensor it stands for.
    """
    originals: dict[int, torch.Tensor] = {}

    def lift(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if isinstance(value, DTensor) and value.device_mesh.ndim == 2:
            return value  # already one entry per node (deto's buffers) or a 2-D HSDP tensor
        entry = per_node(local_tensor(value).detach(), value, topo.mesh)
        originals[id(entry)] = value
        return entry

    return tree_map(lift, state), originals


def save_state(path: str | Path, state: dict[str, Any], topo: Topology) -> None:
    """Write ``state`` (as DCP's ``get_state_dict`` returns it) under ``path``; a collective."""
    entries, _ = one_entry_per_node(state, topo)
    dcp.save(entries, checkpoint_id=str(path))


def load_state(path: str | Path, state: dict[str, Any], topo: Topology) -> dict[str, Any]:
    """Load into ``state`` what :func:`save_state` wrote (a collective); return the loaded state.

    ``state`` names what to load (its keys may be a subset of the saved ones) and gives the
    shapes; its tensors are filled in place, other values (counters, settings) come back in the
    returned dictionary only.
    """
    entries, originals = one_entry_per_node(state, topo)
    dcp.load(entries, checkpoint_id=str(path))
    return tree_map(lambda v: originals.get(id(v), v), entries)
