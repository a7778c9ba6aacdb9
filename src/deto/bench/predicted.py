"""What ``deto plan`` predicts for a recorded run: its inter-node bytes per step, from the
run's own resolved configuration, so ``deto bench`` shows the prediction beside the count."""

from __future__ import annotations

from typing import Any

import torch

from deto import plan
from deto.replicators import make_replicator
from deto.run.config import TrainConfig
from deto.run.presets import PRESETS
from deto.run.tasks import task_model


def node_bytes_per_step(config: dict[str, Any]) -> float:
    """The bytes a node sends per step, averaged over a sync period, that the plan predicts for
    a run of ``config`` (a summary's ``config``); the model is built on the meta device."""
    cfg = TrainConfig.from_dict(config)
    preset = PRESETS[cfg.scheme]
    rep = None
    if preset.replicator is not None:
        rep = make_replicator(preset.replicator, **cfg.replicator_options())
    with torch.device("meta"):
        model = task_model(cfg)
    flow = plan.traffic(plan.from_module(model), rep, cfg.ranks_per_node)
    return sum(flow.node_bytes(cfg.nodes)) / flow.period
