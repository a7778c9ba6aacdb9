"""`deto selftest --device cpu --quick`: the GPU self-check's in-process steps as a dry run on
the CPU, so the script cannot rot (the full dry run, with torchrun and the integrations in
child processes, is tests/e2e/test_selftest_dry_run.py)."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deto.bench import selftest
from deto.cli import main

SRC = Path(selftest.__file__).resolve().parents[2]
NOT_ON_THE_GPU_MACHINE = ("tqdm", "matplotlib", "sklearn", "transformers", "accelerate",
                          "lightning", "torchtitan", "torchft", "hypothesis")
"""What the GPU machine's python3 may lack: the dry run must not import any of it."""


def test_the_quick_dry_run_needs_only_torch_and_writes_its_results(tmp_path) -> None:
    blocked = ", ".join(repr(m) for m in NOT_ON_THE_GPU_MACHINE)
    code = (f"import sys\nfor m in ({blocked},): sys.modules[m] = None\n"
            "from deto.cli import main\n"
            f"sys.exit(main(['selftest', '--device', 'cpu', '--quick', '--out', {str(tmp_path)!r}"
            "]))")
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "selftest: replicator demo-1d" in proc.stderr  # a progress line per check
    result = json.loads((tmp_path / "results.json").read_text())
    checks = {c["name"]: c for c in result["checks"]}
    assert [f"replicator {n}" for n in selftest.REPLICATORS] == list(checks)[: 7]
    for name in ("fsdp2 demo 2 fake nodes x 1 gloo rank", "fsdp2 full 2 fake nodes x 1 gloo rank"):
        assert checks[name]["status"] == "pass"
        assert checks[name]["numbers"]["replicas_identical"] is True
        assert checks[name]["numbers"]["inter_node_bytes_sent_per_step"] > 0
        memory = checks[name]["numbers"]
        assert memory["memory_held_bytes"] == memory["memory_plan_bytes"] > 0  # deto.plan's
    assert checks["demo microbenchmark"]["numbers"]["demo_ms"] > 0
    assert checks["peak memory"]["numbers"]["rss_mb"] > 0
    assert checks["integration hf_trainer.py"]["status"] == "skip"
    assert {c["status"] for c in checks.values()} == {"pass", "skip"}
    assert result["failed"] == [] and result["provenance"]["git"]["sha"]
    assert result["versions"]["torch"] == torch.__version__
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# deto selftest on cpu (cpu)")
    assert "| replicator full | pass |" in report


def test_a_result_off_the_cpu_fails_the_check(monkeypatch) -> None:
    monkeypatch.setattr(selftest, "ATOL", -1.0)  # no difference can be this small
    found = selftest.check_replicators("cpu")
    assert all(c.status == "fail" and "differs from CPU" in c.reason for c in found)


def test_two_runs_that_differ_fail_the_check(monkeypatch) -> None:
    monkeypatch.setattr(selftest, "REPLICATORS", {"full": selftest.REPLICATORS["full"]})
    monkeypatch.setattr(selftest, "replicated_params", lambda *a: [torch.randn(3)])
    [check] = selftest.check_replicators("cpu")
    assert check.status == "fail" and check.reason == "two runs differ"


def test_any_failed_check_exits_1(monkeypatch, tmp_path) -> None:
    broken = selftest.Check("replicator x")
    broken.fail("RuntimeError: boom")
    monkeypatch.setattr(selftest, "check_replicators", lambda device: [broken])
    monkeypatch.setattr(selftest, "check_fsdp_one_rank", lambda device: [])
    with selftest.timed(selftest.Check("raises")) as raised:
        raise ValueError("bad\nsecond line")
    assert (raised.status, raised.reason) == ("fail", "ValueError: bad")
    assert selftest.run_selftest("cpu", tmp_path, quick=True) == 1
    assert json.loads((tmp_path / "results.json").read_text())["failed"] == ["replicator x"]


