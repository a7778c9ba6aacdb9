"""``deto bench``: several schemes on the same task, seed, data and step budget, side by side.

Each run is a separate ``deto train`` process (so every run starts cold and alike), optionally
over emulated slow links (``--bandwidth``). The bench reads each run's ``summary.json`` and
``metrics.jsonl`` and derives what the paper's claim is about: time to a target validation
loss, seconds per step, inter-node bytes per step and compression against HSDP.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deto.train import report
from deto.train.processes import run_child

logger = logging.getLogger(__name__)

DEFAULT_SCHEMES = ("hsdp", "full", "flexdemo", "flexdemo-adamw", "demo", "diloco", "random", "striding", "none")
TARGET_FRACTION = 0.75  # the target val loss is hsdp's at 75% of its steps
BASELINE = "hsdp"
FLOOR = "none"


@dataclass(frozen=True)
class BenchConfig:
    """What to run: ``schemes`` x ``bandwidths`` (``None`` = unshaped links)."""

    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    bandwidths: tuple[str | None, ...] = (None,)
    out: Path = Path("bench")
    train_args: tuple[str, ...] = ()  # passed to every `deto train` (task, steps, seed, ...)


@dataclass
class RunResult:
    scheme: str
    bandwidth: str | None
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


def machine() -> str:
    """One line on where the numbers were measured (they drift with the machine)."""
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}"


def run_name(scheme: str, bandwidth: str | None) -> str:
    return f"{bandwidth or 'unshaped'}-{scheme}"


def train_argv(scheme: str, bandwidth: str | None, out: Path, train_args: Sequence[str]) -> list[str]:
    argv = [sys.executable, "-m", "deto", "train", "--scheme", scheme, "--out", str(out), "-q", *train_args]
    if bandwidth is not None:
        argv += ["--bandwidth", bandwidth]
    return argv


def load_run(scheme: str, bandwidth: str | None, out: Path) -> RunResult:
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return RunResult(scheme, bandwidth, summary, records)


def loss_at(val_loss: Sequence[Sequence[float]], step: float) -> float:
    """Validation loss at ``step``, linearly interpolated between evaluations."""
    points = sorted((float(s), float(v)) for s, v in val_loss)
    if not points:
        raise ValueError("run has no validation loss")
    if step <= points[0][0]:
        return points[0][1]
    for (s0, v0), (s1, v1) in zip(points, points[1:], strict=False):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return points[-1][1]


def time_to_target(records: Sequence[dict[str, Any]], target: float) -> float | None:
    """Wall-clock seconds at which the val loss first reaches ``target``, or ``None``.

    Linearly interpolated between the evaluation that crossed the target and the one before it
    (evaluations are every ``--eval-every`` steps, so taking the crossing evaluation's time
    would round every scheme up to the next evaluation and blur the ratios between them).
    """
    previous: tuple[float, float] | None = None
    for r in records:
        if "val_loss" not in r:
            continue
        t, v = float(r["wall_time_s"]), float(r["val_loss"])
        if v <= target:
            if previous is None or previous[1] == v:
                return t
            t0, v0 = previous
            return t0 + (t - t0) * (v0 - target) / (v0 - v)
        previous = (t, v)
    return None


def target_loss(runs: Sequence[RunResult]) -> tuple[float, str]:
    """The target val loss and how it was defined (hsdp's at 75% of its steps, else the first run's)."""
    base = next((r for r in runs if r.scheme == BASELINE), runs[0])
    steps = base.summary["steps"]
    value = loss_at(base.summary["val_loss"], TARGET_FRACTION * steps)
    return value, f"{base.scheme}'s validation loss at {TARGET_FRACTION:.0%} of its {steps} steps"


def derive(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per run with the derived figures; each bandwidth is compared within itself."""
    rows = []
    for bw in dict.fromkeys(r.bandwidth for r in runs):
        group = [r for r in runs if r.bandwidth == bw]
        target, _ = target_loss(group)
        base = next((r for r in group if r.scheme == BASELINE), None)
        floor = next((r for r in group if r.scheme == FLOOR), None)
        base_t = time_to_target(base.records, target) if base else None
        for r in group:
            s = r.summary
            t = time_to_target(r.records, target)
            sent = s["inter_node_bytes_sent_per_step"]
            rows.append(
                {
                    "scheme": r.scheme,
                    "bandwidth": bw,
                    "final_val_loss": s["final_val_loss"],
                    "target_val_loss": target,
                    "time_to_target_s": t,
                    "time_to_target_vs_hsdp": t / base_t if t is not None and base_t else None,
                    "val_loss_vs_hsdp": s["final_val_loss"] / base.summary["final_val_loss"] - 1 if base else None,
                    "step_time_s_median": s["step_time_s_median"],
                    "step_time_vs_none": (
                        s["step_time_s_median"] / floor.summary["step_time_s_median"] - 1 if floor else None
                    ),
                    "inter_node_mb_per_step": sent / 1e6,
                    "bytes_vs_hsdp": sent / s["full_sync_bytes_per_step"] if s["full_sync_bytes_per_step"] else None,
                    "compression_vs_hsdp": s["full_sync_bytes_per_step"] / sent if sent else None,
                    "replicas_identical": s["replicas_identical"],
                    "wall_time_s": s["wall_time_s"],
                    "link": s.get("link"),
                }
            )
    return rows


