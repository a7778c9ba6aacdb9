"""``deto bench --reproduce`` end to end: a tiny recorded bench, re-run for real, and a doctored
record that must fail."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# 8 steps, warm-up 2: a prefix of 4 steps runs past the warm-up on the 8-step cosine schedule
TINY = [
    "--ranks-per-node",
    "1",
    "--steps",
    "8",
    "--warmup",
    "2",
    "--eval-every",
    "4",
    "--log-every",
    "2",
    "--d-model",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--batch-size",
    "4",
    "--seq-len",
    "16",
    "--eval-samples",
    "16",
]
TIMEOUT_S = 300


def deto(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    }
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "deto", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("recorded") / "bench"
    proc = deto("bench", "--schemes", "flexdemo", "--out", str(out), "-q", "--", *TINY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def rerun(
    recorded: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("again") / "reproduce"
    return out, deto(
        "bench", "--reproduce", str(recorded), "--steps-fraction", "0.5", "--out", str(out), "-q"
    )


def _rows(table: str) -> dict[str, list[str]]:
    """Check name -> its cells, for the table rows of the one run."""
    rows = [
        line.strip("|").split(" | ")
        for line in table.splitlines()
        if line.startswith("| unshaped-")
    ]
    return {cells[1].strip(): [c.strip() for c in cells] for cells in rows}


def test_a_recorded_run_reproduces_bit_for_bit_on_its_machine(recorded, rerun):
    out, proc = rerun
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(proc.stdout)
    assert rows["config"][-1] == "pass"
    assert rows["inter-node bytes by step 4"][-1] == "pass"
    first, prefix = (
        rows["train loss, step 2 (first logged)"],
        rows["train loss, steps 2–4 (2 logged)"],
    )
    assert first[-1] == prefix[-1] == "pass" and prefix[3].endswith("(rel. 0.0e+00)")
    assert rows["final val loss"][-1] == "n/a: a prefix run"
    assert "Same CPU, vector extensions, torch build, threads and packages" in proc.stdout
    # --stop-at 4 kept the 8-step schedule: the prefix is the recorded run's, bit for bit
    again = json.loads((out / "runs" / "unshaped-flexdemo-seed0" / "summary.json").read_text())
    whole = json.loads((recorded / "results.json").read_text())["runs"][0]["summary"]
    assert again["steps"] == 4 and again["config"]["stop_at"] == 4
    assert again["train_loss"] == whole["train_loss"][:2]
    assert again["provenance"]["command"][:2] == ["deto", "train"]


def test_a_doctored_record_fails_with_a_clear_table(recorded, rerun, tmp_path, monkeypatch, capsys):
    from deto import cli
    from deto.bench import reproduce
    results = json.loads((recorded / "results.json").read_text())
    trace = results["runs"][0]["trace"]
    trace["train_loss"][0] *= 1.01
    trace["inter_node_bytes_sent_total"][1] += 1
    doctored = tmp_path / "doctored"
    doctored.mkdir()
    (doctored / "results.json").write_text(json.dumps(results))
    made = rerun[0] / "runs"

    def same_rerun(argv: list[str]) -> int:  # the real re-run above, not trained again
        out = Path(argv[argv.index("--out") + 1])
        shutil.copytree(made / out.name, out)
        return 0

    monkeypatch.setattr(reproduce, "run_child", same_rerun)
    code = cli.main(
        [
            "bench",
            "--reproduce",
            str(doctored),
            "--steps-fraction",
            "0.5",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    table = capsys.readouterr().out
    assert code == 1
    rows = _rows(table)
    assert rows["inter-node bytes by step 4"][-1] == "FAIL"
    assert rows["train loss, step 2 (first logged)"][-1] == "FAIL"
    assert (
        rows["train loss, steps 2–4 (2 logged)"][-1] == "FAIL"
    )  # the recording machine: all must match
    assert rows["config"][-1] == "pass"
    assert "**3 mismatch(es)**: the recorded results do not reproduce." in table
