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
checkpoints through Lightning's own distributed checkpoint, replicator state included.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy

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
