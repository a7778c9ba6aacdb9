"""``--scheme auto`` on real gloo ranks (2 nodes x 2 ranks): it measures and decides on every
rank alike, its measurements leave no trace in the run (the run it chose is bitwise the fixed
scheme's), and a resumed run keeps the choice its checkpoint holds instead of measuring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.dist

TINY = {"steps": 4, "eval_every": 2, "log_every": 1, "d_model": 32, "layers": 1, "heads": 2,
        "batch_size": 4, "warmup": 1, "seq_len": 16, "eval_samples": 8}  # fmt: skip


def train(overrides: dict[str, Any], run_dir: str, slow_link_bps: float | None,
          resume: str | None = None) -> dict[str, Any] | None:  # fmt: skip
    """One rank of ``deto train``; with ``slow_link_bps`` the link probe reports that rate."""
    from deto.linkprobe import LinkMeasurement
    from deto.run import auto, loop
    from deto.run.config import resolve
    from deto.topology import Topology

    cfg = resolve({**TINY, **overrides})
    real = auto.measure_link
    if slow_link_bps is not None:
        auto.measure_link = lambda topo: LinkMeasurement(slow_link_bps, 0.0, 1, 1.0)
    try:
        return loop.run(cfg, Topology(nodes=2, ranks_per_node=2, device="cpu"), run_dir=run_dir,
                        resume=resume)  # fmt: skip
    finally:
        auto.measure_link = real


def test_auto_on_a_fast_link_is_bitwise_the_default(pool, tmp_path: Path) -> None:
    auto_run = pool.run(train, {"scheme": "auto"}, str(tmp_path / "auto"), None)[0]
    fixed = pool.run(train, {"scheme": "flexdemo"}, str(tmp_path / "fixed"), None)[0]
    decision = auto_run["auto"]
    assert decision["source"] == "measured" and decision["chosen"] == "flexdemo"
    assert decision["bandwidth_bps"] > 0 and decision["compute_s"] > 0
    assert auto_run["params_sha256"] == fixed["params_sha256"]
    assert auto_run["train_loss"] == fixed["train_loss"]


def test_auto_on_a_slow_link_compresses_and_resumes_with_its_choice(pool, tmp_path: Path) -> None:
    out = str(tmp_path / "slow")
    first = pool.run(train, {"scheme": "auto", "checkpoint_every": 2}, out, 2e5)[0]
    decision = first["auto"]
    assert decision["chosen"] != "flexdemo" and decision["options"]
    assert first["config"]["blocks"] == decision["options"].get("blocks", "1d")
    default_bytes = decision["considered"][0]["node_bytes_per_step"]  # flexdemo's, predicted
    assert first["inter_node_bytes_sent_per_step"] < default_bytes
    # a resume on a fast link keeps the checkpoint's setting: bitwise the run that went on
    again = pool.run(train, {"scheme": "auto", "checkpoint_every": 2, "steps": 4}, out + "-2",
                     None, f"{out}/checkpoints/step_00000002")[0]  # fmt: skip
    assert again["auto"] == {"source": "resumed", "chosen": decision["chosen"],
                             "options": decision["options"]}  # fmt: skip
    assert again["params_sha256"] == first["params_sha256"]
