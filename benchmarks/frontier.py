"""The loss-vs-bytes frontier of DeMo settings across models, schedules and seeds.

Each point is one ``deto train`` run on a simulated cluster (no link shaping: only the final
validation loss and the inter-node bytes per step matter here, and both are independent of
the machine's speed). For every model the sweep runs HSDP + AdamW as the reference and a set of
FlexDeMo settings (FSDP2 inside a node, DeMo + sign-SGD across nodes), over the learning-rate
schedules and seeds asked for, and writes ``frontier.json``, ``report.md`` and one plot of final
validation loss against bytes per step per model.

Run from the repository root, for example::

    python -m benchmarks.frontier --out benchmarks/results/frontier-cpu-2x2 \
        --models gpt-128x2,gpt-256x4 --schedules cosine,constant --seeds 0,1

The run is resumable: a point whose ``summary.json`` exists is read, not re-run.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("frontier")

MODELS: dict[str, list[str]] = {
    "gpt-128x2": ["--model", "gpt", "--d-model", "128", "--layers", "2"],
    "gpt-128x4": ["--model", "gpt", "--d-model", "128", "--layers", "4"],
    "gpt-256x2": ["--model", "gpt", "--d-model", "256", "--layers", "2"],
    "gpt-256x4": ["--model", "gpt", "--d-model", "256", "--layers", "4"],
    "gpt-512x2": ["--model", "gpt", "--d-model", "512", "--layers", "2"],
    "t5": ["--model", "t5"],
    "llama": ["--model", "llama"],
    "vit": ["--model", "vit"],
}
"""Model label -> ``deto train`` flags that build it (the task follows from ``--model``)."""


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: a scheme and the flags that configure it."""

    label: str
    scheme: str
    flags: tuple[str, ...] = ()


SETTINGS: dict[str, Setting] = {
    s.label: s
    for s in (
        Setting("hsdp", "hsdp"),
        Setting("2d-64-32-fp32", "flexdemo",
                ("--blocks", "2d", "--chunk", "64", "--topk", "32", "--values", "fp32")),
        Setting("2d-32-14-int8", "flexdemo",
                ("--blocks", "2d", "--chunk", "32", "--topk", "14", "--values", "int8")),
        Setting("2d-32-32-int8", "flexdemo",
                ("--blocks", "2d", "--chunk", "32", "--topk", "32", "--values", "int8")),
        Setting("1d-64-4-fp32", "flexdemo",
                ("--blocks", "1d", "--chunk", "64", "--topk", "4", "--values", "fp32")),
        Setting("1d-64-4-int8", "flexdemo",
                ("--blocks", "1d", "--chunk", "64", "--topk", "4", "--values", "int8")),
        Setting("1d-64-4-int2", "flexdemo",
                ("--blocks", "1d", "--chunk", "64", "--topk", "4", "--values", "int2")),
        Setting("1d-64-4-int2-overlap", "flexdemo",
                ("--blocks", "1d", "--chunk", "64", "--topk", "4", "--values", "int2",
                 "--overlap")),
        Setting("1d-64-4-sign", "flexdemo",
                ("--blocks", "1d", "--chunk", "64", "--topk", "4", "--values", "sign")),
        Setting("1d-128-4-int8", "flexdemo",
                ("--blocks", "1d", "--chunk", "128", "--topk", "4", "--values", "int8")),
        Setting("1d-64-8-int2", "flexdemo",
                ("--blocks", "1d", "--chunk", "64", "--topk", "8", "--values", "int2")),
        # the DiLoCo family: AdamW inside, an outer step every H (--every) steps
        Setting("diloco-h25", "diloco"),
        Setting("sparseloco-h25", "sparseloco"),
        Setting("sparseloco-h10-k256", "sparseloco", ("--every", "10", "--topk", "256")),
        Setting("sparseloco-h5-k256", "sparseloco", ("--every", "5", "--topk", "256")),
        Setting("streaming-h25-f2", "streaming-diloco"),
    )
}


def run_point(out: Path, model: str, setting: Setting, schedule: str, seed: int,
              steps: int | None, lr: float | None) -> None:
    """Run one point, unless its ``summary.json`` exists (a resumed sweep)."""
    lr_tag = f"-lr{lr:g}" if lr is not None else ""
    run_dir = out / "runs" / f"{model}-{setting.label}-{schedule}{lr_tag}-s{seed}"
    if (run_dir / "summary.json").exists():
        return
    argv = [sys.executable, "-m", "deto", "train", "-q", "--scheme", setting.scheme,
            *MODELS[model], *setting.flags, "--lr-schedule", schedule, "--seed", str(seed),
            "--out", str(run_dir), "--checkpoint-every", "0"]
    if steps is not None:
        argv += ["--steps", str(steps)]
    if lr is not None and setting.scheme != "hsdp":
        argv += ["--lr", str(lr)]
    logger.info("run %s", run_dir.name)
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        logger.error("%s failed: %s", run_dir.name, done.stderr.strip().splitlines()[-1:])


