"""One rank's run: build the task, prepare the model, train, evaluate, checkpoint, summarise.

:func:`run` is the whole story, top to bottom; the helpers below it are the details. Every rank
of the cluster calls it (spawned by :mod:`deto.train.launch` or started by torchrun); rank 0
alone writes metrics, plots and the summary, every rank writes its part of a checkpoint.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

import deto
from deto.comm import all_reduce_bytes
from deto.replicators.base import local_tensor
from deto.sharding import shard_model
from deto.topology import Topology
from deto.train import data as datalib
from deto.train import report
from deto.train.checkpoint import CHECKPOINTS, load_checkpoint, save_checkpoint
from deto.train.config import TrainConfig
from deto.train.models import ByteGPT, TransformerShape, ViT, count_params
from deto.train.presets import PRESETS

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
FINAL_LR_RATIO = 0.1
EVAL_BATCH = 64
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
}


# --------------------------------------------------------------------------------------------
# The run


def run(
    cfg: TrainConfig,
    topo: Topology,
    *,
    run_dir: str | None,
    resume: str | None = None,
    link: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Train ``cfg`` on this rank of ``topo``; return the summary on rank 0, ``None`` elsewhere.

    ``run_dir``: where outputs go (``None``: rank 0 picks ``runs/<timestamp>-<scheme>``).
    ``resume``: a complete checkpoint directory to continue from. ``link``: how the network
    between nodes was emulated (recorded in the summary), or ``None``.
    """
    topo.init(timeout=COLLECTIVE_TIMEOUT)
    rank = dist.get_rank()
    out = Path(_from_rank0(run_dir or default_run_dir(cfg.scheme)))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        report.write_json(out / "config.json", cfg.to_dict())

    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    task = build_task(cfg, topo)
    params = count_params(task.model)
    model, opt, _ = build_training(cfg, topo, task.model)
    logger.info(
        "%s on %s: %s parameters, %d node(s) x %d rank(s), %d steps",
        cfg.scheme, cfg.task, f"{params:,}", topo.nodes, topo.ranks_per_node, cfg.steps,
    )

    state = History()
    if resume is not None:
        state = History.from_checkpoint(*load_checkpoint(Path(resume), model, opt, topo))
        logger.info("resumed from %s at step %d", resume, state.step)
    full_sync = all_reduce_bytes(4 * params, topo.nodes)
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
            sent, received = step_bytes(opt, full_sync)
            elapsed = time.perf_counter() - start
            state.advance(step, elapsed, sent, received, float(loss.detach()))

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
                    loss=f"{state.last_loss:.3f}", **{f"{task.unit}/s": f"{per_step_items / elapsed:,.0f}"},
                    xnode=f"{sent / 1e3:,.1f}kB",
                )
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
                state.wall_time_s = time.perf_counter() - clock
                history, own = state.to_checkpoint()
                save_checkpoint(
                    out / CHECKPOINTS, step, model, opt, topo,
                    history=history, config=cfg.to_dict(), rank_state=own,
                )
    finally:
        if bar is not None:
            bar.close()
        report.close_all(sinks)
    state.wall_time_s = time.perf_counter() - clock

    identical = replicas_identical(model, opt, topo)
    digest = params_digest(model)
    rss = _all_gather(peak_rss_mb())
    if rank != 0:
        return None
    summary = build_summary(cfg, topo, task, params, state, full_sync, identical, digest, rss, link, out)
    summary["resumed_from"] = str(resume) if resume is not None else None
    report.write_json(out / "summary.json", summary)
    try:
        entropy = task.info.get("unigram_entropy")
        report.plot_losses(
            out / "loss.png", state.records, f"{cfg.scheme} ({cfg.task}), {topo.nodes}x{topo.ranks_per_node}",
            ("unigram entropy", entropy) if entropy is not None else None,
        )
    except Exception as exc:  # a plotting problem must not lose the run's results
        logger.warning("could not write loss.png: %s", exc)
    return summary


# --------------------------------------------------------------------------------------------
# Tasks


