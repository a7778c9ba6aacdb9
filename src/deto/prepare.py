"""``deto.prepare``: the few lines a user changes to go from HSDP to decoupled training."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deto.optim import DecoupledOptimizer, OptimizerSpec, check_model_args
from deto.replicators import ReplicatorSpec, build_replicators
from deto.sharding import WrapPolicy, is_meta, materialize, require_reset_parameters, shard
from deto.topology import Topology


def _repoint(optimizer: torch.optim.Optimizer, renamed: dict[int, nn.Parameter]) -> None:
    """fully_shard swaps the parameters for sharded ones: point the groups at the new ones."""
    for group in optimizer.param_groups:
        try:
            group["params"] = [renamed[id(p)] for p in group["params"]]
        except KeyError:
            raise ValueError("The optimizer holds parameters that are not the model's") from None


def prepare(
    model: nn.Module,
    topology: Topology,
    *,
    replicator: ReplicatorSpec = "demo",
    optimizer: OptimizerSpec = torch.optim.SGD,
    lr: float = 1e-3,
    sign: bool = True,
    weight_decay: float = 0.0,
    mixed_precision: str | None = None,
    wrap_policy: WrapPolicy | None = None,
    nonfinite: str = "raise",
    optimizer_options: dict[str, Any] | None = None,
    sync_initial: bool = True,
    **options: Any,
) -> tuple[nn.Module, DecoupledOptimizer]:
    """Shard ``model`` inside each node and wrap an optimizer whose replicators span nodes.

    :func:`deto.shard` shards the model over the ``shard`` axis only (a model already sharded
    over ``topology.mesh["shard"]`` is kept as it is; one still on the meta device is
    materialised with each module's ``reset_parameters()``); the optimizer is then built by
    :meth:`DecoupledOptimizer.from_model`, whose arguments these are.

    Args:
        optimizer: the base optimizer class, or an instance made from ``model.parameters()``
            before this call (it is re-pointed at the sharded parameters).
        mixed_precision: ``None`` or ``"bf16"`` (bf16 compute, fp32 params and reductions).
        wrap_policy: the FSDP2 units: module classes or ``(module) -> bool`` (see
            :func:`deto.shard`); ``None`` shards the outermost repeated blocks.

    Returns:
        ``(model, optimizer)``: the sharded model and a :class:`DecoupledOptimizer`.
    """
    check_model_args(model, topology, lr)
    replicators = build_replicators(replicator, options)  # bad options fail before sharding
    topology.init()
    named_before = list(model.named_parameters())
    meta = is_meta(model)
    if meta:
        require_reset_parameters(model)
    shard(model, topology, mixed_precision=mixed_precision, wrap_policy=wrap_policy)
    if meta:
        materialize(model, topology.torch_device)
    if isinstance(optimizer, torch.optim.Optimizer):
        named_after = dict(model.named_parameters())
        _repoint(optimizer, {id(p): named_after[n] for n, p in named_before})
    return model, DecoupledOptimizer.from_model(
        model,
        topology,
        optimizer,
        replicator=replicators,
        lr=lr,
        sign=sign,
        weight_decay=weight_decay,
        nonfinite=nonfinite,
        optimizer_options=optimizer_options,
        sync_initial=sync_initial,
    )
