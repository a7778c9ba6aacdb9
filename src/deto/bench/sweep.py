"""``deto bench``: several schemes on the same task, data and step budget, over several seeds.

Each run is a separate ``deto train`` process (so every run starts cold and alike), optionally
over emulated slow links (``--bandwidth``). The bench reads each run's ``summary.json`` and
``metrics.jsonl`` and derives what the paper's claim is about: time to a target validation
loss, seconds per step, inter-node bytes per step and compression against HSDP; per run, then
as a mean with its spread over the seeds, on which the targets are judged.

``results.json`` holds everything the report and plots are drawn from (each run's summary and
its metrics trace), and everything ``deto bench --reproduce`` compares a re-run with.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deto.bench import predicted
from deto.bench import report as bench_report
from deto.bench.stats import ratio_of_means, spread
from deto.proc.processes import run_child
from deto.run import provenance, report
from deto.run.presets import AUTO_SCHEME

logger = logging.getLogger(__name__)

DEFAULT_SCHEMES = (
    "hsdp",
    "full",
    "flexdemo",
    "flexdemo-lean",
    "flexdemo-adamw",
    "demo",
    "diloco",
    "sparseloco",
    "streaming-diloco",
    "random",
    "striding",
    "none",
)
"""What ``deto bench`` runs without ``--schemes``. A run of the default task costs 1-3 minutes
on 2 cores, and the DiLoCo family's about what ``diloco``'s does (60-step runs, whole
commands on a loaded 2-core machine: flexdemo 30 s, diloco 38 s, sparseloco 39 s,
streaming-diloco 54 s), so adding ``sparseloco`` and ``streaming-diloco`` made the default
run about a fifth longer."""
DEFAULT_MINUTES = 27
"""About how long the default schemes take on 2 cores, per link and seed (``--help`` says it)."""
DEFAULT_SEEDS = (0,)
TARGET_FRACTION = 0.75  # the target val loss is hsdp's at 75% of its steps (per seed)
BASELINE = "hsdp"
FLOOR = "none"
TRACE_KEYS = (
    "step",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "wall_time_s",
    "step_time_s",
    "inter_node_bytes_sent_total",
)
"""The metrics.jsonl columns kept in results.json: what the plots and ``--reproduce`` need."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run: ``schemes`` x ``bandwidths`` (``None`` = unshaped links) x ``seeds``."""

    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    bandwidths: tuple[str | None, ...] = (None,)
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    out: Path = Path("bench")
    train_args: tuple[str, ...] = ()  # passed to every `deto train` (task, steps, ...)
    allow_dirty: bool = False  # results meant for committing from a dirty working tree


@dataclass
class RunResult:
    scheme: str
    bandwidth: str | None
    seed: int
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)


def machine() -> str:
    """One line on where the numbers were measured (they drift with the machine)."""
    cores = f"{os.cpu_count()} CPU cores"
    return f"{platform.machine()}, {cores}, {platform.system()} {platform.release()}"


def _parse_variant(spec: str) -> tuple[str, list[tuple[str, bool, str]]]:
    """``SCHEME+KNOB[=VALUE]...`` as the scheme and its changes: (knob as a Python name,
    whether a value was given, the value)."""
    scheme, *changes = spec.split("+")
    parsed = []
    for change in changes:
        knob, eq, value = change.partition("=")
        parsed.append((knob.replace("-", "_"), bool(eq), value))
    return scheme, parsed


def _is_bool_knob(name: str) -> bool:
    from deto.run.config import KNOBS

    return name in KNOBS and KNOBS[name].type in ("bool", bool)


def variant(spec: str) -> tuple[str, list[str]]:
    """A ``--schemes`` entry as a preset and the flags it adds: ``flexdemo+overlap`` is
    ``--scheme flexdemo --overlap``, ``flexdemo+topk=8+dense_fallback=false`` adds ``--topk 8
    --no-dense-fallback``. A variant is its own scheme in the report, so two settings of one
    preset run side by side (interleaved with the others, seed by seed)."""
    scheme, changes = _parse_variant(spec)
    flags: list[str] = []
    for name, given, value in changes:
        flag = "--" + name.replace("_", "-")
        if _is_bool_knob(name):
            flags.append(flag if value.lower() in ("", "true") else f"--no-{flag[2:]}")
        else:
            flags += [flag, *([value] if given else [])]
    return scheme, flags


