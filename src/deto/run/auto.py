"""``--scheme auto``: measure the link and the compute at start-up, then train FlexDeMo at the
best DeMo setting whose exchange fits (:func:`deto.plan.auto.choose`).

The decision is made once, before the first step, by every rank alike (the measurements are
the slowest rank's, and rank 0's choice is broadcast), and it is part of the run's config from
then on: config.json, every checkpoint and the summary hold the chosen knobs, so a resumed or
restarted run continues with the same setting instead of measuring again. Re-planning when the
step time drifts is not done: a run keeps its setting, and the summary's ``auto`` entry says
what it was chosen on.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deto import plan
from deto.linkprobe import measure_link
from deto.plan.auto import LADDER, Decision, choose
from deto.replicators import Options
from deto.run.config import TrainConfig
from deto.run.ranks import from_rank0
from deto.run.tasks import Task
from deto.topology import Topology

logger = logging.getLogger(__name__)

CALIBRATION_STEPS = 3
"""Forward and backward passes timed for the compute time (after one untimed warm-up)."""


def measure_compute(model: nn.Module, task: Task, topo: Topology, data_rank: int) -> float:
    """Seconds of one step's forward and backward pass on the run's first batch, the slowest
    rank's median. Gradients, random state and buffers (BatchNorm's statistics) are put back,
    so the run that follows is the one it would have been without the measurement."""
    device = topo.torch_device
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    buffers = [b.detach().clone() for b in model.buffers()]
    x, y = task.batch(1, data_rank)
    x, y = x.to(device), y.to(device)
    times = []
    for _ in range(CALIBRATION_STEPS + 1):
        start = time.perf_counter()
        task.loss(model(x), y).backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers, strict=True):
            b.copy_(saved)
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    slowest = torch.tensor([statistics.median(times[1:])], dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest.item())


def decide(
    cfg: TrainConfig, topo: Topology, shapes: plan.ModelShapes, model: nn.Module, task: Task,
    data_rank: int,
) -> Decision:
    """Measure and choose (a collective: every rank calls it and gets rank 0's decision)."""
    compute_s = measure_compute(model, task, topo, data_rank)
    if topo.nodes > 1:
        measured = measure_link(topo)
        link = plan.Link(measured.bandwidth_bps, measured.latency_s)
    else:
        link = plan.Link(float("inf"))
    decision: Decision = from_rank0(
        choose(shapes, topo.nodes, topo.ranks_per_node, link, compute_s, budget=cfg.comm_budget)
    )
    logger.info("auto: %s (%s)", decision.chosen.name, decision.reason)
    for c in decision.considered:
        logger.info(
            "auto:   %-48s loss vs hsdp <= %+.1f%%, %9.0f B/step, exchange %7.1f ms, "
            "step %7.1f ms%s", c.rung, 100 * c.loss_vs_hsdp, c.node_bytes_per_step,
            1e3 * c.comm_s, 1e3 * c.step_s, "  fits" if c.fits else "",
        )  # fmt: skip
    return decision


def with_choice(cfg: TrainConfig, options: Options) -> TrainConfig:
    """``cfg`` training the chosen setting."""
    return dataclasses.replace(cfg, replicator=options)


def record(
    decision: Decision | None, saved: Options | None, deciding_s: float = 0.0
) -> dict[str, Any] | None:
    """The summary's ``auto`` entry: this run's decision and the seconds its measurements took
    (before the first step, so not in the run's wall time), or the setting it continued with."""
    if decision is not None:
        return {"source": "measured", "deciding_s": deciding_s, **decision.as_dict()}
    if saved is None:
        return None
    named = next((r.name for r in LADDER if r.options == saved), None)
    return {"source": "resumed", "chosen": named, "options": saved.changed()}