def _fmt(v: Any, spec: str = ".3f", none: str = "—") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def targets(rows: Sequence[dict[str, Any]], scheme: str = "flexdemo") -> list[tuple[str, bool | None, str]]:
    """The product's targets, checked against the measured rows: (claim, met, evidence)."""
    out = []
    for bw in dict.fromkeys(r["bandwidth"] for r in rows):
        r = next((x for x in rows if x["scheme"] == scheme and x["bandwidth"] == bw), None)
        if r is None:
            continue
        at = bw or "unshaped"
        b = r["bytes_vs_hsdp"]
        out.append((f"{scheme} inter-node bytes/step <= 1/100 of hsdp ({at})", None if b is None else b <= 0.01,
                    f"{_fmt(b, '.4f')} of hsdp"))
        v = r["val_loss_vs_hsdp"]
        out.append((f"{scheme} final val loss within 5% of hsdp ({at})", None if v is None else v <= 0.05,
                    f"{_fmt(None if v is None else 100 * v, '+.1f')}%"))
        if bw is not None and bw.lower().startswith("100mbit"):
            t = r["time_to_target_vs_hsdp"]
            evidence = f"{_fmt(t)} x hsdp's time"
            bound = _no_communication_bound(rows, bw)
            if bound is not None:
                evidence += f" (a scheme learning like hsdp at none's s/step: {bound:.2f})"
            out.append((f"{scheme} reaches the target in <= 1/3 of hsdp's time ({at})",
                        None if t is None else t <= 1 / 3, evidence))
            n = r["step_time_vs_none"]
            out.append((f"{scheme} s/step within 15% of none ({at})", None if n is None else n <= 0.15,
                        f"{_fmt(None if n is None else 100 * n, '+.1f')}%"))
    promised = [x for x in rows if x["replicas_identical"] is not None]
    out.append(("replicas bitwise identical for every scheme that promises it",
                all(x["replicas_identical"] for x in promised) if promised else None,
                f"{sum(bool(x['replicas_identical']) for x in promised)}/{len(promised)} runs"))
    return out


def _no_communication_bound(rows: Sequence[dict[str, Any]], bandwidth: str | None) -> float | None:
    """none's s/step over hsdp's: the time-to-target ratio of a scheme that learns per step as
    hsdp does and costs no more than sending nothing. Above 1/3, compute alone rules out a 3x
    speed-up at this bandwidth on this machine."""
    step = {x["scheme"]: x["step_time_s_median"] for x in rows if x["bandwidth"] == bandwidth}
    if step.get(FLOOR) and step.get(BASELINE):
        return float(step[FLOOR] / step[BASELINE])
    return None