@dataclass
class Task:
    """A model with its data: batches by ``(step, rank)``, a loss, and an evaluation."""

    model: nn.Module
    batch: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
    evaluate: Callable[[nn.Module, Topology], dict[str, float]]
    items_per_sample: int
    unit: str  # what throughput counts: "tokens" or "images"
    info: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def build_task(cfg: TrainConfig, topo: Topology) -> Task:
    shape = TransformerShape(d_model=cfg.d_model, layers=cfg.layers, heads=cfg.heads)
    if cfg.task == "lm":
        corpus = datalib.load_stdlib_corpus()
        digests = _all_gather(corpus.digest)
        if len(set(digests)) > 1:
            logger.warning("ranks read different standard library sources (Python versions differ?)")
        starts = datalib.eval_windows(corpus.val, cfg.seq_len, cfg.eval_samples)
        return Task(
            model=ByteGPT(cfg.seq_len, shape),
            batch=lambda step, rank: datalib.lm_batch(
                corpus.train, cfg.seq_len, cfg.batch_size, seed=cfg.seed, step=step, rank=rank
            ),
            evaluate=lambda model, topo: evaluate_lm(model, topo, corpus.val, starts, cfg.seq_len),
            items_per_sample=cfg.seq_len,
            unit="tokens",
            info={
                "unigram_entropy": datalib.unigram_entropy(corpus.train),
                "corpus": {
                    "source": "Python standard library sources",
                    "train_bytes": corpus.train.numel(),
                    "val_bytes": corpus.val.numel(),
                    "train_files": corpus.train_files,
                    "val_files": corpus.val_files,
                    "sha256": corpus.digest,
                },
            },
        )
    digits = datalib.load_digits_split()
    return Task(
        model=ViT(8, 1, digits.classes, patch=2, shape=shape),
        batch=lambda step, rank: datalib.vision_batch(
            digits, cfg.batch_size, seed=cfg.seed, step=step, rank=rank
        ),
        evaluate=lambda model, topo: evaluate_vision(model, topo, digits),
        items_per_sample=1,
        unit="images",
        info={"dataset": {"source": "scikit-learn digits (8x8)", "train": len(digits.train_y),
                          "val": len(digits.val_y)}},
    )


def _eval_items(count: int, topo: Topology) -> Iterator[tuple[list[int], list[float]]]:
    """This rank's share of ``count`` validation items, in batches, padded with weight-0 items."""
    mine, length = datalib.shard_evenly(count, topo.ranks_per_node, topo.local_rank)
    items = mine + [0] * (length - len(mine))
    weights = [1.0] * len(mine) + [0.0] * (length - len(mine))
    for i in range(0, length, EVAL_BATCH):
        yield items[i : i + EVAL_BATCH], weights[i : i + EVAL_BATCH]


def _world_mean(totals: torch.Tensor, device: torch.device) -> list[float]:
    """Sum ``totals`` (last entry: the count) over all ranks; return the ratios."""
    totals = totals.to(device)
    dist.all_reduce(totals)
    return (totals[:-1] / totals[-1]).tolist()


@torch.no_grad()
def evaluate_lm(
    model: nn.Module, topo: Topology, val: torch.Tensor, starts: torch.Tensor, seq_len: int
) -> dict[str, float]:
    """Mean next-byte loss over the fixed validation windows (each node's model, averaged)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for items, weights in _eval_items(len(starts), topo):
        windows = torch.stack([val[s : s + seq_len + 1] for s in starts[items].tolist()]).long()
        logits = model(windows[:, :-1].to(topo.torch_device))
        losses = F.cross_entropy(
            logits.float().transpose(1, 2), windows[:, 1:].to(topo.torch_device), reduction="none"
        ).sum(dim=1).cpu().double()
        w = torch.tensor(weights, dtype=torch.float64)
        totals += torch.stack([(losses * w).sum(), w.sum() * seq_len])
    _reshard(model)
    model.train()
    (loss,) = _world_mean(totals, topo.torch_device)
    return {"val_loss": loss}


@torch.no_grad()
def evaluate_vision(model: nn.Module, topo: Topology, digits: datalib.Digits) -> dict[str, float]:
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)
    for items, weights in _eval_items(len(digits.val_y), topo):
        x, y = digits.val_x[items].to(topo.torch_device), digits.val_y[items].to(topo.torch_device)
        logits = model(x).float()
        losses = F.cross_entropy(logits, y, reduction="none").cpu().double()
        correct = (logits.argmax(-1) == y).cpu().double()
        w = torch.tensor(weights, dtype=torch.float64)
        totals += torch.stack([(losses * w).sum(), (correct * w).sum(), w.sum()])
    _reshard(model)
    model.train()
    loss, accuracy = _world_mean(totals, topo.torch_device)
    return {"val_loss": loss, "val_accuracy": accuracy}


def _reshard(model: nn.Module) -> None:
    """Free the gathered parameters a no-grad forward leaves behind (FSDP2 keeps the root's
    unsharded after forward, expecting a backward), so the model holds its shards again."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# --------------------------------------------------------------------------------------------
# Model and optimizer