def point(model: str, setting: str, schedule: str, seed: int, s: dict[str, Any]) -> dict[str, Any]:
    """The fields of one run's ``summary.json`` that the report needs."""
    return {
        "model": model, "setting": setting, "schedule": schedule, "seed": seed,
        "lr": s["lr"], "final_val_loss": s["final_val_loss"],
        "final_val_accuracy": s.get("final_val_accuracy"),
        "bytes_per_step": s["inter_node_bytes_sent_per_step"],
        "full_sync_bytes_per_step": s["full_sync_bytes_per_step"],
        "params": s["params"], "steps": s["steps"], "git_sha": s.get("git_sha"),
    }


def recorded_points(out: Path) -> list[dict[str, Any]]:
    """Every finished run under ``out/runs``, whatever invocation ran it (names are
    ``<model>-<setting>-<schedule>-s<seed>``)."""
    points = []
    for summary in sorted(out.glob("runs/*/summary.json")):
        name = summary.parent.name
        model = next((m for m in MODELS if name.startswith(m + "-")), None)
        rest = name[len(model) + 1:] if model else ""
        # the longest label that fits: "1d-64-4-int2-overlap" before "1d-64-4-int2"
        setting = max((t for t in SETTINGS if rest.startswith(t + "-")), key=len, default=None)
        if model is None or setting is None:
            continue
        schedule, _, seed = rest[len(setting) + 1:].rpartition("-s")
        schedule, _, lr = schedule.partition("-lr")  # a run with --lr: its own setting
        label = f"{setting} @ lr {lr}" if lr else setting
        if schedule in ("cosine", "constant") and seed.isdigit():
            points.append(point(model, label, schedule, int(seed),
                                json.loads(summary.read_text())))
    return points


