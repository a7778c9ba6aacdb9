"""examples/hf_trainer.py on 2 nodes x 2 ranks: transformers.Trainer with deto, resumed."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="the hf extra is not installed (pip install 'deto[hf]')")
pytest.importorskip("accelerate", reason="the hf extra is not installed (pip install 'deto[hf]')")

import common  # noqa: E402
import integration  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

pytestmark = pytest.mark.dist

STEPS = 4  # checkpoints at steps 2 and 4


def run(out: str, resume: str | None) -> dict:
    integration.torchrun_env()
    example = integration.load_example("hf_trainer")
    trainer = example.build_trainer(out, STEPS, common.topo())
    trainer.train(resume_from_checkpoint=resume)
    opt = trainer.decoupled_optimizer
    full = {k: v.full_tensor() for k, v in trainer.model.state_dict().items()}
    saved = safetensors.torch.load_file(f"{out}/checkpoint-{STEPS}/model.safetensors")
    return {
        "saved_full_weights": saved.keys() <= full.keys()
        and all(torch.equal(v, full[k]) for k, v in saved.items()),
        "model": common.shard_digest(trainer.model),
        "optimizer": integration.optimizer_digest(opt),
        "step": opt.step_count,
        "lr": (opt.param_groups[0]["lr"], trainer.lr_scheduler.get_last_lr()[0]),
        "logs": [h for h in trainer.state.log_history if "loss" in h],
    }


def without_timing(log: dict) -> dict:
    return {k: v for k, v in log.items() if k != "inter_node_seconds"}


@pytest.fixture(scope="module")
def straight(pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    return out, pool.run(run, str(out / "straight"), None, timeout=600)


def test_trains_with_identical_replicas_and_logs_traffic(straight):
    _, ranks = straight
    assert ranks[0]["model"] == ranks[2]["model"] and ranks[1]["model"] == ranks[3]["model"]
    assert all(r["step"] == STEPS for r in ranks)
    assert all(r["saved_full_weights"] for r in ranks)  # what from_pretrained reads
    lr, scheduled = ranks[0]["lr"]
    assert lr == scheduled  # the Trainer's LR schedule drives deto's optimizer
    logs = ranks[0]["logs"]
    assert [h["step"] for h in logs] == [2, 4]
    assert all(h["inter_node_bytes_sent"] > 0 and h["grad_norm"] > 0 for h in logs)
    assert logs[0]["inter_node_bytes_sent"] == logs[1]["inter_node_bytes_sent"]  # same 2 steps


def test_resume_from_checkpoint_matches_straight_run(pool, straight):
    out, ranks = straight
    resumed = pool.run(run, str(out / "resumed"), str(out / "straight" / "checkpoint-2"))
    for want, got in zip(ranks, resumed, strict=True):
        assert got["model"] == want["model"]
        assert got["optimizer"] == want["optimizer"]  # base state, replicators, step count
        assert got["step"] == want["step"]
        assert without_timing(got["logs"][-1]) == without_timing(want["logs"][-1])
