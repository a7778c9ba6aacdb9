"""The microbenchmark's plumbing (shapes, loopback, report), on a tiny model; no timings checked."""

from __future__ import annotations

import json
import math

import pytest
import torch
from benchmarks import micro


def test_shard_shapes_follow_fsdp2_dim0_chunks():
    assert micro.shard_shape((5, 3), 2, 0) == (3, 3)
    assert micro.shard_shape((5, 3), 2, 1) == (2, 3)
    assert micro.shard_shape((1, 4), 2, 1) == (0, 4)  # an empty shard
    assert micro.shard_shape((7,), 1) == (7,)
    shapes = dict(micro.model_shapes("bytegpt-4x256"))
    assert sum(math.prod(s) for s in shapes.values()) == 3_307_008  # the 3.3M-parameter GPT
    assert shapes["blocks.0.fc.weight"] == (1024, 256)
    with pytest.raises(ValueError, match="Invalid model"):
        micro.model_shapes("gpt2")


def test_loopback_returns_every_node_the_same_payload():
    comm = micro.loopback_comm(3)
    parts = [torch.arange(5, dtype=torch.uint8), torch.ones(2, 2)]
    nodes = comm.all_gather(parts)
    assert len(nodes) == 3 and all(torch.equal(n[1], parts[1]) for n in nodes)
    # every node holds the same tensor, so the mean over the nodes is that tensor
    assert torch.equal(comm.all_reduce_mean([torch.full((2,), 3.0)])[0], torch.full((2,), 3.0))


def test_reference_runs_at_each_demo_contenders_block_settings():
    assert micro.reference_settings("demo") == ("1d", 64, 4)
    assert micro.reference_settings("demo-1d-top4-fp32") == ("1d", 64, 4)
    assert micro.reference_settings("demo-lean") == ("2d", 32, 14)
    assert micro.reference_settings("full") is None
    assert micro.reference_label(("2d", 32, 14)) == "reference-2d-32-top14"


def test_run_writes_results(tmp_path):
    report = micro.main(
        [
            "--model",
            "bytegpt-1x16",
            "--only",
            "demo,full,diloco",
            "--rounds",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "micro.json").read_text())
    assert saved["elements_per_rank"] == report["elements_per_rank"] > 0
    assert [r["contender"] for r in saved["results"]] == ["demo", "full", "diloco"]
    assert all(r["steps"] == 2 and r["ms_median"] > 0 for r in saved["results"])
    assert all(r["cpu_ms_median"] > 0 for r in saved["results"])
    assert saved["environment"]["torch"] == torch.__version__
    assert "| demo |" in (tmp_path / "report.md").read_text()
    with pytest.raises(SystemExit):
        micro.parse_args(["--only", "nope"])
