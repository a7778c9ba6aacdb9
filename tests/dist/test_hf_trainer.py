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


def run(out: str, resume: str | None, streaming: bool = False) -> dict:
    integration.torchrun_env()
    example = integration.load_example("hf_trainer")
    import deto

    # Streaming DiLoCo's nodes never hold the same parameters, and checkpoint-2 holds an
    # exchange in flight (fragment 0 starts at step 2 and merges at step 3)
    replicator = deto.StreamingDiLoCo(every=2, fragments=2, overlap_steps=1) if streaming else None
    trainer = example.build_trainer(out, STEPS, common.topo(), replicator)
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


class Indices(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": torch.tensor([i]), "labels": torch.tensor([i])}


def first_epoch(out: str) -> dict:
    """The example's Trainer (no use_cpu given) on CPU: the samples this rank reads."""
    integration.torchrun_env()
    trainer = integration.load_example("hf_trainer").build_trainer(out, STEPS, common.topo())
    trainer.train_dataset = Indices()
    seen = [int(i) for b in trainer.get_train_dataloader() for i in b["input_ids"].view(-1)]
    return {"use_cpu": trainer.args.use_cpu, "world": trainer.args.world_size, "seen": seen}


def test_every_rank_reads_its_own_samples_without_use_cpu(pool, tmp_path):
    """On CPU the Trainer (through Accelerate) takes a process without use_cpu=True for a world
    of one, where every rank would read the same batches; DetoTrainer sets it."""
    ranks = pool.run(first_epoch, str(tmp_path))
    assert all(r["use_cpu"] and r["world"] == 4 for r in ranks)
    seen = [i for r in ranks for i in r["seen"]]
    assert sorted(seen) == list(range(16))  # disjoint, and together the whole set


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


def test_streaming_diloco_resumes_each_node_s_own_parameters(pool, tmp_path):
    """The Trainer loads a resumed model before it builds the optimizer, whose start must not
    hand node 0's parameters to every node: under Streaming DiLoCo they differ."""
    straight = pool.run(run, str(tmp_path / "straight"), None, True, timeout=600)
    assert straight[0]["model"] != straight[2]["model"]  # the nodes' replicas differ
    resumed = pool.run(run, str(tmp_path / "resumed"), str(tmp_path / "straight" / "checkpoint-2"),
                       True, timeout=600)  # fmt: skip
    for want, got in zip(straight, resumed, strict=True):
        assert got["model"] == want["model"] and got["optimizer"] == want["optimizer"]
