"""The embedded tasks: a model with its data, its loss and its evaluation.

A :class:`Task` hands the loop batches by ``(step, rank)`` and evaluates a model on the
validation split; the loop does not know whether it trains a language model or a classifier.
Every rank evaluates its share of the validation items; the result is the mean over all ranks,
so each node's model counts equally.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

from deto.ranklog import warn_once
from deto.run import data as datalib
from deto.run import spans
from deto.run.config import TrainConfig
from deto.run.models import ByteGPT, ResNet18, TransformerShape, ViT, hf_llama, hf_t5
from deto.run.ranks import all_gather
from deto.topology import Topology

logger = logging.getLogger(__name__)

EVAL_BATCH = 64



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
        digests = all_gather(corpus.digest)
        if len(set(digests)) > 1:  # every rank knows it: rank 0 says it
            warn_once(
                logger,
                "ranks read different standard library sources (Python versions differ?)"
            )
        starts = datalib.eval_windows(corpus.val, cfg.seq_len, cfg.eval_samples)
        model, batch, eval_batch = lm_model(cfg, shape, corpus.train, corpus.val, starts)
        return Task(
            model=model,
            batch=batch,
            evaluate=lambda model, topo: evaluate_lm(model, topo, len(starts), eval_batch),
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
        model=vision_model(cfg, shape, digits.classes),
        batch=lambda step, rank: datalib.vision_batch(
            digits, cfg.batch_size, seed=cfg.seed, step=step, rank=rank
        ),
        evaluate=lambda model, topo: evaluate_vision(model, topo, digits),
        items_per_sample=1,
        unit="images",
        info={"dataset": {"source": "scikit-learn digits (8x8)", "train": len(digits.train_y),
                          "val": len(digits.val_y)}},
    )


Batch = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
EvalBatch = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]


def lm_model(
    cfg: TrainConfig, shape: TransformerShape, train: torch.Tensor, val: torch.Tensor,
    starts: torch.Tensor,
) -> tuple[nn.Module, Batch, EvalBatch]:
    """The language model of ``cfg.model``, its training batches by ``(step, rank)`` and its
    validation batches by window index: next-byte prediction, or T5's span corruption."""

    def windows(data: torch.Tensor, at: list[int], length: int) -> torch.Tensor:
        return torch.stack([data[s : s + length] for s in at]).long()

    model = language_model(cfg, shape)
    if cfg.model == "t5":

        def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, _ = datalib.lm_batch(
                train, cfg.seq_len, cfg.batch_size, seed=cfg.seed, step=step, rank=rank
            )
            gen = datalib.batch_generator(cfg.seed + 1, step, rank)  # not the windows' stream
            return spans.seq2seq_batch(x, [gen] * len(x))

        def eval_batch(items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            gens = [torch.Generator().manual_seed(i) for i in items]  # fixed per window
            return spans.seq2seq_batch(windows(val, starts[items].tolist(), cfg.seq_len), gens)

        return model, batch, eval_batch

    def next_bytes(items: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        w = windows(val, starts[items].tolist(), cfg.seq_len + 1)
        return w[:, :-1], w[:, 1:]

    def batch_of(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return datalib.lm_batch(
            train, cfg.seq_len, cfg.batch_size, seed=cfg.seed, step=step, rank=rank
        )

    return model, batch_of, next_bytes


def language_model(cfg: TrainConfig, shape: TransformerShape) -> nn.Module:
    """The language model of ``cfg.model``: the byte GPT, Hugging Face Llama or T5."""
    if cfg.model == "t5":
        layout = spans.SpanLayout(cfg.seq_len)
        return hf_t5(layout.vocab, layout.source_len, shape, decoder_start=spans.PAD)
    if cfg.model == "llama":
        return hf_llama(ByteGPT.vocab, cfg.seq_len, shape)
    return ByteGPT(cfg.seq_len, shape)


def vision_model(cfg: TrainConfig, shape: TransformerShape, classes: int) -> nn.Module:
    """The classifier of ``cfg.model`` for 8x8 one-channel images: ResNet-18 or a ViT."""
    if cfg.model == "resnet":
        return ResNet18(1, classes, width=cfg.d_model)
    return ViT(8, 1, classes, patch=2, shape=shape)


def task_model(cfg: TrainConfig) -> nn.Module:
    """The model ``build_task`` trains, without loading its data (build it under
    ``torch.device("meta")`` to allocate nothing): the digits' 10 classes are fixed."""
    shape = TransformerShape(d_model=cfg.d_model, layers=cfg.layers, heads=cfg.heads)
    if cfg.task == "lm":
        return language_model(cfg, shape)
    return vision_model(cfg, shape, datalib.Digits.classes)


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
    model: nn.Module, topo: Topology, count: int, eval_batch: EvalBatch
) -> dict[str, float]:
    """Mean loss per target token over ``count`` fixed validation items (each node's model,
    averaged)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    for items, weights in _eval_items(count, topo):
        x, y = eval_batch(items)
        logits = model(x.to(topo.torch_device))
        losses = F.cross_entropy(
            logits.float().transpose(1, 2), y.to(topo.torch_device), reduction="none"
        ).sum(dim=1).cpu().double()
        w = torch.tensor(weights, dtype=torch.float64)
        totals += torch.stack([(losses * w).sum(), w.sum() * y.shape[1]])
    reshard(model)
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
    reshard(model)
    model.train()
    loss, accuracy = _world_mean(totals, topo.torch_device)
    return {"val_loss": loss, "val_accuracy": accuracy}


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters a no-grad forward leaves behind (FSDP2 keeps the root's
    unsharded after forward, expecting a backward), so the model holds its shards again."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
