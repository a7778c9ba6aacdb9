"""The plan-check script's measured statistics, its tbf-bucket estimate and one recorded run
held to the plan; nothing is run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks import plan_check

from deto import plan

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_the_mean_counts_every_step_between_the_first_and_last_logged_ones() -> None:
    trace = {"step": [10, 20, 30], "wall_time_s": [5.0, 7.0, 10.0]}
    assert plan_check.mean_step_s(trace) == pytest.approx(0.25)


def test_the_bucket_sends_its_share_at_line_rate_and_the_rate_still_bounds_the_step() -> None:
    step = ((plan.Collective("all_gather", 100_000),),)
    flow = plan.Traffic((step,))  # one node of one rank, R = 2: 100 kB a step
    link = {"bandwidth_bps": 8e6, "burst_bytes": 40_000}  # 1 MB/s: 0.1 s, the bucket 0.04 s
    assert plan_check.burst_step_s(flow, 2, link, compute_s=0.5) == pytest.approx(0.5 + 0.06)
    assert plan_check.burst_step_s(flow, 2, link, compute_s=0.02) == pytest.approx(0.1)


def _run(folder: str, scheme: str) -> dict:
    runs = json.loads((RESULTS / folder / "results.json").read_text())["runs"]
    return next(r for r in runs if r["scheme"] == scheme and r["seed"] == 0)


def test_a_recorded_run_is_held_to_the_plan_with_none_as_its_compute() -> None:
    hsdp, none = (_run("2026-11-28-cpu-2x2-25mbit", s) for s in ("hsdp", "none"))
    check = plan_check.check_run("x", hsdp, none)
    assert check.statistic == "median" and check.period == 1
    assert check.compute_s == none["summary"]["step_time_s_median"]
    assert check.predicted_s == pytest.approx(check.compute_s + 8 * 1_882_112 / 25e6)
    assert check.bytes_measured == check.bytes_predicted == 1_882_112
    row = plan_check.aggregate([check])[0]
    assert row["predicted_ratio"] == pytest.approx(check.predicted_s / check.measured_s)
    assert row["within_tolerance"]


def test_a_scheme_with_a_sync_period_is_compared_by_its_mean() -> None:
    diloco = _run("2026-12-07-sparseloco-cpu-2x2-100mbit", "diloco")
    none = _run("2026-11-28-cpu-2x2", "none")  # a none run at the same link, from another folder
    check = plan_check.check_run("x", diloco, none)
    assert check.statistic == "mean" and check.period == 25
    assert check.measured_s == plan_check.mean_step_s(diloco["trace"])
    assert check.compute_s == plan_check.mean_step_s(none["trace"])
    assert check.predicted_s == pytest.approx(check.compute_s + 8 * 1_882_112 / 25 / 100e6)
