"""The two core calls the integrations make, in the shape of ``deto.shard`` and
``DecoupledOptimizer.from_model``: shard a model inside each node, and build the optimizer of a
model that is already sharded."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

from deto.comm import Comm
from deto.optim import DecoupledOptimizer
from deto.prepare import ReplicatorSpec, build_replicators
from deto.replicators.base import local_tensor
from deto.sharding import shard_model
from deto.topology import Topology


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


def shard(model: nn.Module, topology: Topology, *, mixed_precision: str | None = None) -> nn.Module:
    """Move ``model`` to the topology's device and ``fully_shard`` it over each node's ranks."""
    mesh = topology.init()
    model.to(topology.torch_device)
    return shard_model(model, mesh["shard"], mixed_precision=mixed_precision)


def optimizer_from_model(
    model: nn.Module,
    topology: Topology,
    optimizer: torch.optim.Optimizer,
    *,
    replicator: ReplicatorSpec = "demo",
    sign: bool = True,
    nonfinite: str = "raise",
    **replicator_options: Any,
) -> DecoupledOptimizer:
    """Wrap ``optimizer`` (built on the sharded ``model``) so replicators own inter-node traffic.

    Node 0's parameters are first broadcast to every node, so replicas start equal.
    """
    mesh = topology.init()
    replicators = build_replicators(replicator, replicator_options)
    comm = Comm(mesh["replicate"].get_group(), topology.nodes)
    with torch.no_grad():
        comm.broadcast([local_tensor(p) for p in model.parameters()], src=0)
    comm.take_stats()  # set-up traffic is not a step's traffic
    return DecoupledOptimizer(
        optimizer,
        replicators,
        comm,
        sign=sign,
        param_names={p: n for n, p in model.named_parameters()},
        nonfinite=nonfinite,
        node_group=mesh["shard"].get_group(),
    )


def find_decoupled(optimizer: Any) -> DecoupledOptimizer:
    """The :class:`DecoupledOptimizer` inside a framework's optimizer wrapper(s)."""
    seen = optimizer
    for _ in range(4):  # AcceleratedOptimizer.optimizer, LightningOptimizer._optimizer, ...
        if isinstance(seen, DecoupledOptimizer):
            return seen
        seen = getattr(seen, "optimizer", None) or getattr(seen, "_optimizer", None)
    raise TypeError(f"Expected a deto.DecoupledOptimizer (or a wrapper of one), got {optimizer!r}")