def test_a_copy_without_git_still_reports(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(selftest.provenance, "collect", lambda where: {"git": None})
    monkeypatch.setattr(selftest, "check_replicators", lambda device: [])
    monkeypatch.setattr(selftest, "check_fsdp_one_rank", lambda device: [])
    assert selftest.run_selftest("cpu", tmp_path, quick=True) == 0
    assert "- git: unknown (not run from a git checkout)" in (tmp_path / "report.md").read_text()


def test_the_default_folder_is_dated_and_names_the_gpu() -> None:
    out = selftest.default_out("NVIDIA H100 80GB HBM3")
    assert out.name == f"{datetime.date.today()}-gpu-nvidia-h100-80gb-hbm3"
    assert out.parent == selftest.REPO / "benchmarks" / "results"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys) -> None:
    assert main(["selftest", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device is visible" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.distributed.is_initialized(), reason="needs this process's world")
def test_fsdp2_nodes_that_drift_apart_fail_the_check(monkeypatch) -> None:
    from deto.bench import selftest_fsdp

    monkeypatch.setattr(selftest_fsdp, "SCHEMES", {"diloco": lambda: selftest.deto.DiLoCo(
        every=100)})  # never syncs in 4 steps: each node keeps its own data's weights
    [check] = selftest.check_fsdp_one_rank("cpu")
    assert check.status == "fail" and check.reason == "replicas differ across nodes"
    assert not torch.distributed.is_initialized()  # the one-rank world is taken down


def test_an_out_that_cannot_be_a_folder_is_one_line(tmp_path, capsys) -> None:
    (tmp_path / "taken").write_text("")
    assert main(["selftest", "--device", "cpu", "--quick", "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot make the folder" in err[0]


PLANNED = {"params": 400, "grads": 400, "optimizer": 800, "replicator": 400}


def test_the_counted_state_must_equal_the_plan_kind_by_kind() -> None:
    held = {**PLANNED, "optimizer_other": 32}  # AdamW's step counters: outside the plan
    numbers, reason = selftest.compare_memory(held, PLANNED)
    assert reason == "" and numbers["memory_held_bytes"] == numbers["memory_plan_bytes"] == 2000
    assert numbers["optimizer_other_bytes_not_in_plan"] == 32
    _, reason = selftest.compare_memory({**held, "replicator": 0}, PLANNED)
    assert reason == "persistent state differs from deto.plan: replicator 0 B, plan 400 B"


def test_a_cuda_peak_below_the_band_of_the_plan_fails() -> None:
    held = {**PLANNED, "optimizer_other": 0}
    numbers, reason = selftest.compare_memory(held, PLANNED, peak_bytes=3 * 2000, copies=2)
    assert reason == "" and numbers["memory_peak_vs_plan"] == 1.5  # two ranks in one process
    numbers, reason = selftest.compare_memory(held, PLANNED, peak_bytes=1700)
    assert numbers["memory_peak_vs_plan"] == 0.85
    assert reason == "peak 1700 B is 0.85 x the plan's 1 x 2000 B, below 0.9"


@pytest.mark.skipif(torch.distributed.is_initialized(), reason="needs this process's world")
def test_fsdp2_state_off_the_plan_fails_the_check(monkeypatch) -> None:
    """The live FSDP2 run's counted state against a plan that is one byte off."""
    from deto.bench import selftest_fsdp

    monkeypatch.setattr(selftest_fsdp, "SCHEMES", {"full": selftest_fsdp.SCHEMES["full"]})
    true_plan = selftest_fsdp.planned_bytes
    monkeypatch.setattr(selftest_fsdp, "planned_bytes", lambda scheme, ranks: {
        **true_plan(scheme, ranks), "grads": true_plan(scheme, ranks)["grads"] + 1})
    [check] = selftest.check_fsdp_one_rank("cpu")
    assert check.status == "fail"
    assert check.reason.startswith("persistent state differs from deto.plan: grads ")
