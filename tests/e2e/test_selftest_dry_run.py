"""`deto selftest --device cpu`: the whole GPU self-check as a dry run on the CPU, FSDP2 under
torchrun and the integrations' examples in child processes included."""

from __future__ import annotations

import json

import pytest

from deto.cli import main

pytestmark = pytest.mark.slow


def test_the_full_dry_run_passes(tmp_path) -> None:
    assert main(["selftest", "--device", "cpu", "--out", str(tmp_path)]) == 0
    checks = {c["name"]: c for c in json.loads((tmp_path / "results.json").read_text())["checks"]}
    torchrun = checks["fsdp2 torchrun 2 nodes x 2 ranks"]
    assert torchrun["status"] == "pass" and len(torchrun["numbers"]["peak_memory_mb_per_rank"]) == 4
    for name in ("integration hf_trainer.py", "integration lightning_fit.py"):
        assert checks[name]["status"] in ("pass", "skip"), checks[name]
