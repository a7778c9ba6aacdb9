"""A sharded checkpoint of a deto model and its optimizer, written and read by every rank.

A directory holds a ``torch.distributed.checkpoint`` (DCP) of the model and the base optimizer
under the key ``node<i>`` of each node (nodes whose replicas differ keep their own), and one
``rank<r>.pt`` per rank with the replicators' state and the step count. The model and the
optimizer load separately, because frameworks restore them at different moments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from deto.optim import DecoupledOptimizer
from deto.topology import Topology


def _rank_file(path: Path) -> Path:
    return path / f"rank{dist.get_rank():05d}.pt"


def exists(path: str | Path) -> bool:
    return (Path(path) / ".metadata").is_file()


def save(
    path: str | Path, model: nn.Module, optimizer: DecoupledOptimizer, topology: Topology
) -> None:
    """Write ``model`` and ``optimizer`` (with its replicators) under ``path``."""
    path = Path(path)
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer.base),
    }
    dcp.save({f"node{topology.node}": state}, checkpoint_id=str(path))
    own: dict[str, Any] = optimizer.state_dict()
    own.pop("base")
    torch.save(own, _rank_file(path))


def load_model(path: str | Path, model: nn.Module, topology: Topology) -> None:
    """Restore the model that :func:`save` wrote."""
    key = f"node{topology.node}"
    state: dict[str, Any] = {key: {"model": get_model_state_dict(model)}}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state[key]["model"])


def load_optimizer(
    path: str | Path, model: nn.Module, optimizer: DecoupledOptimizer, topology: Topology
) -> None:
    """Restore the optimizer (base state, replicators, step) that :func:`save` wrote."""
    path = Path(path)
    key = f"node{topology.node}"
    state: dict[str, Any] = {key: {"optim": get_optimizer_state_dict(model, optimizer.base)}}
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer.base, state[key]["optim"])
    own = torch.load(_rank_file(path), weights_only=True)
    optimizer.load_state_dict({"base": optimizer.base.state_dict(), **own})
