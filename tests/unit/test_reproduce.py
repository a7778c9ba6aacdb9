"""deto bench --reproduce: which checks pass or fail, with fake runs (no training)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from deto.bench import reproduce, sweep
from deto.bench.reproduce import EXPECTED, FAIL, NA, PASS, WARN

STEPS = 20
CONFIG = {
    "scheme": "flexdemo",
    "steps": STEPS,
    "log_every": 2,
    "seed": 0,
    "topk": 14,
    "out": "x",
    "stop_at": None,
}


def _run(
    seed: int = 0,
    *,
    final: float = 2.0,
    steps: int = STEPS,
    loss_shift: float = 0.0,
    sent: int = 100,
    step_time: float = 0.2,
    config: dict | None = None,
) -> sweep.RunResult:
    records = []
    for s in range(2, steps + 1, 2):
        r = {
            "step": s,
            "train_loss": 4.0 - s / 10 + loss_shift,
            "wall_time_s": s * step_time,
            "inter_node_bytes_sent_total": s * sent,
        }
        if s % 10 == 0:
            r["val_loss"] = final + (STEPS - s) / 10
        records.append(r)
    summary = {
        "steps": steps,
        "config": {**CONFIG, "seed": seed, **(config or {})},
        "final_val_loss": records[-1].get("val_loss"),
        "inter_node_bytes_sent_per_step": float(sent),
        "step_time_s_median": step_time,
    }
    return sweep.RunResult("flexdemo", "100mbit", seed, summary, records)


def _status(checks: list[reproduce.Check]) -> dict[str, str]:
    """Check name (without its step numbers) -> status."""
    names = {
        "train loss, step ": "train loss, first step",
        "train loss, steps": "train loss, all steps",
    }
    out = {}
    for c in checks:
        what = next((v for k, v in names.items() if c.what.startswith(k)), c.what.split(" by ")[0])
        out[what] = c.status
    return out


def test_prefix_steps():
    run = _run()
    assert reproduce.stop_step(run, 1.0) is None
    assert reproduce.stop_step(run, 0.1) == 2
    assert reproduce.stop_step(run, 0.25) == 6  # 5 steps, rounded up to a logged step
    bounds = r"Invalid steps_fraction: 0 \(must be a number in \(0.0, 1.0\]\)"
    with pytest.raises(ValueError, match=bounds):
        reproduce.ReproduceConfig(recorded=Path("."), out=Path("."), steps_fraction=0)


def test_an_identical_rerun_passes_everything():
    checks = reproduce.compare_run(
        _run(),
        _run(),
        seed_values=[2.0],
        recorded_row={"target_val_loss": 2.5, "time_to_target_s": 3.0},
    )
    assert _status(checks) == {
        "config": PASS,
        "inter-node bytes": PASS,
        "train loss, first step": PASS,
        "train loss, all steps": PASS,
        "final val loss": PASS,
        "s/step (median)": PASS,
        "time to target": PASS,
    }


def test_changed_bytes_prefix_or_config_are_real_mismatches():
    base = _run()
    assert _status(reproduce.compare_run(base, _run(sent=101)))["inter-node bytes"] == FAIL
    assert (
        _status(reproduce.compare_run(base, _run(loss_shift=1e-3)))["train loss, first step"]
        == FAIL
    )
    assert (
        _status(reproduce.compare_run(base, _run(loss_shift=1e-7)))["train loss, first step"]
        == PASS
    )
    changed = reproduce.compare_run(base, _run(config={"topk": 16}))
    assert changed[0].status == FAIL and changed[0].now == "topk: 14 -> 16"
    # a key the record predates compares with its default
    assert reproduce.config_differences({"seed": 0}, {"seed": 0, "perturb_init_ulp": 0}) == []
    assert reproduce.config_differences({"seed": 0}, {"seed": 0, "perturb_init_ulp": 1}) == [
        "perturb_init_ulp: 0 -> 1"
    ]


def test_the_final_loss_is_judged_against_the_recorded_seeds():
    seeds = [2.0, 2.02, 1.98]
    inside = reproduce.compare_run(_run(), _run(final=2.03), seed_values=seeds)
    assert _status(inside)["final val loss"] == PASS
    outside = reproduce.compare_run(_run(), _run(final=2.3), seed_values=seeds)
    (check,) = [c for c in outside if c.what == "final val loss"]
    assert check.status == FAIL and check.note == "outside what a new seed would give"
    one_seed = reproduce.compare_run(_run(), _run(final=2.03), seed_values=[2.0])
    assert _status(one_seed)["final val loss"] == NA
    prefix = reproduce.compare_run(_run(), _run(steps=6))
    assert (
        _status(prefix)["final val loss"] == NA and _status(prefix)["train loss, all steps"] == PASS
    )


def test_past_the_first_step_losses_must_match_only_on_the_recording_machine():
    drifted = _run(final=2.01)
    for r in drifted.records:
        r["train_loss"] += 1e-3 * (r["step"] > 2)  # the first logged step still matches

    def loss_checks(same_machine):
        checks = reproduce.compare_run(
            _run(), drifted, seed_values=[2.0, 2.02], same_machine=same_machine
        )
        return [(c.what, c.status) for c in checks if "loss" in c.what]

    assert loss_checks(None) == [
        ("train loss, step 2 (first logged)", PASS),
        ("train loss, steps 2–20 (10 logged)", EXPECTED),
        ("final val loss", PASS),
    ]
    assert loss_checks(True) == [
        ("train loss, step 2 (first logged)", PASS),
        ("train loss, steps 2–20 (10 logged)", FAIL),
        ("final val loss", FAIL),
    ]


def test_the_first_step_is_held_ten_times_looser_on_another_machine():
    def first(shift, same_machine):
        checks = reproduce.compare_run(_run(), _run(loss_shift=shift), same_machine=same_machine)
        return _status(checks)["train loss, first step"]

    # 4.0 - 0.2 at step 2: a shift of 1.9e-4 is 5e-5 relative, 3.8e-3 is 1e-3
    assert first(1.9e-4, True) == FAIL
    assert first(1.9e-4, False) == PASS and first(1.9e-4, None) == PASS
    assert first(3.8e-3, False) == FAIL


def test_same_machine_compares_what_changes_rounding():
    where = {
        "cpu": {"model": "A", "vector_flags": ["avx2"], "usable_cores": 2},
        "torch": {"version": "2"},
    }
    other_cores = {**where, "cpu": {**where["cpu"], "usable_cores": 8}}
    other_cpu = {**where, "cpu": {**where["cpu"], "vector_flags": ["avx2", "avx512f"]}}
    a, b = _run(), _run()
    assert reproduce.same_machine(a, b) is None
    a.summary["provenance"], b.summary["provenance"] = where, other_cores
    assert reproduce.same_machine(a, b) is True  # cores change timings, not rounding
    b.summary["provenance"] = other_cpu
    assert reproduce.same_machine(a, b) is False


def test_timings_outside_tolerance_warn_and_other_links_are_not_compared():
    slow = reproduce.compare_run(
        _run(), _run(step_time=0.3), recorded_row={"target_val_loss": 2.5, "time_to_target_s": 3.0}
    )
    assert _status(slow)["s/step (median)"] == WARN and _status(slow)["time to target"] == WARN
    other = reproduce.compare_run(_run(), _run(step_time=0.3), same_link=False)
    assert _status(other)["timings"] == NA


def _fake_train(argv: list[str], *, doctor: float = 0.0) -> int:
    """A `deto train` that writes the outputs of a run, deterministic in scheme and seed."""
    out = Path(argv[argv.index("--out") + 1])
    seed = int(argv[argv.index("--seed") + 1])
    stop = int(argv[argv.index("--stop-at") + 1]) if "--stop-at" in argv else STEPS
    run = _run(seed, final=2.0 + seed / 100, loss_shift=doctor)
    run.records = [r for r in run.records if r["step"] <= stop]
    run.summary.update(
        steps=stop,
        final_val_loss=run.summary["final_val_loss"] if stop == STEPS else None,
        scheme="flexdemo",
        task="lm",
        nodes=2,
        ranks_per_node=2,
        params=10,
        val_loss=[[r["step"], r["val_loss"]] for r in run.records if "val_loss" in r],
        full_sync_bytes_per_step=1000,
        replicas_identical=True,
        wall_time_s=4.0,
        link=None,
        versions={},
        git_sha=None,
    )
    run.summary["config"]["stop_at"] = None if stop == STEPS else stop
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run.records))
    (out / "summary.json").write_text(json.dumps(run.summary))
    return 0


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    out = tmp_path / "recorded"
    sweep.run_bench(
        sweep.BenchConfig(schemes=("flexdemo",), bandwidths=("100mbit",), seeds=(0, 1, 2), out=out),
        runner=_fake_train,
    )
    return out


def test_reproduce_reruns_the_recorded_runs_and_passes(recorded, tmp_path):
    calls = []

    def runner(argv):
        calls.append(argv)
        return _fake_train(argv)

    cfg = reproduce.ReproduceConfig(
        recorded=recorded, out=tmp_path / "again", seeds=(0, 2), steps_fraction=0.5
    )
    outcome = reproduce.reproduce(cfg, runner=runner)
    assert outcome["ok"]
    assert [c[c.index("--seed") + 1] for c in calls] == ["0", "2"]
    assert all(
        c[c.index("--stop-at") + 1] == "10" and c[-2:] == ["--bandwidth", "100mbit"] for c in calls
    )
    assert (
        "Everything that must reproduce did." in (tmp_path / "again" / "reproduce.md").read_text()
    )


def test_reproduce_of_a_doctored_record_fails_with_a_table(recorded, tmp_path, monkeypatch, capsys):
    from deto import cli

    results = json.loads((recorded / "results.json").read_text())
    doctored = copy.deepcopy(results)
    run = doctored["runs"][1]  # seed 1
    run["trace"]["train_loss"][0] += 0.01
    run["trace"]["inter_node_bytes_sent_total"][-1] += 4
    (recorded / "results.json").write_text(json.dumps(doctored))
    monkeypatch.setattr(reproduce, "run_child", _fake_train)
    code = cli.main(
        [
            "bench",
            "--reproduce",
            str(recorded),
            "--seeds",
            "1",
            "--bandwidth",
            "none",
            "--out",
            str(tmp_path / "again"),
        ]
    )
    assert code == 1
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| 100mbit-flexdemo-seed1 |")]
    failed = [line.split(" | ")[1] for line in rows if "| FAIL" in line]
    assert failed == ["inter-node bytes by step 20", "train loss, step 2 (first logged)"]
    assert "| timings | — | — | — | n/a: not measured over the recorded link |" in table
    assert "**2 mismatch(es)**" in table


def test_reproduce_refuses_what_was_not_recorded(recorded, capsys):
    from deto.cli import main

    assert main(["bench", "--reproduce", str(recorded), "--schemes", "hsdp"]) == 2
    assert "Invalid --schemes: hsdp not recorded (recorded: flexdemo)" in capsys.readouterr().err
    assert main(["bench", "--reproduce", str(recorded.parent / "nothing")]) == 2
    assert "No results.json in" in capsys.readouterr().err
