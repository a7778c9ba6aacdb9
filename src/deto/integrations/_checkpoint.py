"""A sharded checkpoint of a deto model and its optimizer, written and read by every rank.

A directory holds one DCP checkpoint of ``{"model": ..., "optim": ...}`` with one entry per
node (see :mod:`deto.checkpoint`): the optimizer's state is torch's format, so it carries the
base optimizer's state, the replicators' buffers and the counters. The model and the optimizer
load separately, because frameworks restore them at different moments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from deto.checkpoint import load_state, save_state
from deto.optim import DecoupledOptimizer
from deto.topology import Topology


def exists(path: str | Path) -> bool:
    return (Path(path) / ".metadata").is_file()


def save(
    path: str | Path, model: nn.Module, optimizer: DecoupledOptimizer, topology: Topology
) -> None:
    """Write ``model`` and ``optimizer`` (with its replicators) under ``path``."""
    state: dict[str, Any] = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    save_state(path, state, topology)


def load_model(path: str | Path, model: nn.Module, topology: Topology) -> None:
    """Restore the model that :func:`save` wrote."""
    state = load_state(path, {"model": get_model_state_dict(model)}, topology)
    set_model_state_dict(model, state["model"])


def load_optimizer(
    path: str | Path, model: nn.Module, optimizer: DecoupledOptimizer, topology: Topology
) -> None:
    """Restore the optimizer (base state, replicators, step) that :func:`save` wrote."""
    state = load_state(path, {"optim": get_optimizer_state_dict(model, optimizer)}, topology)
    set_optimizer_state_dict(model, optimizer, state["optim"])
