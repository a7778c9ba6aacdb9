"""A node killed mid-run on torchft: does the run still reach the unfaulted loss, and at what cost?

Two nodes of one rank each train the embedded LM task (FSDP2 inside a node, DeMo over torchft's
managed gloo group, :mod:`deto.ft`) against an in-process Lighthouse, twice, one seed at a time:

* **unfaulted**: both nodes train ``--steps`` steps together;
* **faulted**: node 1 kills itself with SIGKILL in the middle of step ``--kill-at``; node 0
  retries that step alone and goes on; a spare, started beforehand and waiting, joins as node 1
  once node 0 has committed ``--alone`` steps alone, fetches node 0's state from it (live
  recovery) and both finish together.

It reports the final validation loss of both runs (evaluated by node 0, on the whole
validation split), the survivor's stall (from its last step committed with the dead node to
its first committed alone) and the spare's rejoin time (from asking to join to its first
committed step, recovery included), and writes ``recovery.json``, ``report.md`` and
``recovery.png`` (training loss per committed step, participants shaded); not
``results.json``, which names ``deto bench``'s results, whose runs the CI guard re-runs.

Run from the repository root, for example::

    python -m benchmarks.ft_recovery --out benchmarks/results/ft-recovery-cpu-2x1 --seeds 0,1
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

logger = logging.getLogger("ft_recovery")

WAIT_S = 1800.0


def _node(
    name: str, index: int, overrides: dict[str, Any], lighthouse: str, kill_at: int,
    alone_steps: int, events: dict[str, Any], out: Any,
) -> None:
    """One node of one rank: train until ``overrides['steps']`` steps are committed."""
    os.environ.update(OMP_NUM_THREADS="1", RUST_LOG="error")
    import torch
    import torch.distributed as dist

    from deto.ft import ReplicaAxis
    from deto.topology import Topology
    from deto.train.config import resolve
    from deto.train.loop import lr_factor
    from deto.train.optimizer import build_training
    from deto.train.summary import params_digest
    from deto.train.tasks import build_task

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = resolve(overrides)
    topo = Topology(1, 1, device="cpu")  # the node's own world: FSDP2 over its one rank
    topo.init()
    torch.manual_seed(cfg.seed)  # the same initial model on every node
    task = build_task(cfg, topo)
    model, opt = build_training(cfg, topo, task.model)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    events["ready"].set()
    events["start"].wait()
    asked = time.monotonic()
    axis = ReplicaAxis(
        model, opt, lighthouse=lighthouse, replica_id=name, store_addr="127.0.0.1",
        store_port=store.port, timeout=datetime.timedelta(seconds=30),
    )

    def run(step: int) -> None:
        if 0 <= kill_at <= step and axis.participants == 2:  # die in a step shared with node 0
            os.kill(os.getpid(), signal.SIGKILL)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, step + 1)
        opt.zero_grad(set_to_none=True)
        x, y = task.batch(step + 1, index)
        loss = task.loss(model(x), y)
        loss.backward()
        opt.step()
        losses[step + 1] = float(loss.detach())

    losses: dict[int, float] = {}
    log: list[dict[str, Any]] = []  # one entry per attempt
    while axis.step_number < cfg.steps:
        start = time.monotonic()
        committed = axis.step(run)
        log.append({"step": axis.step_number, "participants": axis.participants,
                    "committed": committed, "end_s": time.monotonic() - asked,
                    "took_s": time.monotonic() - start})
        alone = [e for e in log if e["committed"] and e["participants"] == 1]
        if len(alone) >= alone_steps and log[0]["participants"] == 2:
            events["alone"].set()
    result = {"name": name, "log": log, "healed": axis.healed, "digest": params_digest(model),
              "train_loss": {s: losses[s] for s in sorted(losses)}}
    if index == 0:
        result.update(task.evaluate(model, topo))
    out.put(result)
    axis.shutdown()
    dist.destroy_process_group()


def one_run(overrides: dict[str, Any], kill_at: int, alone_steps: int) -> dict[str, Any]:
    """Node 0, node 1 (killed at ``kill_at`` if >= 0) and, in a faulted run, the spare."""
    from deto.ft import start_lighthouse

    lighthouse = start_lighthouse(join_timeout_ms=500, heartbeat_timeout_ms=2000)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start, join, alone = ctx.Event(), ctx.Event(), ctx.Event()
    specs = [("node0", 0, -1, start), ("node1", 1, kill_at, start)]
    if kill_at >= 0:
        specs.append(("node1", 1, -1, join))  # the spare
    procs, readies = [], []
    for name, index, kill, go in specs:
        ready = ctx.Event()
        events = {"ready": ready, "start": go, "alone": alone}
        procs.append(ctx.Process(
            target=_node,
            args=(name, index, overrides, lighthouse.address(), kill, alone_steps, events, out),
            daemon=True,
        ))
        readies.append(ready)
    try:
        for p in procs:
            p.start()
        for r in readies:
            if not r.wait(WAIT_S):
                raise RuntimeError("a node did not start")
        start.set()
        if kill_at >= 0:
            if not alone.wait(WAIT_S):
                raise RuntimeError("the survivor did not go on alone")
            join.set()
        results = [out.get(timeout=WAIT_S) for _ in range(2)]
        by_name = {r["name"]: r for r in results}
        return {"node0": by_name["node0"], "node1": by_name["node1"],
                "killed_exitcode": procs[1].exitcode if kill_at >= 0 else None}
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        lighthouse.shutdown()


def stall_and_rejoin(run: dict[str, Any]) -> dict[str, float]:
    """The survivor's stall and the spare's rejoin time, in seconds, from the attempt logs."""
    log = run["node0"]["log"]
    first_failed = next(i for i, e in enumerate(log) if not e["committed"])
    before = log[first_failed - 1]["end_s"] if first_failed else 0.0
    after = next(e for e in log[first_failed:] if e["committed"])["end_s"]
    spare = next(e for e in run["node1"]["log"] if e["committed"])
    return {"survivor_stall_s": after - before, "rejoin_s": spare["end_s"],
            "failed_attempts": sum(1 for e in log if not e["committed"]),
            "steps_alone": sum(1 for e in log if e["committed"] and e["participants"] == 1)}


def report(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# A node killed mid-run on torchft", "",
             f"- git sha: {meta['git_sha']}; scheme: {meta['scheme']}; steps: {meta['steps']}; "
             f"node 1 killed in step {meta['kill_at']}; the spare joins after "
             f"{meta['alone']} steps alone; 2 nodes x 1 rank, unshaped loopback", "",
             "| seed | val loss unfaulted | val loss faulted | faulted vs unfaulted | survivor "
             "stall | spare rejoin | steps alone | replicas identical |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['unfaulted_val_loss']:.4f} | {r['faulted_val_loss']:.4f} | "
            f"{100 * r['faulted_vs_unfaulted']:+.2f}% | {r['survivor_stall_s']:.1f} s | "
            f"{r['rejoin_s']:.1f} s | {r['steps_alone']} | {r['identical']} |")
    rel = [r["faulted_vs_unfaulted"] for r in rows]
    lines += ["", f"Mean faulted vs unfaulted: {100 * statistics.fmean(rel):+.2f}% "
              f"(range {100 * min(rel):+.2f}% to {100 * max(rel):+.2f}%)."]
    return "\n".join(lines) + "\n"


def plot(runs: dict[int, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for seed, pair in sorted(runs.items()):
        for label, run, style in (("unfaulted", pair["unfaulted"], "-"),
                                  ("faulted", pair["faulted"], "--")):
            curve = run["node0"]["train_loss"]
            steps = sorted(int(s) for s in curve)
            ax.plot(steps, [curve[s] for s in steps], style, lw=0.8,
                    label=f"seed {seed}, {label}")
        alone = [e["step"] for e in pair["faulted"]["node0"]["log"]
                 if e["committed"] and e["participants"] == 1]
        if alone:
            ax.axvspan(min(alone), max(alone), alpha=0.15, color="tab:red")
    ax.set_xlabel("step (shaded: node 0 alone)")
    ax.set_ylabel("training loss of node 0")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "recovery.png", dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results directory")
    parser.add_argument("--scheme", default="flexdemo", help="a deto train preset with DeMo")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--kill-at", type=int, default=100, help="the step node 1 dies in")
    parser.add_argument("--alone", type=int, default=10,
                        help="steps node 0 commits alone before the spare may join")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    ns = parser.parse_args(argv)
    if not 0 < ns.kill_at < ns.steps - ns.alone:
        parser.error(f"--kill-at must leave room for --alone steps before --steps ({ns.steps})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.setdefault("RUST_LOG", "error")  # the in-process Lighthouse logs every quorum
    from deto.train.provenance import collect

    ns.out.mkdir(parents=True, exist_ok=True)
    runs: dict[int, dict[str, Any]] = {}
    rows = []
    for seed in (int(s) for s in ns.seeds.split(",")):
        overrides = {"scheme": ns.scheme, "steps": ns.steps, "seed": seed,
                     "nodes": 1, "ranks_per_node": 1}
        logger.info("seed %d: unfaulted", seed)
        unfaulted = one_run(overrides, -1, ns.alone)
        logger.info("seed %d: node 1 killed in step %d", seed, ns.kill_at)
        faulted = one_run(overrides, ns.kill_at, ns.alone)
        runs[seed] = {"unfaulted": unfaulted, "faulted": faulted}
        u, f = unfaulted["node0"]["val_loss"], faulted["node0"]["val_loss"]
        rows.append({"seed": seed, "unfaulted_val_loss": u, "faulted_val_loss": f,
                     "faulted_vs_unfaulted": f / u - 1.0,
                     "identical": faulted["node0"]["digest"] == faulted["node1"]["digest"],
                     "killed_by_sigkill": faulted["killed_exitcode"] == -signal.SIGKILL,
                     **stall_and_rejoin(faulted)})
        logger.info("seed %d: %s", seed, rows[-1])
    provenance = collect()
    meta = {"git_sha": (provenance["git"] or {}).get("sha", "unknown"), "scheme": ns.scheme,
            "steps": ns.steps, "kill_at": ns.kill_at, "alone": ns.alone, "provenance": provenance}
    (ns.out / "recovery.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1))
    (ns.out / "report.md").write_text(report(rows, meta))
    plot(runs, ns.out)
    logger.info("wrote %s", ns.out / "report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
