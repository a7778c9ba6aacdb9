"""`deto bench` beside `deto plan`: every committed run sent, per step, exactly the bytes the
plan predicts from the run's own configuration, and the report's target row says where not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deto import plan
from deto.bench import predicted, sweep

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SPARSELOCO = "2026-12-07-sparseloco-cpu-2x2-100mbit"


def _recorded() -> list[tuple[str, str, dict]]:
    """One summary per (results folder, scheme, task) of the committed results."""
    seen, out = set(), []
    for path in sorted(RESULTS.glob("*/results.json")):
        for run in json.loads(path.read_text())["runs"]:
            s = run["summary"]
            key = (path.parent.name, run["scheme"], s["config"]["task"])
            if key not in seen:
                seen.add(key)
                out.append((path.parent.name, run["scheme"], s))
    return out


@pytest.mark.parametrize(("folder", "scheme", "summary"), _recorded(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_the_plan_predicts_every_committed_runs_bytes(folder, scheme, summary) -> None:
    assert predicted.node_bytes_per_step(summary["config"]) == pytest.approx(
        summary["inter_node_bytes_sent_per_step"], abs=1e-6
    )


def _row(scheme: str, measured: float, predicted_mb: float | None) -> dict:
    return {"scheme": scheme, "bandwidth": None, "seed": 0,
            "inter_node_mb_per_step": measured, "predicted_mb_per_step": predicted_mb}


def test_the_target_row_names_a_run_the_plan_missed() -> None:
    claim, met, evidence = sweep._prediction_target(
        [_row("flexdemo", 0.0588, 0.0588), _row("diloco", 0.0753, 0.0752), _row("x", 1.0, None)]
    )
    assert claim == "inter-node bytes/step as deto plan predicts" and met is False
    assert evidence.startswith("1/2 runs exact") and "diloco (unshaped, seed 0)" in evidence
    assert sweep._prediction_target([_row("x", 1.0, None)])[1] is None


def _run(folder: str, scheme: str, seed: int = 0) -> dict:
    runs = json.loads((RESULTS / folder / "results.json").read_text())["runs"]
    return next(r for r in runs if r["scheme"] == scheme and r["seed"] == seed)


def test_a_recorded_runs_step_time_is_its_compute_plus_its_bytes_over_the_link() -> None:
    link = plan.Link(100e6)
    hsdp = predicted.recorded_run(_run(SPARSELOCO, "hsdp")["summary"]["config"])
    p = hsdp.predict(link, 0.25)
    assert p.period == 1 and p.step_s == pytest.approx(0.25 + 8 * 1_882_112 / 100e6)
    diloco = predicted.recorded_run(_run(SPARSELOCO, "diloco")["summary"]["config"])
    p = diloco.predict(link, 0.25)  # one full all-reduce every 25 steps, averaged over them
    assert p.period == 25 and p.peak_node_bytes == 1_882_112
    assert p.step_s == pytest.approx(0.25 + 8 * 1_882_112 / 25 / 100e6)
    assert diloco.node_bytes_per_step == pytest.approx(1_882_112 / 25)
