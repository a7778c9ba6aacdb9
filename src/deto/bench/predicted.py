"""What ``deto plan`` predicts for a recorded run, from the run's own resolved configuration:
its inter-node bytes per step, so ``deto bench`` shows the prediction beside the count, and its
step time on a given link and compute time, so a recorded run's s/step can be held to the
plan's time model (``benchmarks/plan_check.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deto import plan
from deto.replicators import make_replicator
from deto.run.config import TrainConfig
from deto.run.presets import OPTIMIZERS, PRESETS
from deto.run.tasks import task_model


@dataclass(frozen=True)
class RecordedRun:
    """A recorded run as the plan sees it: its scheme, model and traffic, and its cluster."""

    scheme: plan.Scheme
    model: plan.ModelShapes
    flow: plan.Traffic
    nodes: int
    ranks_per_node: int

    @property
    def node_bytes_per_step(self) -> float:
        """The bytes a node sends per step, averaged over a sync period."""
        return sum(self.flow.node_bytes(self.nodes)) / self.flow.period

    def predict(self, link: plan.Link, compute_s: float) -> plan.Prediction:
        """The plan's prediction on ``link`` with ``compute_s`` of compute per step:
        ``step_s`` is the step time as configured (its own overlap), averaged over ``period``
        steps."""
        return plan.predict_traffic(self.scheme, self.model, self.flow, self.nodes,
                                    self.ranks_per_node, link, compute_s)  # fmt: skip


def recorded_run(config: dict[str, Any]) -> RecordedRun:
    """The plan's inputs for a run of ``config`` (a summary's ``config``); the model is built
    on the meta device."""
    cfg = TrainConfig.from_dict(config)
    preset = PRESETS[cfg.scheme]
    rep = None
    if preset.replicator is not None:
        rep = make_replicator(preset.replicator, **cfg.replicator_options())
    with torch.device("meta"):
        model = plan.from_module(task_model(cfg))
    scheme = plan.Scheme(cfg.scheme, rep, OPTIMIZERS[cfg.optimizer])
    flow = plan.traffic(model, rep, cfg.ranks_per_node)
    return RecordedRun(scheme, model, flow, cfg.nodes, cfg.ranks_per_node)


def node_bytes_per_step(config: dict[str, Any]) -> float:
    """The bytes a node sends per step, averaged over a sync period, that the plan predicts for
    a run of ``config``."""
    return recorded_run(config).node_bytes_per_step
