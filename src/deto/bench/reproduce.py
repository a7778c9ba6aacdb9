"""``deto bench --reproduce DIR``: re-run the runs a results.json records, and compare.

What must reproduce, and how closely:

* the resolved configuration: exactly (a changed preset or default makes the results stale);
* inter-node bytes: exactly (they depend on the code and the model, never on the machine);
* the training loss at the first logged step: to a tight relative tolerance, ten times
  looser on another machine. Different CPUs round differently in the last bits, but that
  early the losses still agree far closer than any code change that alters the numerics
  leaves them;
* the training loss at every later logged step: to the same tolerance on the machine that
  recorded it (same CPU, vector extensions, torch build, threads and packages: the run is
  deterministic). On another machine the sparse schemes' discrete choices (top-k, sign) amplify
  the rounding differences within a few dozen steps (FlexDeMo on the default task: none at step
  10, 2e-5 at step 20, 4e-4 at step 30), so there a larger difference is expected;
* the final validation loss (runs taken to the end): bit for bit (to the tolerance) on the
  recording machine; elsewhere inside the range a new seed would fall in, judged from the
  recorded seeds (:func:`deto.bench.stats.prediction_interval`), since a different CPU gives a
  different draw;
* timings, as ratios to the recorded ones within a factor: reported, never fatal, because they
  follow the machine and its load.

A mismatch of the others is a real one: the command exits with status 1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deto.bench import sweep
from deto.bench.stats import prediction_interval
from deto.proc.processes import run_child
from deto.replicators.options import check_knob, knob
from deto.run import provenance, report

logger = logging.getLogger(__name__)

LOSS_RTOL = 1e-5
"""Relative tolerance of training and final losses. Measured on the default task at step 10:
another CPU moved hsdp's training loss by 2e-9 and FlexDeMo's by 0, a 1-ulp change of every
initial weight FlexDeMo's by 9e-8; FlexDeMo with --topk 15 instead of 14 moves it by 6e-4."""
FIRST_STEP_RTOL_ELSEWHERE = 1e-4
"""Relative tolerance of the first logged training loss on another (or an unrecorded) machine.
AVX2 instead of AVX-512 (torch's CPU capability) moved FlexDeMo's loss at step 10 by 1.3e-5 on
4 nodes x 1 rank, past :data:`LOSS_RTOL`; one more coefficient per block (the code change
above) still moves it six times further than this."""
TIME_TOLERANCE = 0.25
"""Timings pass within a factor 1 + this of the recorded ones, either way."""
NOT_COMPARED = frozenset({"out", "resume", "stop_at"})
"""Config keys that say where and how far a run went, not what it computes."""

PASS, FAIL, WARN, NA, EXPECTED = "pass", "FAIL", "warn", "n/a", "expected"


class RecordError(ValueError):
    """The record cannot be reproduced as asked: missing, unreadable, or lacking a run."""


@dataclass(frozen=True)
class ReproduceConfig:
    """Which recorded runs to re-run, how far, and how closely they must match."""

    recorded: Path
    out: Path
    schemes: tuple[str, ...] | None = None  # None: every recorded scheme
    seeds: tuple[int, ...] | None = None  # None: every recorded seed
    bandwidths: tuple[str | None, ...] | None = None  # None: each run's recorded link
    steps_fraction: float = knob(
        1.0, "re-run only the first F of every run's steps", low=0.0, low_open=True, high=1.0,
        metavar="F",
    )
    loss_rtol: float = LOSS_RTOL
    time_tolerance: float = TIME_TOLERANCE

    def __post_init__(self) -> None:
        check_knob(steps_fraction_field(), self.steps_fraction)


def steps_fraction_field() -> dataclasses.Field[Any]:
    """The declaration of ``steps_fraction`` (``--steps-fraction``): its bounds and help."""
    return next(f for f in dataclasses.fields(ReproduceConfig) if f.name == "steps_fraction")


@dataclass(frozen=True)
class Check:
    """One row of the comparison table."""

    run: str
    what: str
    recorded: str
    now: str
    tolerance: str
    status: str
    note: str = ""


# --------------------------------------------------------------------------------------------
# Reading what was recorded