def check_variant(spec: str) -> None:
    """``ValueError`` (one line) unless ``spec`` names a preset and knobs that preset has."""
    from deto.run.presets import PRESETS

    scheme, changes = _parse_variant(spec)
    if scheme not in PRESETS:
        raise ValueError(f"unknown scheme {scheme!r} in {spec!r} (valid: {', '.join(PRESETS)})")
    options = PRESETS[scheme].options
    for knob, _, value in changes:
        if options is None or knob not in options.knobs():
            raise ValueError(f"{spec!r}: scheme {scheme!r} has no knob {knob!r}")
        if _is_bool_knob(knob):
            if value.lower() not in ("", "true", "false"):
                raise ValueError(f"{spec!r}: {knob} is on or off ({knob}, {knob}=false)")
        elif not value:
            raise ValueError(f"{spec!r}: {knob} needs a value ({knob}=VALUE)")


def run_name(scheme: str, bandwidth: str | None, seed: int) -> str:
    return f"{bandwidth or 'unshaped'}-{scheme}-seed{seed}"


def train_argv(
    scheme: str, bandwidth: str | None, seed: int, out: Path, train_args: Sequence[str]
) -> list[str]:
    preset, flags = variant(scheme)
    argv = [
        sys.executable,
        "-m",
        "deto",
        "train",
        "--scheme",
        preset,
        *flags,
        "--seed",
        str(seed),
        "--out",
        str(out),
        "-q",
        *train_args,
    ]
    if bandwidth is not None:
        argv += ["--bandwidth", bandwidth]
    return argv


def load_run(scheme: str, bandwidth: str | None, seed: int, out: Path) -> RunResult:
    summary = json.loads((out / "summary.json").read_text())
    records = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return RunResult(scheme, bandwidth, seed, summary, records)


