"""``deto bench``'s report.md and plots, drawn from results.json's content alone.

Every figure is shown as its mean over the seeds with its spread (min–max and the sample
standard deviation σ), so a reader sees at once whether a difference between schemes exceeds
what a change of seed does.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deto.run import provenance


def fmt(v: Any, spec: str = ".3f", none: str = "—") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def fmt_spread(s: Mapping[str, Any] | None, spec: str, none: str = "—") -> str:
    """``mean (min–max, σ std)``; just the value for one seed."""
    if s is None:
        return none
    if s["n"] == 1 or s["std"] is None:
        return fmt(s["mean"], spec)
    low, high, std = fmt(s["min"], spec), fmt(s["max"], spec), fmt(s["std"], spec)
    return f"{fmt(s['mean'], spec)} ({low}–{high}, σ {std})"


def _percent(v: float | None) -> str:
    return f"{fmt(None if v is None else 100 * v, '+.0f')}%"


def _machine_lines(meta: Mapping[str, Any]) -> list[str]:
    where = meta.get("provenance")
    if not where:  # results written before provenance was recorded
        return [f"- machine: {meta['machine']}"]
    cpu, torch, threads = (
        where["cpu"],
        where["torch"],
        (meta.get("run_provenance") or where)["threads"],
    )
    env = ", ".join(f"{k}={v}" for k, v in threads["env"].items()) or "no thread variables set"
    git = where.get("git") or {}
    return [
        f"- command: `{' '.join(where['command'])}`",
        f"- git: {git.get('sha', 'not a checkout')}{' (dirty)' if git.get('dirty') else ''}",
        f"- CPU: {cpu['model']} ({cpu['machine']}, {cpu['usable_cores']} usable of "
        f"{cpu['cores']} cores); "
        f"vector extensions: {', '.join(cpu['vector_flags']) or 'none found'}",
        f"- torch {torch['version']}: CPU capability {torch['cpu_capability']}, "
        f"config sha256 {torch['config_sha256'][:16]}; "
        f"threads per rank: {threads['torch_num_threads']} "
        f"({env})",
        f"- packages: {', '.join(f'{k} {v}' for k, v in where['packages'].items())}; "
        f"{where['python']}",
    ]


def markdown(results: Mapping[str, Any]) -> str:
    meta, rows, aggregates = results["meta"], results["rows"], results["aggregates"]
    lines = ["# deto bench", ""]
    warning = provenance.dirty_warning((meta.get("provenance") or {}).get("git"))
    if warning and meta.get("provenance"):
        lines += [f"> {warning}", ""]
    seeds = meta["seeds"]
    lines.append(
        f"- task: {meta['task']}; nodes x ranks: {meta['nodes']} x {meta['ranks_per_node']}; "
        f"steps: {meta['steps']}; seeds: {', '.join(map(str, seeds))}; params: {meta['params']:,}"
    )
    lines += _machine_lines(meta)
    if len(seeds) > 1:
        lines.append(
            f"- every figure: mean over the {len(seeds)} seeds (min–max, σ = sample standard "
            "deviation); comparisons are ratios of the means"
        )
    for bw in dict.fromkeys(a["bandwidth"] for a in aggregates):
        lines += ["", f"## Link: {bw or 'unshaped (loopback)'}", ""]
        lines += _link_lines(results, bw)
        group = [a for a in aggregates if a["bandwidth"] == bw]
        lines.append(
            f"Target validation loss: {meta['target']}: "
            f"{fmt_spread(group[0]['target_val_loss'], '.4f')}."
        )
        lines += [
            "",
            "| scheme | final val loss | time to target (s) | vs hsdp | s/step | vs none | "
            "inter-node MB/step | peak MB/sync | compression vs hsdp | replicas identical |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for a in group:
            n = len(a["seeds"])
            reached = fmt_spread(a["time_to_target_s"], ".1f", "not reached")
            if 0 < a["reached_target"] < n:
                reached += f", reached in {a['reached_target']}/{n}"
            same, promised = a["replicas_identical_runs"]
            identical = (
                "n/a"
                if not promised
                else f"{'yes' if same == promised else '**no**'} ({same}/{promised})"
            )
            lines.append(
                f"| {a['scheme']} | {fmt_spread(a['final_val_loss'], '.4f')} | {reached} | "
                f"{fmt(a['time_to_target_vs_hsdp'], '.2f')} | "
                f"{fmt_spread(a['step_time_s_median'], '.3f')} | "
                f"{_percent(a['step_time_vs_none'])} | "
                f"{fmt(a['inter_node_mb_per_step']['mean'], '.4f')} | "
                f"{fmt((a.get('peak_mb_per_sync') or {}).get('mean'), '.4f')} | "
                f"{fmt(a['compression_vs_hsdp'], '.0f')}x | {identical} |"
            )
        if len(seeds) > 1:
            lines += [
                "",
                "Per seed:",
                "",
                "| scheme | seed | final val loss | time to target (s) | vs hsdp | s/step |",
                "|---|---|---|---|---|---|",
            ]
            for r in (x for x in rows if x["bandwidth"] == bw):
                lines.append(
                    f"| {r['scheme']} | {r['seed']} | {fmt(r['final_val_loss'], '.4f')} | "
                    f"{fmt(r['time_to_target_s'], '.1f', 'not reached')} | "
                    f"{fmt(r['time_to_target_vs_hsdp'], '.2f')} | "
                    f"{fmt(r['step_time_s_median'], '.3f')} |"
                )
    lines += [
        "",
        "## Targets",
        "",
        "Judged on the means over the seeds; the spread is shown with each.",
        "",
        "| claim | met | measured |",
        "|---|---|---|",
    ]
    for claim, met, evidence in results["targets"]:
        lines.append(
            f"| {claim} | {'yes' if met else 'n/a' if met is None else '**no**'} | {evidence} |"
        )
    lines += [
        "",
        "Plots: `val_loss_vs_time.png`, `val_loss_vs_bytes.png`, `step_time.png` "
        "(lines: mean over seeds; bands and bars: min–max).",
        "",
    ]
    return "\n".join(lines)


def _link_lines(results: Mapping[str, Any], bw: str | None) -> list[str]:
    links = [r["summary"].get("link") or {} for r in results["runs"] if r["bandwidth"] == bw]
    measured = [((x.get("probe") or {}).get("measured_bps") or 0) / 1e6 for x in links if x]
    if not measured:
        return []
    probe = (
        f"{min(measured):.1f}"
        if len(set(measured)) == 1
        else f"{min(measured):.1f}–{max(measured):.1f}"
    )
    return [f"Emulated with {links[0].get('method', '?')}; probe measured {probe} Mbit/s."]


# --------------------------------------------------------------------------------------------
# Plots


def _curves(
    runs: Sequence[Mapping[str, Any]], xkey: str
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per evaluation step common to the runs: mean x, and mean, min and max val loss."""
    per_run = []
    for r in runs:
        tr = r["trace"]
        per_run.append(
            {
                s: (x, v)
                for s, x, v in zip(
                    tr["step"], tr.get(xkey, []), tr.get("val_loss", []), strict=False
                )
                if v is not None and x is not None
            }
        )
    steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    xs = [statistics.fmean(p[s][0] for p in per_run) for s in steps]
    vals = [[p[s][1] for p in per_run] for s in steps]
    return xs, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def plot(results: Mapping[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "trace" in r]
    aggregates = results["aggregates"]
    bws = list(dict.fromkeys(a["bandwidth"] for a in aggregates))
    for name, xkey, xlabel in (
        ("val_loss_vs_time.png", "wall_time_s", "wall-clock time (s)"),
        (
            "val_loss_vs_bytes.png",
            "inter_node_bytes_sent_total",
            "cumulative inter-node bytes sent per node",
        ),
    ):
        fig, axes = plt.subplots(1, len(bws), figsize=(6 * len(bws), 4.5), squeeze=False)
        for ax, bw in zip(axes[0], bws, strict=True):
            for scheme in dict.fromkeys(a["scheme"] for a in aggregates if a["bandwidth"] == bw):
                xs, mean, low, high = _curves(
                    [r for r in runs if r["bandwidth"] == bw and r["scheme"] == scheme], xkey
                )
                if xkey == "inter_node_bytes_sent_total":
                    xs = [max(x, 1.0) for x in xs]
                if xs:
                    (line,) = ax.plot(xs, mean, marker=".", label=scheme)
                    if low != high:
                        ax.fill_between(
                            xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0
                        )
            if xkey == "inter_node_bytes_sent_total":
                ax.set_xscale("log")
            target = next(a["target_val_loss"] for a in aggregates if a["bandwidth"] == bw)
            if target is not None:
                ax.axhline(
                    target["mean"], color="grey", linestyle=":", linewidth=1, label="target (mean)"
                )
            ax.set(
                title=f"link: {bw or 'unshaped'} (mean over seeds; bands: min–max)",
                xlabel=xlabel,
                ylabel="validation loss",
            )
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    schemes = list(dict.fromkeys(a["scheme"] for a in aggregates))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(schemes) * len(bws)), 4.5))
    width = 0.8 / len(bws)
    for j, bw in enumerate(bws):
        found = {a["scheme"]: a["step_time_s_median"] for a in aggregates if a["bandwidth"] == bw}
        means = [found[s]["mean"] if found.get(s) else 0.0 for s in schemes]
        # max(0, ...): a mean of equal values can round a hair outside them
        errs = [
            [
                max(0.0, m - found[s]["min"]) if found.get(s) else 0.0
                for s, m in zip(schemes, means, strict=True)
            ],
            [
                max(0.0, found[s]["max"] - m) if found.get(s) else 0.0
                for s, m in zip(schemes, means, strict=True)
            ],
        ]
        ax.bar(
            [i + j * width for i in range(len(schemes))],
            means,
            width,
            yerr=errs,
            capsize=3,
            label=bw or "unshaped",
        )
    ax.set_xticks(
        [i + width * (len(bws) - 1) / 2 for i in range(len(schemes))], schemes, rotation=30
    )
    ax.set(
        ylabel="median seconds per step",
        title="step time by scheme and link (mean over seeds; whiskers: min–max)",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=110)
    plt.close(fig)