def load_results(path: Path) -> dict[str, Any]:
    """results.json of a bench folder (or the file itself); :class:`RecordError` if unusable."""
    file = path / "results.json" if path.is_dir() else path
    try:
        results = json.loads(file.read_text())
    except FileNotFoundError:
        raise RecordError(f"No results.json in {path}") from None
    except ValueError as exc:
        raise RecordError(f"Unreadable {file}: {exc}") from None
    if not isinstance(results, dict) or not results.get("runs"):
        raise RecordError(f"{file} records no runs")
    return results


def recorded_runs(results: Mapping[str, Any]) -> list[sweep.RunResult]:
    return [sweep.run_from_entry(e) for e in results["runs"]]


def select(
    runs: Sequence[sweep.RunResult], schemes: Sequence[str] | None, seeds: Sequence[int] | None
) -> list[sweep.RunResult]:
    """The recorded runs of ``schemes`` and ``seeds`` (``None``: all); :class:`RecordError` if
    a requested one was not recorded."""
    for name, wanted, have in (
        ("schemes", schemes, {r.scheme for r in runs}),
        ("seeds", seeds, {r.seed for r in runs}),
    ):
        missing = sorted(set(wanted or ()) - have, key=str)
        if missing:
            raise RecordError(
                f"Invalid --{name}: {', '.join(map(str, missing))} not recorded "
                f"(recorded: {', '.join(map(str, sorted(have, key=str)))})"
            )
    return [
        r
        for r in runs
        if (schemes is None or r.scheme in schemes) and (seeds is None or r.seed in seeds)
    ]


def stop_step(recorded: sweep.RunResult, fraction: float) -> int | None:
    """The step a ``fraction`` prefix of ``recorded`` stops at (a logged step, so the last
    training loss is recorded), or ``None`` for the whole run."""
    steps = int(recorded.summary["steps"])
    every = int(recorded.summary.get("config", {}).get("log_every") or 1)
    stop = math.ceil(math.ceil(fraction * steps) / every) * every
    return None if stop >= steps else stop


# --------------------------------------------------------------------------------------------
# Comparing one run