def trace(records: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """The :data:`TRACE_KEYS` columns of a run's metrics (``None`` where a line lacks one)."""
    return {k: [r.get(k) for r in records] for k in TRACE_KEYS if any(k in r for r in records)}


def records_from_trace(columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The metrics lines back from :func:`trace` (without the keys a line did not have)."""
    steps = columns.get("step", [])
    return [{k: v[i] for k, v in columns.items() if v[i] is not None} for i in range(len(steps))]


def run_entry(r: RunResult) -> dict[str, Any]:
    """A run as results.json keeps it."""
    return {
        "scheme": r.scheme,
        "bandwidth": r.bandwidth,
        "seed": r.seed,
        "summary": r.summary,
        "trace": trace(r.records),
    }


def run_from_entry(entry: dict[str, Any]) -> RunResult:
    """A run back from results.json; results written before seeds and traces were kept have
    only the summary (its seed from the run's config, its records from the summary's losses)."""
    summary = entry["summary"]
    seed = entry.get("seed", summary.get("config", {}).get("seed", 0))
    if "trace" in entry:
        records = records_from_trace(entry["trace"])
    else:
        by_step: dict[int, dict[str, Any]] = {}
        for key in ("train_loss", "val_loss"):
            for step, value in summary.get(key, []):
                by_step.setdefault(int(step), {"step": int(step)})[key] = value
        records = [by_step[s] for s in sorted(by_step)]
    return RunResult(entry["scheme"], entry["bandwidth"], int(seed), summary, records)


# --------------------------------------------------------------------------------------------
# Derived figures


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
        if "val_loss" not in r or "wall_time_s" not in r:
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
    """The target val loss and how it was defined (hsdp's at 75% of its steps, else the first
    run's)."""
    base = next((r for r in runs if r.scheme == BASELINE), runs[0])
    steps = base.summary["steps"]
    value = loss_at(base.summary["val_loss"], TARGET_FRACTION * steps)
    return value, f"{base.scheme}'s validation loss at {TARGET_FRACTION:.0%} of its {steps} steps"


def derive(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per run with the derived figures; each (bandwidth, seed) is compared within
    itself, so every ratio pairs runs that saw the same initial model and batches."""
    rows = []
    for bw, seed in dict.fromkeys((r.bandwidth, r.seed) for r in runs):
        group = [r for r in runs if r.bandwidth == bw and r.seed == seed]
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
                    "seed": seed,
                    "final_val_loss": s["final_val_loss"],
                    "target_val_loss": target,
                    "time_to_target_s": t,
                    "time_to_target_vs_hsdp": t / base_t if t is not None and base_t else None,
                    "val_loss_vs_hsdp": s["final_val_loss"] / base.summary["final_val_loss"] - 1
                    if base
                    else None,
                    "step_time_s_median": s["step_time_s_median"],
                    "step_time_vs_none": (
                        s["step_time_s_median"] / floor.summary["step_time_s_median"] - 1
                        if floor
                        else None
                    ),
                    "inter_node_mb_per_step": sent / 1e6,
                    "predicted_mb_per_step": _predicted_mb(s),
                    "peak_mb_per_sync": _peak_mb(s),
                    "bytes_vs_hsdp": sent / s["full_sync_bytes_per_step"]
                    if s["full_sync_bytes_per_step"]
                    else None,
                    "compression_vs_hsdp": s["full_sync_bytes_per_step"] / sent if sent else None,
                    "replicas_identical": s["replicas_identical"],
                    "wall_time_s": s["wall_time_s"],
                    "link": s.get("link"),
                    "auto_choice": (s.get("auto") or {}).get("chosen"),
                }
            )
    return rows


def _predicted_mb(summary: dict[str, Any]) -> float | None:
    """``deto plan``'s inter-node MB per step for the run; ``None`` where the record has no
    configuration the plan can rebuild (records from before configs were complete)."""
    try:
        return predicted.node_bytes_per_step(summary["config"]) / 1e6
    except (KeyError, TypeError, ValueError) as exc:
        logger.debug("no prediction for %s: %s", summary.get("scheme"), exc)
        return None


def _peak_mb(summary: dict[str, Any]) -> float | None:
    """The most inter-node MB the node sent in any one step (a sync's burst, which a link
    must carry however rarely it comes); ``None`` for runs recorded before it was kept."""
    peak = summary.get("inter_node_bytes_sent_peak")
    return None if peak is None else peak / 1e6


def _column(rows: Sequence[dict[str, Any]], key: str) -> list[Any]:
    return [r[key] for r in rows]


def _known(values: Sequence[Any]) -> list[float]:
    return [float(v) for v in values if v is not None]


def _minus_one(ratio: float | None) -> float | None:
    return None if ratio is None else ratio - 1


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (bandwidth, scheme): each figure's spread over the seeds (``n``, ``mean``,
    ``std``, ``min``, ``max``) and the comparisons with hsdp and none as ratios of the means."""
    out = []
    for bw, scheme in dict.fromkeys((r["bandwidth"], r["scheme"]) for r in rows):
        at_bw = [r for r in rows if r["bandwidth"] == bw]
        mine = [r for r in at_bw if r["scheme"] == scheme]
        base = [r for r in at_bw if r["scheme"] == BASELINE]
        floor = [r for r in at_bw if r["scheme"] == FLOOR]
        times = _column(mine, "time_to_target_s")
        promised = [
            bool(r["replicas_identical"]) for r in mine if r["replicas_identical"] is not None
        ]
        bytes_ratio = _known(_column(mine, "bytes_vs_hsdp"))
        out.append(
            {
                "scheme": scheme,
                "bandwidth": bw,
                "seeds": _column(mine, "seed"),
                "final_val_loss": spread(_known(_column(mine, "final_val_loss"))),
                "target_val_loss": spread(_column(mine, "target_val_loss")),
                "time_to_target_s": spread(_known(times)),
                "reached_target": len(_known(times)),
                "time_to_target_vs_hsdp": (
                    ratio_of_means(times, _column(base, "time_to_target_s")) if base else None
                ),
                "time_to_target_vs_hsdp_per_seed": spread(
                    _known(_column(mine, "time_to_target_vs_hsdp"))
                ),
                "val_loss_vs_hsdp": _minus_one(
                    ratio_of_means(_column(mine, "final_val_loss"), _column(base, "final_val_loss"))
                    if base
                    else None
                ),
                "step_time_s_median": spread(_column(mine, "step_time_s_median")),
                "step_time_vs_none": _minus_one(
                    ratio_of_means(
                        _column(mine, "step_time_s_median"), _column(floor, "step_time_s_median")
                    )
                    if floor
                    else None
                ),
                "inter_node_mb_per_step": spread(_column(mine, "inter_node_mb_per_step")),
                "peak_mb_per_sync": spread(_known(_column(mine, "peak_mb_per_sync"))),
                "bytes_vs_hsdp": statistics.fmean(bytes_ratio) if bytes_ratio else None,
                "compression_vs_hsdp": 1 / statistics.fmean(bytes_ratio)
                if bytes_ratio and any(bytes_ratio)
                else None,
                "replicas_identical": all(promised) if promised else None,
                "replicas_identical_runs": [sum(promised), len(promised)],
                "wall_time_s": spread(_column(mine, "wall_time_s")),
            }
        )
    return out


def _prediction_target(rows: Sequence[dict[str, Any]]) -> tuple[str, bool | None, str]:
    """Every run's bytes per step equal the plan's prediction (to the byte: both count the
    same wire rules)."""
    judged = [r for r in rows if r.get("predicted_mb_per_step") is not None]
    off = [
        f"{r['scheme']} ({r['bandwidth'] or 'unshaped'}, seed {r['seed']}): "
        f"{r['inter_node_mb_per_step'] * 1e6:.0f} B, predicted "
        f"{r['predicted_mb_per_step'] * 1e6:.0f} B"
        for r in judged
        if abs(r["inter_node_mb_per_step"] - r["predicted_mb_per_step"]) * 1e6 > 1e-6
    ]
    evidence = f"{len(judged) - len(off)}/{len(judged)} runs exact" + (
        "; " + "; ".join(off[:3]) if off else "")
    return ("inter-node bytes/step as deto plan predicts", not off if judged else None, evidence)


def _range(s: dict[str, Any] | None, spec: str, unit: str = "") -> str:
    """``min–max over n seeds`` (the value, for one seed)."""
    if s is None:
        return "—"
    if s["n"] == 1:
        return f"{format(s['mean'], spec)}{unit}, one seed"
    return f"{format(s['min'], spec)}–{format(s['max'], spec)}{unit} over {s['n']} seeds"


@dataclass(frozen=True)
class Claim:
    """What a preset promises against hsdp: at most ``max_bytes`` of its inter-node bytes per
    step, a final val loss at most ``max_loss_excess`` above its (on the means over seeds);
    with ``over_the_link``, at 100 Mbit/s also the time-to-target and s/step targets."""

    scheme: str
    max_bytes: float
    bytes_label: str
    max_loss_excess: float
    over_the_link: bool = True


CLAIMS = (
    # DeMo()'s defaults: the frontier sweep's target (1/30, within 2%) on every swept model.
    Claim("flexdemo", 1 / 30, "1/30", 0.02),
    # The bandwidth-first setting: the first bench's target, 1/100 within 5%.
    Claim("flexdemo-lean", 1 / 100, "1/100", 0.05),
    # SparseLoCo's published claim, adapted: hsdp's loss within 3% at 1/200 of its average
    # bytes. Its bursts every H steps make no s/step promise against none.
    Claim("sparseloco", 1 / 200, "1/200", 0.03, over_the_link=False),
)

STREAMING = "streaming-diloco"
DILOCO = "diloco"
"""Streaming DiLoCo's peak bytes per sync are judged against plain DiLoCo's, which sends the
whole model at once."""


def targets(
    aggregates: Sequence[dict[str, Any]],
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    rows: Sequence[dict[str, Any]] | None = None,
) -> list[tuple[str, bool | None, str]]:
    """The product's targets, judged on the means over seeds: (claim, met, evidence with the
    spread), for every :data:`CLAIMS` scheme that ran, and for every Streaming DiLoCo scheme
    that ran beside ``diloco``. A scheme that misses the target loss in any seed has no mean
    time: a miss. ``configs``: each scheme's resolved ``deto train`` configuration (its
    summary's ``config``), where Streaming DiLoCo's fragment count is read. ``rows``: the
    per-run rows, for the check that every run sent the bytes ``deto plan`` predicts."""
    out = []
    configs = configs or {}
    for bw in dict.fromkeys(a["bandwidth"] for a in aggregates):
        group = {a["scheme"]: a for a in aggregates if a["bandwidth"] == bw}
        for claim in CLAIMS:
            if claim.scheme in group:
                out.extend(_scheme_targets(claim, group, bw))
        if DILOCO in group:
            out.extend(
                _streaming_target(spec, group, int(configs[spec]["fragments"]), bw)
                for spec in group
                if _parse_variant(spec)[0] == STREAMING
                and (configs.get(spec) or {}).get("fragments") is not None
            )
        if bw is not None and FLOOR in group:
            out.extend(_overlap_target(spec, group, bw) for spec in group if _overlaps(spec))
        if AUTO_SCHEME in group:
            out.append(_auto_target(group, rows or [], bw))
    if rows is not None:
        out.append(_prediction_target(rows))
    promised = [x["replicas_identical_runs"] for x in aggregates if x["replicas_identical_runs"][1]]
    same, total = sum(p[0] for p in promised), sum(p[1] for p in promised)
    out.append(
        (
            "replicas bitwise identical for every scheme that promises it",
            same == total if total else None,
            f"{same}/{total} runs",
        )
    )
    return out


def _scheme_targets(
    claim: Claim, group: dict[str, dict[str, Any]], bw: str | None
) -> list[tuple[str, bool | None, str]]:
    scheme, a, base = claim.scheme, group[claim.scheme], group.get(BASELINE)
    at = bw or "unshaped"
    b = a["bytes_vs_hsdp"]
    out: list[tuple[str, bool | None, str]] = [
        (
            f"{scheme} inter-node bytes/step <= {claim.bytes_label} of hsdp ({at})",
            None if b is None else b <= claim.max_bytes,
            f"{bench_report.fmt(b, '.4f')} of hsdp",
        )
    ]
    v = a["val_loss_vs_hsdp"]
    evidence = f"{bench_report.fmt(None if v is None else 100 * v, '+.1f')}% on the means"
    if base is not None:
        evidence += (
            f" ({scheme}: {_range(a['final_val_loss'], '.4f')}; "
            f"hsdp: {_range(base['final_val_loss'], '.4f')})"
        )
    out.append(
        (
            f"{scheme} final val loss within {claim.max_loss_excess:.0%} of hsdp ({at})",
            None if v is None else v <= claim.max_loss_excess,
            evidence,
        )
    )
    if claim.over_the_link and bw is not None and bw.lower().startswith("100mbit"):
        out.append(_time_target(group, a, at))
        n = a["step_time_vs_none"]
        out.append(
            (
                f"{scheme} s/step within 15% of none ({at})",
                None if n is None else n <= 0.15,
                f"{bench_report.fmt(None if n is None else 100 * n, '+.1f')}% on the means "
                f"({scheme}: {_range(a['step_time_s_median'], '.3f', ' s')})",
            )
        )
    return out


def _streaming_target(
    spec: str, group: dict[str, dict[str, Any]], fragments: int, bw: str | None
) -> tuple[str, bool | None, str]:
    """Streaming DiLoCo syncs one of its ``fragments`` at a time, so the most it sends in one
    step is at most ``1 / fragments`` of what DiLoCo sends in its sync of the whole model."""
    claim = f"{spec} peak bytes/sync <= 1/{fragments} of {DILOCO}'s ({bw or 'unshaped'})"
    mine, theirs = group[spec]["peak_mb_per_sync"], group[DILOCO]["peak_mb_per_sync"]
    if mine is None or theirs is None or not theirs["mean"]:
        return claim, None, "no peak bytes recorded"
    ratio = mine["mean"] / theirs["mean"]
    evidence = (
        f"{ratio:.4f} of {DILOCO}'s ({mine['mean']:.4f} against {theirs['mean']:.4f} MB; "
        f"1/{fragments} = {1 / fragments:.4f})"
    )
    return claim, ratio <= 1 / fragments, evidence


def _turns_overlap_on(change: tuple[str, bool, str]) -> bool:
    knob, _, value = change
    return knob == "overlap" and value.lower() in ("", "true")


def _overlaps(spec: str) -> bool:
    """Whether a ``--schemes`` entry is a variant with ``overlap`` on."""
    return any(_turns_overlap_on(c) for c in _parse_variant(spec)[1])


OVERLAP_SLACK = 1.1
"""An overlapped scheme's s/step may exceed the larger of compute and exchange by this factor."""


def _overlap_target(
    spec: str, group: dict[str, dict[str, Any]], bw: str
) -> tuple[str, bool | None, str]:
    """Overlap hides the exchange: s/step <= 1.1 x max(compute, exchange), where compute is
    ``none``'s s/step and exchange the node's bytes per step over the link's rate (the same
    for the variant without overlap, which pays their sum)."""
    from deto.netem import parse_bandwidth

    a, floor = group[spec], group[FLOOR]
    step, compute = a["step_time_s_median"]["mean"], floor["step_time_s_median"]["mean"]
    exchange = a["inter_node_mb_per_step"]["mean"] * 1e6 * 8 / parse_bandwidth(bw)
    bound = OVERLAP_SLACK * max(compute, exchange)
    evidence = (
        f"{step:.3f} s against {OVERLAP_SLACK} x max({compute:.3f} s compute ({FLOOR}), "
        f"{exchange:.3f} s exchange) = {bound:.3f} s"
    )
    scheme, *texts = spec.split("+")
    changes = _parse_variant(spec)[1]
    kept = [text for text, c in zip(texts, changes, strict=True) if not _turns_overlap_on(c)]
    plain = group.get("+".join([scheme, *kept]))
    if plain is not None:
        evidence += f"; without overlap: {plain['step_time_s_median']['mean']:.3f} s"
    claim = f"{spec} s/step <= {OVERLAP_SLACK} x max(compute, exchange) ({bw})"
    return claim, step <= bound, evidence


def _auto_target(
    group: dict[str, dict[str, Any]], rows: Sequence[dict[str, Any]], bw: str | None
) -> tuple[str, bool | None, str]:
    """``auto`` reaches the target no later than the fastest fixed preset that ran beside it
    (presets only: variants and the ``none`` control are not fixed presets)."""
    at = bw or "unshaped"
    claim = f"{AUTO_SCHEME} reaches the target no later than the best fixed preset ({at})"
    mine = group[AUTO_SCHEME]
    seeds = len(mine["seeds"])
    fixed = {s: a for s, a in group.items()
             if s not in (AUTO_SCHEME, FLOOR) and "+" not in s
             and a["reached_target"] == len(a["seeds"]) and a["time_to_target_s"]}  # fmt: skip
    picked = [r["auto_choice"] for r in rows
              if r["scheme"] == AUTO_SCHEME and r["bandwidth"] == bw]  # fmt: skip
    chose = "chose " + ", ".join(f"{c} ({picked.count(c)}x)" if len(picked) > 1 else str(c)
                                 for c in dict.fromkeys(picked))  # fmt: skip
    if mine["reached_target"] < seeds:
        return claim, False, f"{chose}; reached the target in {mine['reached_target']} of {seeds}"
    if not fixed:
        return claim, None, f"{chose}; no fixed preset reached the target"
    best = min(fixed, key=lambda s: fixed[s]["time_to_target_s"]["mean"])
    t, b = mine["time_to_target_s"]["mean"], fixed[best]["time_to_target_s"]["mean"]
    evidence = (f"{chose}: {t:.1f} s against {best}'s {b:.1f} s ({t / b:.2f}x, means over "
                f"{seeds} seed{'s' if seeds > 1 else ''})")  # fmt: skip
    return claim, t <= b, evidence


def _time_target(
    group: dict[str, dict[str, Any]], a: dict[str, Any], at: str
) -> tuple[str, bool | None, str]:
    claim = f"{a['scheme']} reaches the target in <= 1/3 of hsdp's time ({at})"
    seeds = len(a["seeds"])
    if a["reached_target"] < seeds:
        return claim, False, f"reached the target in {a['reached_target']} of {seeds} seeds"
    t = a["time_to_target_vs_hsdp"]
    evidence = f"{bench_report.fmt(t, '.2f')} x hsdp's time (ratio of the means"
    per_seed = a["time_to_target_vs_hsdp_per_seed"]
    evidence += f"; per seed {_range(per_seed, '.2f')})" if per_seed and per_seed["n"] > 1 else ")"
    floor, base = group.get(FLOOR), group.get(BASELINE)
    if floor and base:
        bound = ratio_of_means(
            [floor["step_time_s_median"]["mean"]], [base["step_time_s_median"]["mean"]]
        )
        evidence += (
            f" (a scheme learning like hsdp at none's s/step: {bench_report.fmt(bound, '.2f')})"
        )
    return claim, None if t is None else t <= 1 / 3, evidence


# --------------------------------------------------------------------------------------------
# Running


def plan(cfg: BenchConfig) -> list[tuple[str | None, int, str]]:
    """(bandwidth, seed, scheme) in run order: each seed's schemes back to back, so a drift of
    the machine during the bench touches every scheme of a seed alike."""
    return [(bw, seed, s) for bw in cfg.bandwidths for seed in cfg.seeds for s in cfg.schemes]


def run_bench(
    cfg: BenchConfig,
    *,
    runner: Callable[[list[str]], int] | None = None,
    on_run: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Run every scheme at every bandwidth and seed, then write results.json, report.md and
    plots. Raises :class:`provenance.DirtyTreeError` before running anything when ``cfg.out``
    is meant for committed results and the working tree is not clean (see ``allow_dirty``)."""
    provenance.check_committable(cfg.out, allow_dirty=cfg.allow_dirty)
    where = provenance.collect()
    run = runner or run_child
    cfg.out.mkdir(parents=True, exist_ok=True)
    todo = plan(cfg)
    runs: list[RunResult] = []
    for i, (bw, seed, scheme) in enumerate(todo):
        name = run_name(scheme, bw, seed)
        if on_run is not None:
            on_run(i, len(todo), name)
        out = cfg.out / "runs" / name
        code = run(train_argv(scheme, bw, seed, out, cfg.train_args))
        if code != 0:
            raise RuntimeError(f"run {name} failed with exit status {code} (its output is above)")
        runs.append(load_run(scheme, bw, seed, out))
    results = summarise(runs, cfg, where)
    write_outputs(results, cfg.out)
    return results


def summarise(runs: Sequence[RunResult], cfg: BenchConfig, where: dict[str, Any]) -> dict[str, Any]:
    """results.json's content: meta, per-run rows, per-scheme aggregates, targets, runs."""
    rows = derive(runs)
    aggregates = aggregate(rows)
    configs = {r.scheme: r.summary.get("config") or {} for r in runs}
    first = runs[0].summary
    meta = {
        "task": first["task"],
        "nodes": first["nodes"],
        "ranks_per_node": first["ranks_per_node"],
        "steps": first["steps"],
        "seeds": list(cfg.seeds),
        "params": first["params"],
        "versions": first["versions"],
        "git_sha": first["git_sha"],
        "machine": machine(),
        "schemes": list(cfg.schemes),
        "bandwidths": list(cfg.bandwidths),
        "train_args": list(cfg.train_args),
        "target": f"{target_loss(runs)[1]}, per seed",
        "provenance": where,
        "run_provenance": first.get("provenance"),
    }
    return {
        "meta": meta,
        "rows": rows,
        "aggregates": aggregates,
        "targets": [list(t) for t in targets(aggregates, configs, rows)],
        "runs": [run_entry(r) for r in runs],
    }


def write_outputs(results: dict[str, Any], out: Path) -> None:
    report.write_json(out / "results.json", results)
    (out / "report.md").write_text(bench_report.markdown(results))
    bench_report.plot(results, out)