def report_markdown(runs: Sequence[RunResult], rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# deto bench", ""]
    lines.append(f"- task: {meta['task']}; nodes x ranks: {meta['nodes']} x {meta['ranks_per_node']}; "
                 f"steps: {meta['steps']}; seed: {meta['seed']}; params: {meta['params']:,}")
    lines.append(f"- versions: {meta['versions']}; git sha: {meta['git_sha']}")
    lines.append(f"- machine: {meta['machine']}")
    for bw in dict.fromkeys(r["bandwidth"] for r in rows):
        group = [r for r in rows if r["bandwidth"] == bw]
        _, how = target_loss([x for x in runs if x.bandwidth == bw])
        run = next(x for x in runs if x.bandwidth == bw)
        link = run.summary.get("link") or {}
        lines += ["", f"## Link: {bw or 'unshaped (loopback)'}", ""]
        if link:
            probe = link.get("probe") or {}
            measured = probe.get("measured_bps")
            lines.append(f"Emulated with {link.get('method', '?')}; probe measured "
                         f"{_fmt(None if measured is None else measured / 1e6, '.1f')} Mbit/s.")
        lines.append(f"Target validation loss {group[0]['target_val_loss']:.4f} = {how}.")
        lines += ["", "| scheme | final val loss | time to target (s) | vs hsdp | s/step | vs none | "
                      "inter-node MB/step | compression vs hsdp | replicas identical |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in group:
            lines.append(
                f"| {r['scheme']} | {_fmt(r['final_val_loss'], '.4f')} | {_fmt(r['time_to_target_s'], '.1f', 'not reached')} | "
                f"{_fmt(r['time_to_target_vs_hsdp'], '.2f')} | {_fmt(r['step_time_s_median'], '.3f')} | "
                f"{_fmt(None if r['step_time_vs_none'] is None else 100 * r['step_time_vs_none'], '+.0f')}% | "
                f"{_fmt(r['inter_node_mb_per_step'], '.4f')} | {_fmt(r['compression_vs_hsdp'], '.0f')}x | "
                f"{_fmt(r['replicas_identical'], '', 'n/a')} |"
            )
    lines += ["", "## Targets", "", "| claim | met | measured |", "|---|---|---|"]
    for claim, met, evidence in targets(rows):
        lines.append(f"| {claim} | {'yes' if met else 'n/a' if met is None else '**no**'} | {evidence} |")
    lines += ["", "Plots: `val_loss_vs_time.png`, `val_loss_vs_bytes.png`, `step_time.png`.", ""]
    return "\n".join(lines)


def plot(runs: Sequence[RunResult], rows: Sequence[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bws = list(dict.fromkeys(r.bandwidth for r in runs))
    for name, xkey, xlabel in (
        ("val_loss_vs_time.png", "wall_time_s", "wall-clock time (s)"),
        ("val_loss_vs_bytes.png", "inter_node_bytes_sent_total", "cumulative inter-node bytes sent per node"),
    ):
        fig, axes = plt.subplots(1, len(bws), figsize=(6 * len(bws), 4.5), squeeze=False)
        for ax, bw in zip(axes[0], bws, strict=True):
            for r in (x for x in runs if x.bandwidth == bw):
                pts = [(rec[xkey], rec["val_loss"]) for rec in r.records if "val_loss" in rec]
                if xkey.endswith("bytes_sent_total"):
                    pts = [(max(x, 1.0), y) for x, y in pts]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker=".", label=r.scheme)
            if xkey.endswith("bytes_sent_total"):
                ax.set_xscale("log")
            target = next(x["target_val_loss"] for x in rows if x["bandwidth"] == bw)
            ax.axhline(target, color="grey", linestyle=":", linewidth=1, label="target")
            ax.set(title=f"link: {bw or 'unshaped'}", xlabel=xlabel, ylabel="validation loss")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    schemes = list(dict.fromkeys(r["scheme"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(schemes) * len(bws)), 4.5))
    width = 0.8 / len(bws)
    for j, bw in enumerate(bws):
        vals = [next((x["step_time_s_median"] for x in rows if x["scheme"] == s and x["bandwidth"] == bw), 0) or 0
                for s in schemes]
        ax.bar([i + j * width for i in range(len(schemes))], vals, width, label=bw or "unshaped")
    ax.set_xticks([i + width * (len(bws) - 1) / 2 for i in range(len(schemes))], schemes, rotation=30)
    ax.set(ylabel="median seconds per step", title="step time by scheme and link")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=110)
    plt.close(fig)


def run_bench(
    cfg: BenchConfig,
    *,
    runner: Callable[[list[str]], int] | None = None,
    on_run: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Run every scheme at every bandwidth, then write results.json, report.md and plots."""
    run = runner or run_child
    cfg.out.mkdir(parents=True, exist_ok=True)
    plan = [(bw, s) for bw in cfg.bandwidths for s in cfg.schemes]
    runs: list[RunResult] = []
    for i, (bw, scheme) in enumerate(plan):
        name = run_name(scheme, bw)
        if on_run is not None:
            on_run(i, len(plan), name)
        out = cfg.out / "runs" / name
        code = run(train_argv(scheme, bw, out, cfg.train_args))
        if code != 0:
            raise RuntimeError(f"run {name} failed with exit status {code} (its output is above)")
        runs.append(load_run(scheme, bw, out))
    rows = derive(runs)
    first = runs[0].summary
    meta = {
        "task": first["task"], "nodes": first["nodes"], "ranks_per_node": first["ranks_per_node"],
        "steps": first["steps"], "seed": first.get("config", {}).get("seed"), "params": first["params"],
        "versions": first["versions"], "git_sha": first["git_sha"], "machine": machine(),
        "train_args": list(cfg.train_args),
    }
    results = {"meta": meta, "rows": rows, "targets": [list(t) for t in targets(rows)],
               "runs": [{"scheme": r.scheme, "bandwidth": r.bandwidth, "summary": r.summary} for r in runs]}
    report.write_json(cfg.out / "results.json", results)
    (cfg.out / "report.md").write_text(report_markdown(runs, rows, meta))
    plot(runs, rows, cfg.out)
    return results
