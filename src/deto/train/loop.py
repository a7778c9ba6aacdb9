"""One rank's run: build the task, prepare the model, train, evaluate, checkpoint, summarise.

:func:`run` is the whole story, top to bottom. The task and its evaluation
(:mod:`deto.train.tasks`), the optimizer (:mod:`deto.train.optimizer`) and the summary
(:mod:`deto.train.summary`) are details with their own modules. Every rank of the cluster calls
it (see :mod:`deto.train.launch`); rank 0 alone writes metrics, plots and the summary, every
rank writes its part of a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import deto
from deto.comm import Comm
from deto.topology import Topology
from deto.train import report
from deto.train.config import STRUCTURAL, TrainConfig
from deto.train.console import progress_bar
from deto.train.models import count_params
from deto.train.optimizer import RunOptimizer, build_training, full_sync_bytes
from deto.train.ranks import all_gather, from_rank0
from deto.train.summary import (
    History,
    build_summary,
    params_digest,
    peak_rss_mb,
    replicas_identical,
)
from deto.train.tasks import build_task, reshard

logger = logging.getLogger(__name__)

FINAL_LR_RATIO = 0.1
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"


# --------------------------------------------------------------------------------------------
# The run


def run(
    cfg: TrainConfig,
    topo: Topology,
    *,
    run_dir: str | None,
    resume: str | None = None,
) -> dict[str, Any] | None:
    """Train ``cfg`` on this rank of ``topo``; return the summary on rank 0, ``None`` elsewhere.

    ``run_dir``: where outputs go (``None``: rank 0 picks ``runs/<timestamp>-<scheme>``).
    ``resume``: a complete checkpoint directory to continue from.
    """
    topo.init()
    rank = dist.get_rank()
    out = Path(from_rank0(run_dir or default_run_dir(cfg.scheme)))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        report.write_json(out / "config.json", cfg.to_dict())

    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    task = build_task(cfg, topo)
    params = count_params(task.model)
    model, opt = build_training(cfg, topo, task.model)
    logger.info(
        "%s on %s: %s parameters, %d node(s) x %d rank(s), %d steps",
        cfg.scheme, cfg.task, f"{params:,}", topo.nodes, topo.ranks_per_node, cfg.steps,
    )

    state = History()
    if resume is not None:
        state = load_checkpoint(Path(resume), model, opt, opt.base, topo)  # type: ignore[arg-type]
        logger.info("resumed from %s at step %d", resume, state.step)
    full_sync = full_sync_bytes(params, topo.nodes)
    sinks = open_sinks(out, state.records) if rank == 0 else []
    bar = progress_bar(cfg.steps, state.step) if rank == 0 else None
    per_step_items = cfg.batch_size * topo.world_size * task.items_per_sample
    clock = time.perf_counter() - state.wall_time_s

    try:
        for step in range(state.step + 1, cfg.steps + 1):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg, step)
            start = time.perf_counter()
            x, y = task.batch(step, rank)
            loss = task.loss(model(x.to(topo.torch_device)), y.to(topo.torch_device))
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats = opt.stats()
            sent, received = stats.node_bytes_sent, stats.node_bytes_received
            elapsed = time.perf_counter() - start
            state.advance(step, elapsed, sent, received, float(loss.detach()))
            if cfg.check_replicas_every and step % cfg.check_replicas_every == 0:
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
                    record.update(task.evaluate(model, topo))
                    logger.info("step %d: val loss %.4f", step, record["val_loss"])
                state.records.append(record)
                for sink in sinks:
                    sink.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{state.last_loss:.3f}",
                    **{f"{task.unit}/s": f"{per_step_items / elapsed:,.0f}"},
                    xnode=f"{sent / 1e3:,.1f}kB",
                )
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                state.wall_time_s = time.perf_counter() - clock
                ckpt, base = out / CHECKPOINTS, opt.base
                save_checkpoint(ckpt, cfg, state, model, opt, base, topo)  # type: ignore[arg-type]
    finally:
        if bar is not None:
            bar.close()
        report.close_all(sinks)
    state.wall_time_s = time.perf_counter() - clock

    identical = replicas_identical(model, topo, opt.promises_identical_replicas, cfg.scheme)
    digest = params_digest(model)
    rss = all_gather(peak_rss_mb())
    if rank != 0:
        return None
    summary = build_summary(cfg, topo, task, params, state, full_sync, identical, digest, rss, out)
    summary["resumed_from"] = str(resume) if resume is not None else None
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


# --------------------------------------------------------------------------------------------
# Checkpoints
#
# A checkpoint is a directory <out>/checkpoints/step_<N>/ holding:
#   * a torch.distributed.checkpoint (DCP) of the model and the base optimizer, under the key
#     "node<i>" of each node, so that nodes whose replicas differ (none, DiLoCo) keep their own;
#   * rank<r>.pt per rank: the replicators' state (per node and per shard), the step, RNG state;
#   * trainer.json: the history (metrics so far, timings, traffic) and the config;
#   * COMPLETE, written last. It is written in a temporary directory and renamed into place,
#     so a crash mid-save never leaves a directory that loads as a checkpoint.


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    root: Path,
    cfg: TrainConfig,
    state: History,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    base: torch.optim.Optimizer,
    topo: Topology,
) -> Path:
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    final = root / checkpoint_name(state.step)
    tmp = root / f".{final.name}.incomplete"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, base)
    dcp.save({f"node{topo.node}": {"model": model_sd, "optim": optim_sd}}, checkpoint_id=str(tmp))
    own = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "optimizer": _without_base(opt),
        "rng": torch.get_rng_state(),
        "loss_sum": state.loss_sum,
        "loss_count": state.loss_count,
    }
    torch.save(own, tmp / f"rank{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        history = asdict(state)
        history.pop("loss_sum")
        history.pop("loss_count")
        history["last_loss"] = None if math.isnan(state.last_loss) else state.last_loss
        report.write_json(tmp / "trainer.json", {"history": history, "config": cfg.to_dict()})
        marker = {"step": state.step, "world_size": dist.get_world_size(), "config": cfg.to_dict()}
        report.write_json(tmp / COMPLETE, marker)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        logger.info("checkpoint saved: %s", final)
    dist.barrier()
    return final


def _without_base(opt: torch.optim.Optimizer) -> dict[str, Any]:
    if isinstance(opt, deto.DecoupledOptimizer):
        sd = opt.state_dict()
        sd.pop("base")
        return sd
    return {}


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    base: torch.optim.Optimizer,
    topo: Topology,
) -> History:
    """Restore model, base optimizer, replicators and RNG; return the saved history."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    rank = dist.get_rank()
    key = f"node{topo.node}"
    model_sd, optim_sd = get_state_dict(model, base)
    state: dict[str, Any] = {key: {"model": model_sd, "optim": optim_sd}}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model, base, model_state_dict=state[key]["model"], optim_state_dict=state[key]["optim"]
    )
    own = torch.load(path / f"rank{rank:05d}.pt", weights_only=True)
    if isinstance(opt, deto.DecoupledOptimizer):
        opt.load_state_dict({"base": base.state_dict(), **own["optimizer"]})
    torch.set_rng_state(own["rng"])
    saved = json.loads((path / "trainer.json").read_text())["history"]
    history = History(**{k: v for k, v in saved.items() if k != "last_loss"})
    history.last_loss = saved["last_loss"] if saved["last_loss"] is not None else math.nan
    history.loss_sum, history.loss_count = float(own["loss_sum"]), int(own["loss_count"])
    return history


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint ``path`` names: itself if complete, else the latest complete one inside
    it (or inside its ``checkpoints/``). Raises ``ValueError`` if there is none."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"Checkpoint not found: {path}")
    if (path / COMPLETE).is_file():
        return path
    for where in (path, path / CHECKPOINTS):
        if where.is_dir():
            found = sorted(
                p for p in where.iterdir()
                if p.is_dir() and p.name.startswith("step_") and (p / COMPLETE).is_file()
            )
            if found:
                return found[-1]
    if path.name.startswith("step_") or path.name.endswith(".incomplete"):
        raise ValueError(f"Not a complete checkpoint (no {COMPLETE} marker): {path}")
    raise ValueError(f"No complete checkpoint in {path}")


def check_resumable(path: Path, cfg: TrainConfig) -> int:
    """Check a checkpoint fits ``cfg``; return its step. ``ValueError`` explains a mismatch."""
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"Unreadable checkpoint marker in {path}: {exc}") from None
    saved = marker.get("config", {})
    now = cfg.to_dict()
    wrong = [f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in STRUCTURAL if saved.get(k) != now[k]]
    if wrong:
        raise ValueError(f"Checkpoint {path} does not fit this run: it has {', '.join(wrong)}")
    step = int(marker["step"])
    if step >= cfg.steps:
        raise ValueError(f"Checkpoint {path} is at step {step}: nothing to do for --steps {cfg.steps}")
    changed = sorted(
        k for k in now if k not in STRUCTURAL and k not in ("out", "resume", "steps") and saved.get(k) != now[k]
    )
    if changed:
        logger.warning("resuming with changed settings: %s", ", ".join(f"{k}={now[k]!r}" for k in changed))
    return step
