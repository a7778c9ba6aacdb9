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


def test_a_recorded_run_is_held_to_the_plan_with_none_as_its_compute() -> None:
    folder = RESULTS / "2026-11-28-cpu-2x2-25mbit"
    runs = json.loads((folder / "results.json").read_text())["runs"]
    hsdp, none = (next(r for r in runs if r["scheme"] == s and r["seed"] == 0)
                  for s in ("hsdp", "none"))  # fmt: skip
    check = plan_check.check_run(folder.name, hsdp, none)
    assert check.statistic == "median" and check.period == 1
    assert check.compute_s == none["summary"]["step_time_s_median"]
    assert check.predicted_s == pytest.approx(check.compute_s + 8 * 1_882_112 / 25e6)
    assert check.bytes_measured == check.bytes_predicted == 1_882_112
    row = plan_check.aggregate([check])[0]
    assert row["predicted_ratio"] == pytest.approx(check.predicted_s / check.measured_s)
    assert row["within_tolerance"]
