"""`deto selftest --device cpu`: the whole GPU self-check as a dry run on the CPU, deto train
and the integrations' examples in child processes included."""

from __future__ import annotations

import json

import pytest

from deto.cli import main

pytestmark = pytest.mark.slow


def test_the_full_dry_run_passes(tmp_path) -> None:
    assert main(["selftest", "--device", "cpu", "--out", str(tmp_path)]) == 0
    checks = {c["name"]: c for c in json.loads((tmp_path / "results.json").read_text())["checks"]}
    for scheme in ("flexdemo", "full"):
        train = checks[f"deto train {scheme} 2x2"]
        assert train["status"] == "pass" and train["numbers"]["replicas_identical"] is True
    for name in ("integration hf_trainer.py", "integration lightning_fit.py",
                 "integration torchtitan"):
        assert checks[name]["status"] in ("pass", "skip"), checks[name]