def build_training(
    cfg: TrainConfig, topo: Topology, model: nn.Module
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    """``(model, optimizer, base optimizer)``: deto's decoupled optimizer, or torch's HSDP."""
    preset = PRESETS[cfg.scheme]
    mixed = None if cfg.precision == "fp32" else cfg.precision
    cls: Any = OPTIMIZERS[cfg.optimizer]
    if preset.replicator is None:  # the baseline: torch's own HSDP over the 2-D mesh
        model.to(topo.torch_device)
        shard_model(model, topo.mesh, mixed_precision=mixed)
        opt = cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        return model, opt, opt
    model, dopt = deto.prepare(
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
    return model, dopt, dopt.base


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to 1, then constant or cosine decay to ``FINAL_LR_RATIO`` at ``cfg.steps``."""
    if cfg.warmup and step <= cfg.warmup:
        return step / cfg.warmup
    if cfg.lr_schedule == "constant" or cfg.steps <= cfg.warmup:
        return 1.0
    progress = min(1.0, (step - cfg.warmup) / (cfg.steps - cfg.warmup))
    return FINAL_LR_RATIO + (1 - FINAL_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def step_bytes(opt: torch.optim.Optimizer, full_sync: int) -> tuple[int, int]:
    """Inter-node bytes this node sent and received in the last step."""
    if isinstance(opt, deto.DecoupledOptimizer):
        stats = opt.stats()
        return stats.node_bytes_sent, stats.node_bytes_received
    return full_sync, full_sync  # torch HSDP all-reduces the full fp32 gradient every step


# --------------------------------------------------------------------------------------------
# Bookkeeping


@dataclass
class History:
    """What the run has done so far; saved in checkpoints so a resumed run continues it."""

    step: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    sent_total: int = 0
    received_total: int = 0
    loss_sum: float = 0.0  # this rank's training loss since the last logged step
    loss_count: int = 0
    last_loss: float = math.nan

    def advance(self, step: int, seconds: float, sent: int, received: int, loss: float) -> None:
        self.step = step
        self.step_times.append(seconds)
        self.sent_total += sent
        self.received_total += received
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
        totals = torch.tensor([self.loss_sum, float(self.loss_count)], dtype=torch.float64, device=device)
        self.loss_sum, self.loss_count = 0.0, 0
        dist.all_reduce(totals)
        return float(totals[0] / totals[1])


def build_summary(
    cfg: TrainConfig,
    topo: Topology,
    task: Task,
    params: int,
    state: History,
    full_sync: int,
    identical: bool | None,
    digest: str,
    rss: list[float],
    link: dict[str, Any] | None,
    out: Path,
) -> dict[str, Any]:
    steps = max(1, len(state.step_times))
    sent = state.sent_total / steps
    received = state.received_total / steps
    val = [[r["step"], r["val_loss"]] for r in state.records if "val_loss" in r]
    summary: dict[str, Any] = {
        "scheme": cfg.scheme,
        "task": cfg.task,
        "nodes": topo.nodes,
        "ranks_per_node": topo.ranks_per_node,
        "steps": state.step,
        "params": params,
        "final_val_loss": val[-1][1] if val else None,
        "val_loss": val,
        "train_loss": [[r["step"], r["train_loss"]] for r in state.records],
        "wall_time_s": state.wall_time_s,
        "step_time_s_median": statistics.median(state.step_times) if state.step_times else None,
        "inter_node_bytes_sent_per_step": sent,
        "inter_node_bytes_received_per_step": received,
        "full_sync_bytes_per_step": full_sync,
        "compression_ratio": full_sync / sent if sent > 0 and full_sync > 0 else None,
        "replicas_identical": identical,
        "peak_rss_mb_per_rank": rss,
        "link": link,
        "versions": report.versions(),
        "git_sha": report.git_sha(),
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


def replicas_identical(model: nn.Module, opt: torch.optim.Optimizer, topo: Topology) -> bool | None:
    """Whether the parameters are bitwise equal across the replicate axis (``None``: the
    scheme does not promise it now, e.g. ``none``, or DiLoCo between synchronisations)."""
    # torch HSDP all-reduces gradients: its replicas take identical steps
    promised = opt.promises_identical_replicas if isinstance(opt, deto.DecoupledOptimizer) else True
    digests = _all_gather(_local_digest(model))
    if not promised:
        return None
    s = topo.ranks_per_node
    same = all(digests[i] == digests[i % s] for i in range(len(digests)))
    if not same:
        logger.error("replicas differ across nodes although scheme %s promises identical ones", type(opt).__name__)
    return same


def _local_digest(model: nn.Module) -> str:
    _reshard(model)  # digest the shards, whatever the last forward left registered
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        t = local_tensor(p).detach().cpu().contiguous().reshape(-1)
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def params_digest(model: nn.Module) -> str:
    """sha256 over every rank's local shards, in rank order: equal iff the runs' parameters are."""
    return hashlib.sha256("".join(_all_gather(_local_digest(model))).encode()).hexdigest()


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _all_gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj: Any) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


def progress_bar(total: int, initial: int) -> Any:
    """A tqdm bar on a terminal; ``None`` when not interactive (logs carry the progress)."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, leave=True)
