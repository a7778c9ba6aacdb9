"""Train with PyTorch Lightning: :class:`DetoStrategy` is Lightning's ``ModelParallelStrategy``
with deto's optimizer between nodes.

    class LitModel(L.LightningModule):
        def configure_model(self):                       # FSDP2 inside each node
            deto.shard(self.net, self.trainer.strategy.topology)

        def configure_optimizers(self):                  # any torch optimizer and scheduler
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    L.Trainer(strategy=DetoStrategy(replicator=deto.DeMo()), num_nodes=2, devices=8).fit(...)

The strategy wraps every optimizer ``configure_optimizers`` returns in a
:class:`deto.DecoupledOptimizer` (LR schedulers keep driving it: they share its parameter
groups), gives every rank its own batches (FSDP2 inside a node is data parallel as well), and
checkpoints through Lightning's own distributed checkpoint, replicator state included, with
one entry per node (:mod:`deto.checkpoint`): nodes whose parameters or base optimizer state
differ (DiLoCo between syncs and its inner AdamW, Streaming DiLoCo always) each get their own
back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME, _is_sharded_checkpoint
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from deto.checkpoint import load_state, one_entry_per_node
from deto.integrations._compat import check_world, is_sharded
from deto.optim import DecoupledOptimizer
from deto.prepare import ReplicatorSpec
from deto.topology import Topology


class DetoStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with a deto replicator across nodes.

    Args:
        topology: the cluster shape; by default Lightning's ``num_nodes`` x ``devices``. Pass
            one to simulate several nodes on one machine (``devices=4`` with
            ``deto.Topology(nodes=2, ranks_per_node=2)``).
        replicator: a registry name, a replicator or a list of them (as in ``deto.prepare``);
            ``replicator_options`` configure one given by name.
        sign: use the sign of the replicated gradient (FlexDeMo's sign-SGD).
        nonfinite: what to do with non-finite gradients (see ``deto.DecoupledOptimizer``).
        **strategy_kwargs: ``ModelParallelStrategy``'s (``save_distributed_checkpoint``, ...).
    """

    def __init__(
        self,
        topology: Topology | None = None,
        *,
        replicator: ReplicatorSpec = "demo",
        replicator_options: dict[str, Any] | None = None,
        sign: bool = True,
        nonfinite: str = "raise",
        **strategy_kwargs: Any,
    ) -> None:
        super().__init__(**strategy_kwargs)
        self._topology = topology
        self._deto_options = dict(
            replicator=replicator, sign=sign, nonfinite=nonfinite, **(replicator_options or {})
        )

    @property
    def topology(self) -> Topology:
        """Nodes x ranks per node; ``configure_model`` shards over ``topology.mesh["shard"]``."""
        if self._topology is None:
            self._topology = Topology(
                nodes=self.num_nodes,
                ranks_per_node=self.num_processes,
                device=self.root_device.type,
            )
        return self._topology

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # every rank trains on its own batches: FSDP2 inside a node is data parallel too
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def setup_environment(self) -> None:
        """Lightning's process group, then the check that its world is the topology's, before
        ``configure_model`` shards anything over the topology's mesh."""
        super().setup_environment()
        check_world(
            "DetoStrategy: Lightning", self.world_size, self.global_rank, self.root_device.type,
            self.topology,
            "give DetoStrategy a Topology of num_nodes x devices, or none to take Lightning's",
        )

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        super().setup_optimizers(trainer)
        module = self.lightning_module
        assert module is not None  # Lightning sets up optimizers for a connected module
        if self.topology.ranks_per_node > 1 and not is_sharded(module):
            raise TypeError(
                "DetoStrategy needs the model sharded inside each node: call "
                "deto.shard(module, self.trainer.strategy.topology) in configure_model()"
            )
        self.optimizers = [
            DecoupledOptimizer.from_model(module, self.topology, opt, **self._deto_options)
            for opt in self.optimizers
        ]

    # -- checkpoints: one entry per node --------------------------------------------------------
    # Lightning's distributed checkpoint keeps one copy of a tensor that every node holds at the
    # same place, so each node's own parameters and base optimizer state would come back as
    # node 0's. The states it saves get a node dimension; loading reads them back per node.
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._save_distributed_checkpoint:
            return super().lightning_module_state_dict()
        assert self.model is not None
        return one_entry_per_node(get_model_state_dict(self.model), self.topology)[0]

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if not self._save_distributed_checkpoint:
            return super().optimizer_state(optimizer)
        assert self.model is not None
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        state = get_optimizer_state_dict(self.model, optimizer)
        return one_entry_per_node(state, self.topology)[0]

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> Any:
        path = Path(self.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        assert self.model is not None and self.lightning_module is not None
        optimizers = {f"optimizer_{i}": opt for i, opt in enumerate(self.optimizers)}
        template: dict[str, Any] = {"state_dict": get_model_state_dict(self.model)}
        template.update(
            {key: get_optimizer_state_dict(self.model, opt) for key, opt in optimizers.items()}
        )
        state = load_state(path, template, self.topology)
        strict = self.lightning_module.strict_loading
        set_model_state_dict(
            self.model, state["state_dict"], options=StateDictOptions(strict=strict)
        )
        for key, opt in optimizers.items():
            set_optimizer_state_dict(self.model, opt, state[key])
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
