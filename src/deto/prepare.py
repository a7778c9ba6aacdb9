"""``deto.prepare``: the few lines a user changes to go from HSDP to decoupled training."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deto.comm import Comm
from deto.optim import DecoupledOptimizer
from deto.replicators import Replicator, make_replicator
from deto.replicators.base import local_tensor
from deto.sharding import shard_model
from deto.topology import Topology

logger = logging.getLogger(__name__)

ReplicatorSpec = str | Replicator | Sequence[str | Replicator]


def build_replicators(spec: ReplicatorSpec, options: dict[str, Any]) -> list[Replicator]:
    """Turn a name, an instance or a list of either into replicators.

    ``options`` configure a replicator given by name; they are an error with instances (which
    carry their own settings) or with a list of several names (ambiguous).
    """
    items = [spec] if isinstance(spec, (str, Replicator)) else list(spec)
    if not items:
        raise ValueError("replicator list is empty (use 'none' for no replication)")
    names = [it for it in items if isinstance(it, str)]
    if options and len(names) != 1:
        raise ValueError(
            f"Options {sorted(options)} need exactly one replicator given by name, got {items!r}"
        )
    out = []
    for it in items:
        if isinstance(it, Replicator):
            out.append(it)
        elif isinstance(it, str):
            out.append(make_replicator(it, **options))
        else:
            raise TypeError(f"replicator must be a name or a Replicator, got {type(it).__name__}")
    return out


def _build_base(
    optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer,
    model: nn.Module,
    renamed: dict[int, nn.Parameter],
    lr: float,
    optimizer_options: dict[str, Any],
) -> torch.optim.Optimizer:
    if isinstance(optimizer, torch.optim.Optimizer):
        if optimizer_options:
            raise ValueError("optimizer_options apply only when optimizer is a class")
        if optimizer.state:
            raise ValueError("Pass a fresh optimizer to deto.prepare (this one already has state)")
        # fully_shard swaps the parameters for sharded ones: point the groups at the new ones.
        for group in optimizer.param_groups:
            try:
                group["params"] = [renamed[id(p)] for p in group["params"]]
            except KeyError:
                raise ValueError("The optimizer holds parameters that are not the model's") from None
        return optimizer
    if not (inspect.isclass(optimizer) and issubclass(optimizer, torch.optim.Optimizer)):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer class or instance, got {optimizer!r}"
        )
    kwargs = dict(optimizer_options)
    if "weight_decay" in inspect.signature(optimizer).parameters:
        kwargs.setdefault("weight_decay", 0.0)  # decay is applied, decoupled, by deto
    return optimizer(model.parameters(), lr=lr, **kwargs)  # type: ignore[call-arg]


def prepare(
    model: nn.Module,
    topology: Topology,
    *,
    replicator: ReplicatorSpec = "demo",
    optimizer: type[torch.optim.Optimizer] | torch.optim.Optimizer = torch.optim.SGD,
    lr: float = 1e-3,
    sign: bool = True,
    weight_decay: float = 0.0,
    mixed_precision: str | None = None,
    nonfinite: str = "raise",
    optimizer_options: dict[str, Any] | None = None,
    sync_initial: bool = True,
    **options: Any,
) -> tuple[nn.Module, DecoupledOptimizer]:
    """Shard ``model`` inside each node and wrap an optimizer whose replicators span nodes.

    Args:
        model: any ``nn.Module``; moved to the topology's device and sharded with FSDP2 over
            the ``shard`` axis only (members of ``nn.ModuleList`` first, then the root).
        topology: the cluster shape; the process group is initialised if needed.
        replicator: a registry name (``"demo"``, ``"full"``, ...), a :class:`Replicator`, or a
            list of them. ``**options`` configure a replicator given by name.
        optimizer: the base optimizer class (built with ``lr`` and ``optimizer_options``) or an
            instance made from ``model.parameters()`` before this call.
        lr: learning rate of the base optimizer (DeMo also scales its momentum by it).
        sign: use the sign of the replicated gradient (sign-SGD; FlexDeMo's default).
        weight_decay: decoupled weight decay, applied by deto for every base optimizer.
        mixed_precision: ``None`` or ``"bf16"`` (bf16 compute, fp32 params and reductions).
        nonfinite: what to do with non-finite gradients (see :class:`DecoupledOptimizer`).
        sync_initial: broadcast node 0's parameters to every node first, so replicas start equal.

    Returns:
        ``(model, optimizer)``: the sharded model and a :class:`DecoupledOptimizer`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(topology, Topology):
        raise TypeError(f"topology must be a deto.Topology, got {type(topology).__name__}")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"Invalid learning rate: {lr}")
    replicators = build_replicators(replicator, options)
    mesh = topology.init()

    named_before = list(model.named_parameters())
    model.to(topology.torch_device)
    shard_model(model, mesh["shard"], mixed_precision=mixed_precision)
    named_after = dict(model.named_parameters())
    renamed = {id(p): named_after[n] for n, p in named_before}
    names: dict[torch.Tensor, str] = {p: n for n, p in named_after.items()}

    comm = Comm(mesh["replicate"].get_group(), topology.nodes)
    if sync_initial:
        with torch.no_grad():
            comm.broadcast([local_tensor(p) for p in named_after.values()], src=0)
        comm.take_stats()  # set-up traffic is not a step's traffic

    base = _build_base(optimizer, model, renamed, lr, optimizer_options or {})
    opt = DecoupledOptimizer(
        base,
        replicators,
        comm,
        sign=sign,
        weight_decay=weight_decay,
        param_names=names,
        nonfinite=nonfinite,
        node_group=mesh["shard"].get_group(),
    )
    logger.info("deto: %s on %d node(s) x %d rank(s)", opt, topology.nodes, topology.ranks_per_node)
    return model, opt
