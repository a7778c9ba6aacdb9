"""``deto train --model``: the paper's model families end to end (tiny sizes, a few steps)."""

from __future__ import annotations

import math

import pytest
from test_cli_train import MODEL, train

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHORT = ["--steps", "5", "--eval-every", "5", "--log-every", "5", *MODEL]
LM = ["--seq-len", "32", "--eval-samples", "16"]


def test_t5_span_corruption(tmp_path) -> None:
    pytest.importorskip("transformers")
    s = train(tmp_path, "--model", "t5", "--ranks-per-node", "1", *SHORT, *LM)  # sharded: test_zoo
    assert (s["model"], s["task"], s["steps"]) == ("t5", "lm", 5)
    assert s["config"]["model"] == "t5"
    assert math.isfinite(s["final_val_loss"]) and s["replicas_identical"] is True


def test_resnet_with_batchnorm_under_torch_hsdp_in_bf16(tmp_path) -> None:
    # torch's HSDP syncs no buffers by itself: deto averages the BatchNorm statistics
    s = train(tmp_path, "--model", "resnet", "--scheme", "hsdp", "--precision", "bf16",
              *SHORT[:6], "--d-model", "8", "--batch-size", "4")
    assert (s["model"], s["task"]) == ("resnet", "vision")
    assert 0 <= s["final_val_accuracy"] <= 1 and s["replicas_identical"] is True
    # the baseline sends every gradient: what deto counts for it is the full sync
    assert s["inter_node_bytes_sent_per_step"] == s["full_sync_bytes_per_step"] > 0
    assert s["compression_ratio"] == 1.0
