"""``deto.prepare``: the few lines a user changes to go from HSDP to decoupled training."""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deto.buffers import BufferSync, synced_buffers
from deto.comm import Comm
from deto.optim import DecoupledOptimizer
from deto.replicators import Replicator, make_replicator
from deto.replicators.base import local_tensor
from deto.sharding import WrapPolicy, is_meta, materialize, require_reset_parameters, shard
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
    wrap_policy: WrapPolicy | None = None,
    nonfinite: str = "raise",
    optimizer_options: dict[str, Any] | None = None,
    sync_initial: bool = True,
    **options: Any,
) -> tuple[nn.Module, DecoupledOptimizer]:
    """Shard ``model`` inside each node and wrap an optimizer whose replicators span nodes.

    Args:
        model: any ``nn.Module``, sharded by :func:`deto.shard` over the ``shard`` axis only;
            one already sharded over ``topology.mesh["shard"]`` is kept as it is. A model
            still on the meta device is materialised with each module's ``reset_parameters()``.
        topology: the cluster shape; the process group is initialised if needed.
        replicator: a registry name (``"demo"``, ``"full"``, ...), a :class:`Replicator`, or a
            list of them. ``**options`` configure a replicator given by name.
        optimizer: the base optimizer class (built with ``lr`` and ``optimizer_options``) or an
            instance made from ``model.parameters()`` before this call.
        lr: learning rate of the base optimizer (DeMo also scales its momentum by it).
        sign: use the sign of the replicated gradient (sign-SGD; FlexDeMo's default).
        weight_decay: decoupled weight decay, applied by deto for every base optimizer.
        mixed_precision: ``None`` or ``"bf16"`` (bf16 compute, fp32 params and reductions).
        wrap_policy: the FSDP2 units: module classes or ``(module) -> bool`` (see
            :func:`deto.shard`); ``None`` shards the outermost repeated blocks.
        nonfinite: what to do with non-finite gradients (see :class:`DecoupledOptimizer`).
        sync_initial: broadcast node 0's parameters and buffers to every node first, so
            replicas start equal.

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
    meta = is_meta(model)
    if meta:
        require_reset_parameters(model)
    shard(model, topology, mixed_precision=mixed_precision, wrap_policy=wrap_policy)
    if meta:
        materialize(model, topology.torch_device)
    named_after = dict(model.named_parameters())
    renamed = {id(p): named_after[n] for n, p in named_before}
    names: dict[torch.Tensor, str] = {p: n for n, p in named_after.items()}

    comm = Comm(mesh["replicate"].get_group(), topology.nodes)
    if sync_initial:
        with torch.no_grad():
            tensors = [local_tensor(p) for p in named_after.values()]
            comm.broadcast(tensors + list(model.buffers()), src=0)
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
    opt.register_step_pre_hook(
        BufferSync(synced_buffers(model), comm, mesh["shard"].get_group())
    )
    _fire_step_hooks(opt)
    logger.info("deto: %s on %d node(s) x %d rank(s)", opt, topology.nodes, topology.ranks_per_node)
    return model, opt


def _fire_step_hooks(opt: DecoupledOptimizer) -> None:
    """Run the step hooks registered on ``opt`` around its ``step`` where its class does not.

    Bound as a method, so LR schedulers can wrap it as they wrap any optimizer's ``step``.
    """
    if getattr(type(opt).step, "hooked", False):
        return

    def hooked_step(self: DecoupledOptimizer, *args: Any, **kwargs: Any) -> Any:
        for pre in list(self._optimizer_step_pre_hooks.values()):
            pre(self, args, kwargs)
        out = type(self).step(self, *args, **kwargs)
        for post in list(self._optimizer_step_post_hooks.values()):
            post(self, args, kwargs)
        return out

    opt.step = types.MethodType(hooked_step, opt)  # type: ignore[method-assign]
