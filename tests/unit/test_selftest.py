"""`deto selftest --device cpu --quick`: the GPU self-check's in-process steps as a dry run on
the CPU, so the script cannot rot (the full dry run, with deto train and the integrations in
child processes, is tests/e2e/test_selftest_dry_run.py)."""

from __future__ import annotations

import json

import pytest
import torch

from deto.bench import selftest
from deto.cli import main


def test_the_quick_dry_run_passes_and_writes_its_results(tmp_path) -> None:
    assert main(["selftest", "--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    names = [c["name"] for c in result["checks"]]
    assert [f"replicator {n}" for n in selftest.REPLICATORS] == names[: len(selftest.REPLICATORS)]
    assert "demo local work" in names and "peak memory" in names
    assert all(c["status"] == "pass" for c in result["checks"])
    assert result["failed"] == [] and result["provenance"]["git"]["sha"]
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# deto selftest on cpu (cpu)")
    assert "| replicator full | pass |" in report


def test_a_wrong_result_fails_the_check(monkeypatch) -> None:
    monkeypatch.setattr(selftest, "ATOL", -1.0)  # no difference can be this small
    found = selftest.check_replicators("cpu")
    assert all(c.status == "fail" and "differs from CPU" in c.reason for c in found)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys) -> None:
    assert main(["selftest", "--device", "cuda"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_the_report_of_a_tree_without_git_says_so() -> None:
    # the GPU machine gets a copy of the tree, which may hold no .git
    result = {"device": "cuda", "device_name": "H100", "quick": True,
              "provenance": {"git": None}, "checks": []}
    assert "- git: not run from a git checkout" in selftest.report(result)