def aggregate(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seed means and spreads per (model, setting, schedule, lr), with loss relative to HSDP."""
    cells: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    for p in points:
        cells.setdefault((p["model"], p["setting"], p["schedule"], p["lr"]), []).append(p)
    rows = []
    for (model, setting, schedule, lr), ps in sorted(cells.items()):
        losses = [p["final_val_loss"] for p in ps]
        accuracies = [a for p in ps if (a := p.get("final_val_accuracy")) is not None]
        rows.append({
            "model": model, "setting": setting, "schedule": schedule, "lr": lr,
            "seeds": sorted(p["seed"] for p in ps),
            "val_loss_mean": statistics.fmean(losses),
            "val_loss_min": min(losses), "val_loss_max": max(losses),
            "val_accuracy_mean": statistics.fmean(accuracies) if accuracies else None,
            "bytes_per_step": ps[0]["bytes_per_step"],
            "bytes_vs_hsdp": ps[0]["bytes_per_step"] / ps[0]["full_sync_bytes_per_step"],
        })
    hsdp = {(r["model"], r["schedule"]): r["val_loss_mean"] for r in rows if r["setting"] == "hsdp"}
    for r in rows:
        ref = hsdp.get((r["model"], r["schedule"]))
        r["loss_vs_hsdp"] = None if ref is None else r["val_loss_mean"] / ref - 1.0
    return rows


def report(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["# DeMo frontier: final validation loss vs inter-node bytes", "",
             f"- git sha: {meta['git_sha']}; steps: {meta['steps']}; nodes x ranks: 2 x 2",
             "- loss vs hsdp: seed mean over seed mean of HSDP + AdamW on the same model and "
             "schedule; spread: min-max over seeds",
             "- a setting without '@ lr' ran at the rate `deto train` gives it on that model "
             "(the preset's, divided by 1.5 per doubling of the width above the task's default); "
             "'@ lr X': at the rate X given explicitly", "",
             "| model | schedule | setting | lr | seeds | val loss (mean, min-max) | vs hsdp "
             "| val acc | bytes/step | 1/x of hsdp |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = "—" if r["loss_vs_hsdp"] is None else f"{100 * r['loss_vs_hsdp']:+.1f}%"
        inv = "1" if r["setting"] == "hsdp" else f"{1 / r['bytes_vs_hsdp']:.0f}"
        acc = "—" if r["val_accuracy_mean"] is None else f"{r['val_accuracy_mean']:.3f}"
        lines.append(
            f"| {r['model']} | {r['schedule']} | {r['setting']} | {r['lr']:g} | "
            f"{','.join(map(str, r['seeds']))} | {r['val_loss_mean']:.4f} "
            f"({r['val_loss_min']:.4f}-{r['val_loss_max']:.4f}) | {vs} | {acc} | "
            f"{r['bytes_per_step']:,.0f} | {inv} |")
    lines += ["", "## Each setting over every model and schedule", "",
              "The worst and mean loss vs HSDP over the (model, schedule) cells a setting ran in:",
              "a default must hold in the worst cell, not on average.", "",
              "| setting | cells | worst vs hsdp | mean vs hsdp | bytes: 1/x of hsdp (range) |",
              "|---|---|---|---|---|"]
    for s in by_setting(rows):
        lines.append(
            f"| {s['setting']} | {s['cells']} | {100 * s['worst_vs_hsdp']:+.1f}% | "
            f"{100 * s['mean_vs_hsdp']:+.1f}% | {s['min_x']:.0f}-{s['max_x']:.0f} |")
    return "\n".join(lines) + "\n"


def by_setting(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per DeMo setting: its worst and mean loss vs HSDP over the cells, and its compression."""
    out = []
    for setting in sorted({r["setting"] for r in rows} - {"hsdp"}):
        cells = [r for r in rows if r["setting"] == setting and r["loss_vs_hsdp"] is not None]
        if not cells:
            continue
        rel = [r["loss_vs_hsdp"] for r in cells]
        x = [1 / r["bytes_vs_hsdp"] for r in cells]
        out.append({"setting": setting, "cells": len(cells), "worst_vs_hsdp": max(rel),
                    "mean_vs_hsdp": statistics.fmean(rel), "min_x": min(x), "max_x": max(x)})
    return sorted(out, key=lambda s: s["worst_vs_hsdp"])


def plot(rows: Sequence[dict[str, Any]], out: Path) -> None:
    """One panel per model: loss vs bytes/step (log), HSDP marked, the frontier drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for schedule, marker in (("cosine", "o"), ("constant", "s")):
            pts = [r for r in rows if r["model"] == model and r["schedule"] == schedule]
            if not pts:
                continue
            for r in pts:
                color = "black" if r["setting"] == "hsdp" else "tab:blue"
                ax.errorbar(r["bytes_per_step"], r["val_loss_mean"],
                            yerr=[[r["val_loss_mean"] - r["val_loss_min"]],
                                  [r["val_loss_max"] - r["val_loss_mean"]]],
                            fmt=marker, color=color, ms=5, capsize=2)
                ax.annotate(r["setting"], (r["bytes_per_step"], r["val_loss_mean"]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
            front, best = [], float("inf")
            for r in sorted(pts, key=lambda r: r["bytes_per_step"]):
                if r["val_loss_mean"] < best:
                    best = r["val_loss_mean"]
                    front.append(r)
            ax.plot([r["bytes_per_step"] for r in front], [r["val_loss_mean"] for r in front],
                    "--", lw=1, label=f"frontier ({schedule})")
        ax.set_xscale("log")
        ax.set_title(model)
        ax.set_xlabel("inter-node bytes per step per rank")
        ax.set_ylabel("final val loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results directory")
    parser.add_argument("--models", default="gpt-128x2,gpt-256x4",
                        help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma-separated, of: {', '.join(SETTINGS)}")
    parser.add_argument("--schedules", default="cosine", help="cosine,constant")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (task default)")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate of the DeMo settings (default: the preset's)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rebuild the report from every finished run in --out")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    models = ns.models.split(",")
    settings = [SETTINGS[s] for s in ns.settings.split(",")]
    for m in models:
        if m not in MODELS:
            parser.error(f"unknown model {m!r} (valid: {', '.join(MODELS)})")
    ns.out.mkdir(parents=True, exist_ok=True)
    if ns.report_only:
        points = recorded_points(ns.out)
        if not points:
            parser.error(f"no finished runs in {ns.out / 'runs'}")
        write_report(ns.out, points)
        return 0
    for schedule in ns.schedules.split(","):  # a schedule's cells complete over seeds first
        for seed in (int(s) for s in ns.seeds.split(",")):
            for model in models:
                for setting in settings:
                    run_point(ns.out, model, setting, schedule, seed, ns.steps, ns.lr)
    write_report(ns.out, recorded_points(ns.out))  # this invocation's runs and earlier ones
    return 0


def write_report(out: Path, points: list[dict[str, Any]]) -> None:
    """``frontier.json``, ``report.md`` and ``frontier.png`` of ``points`` (not ``results.json``:
    that is ``deto bench``'s name, whose runs the committed-results guard re-runs)."""
    rows = aggregate(points)
    shas = sorted({p["git_sha"] for p in points if p.get("git_sha")})
    meta = {"git_sha": ", ".join(shas) or "unknown", "steps": sorted({p["steps"] for p in points})}
    (out / "frontier.json").write_text(json.dumps({"meta": meta, "points": points,
                                                  "rows": rows}, indent=2))
    (out / "report.md").write_text(report(rows, meta))
    plot(rows, out)
    logger.info("wrote %s", out / "report.md")


if __name__ == "__main__":
    raise SystemExit(main())