def config_differences(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: recorded -> now`` for every setting that changes what a run computes.

    A setting the recorded run predates compares with its default; one whose default is
    resolved per run (``None``: the model, a replicator knob) is not compared, since what the
    old code did there is not on record (a change it makes shows in the losses and bytes).
    """
    from deto.run.config import FIELDS, KNOBS

    out = []
    for key, value in now.items():
        if key in NOT_COMPARED:
            continue
        if key in recorded:
            before = recorded[key]
            if before is None and key in KNOBS:
                continue  # recorded before knobs resolved: unset meant the replicator's default
        elif key in FIELDS and FIELDS[key].default is not None:
            before = FIELDS[key].default
        else:
            continue
        if before != value:
            out.append(f"{key}: {before!r} -> {value!r}")
    return out


def _bytes_at(run: sweep.RunResult, step: int) -> float:
    """Cumulative inter-node bytes one node sent by ``step``: from the trace when recorded,
    else from the per-step mean (results written before traces were kept)."""
    for r in run.records:
        if r["step"] == step and "inter_node_bytes_sent_total" in r:
            return float(r["inter_node_bytes_sent_total"])
    return float(run.summary["inter_node_bytes_sent_per_step"]) * step


def _losses(run: sweep.RunResult, until: int) -> dict[int, float]:
    return {
        int(r["step"]): float(r["train_loss"])
        for r in run.records
        if "train_loss" in r and r["step"] <= until
    }


def _ratio_check(
    name: str,
    what: str,
    recorded: float | None,
    now: float | None,
    tol: float,
    unit: str,
    spec: str,
) -> Check:
    tolerance = f"x{1 / (1 + tol):.2f}–x{1 + tol:.2f}"
    if recorded is None or now is None:
        status = PASS if recorded is None and now is None else WARN
        return Check(
            name,
            what,
            _num(recorded, spec, unit),
            _num(now, spec, unit),
            tolerance,
            status,
            "" if status == PASS else "reached in one of the two only",
        )
    ratio = now / recorded if recorded else math.inf
    ok = 1 / (1 + tol) <= ratio <= 1 + tol
    return Check(
        name,
        what,
        _num(recorded, spec, unit),
        f"{_num(now, spec, unit)} (x{ratio:.2f})",
        tolerance,
        PASS if ok else WARN,
        "" if ok else "timings follow the machine and its load",
    )


def _num(v: float | None, spec: str, unit: str = "") -> str:
    return "not reached" if v is None else f"{format(v, spec)}{unit}"


def compare_run(
    recorded: sweep.RunResult,
    now: sweep.RunResult,
    *,
    seed_values: Sequence[float] = (),
    recorded_row: Mapping[str, Any] | None = None,
    same_link: bool = True,
    same_machine: bool | None = None,
    loss_rtol: float = LOSS_RTOL,
    time_tolerance: float = TIME_TOLERANCE,
) -> list[Check]:
    """The checks of one re-run against its record.

    ``seed_values``: the recorded final val losses of this scheme and link over all seeds (the
    spread a final loss is judged against). ``recorded_row``: the recorded derived row (time
    to target and its target loss). ``same_link``: timings are compared only over the link
    they were measured on. ``same_machine``: whether the recorded provenance matches this
    machine in everything that changes rounding (``None``: not recorded); only then must the
    losses past the first logged step match too, and the first to ``loss_rtol`` rather than
    :data:`FIRST_STEP_RTOL_ELSEWHERE`.
    """
    name = sweep.run_name(recorded.scheme, recorded.bandwidth, recorded.seed)
    checks = []
    changed = config_differences(recorded.summary.get("config", {}), now.summary.get("config", {}))
    checks.append(
        Check(
            name,
            "config",
            "as recorded",
            "; ".join(changed) or "same",
            "exact",
            FAIL if changed else PASS,
            "the results are stale" if changed else "",
        )
    )

    last = int(now.summary["steps"])
    at = max((int(r["step"]) for r in now.records if r["step"] <= last), default=last)
    was, got = _bytes_at(recorded, at), _bytes_at(now, at)
    checks.append(
        Check(
            name,
            f"inter-node bytes by step {at}",
            f"{was:,.0f} ({was / at:,.1f}/step)",
            f"{got:,.0f} ({got / at:,.1f}/step)",
            "exact",
            PASS if was == got else FAIL,
        )
    )

    rec, cur = _losses(recorded, last), _losses(now, last)
    common = sorted(rec.keys() & cur.keys())
    if not common:
        checks.append(
            Check(
                name,
                "train loss prefix",
                "—",
                "—",
                f"rel. {loss_rtol:.0e}",
                FAIL,
                "no logged training loss in the prefix of both runs",
            )
        )
    else:
        checks.append(
            _loss_check(
                name,
                f"train loss, step {common[0]} (first logged)",
                rec,
                cur,
                common[:1],
                loss_rtol if same_machine is True else max(loss_rtol, FIRST_STEP_RTOL_ELSEWHERE),
                must_match=True,
            )
        )
    if len(common) > 1:
        checks.append(
            _loss_check(
                name,
                f"train loss, steps {common[0]}–{common[-1]} ({len(common)} logged)",
                rec,
                cur,
                common,
                loss_rtol,
                must_match=same_machine is True,
            )
        )

    full = last >= int(recorded.summary["steps"])
    checks.append(
        _final_check(name, recorded, now, seed_values, loss_rtol, full, same_machine is True)
    )

    if not same_link:
        checks.append(
            Check(name, "timings", "—", "—", "—", NA, "not measured over the recorded link")
        )
        return checks
    checks.append(
        _ratio_check(
            name,
            "s/step (median)",
            recorded.summary.get("step_time_s_median"),
            now.summary.get("step_time_s_median"),
            time_tolerance,
            " s",
            ".3f",
        )
    )
    if full and recorded_row is not None:
        target = recorded_row.get("target_val_loss")
        t_now = sweep.time_to_target(now.records, target) if target is not None else None
        checks.append(
            _ratio_check(
                name,
                "time to target",
                recorded_row.get("time_to_target_s"),
                t_now,
                time_tolerance,
                " s",
                ".1f",
            )
        )
    return checks


def _loss_check(
    name: str,
    what: str,
    rec: Mapping[int, float],
    cur: Mapping[int, float],
    steps: Sequence[int],
    rtol: float,
    *,
    must_match: bool,
) -> Check:
    """The largest relative difference over ``steps``; beyond ``rtol`` a failure if the losses
    ``must_match``, else a difference expected from another machine's rounding."""
    worst = max(steps, key=lambda s: abs(cur[s] - rec[s]) / abs(rec[s]))
    rel = abs(cur[worst] - rec[worst]) / abs(rec[worst])
    status, note = PASS, ""
    if rel > rtol:
        status = FAIL if must_match else EXPECTED
        note = "" if must_match else "another (or unrecorded) machine: rounding differences grow"
    return Check(
        name,
        what,
        f"{rec[worst]:.10f} at step {worst}",
        f"{cur[worst]:.10f} (rel. {rel:.1e})",
        f"rel. {rtol:.0e}",
        status,
        note,
    )


def _final_check(
    name: str,
    recorded: sweep.RunResult,
    now: sweep.RunResult,
    seed_values: Sequence[float],
    rtol: float,
    full: bool,
    same_machine: bool,
) -> Check:
    was, got = recorded.summary.get("final_val_loss"), now.summary.get("final_val_loss")
    if not full:
        return Check(name, "final val loss", _num(was, ".4f"), "—", "—", NA, "a prefix run")
    if was is None or got is None:
        return Check(
            name,
            "final val loss",
            _num(was, ".4f"),
            _num(got, ".4f"),
            "—",
            FAIL,
            "one of the runs has no validation loss",
        )
    if got == was or abs(got - was) <= rtol * abs(was):
        return Check(name, "final val loss", f"{was:.4f}", f"{got:.4f}", f"rel. {rtol:.0e}", PASS)
    if same_machine:
        return Check(
            name,
            "final val loss",
            f"{was:.6f}",
            f"{got:.6f}",
            f"rel. {rtol:.0e}",
            FAIL,
            "the recording machine: the run should repeat bit for bit",
        )
    interval = prediction_interval(seed_values)
    if interval is None:
        return Check(
            name,
            "final val loss",
            f"{was:.4f}",
            f"{got:.4f}",
            "one recorded seed: no spread",
            NA,
            "record several seeds (--seeds) to judge a final loss",
        )
    low, high = interval
    ok = low <= got <= high
    return Check(
        name,
        "final val loss",
        f"{was:.4f} (seeds: {min(seed_values):.4f}–{max(seed_values):.4f})",
        f"{got:.4f}",
        f"{low:.4f}–{high:.4f}",
        PASS if ok else FAIL,
        "" if ok else "outside what a new seed would give",
    )


# --------------------------------------------------------------------------------------------
# The whole reproduction


def reproduce(
    cfg: ReproduceConfig,
    *,
    runner: Callable[[list[str]], int] | None = None,
    on_run: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Re-run the selected recorded runs into ``cfg.out``; return the checks, the provenance
    differences, and whether everything that must reproduce did (``ok``)."""
    results = load_results(cfg.recorded)
    meta = results["meta"]
    recorded = recorded_runs(results)
    chosen = select(recorded, cfg.schemes, cfg.seeds)
    if runner is None and cfg.bandwidths is None:
        _check_links({r.bandwidth for r in chosen} - {None})
    run = runner or run_child
    rows = {
        (r["scheme"], r["bandwidth"], r.get("seed", meta.get("seed", 0))): r
        for r in results["rows"]
    }
    done: dict[tuple[str, str | None, int, int | None], sweep.RunResult] = {}
    checks: list[Check] = []
    first_now: sweep.RunResult | None = None
    for i, rec in enumerate(chosen):
        links = cfg.bandwidths if cfg.bandwidths is not None else (rec.bandwidth,)
        stop = stop_step(rec, cfg.steps_fraction)
        for bw in links:
            key = (rec.scheme, bw, rec.seed, stop)
            if key not in done:
                name = sweep.run_name(rec.scheme, bw, rec.seed)
                if on_run is not None:
                    on_run(i, len(chosen), name)
                extra = ["--stop-at", str(stop)] if stop is not None else []
                out = cfg.out / "runs" / name
                argv = sweep.train_argv(
                    rec.scheme, bw, rec.seed, out, [*meta.get("train_args", []), *extra]
                )
                code = run(argv)
                if code != 0:
                    raise RuntimeError(
                        f"run {name} failed with exit status {code} (its output is above)"
                    )
                done[key] = sweep.load_run(rec.scheme, bw, rec.seed, out)
            now = done[key]
            first_now = first_now or now
            spread = [
                r.summary["final_val_loss"]
                for r in recorded
                if r.scheme == rec.scheme
                and r.bandwidth == rec.bandwidth
                and r.summary.get("final_val_loss") is not None
            ]
            checks += compare_run(
                rec,
                now,
                seed_values=spread,
                recorded_row=rows.get((rec.scheme, rec.bandwidth, rec.seed)),
                same_link=bw == rec.bandwidth,
                same_machine=same_machine(rec, now),
                loss_rtol=cfg.loss_rtol,
                time_tolerance=cfg.time_tolerance,
            )
    was = (chosen[0].summary.get("provenance") or meta.get("run_provenance")) if chosen else None
    here = first_now.summary.get("provenance") if first_now else None
    outcome = {
        "recorded": str(cfg.recorded),
        "steps_fraction": cfg.steps_fraction,
        "checks": [asdict(c) for c in checks],
        "provenance_differences": (
            None
            if was is None or here is None
            else [list(d) for d in provenance.differences(was, here)]
        ),
        "provenance": here,
        "ok": not any(c.status == FAIL for c in checks),
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    report.write_json(cfg.out / "reproduce.json", outcome)
    (cfg.out / "reproduce.md").write_text(markdown(outcome))
    return outcome


def _check_links(links: set[str | None]) -> None:
    """Re-running over the recorded emulated links needs what emulating them needs."""
    if not links:
        return
    from deto import netem
    try:
        netem.check_requirements()
    except RuntimeError as exc:
        raise RecordError(
            f"the recorded runs used emulated links ({', '.join(sorted(map(str, links)))}): {exc}; "
            "or pass --bandwidth none to re-run them unshaped (timings are then not compared)"
        ) from None


def same_machine(recorded: sweep.RunResult, now: sweep.RunResult) -> bool | None:
    """Whether two runs' provenance agrees in everything that changes rounding (``None``: the
    record predates provenance)."""
    was, here = recorded.summary.get("provenance"), now.summary.get("provenance")
    if was is None or here is None:
        return None
    return not any(what in provenance.NUMERIC for what, _, _ in provenance.differences(was, here))


def expected_differences(diffs: Sequence[Sequence[Any]] | None) -> list[str]:
    """What the machine differences explain, in words."""
    if diffs is None:
        return [
            "The recorded runs carry no provenance (recorded before it was kept): whether "
            "they ran on another CPU or torch build is unknown, so losses past the first logged "
            "step may differ ('expected' above) and final losses are judged on the seed spread."
        ]
    if not diffs:
        return [
            "Same CPU, vector extensions, torch build, threads and packages as recorded: "
            "the losses should match bit for bit, only timings may move."
        ]
    lines = ["Differences from the recorded machine:", ""]
    lines += [f"- {what}: recorded {a!r}, now {b!r}" for what, a, b in diffs]
    numeric = [what for what, _, _ in diffs if what in provenance.NUMERIC]
    lines.append("")
    if numeric:
        lines.append(
            "Expected from these: losses differ in their last digits, which the sparse schemes' "
            "top-k and sign amplify within a few dozen steps, so past the first logged step their "
            "losses differ ('expected' above) and their final losses land elsewhere within the "
            "seed spread; bytes never change; timings follow the machine."
        )
    else:
        lines.append(
            "Expected from these: timings differ; losses and bytes should match bit for bit."
        )
    return lines


def markdown(outcome: Mapping[str, Any]) -> str:
    """The comparison table and what the machine differences explain."""
    lines = [f"# deto bench --reproduce {outcome['recorded']}", ""]
    if outcome["steps_fraction"] < 1:
        lines += [f"A prefix: the first {outcome['steps_fraction']:.0%} of every run's steps.", ""]
    lines += ["| run | check | recorded | now | tolerance | result |", "|---|---|---|---|---|---|"]
    for c in outcome["checks"]:
        result = c["status"] + (f": {c['note']}" if c["note"] else "")
        lines.append(
            "| "
            + " | ".join([c["run"], c["what"], c["recorded"], c["now"], c["tolerance"], result])
            + " |"
        )
    lines += [""] + expected_differences(outcome["provenance_differences"]) + [""]
    count = {
        status: sum(c["status"] == status for c in outcome["checks"])
        for status in (FAIL, WARN, EXPECTED)
    }
    if count[FAIL]:
        lines.append(f"**{count[FAIL]} mismatch(es)**: the recorded results do not reproduce.")
    else:
        lines.append(
            "Everything that must reproduce did."
            + (
                f" {count[EXPECTED]} difference(s) expected on this machine."
                if count[EXPECTED]
                else ""
            )
            + (f" {count[WARN]} timing(s) outside tolerance." if count[WARN] else "")
        )
    lines.append("")
    return "\n".join(lines)
