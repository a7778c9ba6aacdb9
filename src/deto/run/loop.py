"""One rank's run: build the task, prepare the model, train, evaluate, checkpoint, summarise.

:func:`run` is the whole story, top to bottom. The task and its evaluation
(:mod:`deto.run.tasks`), the optimizer (:mod:`deto.run.optimizer`) and the summary
(:mod:`deto.run.summary`) are details with their own modules. Every rank of the cluster calls
it (see :mod:`deto.launch.dispatch`); rank 0 alone writes metrics, plots and the summary, every
rank writes its part of a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import deto
from deto import plan
from deto.comm import Comm
from deto.replicators import Options
from deto.run import auto, noise, report
from deto.run.checkpoint import CHECKPOINTS, load_checkpoint, save_checkpoint, saved_config
from deto.run.config import AUTO_SCHEME, TrainConfig
from deto.run.console import progress
from deto.run.models import count_params
from deto.run.optimizer import RunOptimizer, build_training, full_sync_bytes
from deto.run.ranks import all_gather, from_rank0
from deto.run.snapshot import drop_snapshots, load_snapshot, save_snapshot
from deto.run.summary import (
    History,
    build_summary,
    local_digest,
    params_digest,
    peak_rss_mb,
    replicas_identical,
)
from deto.run.tasks import build_task, reshard
from deto.topology import Topology

logger = logging.getLogger(__name__)

FINAL_LR_RATIO = 0.1


# --------------------------------------------------------------------------------------------
# The run


def run(
    cfg: TrainConfig,
    topo: Topology,
    *,
    run_dir: str | None,
    resume: str | None = None,
    snapshot_step: int | None = None,
    join_replicas: JoinReplicas | None = None,
) -> dict[str, Any] | None:
    """Train ``cfg`` on this rank of ``topo``; return the summary on rank 0, ``None`` elsewhere.

    ``run_dir``: where outputs go (``None``: rank 0 picks ``runs/<timestamp>-<scheme>``).
    ``resume``: a complete checkpoint directory to continue from; ``snapshot_step``: continue
    from this rank's in-memory snapshot of that step instead (:mod:`deto.run.snapshot`).
    ``join_replicas``: with ``--ft``, ``topo`` is this node's own world and this callable
    seats the built model and optimizer on torchft's replicate axis
    (:class:`deto.ft.ReplicaAxis`), which then drives every step.
    """
    topo.init()
    rank = dist.get_rank()
    out = Path(from_rank0(run_dir or default_run_dir(cfg.scheme)))
    if cfg.ft:
        out = out / node_dir(cfg.node_index or 0)  # every node of a run on torchft writes its own
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    data_rank = rank + (cfg.node_index or 0) * topo.ranks_per_node  # with --ft, a node world

    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    task = build_task(cfg, topo)
    if cfg.perturb_init_ulp:
        noise.perturb_ulps(task.model, cfg.perturb_init_ulp)
    params = count_params(task.model)
    shapes = plan.from_module(task.model) if cfg.scheme == AUTO_SCHEME else None
    model, opt = build_training(cfg, topo, task.model)
    decision, saved, deciding_s = None, None, 0.0
    if shapes is not None:  # --scheme auto: the setting a resumed run had, or a measured one
        chosen = saved = earlier_choice(out, resume, snapshot_step)
        if chosen is None:
            began = time.perf_counter()
            decision = auto.decide(cfg, topo, shapes, model, task, data_rank)
            deciding_s = time.perf_counter() - began
            chosen = decision.chosen.options
        if chosen != cfg.replicator:  # the model is sharded already: only the optimizer changes
            cfg = auto.with_choice(cfg, chosen)
            model, opt = build_training(cfg, topo, model)
    if rank == 0:
        report.write_json(out / "config.json", cfg.to_dict())
    logger.info(
        "%s on %s: %s parameters, %d node(s) x %d rank(s), %d steps",
        cfg.scheme, cfg.task, f"{params:,}", cfg.nodes, cfg.ranks_per_node, cfg.steps,
    )

    state = History()
    resumed_from = resume
    if snapshot_step is not None:
        state = History.from_checkpoint(*load_snapshot(out, snapshot_step, model, opt))
        resumed_from = f"in-memory snapshot of step {state.step}"
        logger.info("resumed from the %s", resumed_from)
    elif resume is not None:
        state = History.from_checkpoint(*load_checkpoint(Path(resume), model, opt, topo))
        logger.info("resumed from %s at step %d", resume, state.step)
    axis = join_replicas(model, opt) if join_replicas is not None else None
    if axis is not None and state.step:
        axis.start_at(state.step)
    full_sync = full_sync_bytes(params, cfg.nodes)
    sinks = open_sinks(out, state.records) if rank == 0 else []
    last = cfg.stop_at or cfg.steps  # stop_at: a prefix, on the schedule of cfg.steps
    reporter = progress(last, state.step) if rank == 0 else None
    per_step_items = cfg.batch_size * cfg.world_size * task.items_per_sample
    clock = time.perf_counter() - state.wall_time_s

    def train_step(step: int) -> float:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, step)
        x, y = task.batch(step, data_rank)
        loss = task.loss(model(x.to(topo.torch_device)), y.to(topo.torch_device))
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    steps = (
        static_steps(state.step, last, train_step)
        if axis is None
        else torchft_steps(axis, last, train_step, cfg.nodes, cfg.timeout)
    )
    # This process's first step (--ft: where it joined) and when it ended. Not derived from the
    # history's step times: those a resumed run restores are not contiguous with a joined node's.
    first_step, first_unix_s = None, None
    slowest = [0, 0.0]  # this process's slowest step and its seconds
    try:
        start = time.perf_counter()
        for step, loss in steps:
            if first_step is None:
                first_step, first_unix_s = step, time.time()
            stats = opt.stats()
            sent, received = stats.node_bytes_sent, stats.node_bytes_received
            elapsed = time.perf_counter() - start
            slowest = max(slowest, [step, elapsed], key=lambda s: s[1])
            state.advance(step, elapsed, sent, received, loss)
            if cfg.check_replicas_every and step % cfg.check_replicas_every == 0:
                with opt.consensus():
                    repair = check_and_repair(model, opt, topo, step)
                if repair is not None:
                    state.replica_repairs.append(repair)
                    for sink in sinks:
                        sink.write(repair)

            evaluating = step % cfg.eval_every == 0 or step == cfg.steps
            if evaluating or step % cfg.log_every == 0:
                record = {
                    "step": step,
                    "train_loss": state.take_train_loss(topo.torch_device),
                    "lr": opt.param_groups[0]["lr"],
                    "step_time_s": elapsed,
                    f"{task.unit}_per_s": per_step_items / elapsed,
                    "inter_node_bytes_sent": sent,
                    "inter_node_bytes_received": received,
                    "inter_node_bytes_sent_total": state.sent_total,
                    "wall_time_s": time.perf_counter() - clock,
                }
                if evaluating:
                    with opt.consensus():
                        record.update(task.evaluate(model, topo))
                    logger.info("step %d: val loss %.4f", step, record["val_loss"])
                state.records.append(record)
                for sink in sinks:
                    sink.write(record)
            if reporter is not None:
                reporter.update(
                    step,
                    loss=f"{state.last_loss:.3f}",
                    **{f"{task.unit}/s": f"{per_step_items / elapsed:,.0f}"},
                    xnode=report.format_bytes(sent),
                )
            checkpointing = cfg.checkpoint_every and (
                step % cfg.checkpoint_every == 0 or step == cfg.steps
            )
            snapshotting = cfg.snapshot_every and step % cfg.snapshot_every == 0 and step < last
            if checkpointing or snapshotting:
                state.wall_time_s = time.perf_counter() - clock
                history, own = state.to_checkpoint()
                if checkpointing:
                    save_checkpoint(
                        out / CHECKPOINTS, step, model, opt, topo,
                        history=history, config=cfg.to_dict(), rank_state=own,
                    )
                else:
                    save_snapshot(out, step, model, opt, history=history, rank_state=own)
            start = time.perf_counter()
    finally:
        if reporter is not None:
            reporter.close()
        report.close_all(sinks)
    state.wall_time_s = time.perf_counter() - clock
    if cfg.snapshot_every:
        drop_snapshots(out)

    with opt.consensus():
        if axis is None:
            identical = replicas_identical(
                model, topo, opt.promises_identical_replicas, cfg.scheme
            )
        else:
            identical = nodes_identical(axis, model, opt.promises_identical_replicas)
        digest = params_digest(model)
    rss = all_gather(peak_rss_mb())
    if axis is not None:
        axis.shutdown()
    if rank != 0:
        return None
    summary = build_summary(cfg, task, params, state, full_sync, identical, digest, rss, out)
    summary["resumed_from"] = str(resumed_from) if resumed_from is not None else None
    if shapes is not None:
        summary["auto"] = auto.record(decision, saved, deciding_s)
    if axis is not None:
        summary["torchft"] = {
            "node_index": cfg.node_index,
            "recovered_from_peer": axis.healed,
            "failed_attempts": axis.failed,
            "first_step": first_step,
            "first_step_unix_s": first_unix_s,
            "slowest_step": slowest,
        }
    report.write_json(out / "summary.json", summary)
    try:
        entropy = task.info.get("unigram_entropy")
        title = f"{cfg.scheme} ({cfg.task}), {topo.nodes}x{topo.ranks_per_node}"
        report.plot_losses(
            out / "loss.png", state.records, title,
            ("unigram entropy", entropy) if entropy is not None else None,
        )
    except Exception as exc:  # a plotting problem must not lose the run's results
        logger.warning("could not write loss.png: %s", exc)
    return summary


# --------------------------------------------------------------------------------------------
# Details


JoinReplicas = Callable[[nn.Module, RunOptimizer], Any]
"""Seats a rank's model and optimizer on torchft's replicate axis; returns the
:class:`deto.ft.ReplicaAxis` (``deto.ft`` is imported only by runs that use it)."""


def static_steps(
    done: int, last: int, train_step: Callable[[int], float]
) -> Iterator[tuple[int, float]]:
    """Steps ``done + 1`` to ``last`` of a run whose nodes are fixed: ``(step, loss)``."""
    for step in range(done + 1, last + 1):
        yield step, train_step(step)


def torchft_steps(
    axis: Any, last: int, train_step: Callable[[int], float], nodes: int, wait_s: float
) -> Iterator[tuple[int, float]]:
    """The committed steps of a node on torchft's replicate axis, up to ``last``: ``(step,
    loss)``.

    Each step is attempted until it commits (a failed attempt leaves no trace, see
    :meth:`deto.ft.ReplicaAxis.step`). A node that joins late starts after its recovery, at
    the step its peers are at. The first step (of a run, or of a resumed run) waits up to
    ``wait_s`` seconds for all ``nodes`` to be in the quorum, then starts with those present.
    """
    deadline = time.monotonic() + wait_s
    losses: dict[int, float] = {}

    def attempt(done: int) -> None:
        losses[done + 1] = train_step(done + 1)

    while axis.step_number < last:
        waiting = time.monotonic() < deadline
        healed = axis.healed
        if axis.step(attempt, min_nodes=nodes if waiting else 1):
            step = axis.step_number
            if axis.healed > healed:
                logger.info("joined at step %d with a live peer's state", step - 1)
            yield step, losses.pop(step)
            losses.clear()
        elif waiting:  # for the other nodes (or for another attempt)
            time.sleep(0.1)


def nodes_identical(axis: Any, model: nn.Module, promised: bool) -> bool | None:
    """:func:`deto.run.summary.replicas_identical` over torchft's replicate axis: every rank
    compares its shards' digest with the other nodes', and the node agrees on the answer."""
    mine = axis.identical(local_digest(model).encode())
    same = all(all_gather(mine))
    if not promised:
        return None
    if not same:
        logger.error("replicas differ across the nodes on torchft")
    return same


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to 1, then constant or cosine decay to ``FINAL_LR_RATIO`` at ``cfg.steps``."""
    if cfg.warmup and step <= cfg.warmup:
        return step / cfg.warmup
    if cfg.lr_schedule == "constant" or cfg.steps <= cfg.warmup:
        return 1.0
    progress = min(1.0, (step - cfg.warmup) / (cfg.steps - cfg.warmup))
    return FINAL_LR_RATIO + (1 - FINAL_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def check_and_repair(
    model: nn.Module, opt: RunOptimizer, topo: Topology, step: int
) -> dict[str, Any] | None:
    """``--check-replicas-every``: compare the nodes' replicas, repair a divergence from the
    majority's node, and return the event for the metrics (``None``: identical, or the scheme
    does not promise identical replicas at this step)."""
    if not opt.promises_identical_replicas:
        return None
    reshard(model)
    comm = Comm(topo.mesh["replicate"].get_group(), topo.nodes)
    check = deto.check_replicas(
        model, opt.base, comm=comm, node_group=topo.mesh["shard"].get_group()
    )
    if check.identical:
        return None
    return {
        "step": step,
        "replicas_diverged": check.diverged,
        "repaired_from": check.source,
        "tensors": check.tensors[:10],
    }


def earlier_choice(out: Path, resume: str | None, snapshot_step: int | None) -> Options | None:
    """The DeMo setting ``--scheme auto`` chose before, for a run that continues: from the
    checkpoint it resumes, or, for a snapshot, from the run's config.json (written after the
    choice); ``None`` for a run that starts afresh."""
    if resume is not None:
        saved = saved_config(Path(resume))
    elif snapshot_step is not None:
        saved = json.loads((out / "config.json").read_text())
    else:
        return None
    return TrainConfig.from_dict(saved).replicator


def node_dir(node: int) -> str:
    """The folder of ``--out`` where a node of a run on torchft writes its outputs."""
    return f"node{node}"


def default_run_dir(scheme: str) -> str:
    return os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{scheme}")


def open_sinks(out: Path, earlier: list[dict[str, Any]]) -> list[report.MetricsSink]:
    """Sinks of rank 0; a resumed run's ``metrics.jsonl`` starts with the earlier records."""
    path = out / "metrics.jsonl"
    path.unlink(missing_ok=True)
    sinks: list[report.MetricsSink] = [report.JsonlSink(path)]
    for record in earlier:
        sinks[0].write(record)
    tb = report.tensorboard_sink(out / "tensorboard")
    if tb is not None:
        sinks.append(tb)
    return sinks
