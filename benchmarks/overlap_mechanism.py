"""Why a one-step delay costs FlexDeMo so much loss, and what eager updates recover: the
mechanism, measured on the embedded LM task.

Two simulated nodes of one rank each (:class:`deto.FakeComm`, one process) train the byte GPT
at the ``deto train`` defaults (300 steps, warm-up 20, cosine to 10%, sign-SGD at 1.5e-3, 32
sequences of 64 bytes per node and step) with ``DeMo``'s defaults, three ways: the exchange in
the step (``sync``), applied a step late (``delayed``), and applied a step late with this
node's own selection applied at once (``eager``). Each also runs with compression off (every
coefficient, fp32 values), which leaves error feedback nothing to hold, so "delay" and
"delay x error feedback" come apart. Per step it records:

- the share of the coefficients selected at step t+1 that were also selected at step t;
- the norm of the aggregate the base optimizer steps with (before the sign);
- the share of weights whose update keeps its sign from one step to the next (a sign-SGD
  trajectory that oscillates flips often).

Usage::

    python -m benchmarks.overlap_mechanism --seeds 0,1 --out benchmarks/results/<dir>

It writes ``mechanism.json`` (per run: final validation loss of the consensus, the three
series and their means after warm-up) and ``mechanism.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import deto
from deto.run import data as datalib
from deto.run import provenance
from deto.run.models import ByteGPT, TransformerShape

logger = logging.getLogger("benchmarks.overlap_mechanism")

STEPS, WARMUP, LR, BATCH, SEQ, NODES, EVAL = 300, 20, 1.5e-3, 32, 64, 2, 256
UNCOMPRESSED = {"topk": 64, "values": "fp32", "dense_fallback": False}
SETTINGS = {"compressed": {}, "uncompressed": UNCOMPRESSED}
MODES = ("sync", "delayed", "eager")


def lr_at(step: int) -> float:
    """``deto train``'s schedule: linear warm-up, then cosine to 10% of the peak."""
    if step <= WARMUP:
        return LR * step / WARMUP
    progress = (step - WARMUP) / (STEPS - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def demo(mode: str, knobs: dict[str, Any]) -> deto.DeMo:
    if mode == "sync":
        return deto.DeMo(**knobs)
    return deto.DeMo(overlap=True, overlap_mode=mode, **knobs)


class Recorder:
    """The three per-step series of one node's run."""

    def __init__(self, rep: deto.DeMo) -> None:
        self.reselected: list[float] = []
        self.aggregate_norm: list[float] = []
        self.sign_kept: list[float] = []
        self._chosen: dict[int, torch.Tensor] = {}
        self._last_update: list[torch.Tensor] | None = None
        for g, group in enumerate(rep.groups):
            group.select = self._watch(g, group.select, group.m)  # type: ignore[method-assign]
        replicate = rep.replicate

        def replicate_and_measure(*args: Any) -> list[torch.Tensor]:
            out = replicate(*args)
            self.aggregate_norm.append(float(sum(t.double().pow(2).sum() for t in out).sqrt()))
            return out

        rep.replicate = replicate_and_measure  # type: ignore[method-assign]

    def _watch(self, g: int, select: Any, m: int) -> Any:
        def watched(members: list[int], wire: Any) -> tuple[torch.Tensor, torch.Tensor]:
            idx, vals = select(members, wire)
            chosen = torch.zeros(idx.shape[0], m, dtype=torch.bool).scatter_(1, idx.long(), True)
            before = self._chosen.get(g)
            if before is not None and before.shape == chosen.shape:
                self.reselected.append(float((chosen & before).sum() / chosen.sum()))
            self._chosen[g] = chosen
            return idx, vals

        return watched

    def updates(self, before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
        update = [(a - b).sign() for a, b in zip(after, before, strict=True)]
        if self._last_update is not None:
            same = sum(int((u == v).logical_and(u != 0).sum())
                       for u, v in zip(update, self._last_update, strict=True))
            moved = sum(int((u != 0).sum()) for u in update)
            self.sign_kept.append(same / max(moved, 1))
        self._last_update = update


def validation_loss(model: torch.nn.Module, val: torch.Tensor) -> float:
    starts = datalib.eval_windows(val, SEQ, EVAL).tolist()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(starts), 64):
            w = torch.stack([val[s : s + SEQ + 1] for s in starts[i : i + 64]]).long()
            logits = model(w[:, :-1]).flatten(0, 1)
            total += float(F.cross_entropy(logits, w[:, 1:].flatten(), reduction="sum"))
            count += w[:, 1:].numel()
    return total / count


def run(mode: str, setting: str, seed: int, corpus: datalib.TextCorpus) -> dict[str, Any]:
    torch.manual_seed(seed)
    initial = ByteGPT(SEQ, TransformerShape())  # built once: the nodes' threads share the RNG

    def node(comm: deto.Comm) -> dict[str, Any]:
        model = copy.deepcopy(initial)
        rep = demo(mode, SETTINGS[setting])
        base = torch.optim.SGD(model.parameters(), lr=LR)
        opt = deto.DecoupledOptimizer(base, [rep], comm, sign=True)
        recorder = Recorder(rep)
        for step in range(1, STEPS + 1):
            for group in base.param_groups:
                group["lr"] = lr_at(step)
            x, y = datalib.lm_batch(corpus.train, SEQ, BATCH, seed=seed, step=step, rank=comm.rank)
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.step()
            opt.zero_grad()
            recorder.updates(before, [p.detach() for p in model.parameters()])
        with opt.consensus():
            loss = validation_loss(model, corpus.val)
        return {"val_loss": loss, "reselected": recorder.reselected,
                "aggregate_norm": recorder.aggregate_norm, "sign_kept": recorder.sign_kept}

    first, *_ = deto.FakeComm(nodes=NODES, timeout_s=600).run(node)
    means = {k: sum(v[WARMUP:]) / len(v[WARMUP:]) for k, v in first.items()
             if isinstance(v, list) and v[WARMUP:]}
    return {"mode": mode, "setting": setting, "seed": seed, **first,
            "means_after_warmup": means}


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = ("reselected", "aggregate_norm", "sign_kept")
    fig, axes = plt.subplots(len(SETTINGS), len(series), figsize=(14, 7), squeeze=False)
    for row, setting in enumerate(SETTINGS):
        for col, key in enumerate(series):
            ax = axes[row][col]
            for r in runs:
                if r["setting"] == setting and r["seed"] == runs[0]["seed"] and r[key]:
                    ax.plot(r[key], label=f"{r['mode']} (val {r['val_loss']:.3f})", lw=0.8)
            ax.set_title(f"{setting}: {key.replace('_', ' ')}", fontsize=9)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    corpus = datalib.load_stdlib_corpus()
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for setting in SETTINGS:
            for mode in MODES:
                runs.append(run(mode, setting, seed, corpus))
                logger.info("%s %s seed %d: val %.4f, %s", setting, mode, seed,
                            runs[-1]["val_loss"], runs[-1]["means_after_warmup"])
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"provenance": provenance.collect(), "steps": STEPS, "nodes": NODES,
            "batch_per_node": BATCH, "seq_len": SEQ, "lr": LR}
    (args.out / "mechanism.json").write_text(json.dumps({"meta": meta, "runs": runs}))
    plot(runs, args.out / "mechanism.png")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
