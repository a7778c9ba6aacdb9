"""A node killed mid-run on ``deto train --ft``: does the run still reach the unfaulted loss,
and at what cost?

For each seed, two runs of ``deto train --ft`` (2 nodes x 1 rank, the embedded LM task,
``--scheme``), over links shaped to ``--bandwidth`` (as root) or on loopback:

* **unfaulted**: both nodes train ``--steps`` steps together;
* **faulted**: node 1's rank is killed with SIGKILL once node 1 has logged step ``--kill-at``.
  Node 0 goes on alone; node 1's agent restarts its rank (``--max-restarts 1``), which fetches
  node 0's state (torchft's live recovery) and joins at the step node 0 has reached.

It reports node 0's final validation loss in both runs; the survivor's stall (node 0's slowest
step of the faulted run: the wait until the Lighthouse drops the dead node, and the failed
attempt); the rejoin time (from the kill to node 1's first committed step: restart, start-up
and recovery); the step node 1 rejoined at; and whether the replicas end identical. It writes
``recovery.json``, ``report.md`` and ``recovery.png`` (node 0's training loss of both runs, the
steps it trained alone shaded); not ``results.json``, which names ``deto bench``'s results.

Run from the repository root, for example::

    python -m benchmarks.ft_recovery --out benchmarks/results/ft-recovery --bandwidth 100mbit
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deto.launch.ftcluster import rank_pids

logger = logging.getLogger("ft_recovery")

WAIT_S = 1800.0
LOG_EVERY = 10


def one_run(out: Path, flags: list[str], kill_at: int | None) -> dict[str, Any]:
    """``deto train --ft`` with ``flags``; kill node 1's rank after step ``kill_at`` if given.
    Returns both nodes' summaries, node 0's metrics and the kill's wall-clock time."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    argv = [sys.executable, "-m", "deto", "train", "--ft", "--out", str(out), "-q", *flags]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    killed_at = None
    if kill_at is not None:
        metrics, deadline = out / "node1" / "metrics.jsonl", time.monotonic() + WAIT_S
        while not (metrics.exists() and f'"step": {kill_at},' in metrics.read_text()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node 1 never reached step {kill_at}")
            time.sleep(0.01)
        ranks = rank_pids(1)
        if len(ranks) != 1:
            raise RuntimeError(f"expected one rank of node 1, found {ranks}")
        os.kill(ranks[0], signal.SIGKILL)
        killed_at = time.time()
    _, err = proc.communicate(timeout=WAIT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"deto train failed: {err.strip().splitlines()[-1:]}")
    nodes = [json.loads((out / f"node{k}" / "summary.json").read_text()) for k in (0, 1)]
    metrics = [json.loads(line) for line in (out / "node0" / "metrics.jsonl").open()]
    return {"nodes": nodes, "metrics": metrics, "killed_unix_s": killed_at}


def measure(unfaulted: dict[str, Any], faulted: dict[str, Any], kill_at: int) -> dict[str, Any]:
    """One seed's row: losses, the survivor's stall, the rejoin."""
    u, f = unfaulted["nodes"][0]["final_val_loss"], faulted["nodes"][0]["final_val_loss"]
    survivor, joiner = faulted["nodes"][0]["torchft"], faulted["nodes"][1]["torchft"]
    return {
        "unfaulted_val_loss": u, "faulted_val_loss": f, "faulted_vs_unfaulted": f / u - 1.0,
        "survivor_stall_s": survivor["slowest_step"][1],
        "stall_step": survivor["slowest_step"][0],
        "rejoin_s": joiner["first_step_unix_s"] - faulted["killed_unix_s"],
        "killed_after_step": kill_at, "rejoined_at_step": joiner["first_step"],
        "recovered_from_peer": joiner["recovered_from_peer"],
        "identical": all(n["replicas_identical"] for n in faulted["nodes"]),
        "unfaulted_step_time_s": unfaulted["nodes"][0]["step_time_s_median"],
    }  # fmt: skip


def report(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# A node killed mid-run on `deto train --ft`", "",
        f"- git sha: {meta['git_sha']}; scheme: {meta['scheme']}; steps: {meta['steps']}; "
        f"2 nodes x 1 rank; link: {meta['link']}",
        f"- node 1's rank killed (SIGKILL) once it logged step {meta['kill_at']}; restarted by "
        "its agent (`--max-restarts 1`); it recovers node 0's state and joins at node 0's step",
        "- survivor stall: node 0's slowest step of the faulted run; rejoin: from the kill to "
        "node 1's first committed step (restart, start-up and recovery)", "",
        "| seed | val loss unfaulted | val loss faulted | faulted vs unfaulted | survivor stall "
        "| rejoin | rejoined at step | replicas identical |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['unfaulted_val_loss']:.4f} | {r['faulted_val_loss']:.4f} | "
            f"{100 * r['faulted_vs_unfaulted']:+.2f}% | {r['survivor_stall_s']:.1f} s | "
            f"{r['rejoin_s']:.1f} s | {r['rejoined_at_step']} | {r['identical']} |")
    rel = [r["faulted_vs_unfaulted"] for r in rows]
    lines += ["", f"Mean faulted vs unfaulted: {100 * statistics.fmean(rel):+.2f}% "
              f"(range {100 * min(rel):+.2f}% to {100 * max(rel):+.2f}%); the target is 2%."]
    return "\n".join(lines) + "\n"


def plot(runs: dict[int, dict[str, Any]], rows: Sequence[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (seed, pair), row in zip(sorted(runs.items()), rows, strict=True):
        for label, style in (("unfaulted", "-"), ("faulted", "--")):
            records = [r for r in pair[label]["metrics"] if "train_loss" in r]
            ax.plot([r["step"] for r in records], [r["train_loss"] for r in records], style,
                    lw=0.8, label=f"seed {seed}, {label}")  # fmt: skip
        ax.axvspan(row["killed_after_step"], row["rejoined_at_step"], alpha=0.15, color="tab:red")
    ax.set_xlabel("step (shaded: node 0 alone)")
    ax.set_ylabel("training loss of node 0")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "recovery.png", dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results directory")
    parser.add_argument("--scheme", default="flexdemo", help="a deto train scheme")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--kill-at", type=int, default=100,
                        help=f"kill node 1 once it logged this step (a multiple of {LOG_EVERY})")
    parser.add_argument("--bandwidth", default=None, help="shape the link (as root), e.g. 100mbit")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    ns = parser.parse_args(argv)
    if ns.kill_at % LOG_EVERY or not 0 < ns.kill_at < ns.steps:
        parser.error(f"--kill-at must be a multiple of {LOG_EVERY} below --steps ({ns.steps})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from deto.run.provenance import collect

    ns.out.mkdir(parents=True, exist_ok=True)
    flags = ["--scheme", ns.scheme, "--steps", str(ns.steps), "--nodes", "2",
             "--ranks-per-node", "1", "--log-every", str(LOG_EVERY), "--max-restarts", "1"]
    if ns.bandwidth is not None:
        flags += ["--bandwidth", ns.bandwidth]
    runs: dict[int, dict[str, Any]] = {}
    rows = []
    for seed in (int(s) for s in ns.seeds.split(",")):
        seeded = [*flags, "--seed", str(seed)]
        logger.info("seed %d: unfaulted", seed)
        unfaulted = one_run(ns.out / "runs" / f"seed{seed}-unfaulted", seeded, None)
        logger.info("seed %d: node 1 killed after step %d", seed, ns.kill_at)
        faulted = one_run(ns.out / "runs" / f"seed{seed}-faulted", seeded, ns.kill_at)
        runs[seed] = {"unfaulted": unfaulted, "faulted": faulted}
        rows.append({"seed": seed, **measure(unfaulted, faulted, ns.kill_at)})
        logger.info("seed %d: %s", seed, rows[-1])
    provenance = collect()
    link = runs[min(runs)]["faulted"]["nodes"][0].get("link")
    meta = {"git_sha": (provenance["git"] or {}).get("sha", "unknown"), "scheme": ns.scheme,
            "steps": ns.steps, "kill_at": ns.kill_at,
            "link": f"{link['bandwidth']}, {link['method']}" if link else "loopback, unshaped",
            "provenance": provenance}  # fmt: skip
    (ns.out / "recovery.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (ns.out / "report.md").write_text(report(rows, meta))
    plot(runs, rows, ns.out)
    logger.info("wrote %s", ns.out / "report.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
