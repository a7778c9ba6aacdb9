"""What a run has done, and the summary it ends with.

:class:`History` is the running record (steps, timings, traffic, logged metrics) that a
checkpoint saves and a resumed run continues. :func:`build_summary` turns it into
``summary.json``; the fields are documented in docs/cli.md. The digests and memory figures
here are collectives: every rank calls them, rank 0 writes.
"""

from __future__ import annotations

import hashlib
import logging
import math
import resource
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deto.replicators.base import local_tensor
from deto.run import provenance, report
from deto.run.config import TrainConfig
from deto.run.ranks import all_gather
from deto.run.tasks import Task, reshard
from deto.topology import Topology

logger = logging.getLogger(__name__)



@dataclass
class History:
    """What the run has done so far; saved in checkpoints so a resumed run continues it."""

    step: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    sent_total: int = 0
    received_total: int = 0
    sent_peak: int = 0  # the most this node sent in one step: what a bursty link must carry
    loss_sum: float = 0.0  # this rank's training loss since the last logged step
    loss_count: int = 0
    last_loss: float = math.nan
    replica_repairs: list[dict[str, Any]] = field(default_factory=list)  # --check-replicas-every

    def advance(self, step: int, seconds: float, sent: int, received: int, loss: float) -> None:
        self.step = step
        self.step_times.append(seconds)
        self.sent_total += sent
        self.received_total += received
        self.sent_peak = max(self.sent_peak, sent)
        self.loss_sum += loss
        self.loss_count += 1
        self.last_loss = loss

    def to_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(shared, own)``: the run's record (JSON), and this rank's part of it."""
        shared = asdict(self)
        own = {"loss_sum": shared.pop("loss_sum"), "loss_count": shared.pop("loss_count")}
        shared["last_loss"] = None if math.isnan(self.last_loss) else self.last_loss
        return shared, own

    @classmethod
    def from_checkpoint(cls, shared: dict[str, Any], own: dict[str, Any]) -> History:
        history = cls(**{k: v for k, v in shared.items() if k != "last_loss"})
        history.last_loss = shared["last_loss"] if shared["last_loss"] is not None else math.nan
        history.loss_sum, history.loss_count = float(own["loss_sum"]), int(own["loss_count"])
        return history

    def take_train_loss(self, device: torch.device) -> float:
        """Mean training loss over all ranks and the steps since the last call (a collective)."""
        totals = torch.tensor(
            [self.loss_sum, float(self.loss_count)], dtype=torch.float64, device=device
        )
        self.loss_sum, self.loss_count = 0.0, 0
        dist.all_reduce(totals)
        return float(totals[0] / totals[1])


def build_summary(
    cfg: TrainConfig,
    task: Task,
    params: int,
    state: History,
    full_sync: int,
    identical: bool | None,
    digest: str,
    rss: list[float],
    out: Path,
) -> dict[str, Any]:
    steps = max(1, len(state.step_times))
    sent = state.sent_total / steps
    received = state.received_total / steps
    val = [[r["step"], r["val_loss"]] for r in state.records if "val_loss" in r]
    summary: dict[str, Any] = {
        "scheme": cfg.scheme,
        "task": cfg.task,
        "model": cfg.model,
        "nodes": cfg.nodes,
        "ranks_per_node": cfg.ranks_per_node,
        "steps": state.step,
        "params": params,
        "final_val_loss": val[-1][1] if val else None,
        "val_loss": val,
        "train_loss": [[r["step"], r["train_loss"]] for r in state.records],
        "wall_time_s": state.wall_time_s,
        "step_time_s_median": statistics.median(state.step_times) if state.step_times else None,
        "inter_node_bytes_sent_per_step": sent,
        "inter_node_bytes_received_per_step": received,
        "inter_node_bytes_sent_peak": state.sent_peak,
        "full_sync_bytes_per_step": full_sync,
        "compression_ratio": full_sync / sent if sent > 0 and full_sync > 0 else None,
        "replicas_identical": identical,
        "replica_repairs": state.replica_repairs,
        "peak_rss_mb_per_rank": rss,
        "link": None,  # an emulated-link run's driver fills it in (deto.launch.shaped)
        "versions": report.versions(),
        "git_sha": report.git_sha(),
        "provenance": provenance.collect(),
    }
    summary.update(task.info)
    accuracy = [r["val_accuracy"] for r in state.records if "val_accuracy" in r]
    if accuracy:
        summary["final_val_accuracy"] = accuracy[-1]
    summary.update(
        {
            "params_sha256": digest,
            "lr": cfg.lr,
            "config": cfg.to_dict(),
            "out": str(out),
        }
    )
    return summary


def replicas_identical(
    model: nn.Module, topo: Topology, promised: bool, scheme: str
) -> bool | None:
    """Whether parameters and buffers are bitwise equal across the replicate axis (``None``: the
    scheme does not promise it now, e.g. ``none``, or DiLoCo between synchronisations)."""
    digests = all_gather(local_digest(model))
    if not promised:
        return None
    s = topo.ranks_per_node
    same = all(digests[i] == digests[i % s] for i in range(len(digests)))
    if not same:
        logger.error(
            "replicas differ across nodes although scheme %s promises identical ones", scheme
        )
    return same


def local_digest(model: nn.Module) -> str:
    reshard(model)  # digest the shards, whatever the last forward left registered
    h = hashlib.sha256()
    for name, p in sorted([*model.named_parameters(), *model.named_buffers()]):  # BN statistics
        t = local_tensor(p).detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def params_digest(model: nn.Module) -> str:
    """sha256 over every rank's local shards and buffers, in rank order: equal iff the runs'
    parameters and buffers are."""
    return hashlib.sha256("".join(all_gather(local_digest(model))).encode()).hexdigest()


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
