"""The run's optimizer: deto's decoupled optimizer, or the HSDP baseline, behind one interface.

The loop asks an optimizer for three things besides stepping: the inter-node traffic of the last
step (:meth:`stats`), whether the replicas are bitwise identical now
(``promises_identical_replicas``) and its state dict in torch's format (what a
``torch.distributed.checkpoint`` saves next to the model). :class:`deto.DecoupledOptimizer`
has all of them; :class:`HSDPBaseline` gives torch's own HSDP the same shape, so the loop never
asks which one it holds.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import nn

import deto
from deto.buffers import BufferSync, synced_buffers
from deto.comm import Comm, CommStats, all_reduce_bytes
from deto.run.config import TrainConfig
from deto.run.models import count_params
from deto.run.presets import OPTIMIZERS, PRESETS
from deto.sharding import shard_model
from deto.topology import Topology


class RunOptimizer(Protocol):
    """What the loop and the checkpoints need of an optimizer."""

    base: torch.optim.Optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]: ...

    @property
    def promises_identical_replicas(self) -> bool: ...

    def step(self) -> Any: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def stats(self) -> CommStats: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...

    def consensus(self) -> AbstractContextManager[None]:
        """The parameters every node agrees on, for checks and evaluations (see
        :meth:`deto.DecoupledOptimizer.consensus`)."""
        ...


def full_sync_bytes(params: int, nodes: int) -> int:
    """What HSDP sends per node per step: a ring all-reduce of every fp32 gradient."""
    return all_reduce_bytes(4 * params, nodes)


class HSDPBaseline:
    """torch-native HSDP (FSDP2 over the 2-D mesh) with a plain torch optimizer.

    FSDP2 all-reduces the full gradient across nodes inside ``backward``; the step is the base
    optimizer's own. torch does not count that traffic, so :meth:`stats` reports it computed.
    Every node steps on the same gradient, so the replicas are always identical.
    """

    promises_identical_replicas = True

    def __init__(self, base: torch.optim.Optimizer, node_bytes_per_step: int) -> None:
        self.base = base
        self._stats = CommStats(
            node_bytes_sent=node_bytes_per_step, node_bytes_received=node_bytes_per_step
        )

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    def step(self) -> Any:
        return self.base.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def stats(self) -> CommStats:
        """Inter-node traffic of the last step: the node's full sync (per rank: not counted)."""
        return replace(self._stats)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state, in torch's format (as deto's optimizer's is)."""
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)

    def consensus(self) -> AbstractContextManager[None]:
        """HSDP's parameters are always the agreed ones."""
        return nullcontext()


def build_training(
    cfg: TrainConfig, topo: Topology, model: nn.Module
) -> tuple[nn.Module, RunOptimizer]:
    """The sharded model and its optimizer: deto's decoupled one, or torch's HSDP."""
    preset = PRESETS[cfg.scheme]
    mixed = None if cfg.precision == "fp32" else cfg.precision
    cls: Any = OPTIMIZERS[cfg.optimizer]
    if preset.replicator is None:  # the baseline: torch's own HSDP over the 2-D mesh
        full_sync = full_sync_bytes(count_params(model), topo.nodes)
        model.to(topo.torch_device)
        shard_model(model, topo.mesh, mixed_precision=mixed)
        base = cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # torch's HSDP syncs no buffers: average the BatchNorm statistics as deto.prepare does
        comm = Comm(topo.mesh["replicate"].get_group(), topo.nodes)
        sync = BufferSync(synced_buffers(model), comm, topo.mesh["shard"].get_group())
        base.register_step_pre_hook(sync)
        return model, HSDPBaseline(base, full_sync)
    return deto.prepare(
        model,
        topo,
        replicator=preset.replicator,
        optimizer=cls,
        lr=cfg.lr,
        sign=cfg.sign,
        weight_decay=cfg.weight_decay,
        mixed_precision=mixed,
        **cfg.replicator_options(),
    )
