"""examples/lightning_fit.py on 2 nodes x 2 ranks: Lightning with DetoStrategy, resumed."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "lightning", reason="the lightning extra is not installed (pip install 'deto[lightning]')"
)

import common  # noqa: E402
import integration  # noqa: E402

pytestmark = pytest.mark.dist

STEPS = 4  # 2 steps per epoch: checkpoints at steps 2 and 4


def run(out: str, resume: str | None, streaming: bool = False) -> dict:
    integration.torchrun_env()
    example = integration.load_example("lightning_fit")
    import deto

    # Streaming DiLoCo's nodes never hold the same parameters or inner AdamW state, and
    # step=2.ckpt holds an exchange in flight (fragment 0 starts at step 2, merges at step 3)
    replicator = deto.StreamingDiLoCo(every=2, fragments=2, overlap_steps=1) if streaming else None
    trainer, module, loader = example.build(
        out, STEPS, common.topo(), epoch_steps=2, replicator=replicator
    )
    trainer.fit(module, loader, ckpt_path=resume)
    opt = trainer.strategy.optimizers[0]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    return {
        "model": common.shard_digest(module),
        "optimizer": integration.optimizer_digest(opt),
        "step": (trainer.global_step, opt.step_count),
        "lr": (opt.param_groups[0]["lr"], scheduler.get_last_lr()[0]),
        "sent": opt.stats().node_bytes_sent,
    }


@pytest.fixture(scope="module")
def straight(pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning")
    return out, pool.run(run, str(out / "straight"), None, timeout=600)


def test_fits_with_identical_replicas(straight):
    _, ranks = straight
    assert ranks[0]["model"] == ranks[2]["model"] and ranks[1]["model"] == ranks[3]["model"]
    assert ranks[0]["model"] != ranks[1]["model"]  # each rank holds its own shard
    assert all(r["step"] == (STEPS, STEPS) and r["sent"] > 0 for r in ranks)
    lr, scheduled = ranks[0]["lr"]
    assert lr == scheduled < 3e-3  # the module's cosine schedule drives deto's optimizer


def test_resume_from_checkpoint_matches_straight_run(pool, straight):
    out, ranks = straight
    resumed = pool.run(run, str(out / "resumed"), str(out / "straight" / "step=2.ckpt"))
    for want, got in zip(ranks, resumed, strict=True):
        assert got["model"] == want["model"]
        assert got["optimizer"] == want["optimizer"]  # base state, replicators, step count
        assert got["step"] == want["step"]


def test_streaming_diloco_resumes_each_node_s_own_state(pool, tmp_path):
    """Lightning's distributed checkpoint keeps one copy of what every node holds at the same
    place; DetoStrategy saves one entry per node, so each node gets its own state back."""
    straight = pool.run(run, str(tmp_path / "straight"), None, True, timeout=600)
    assert straight[0]["model"] != straight[2]["model"]  # the nodes' replicas differ
    resumed = pool.run(run, str(tmp_path / "resumed"), str(tmp_path / "straight" / "step=2.ckpt"),
                       True, timeout=600)  # fmt: skip
    for want, got in zip(straight, resumed, strict=True):
        assert got["model"] == want["model"] and got["optimizer"] == want["optimizer"]


def mismatched(out: str) -> str:
    """Lightning on 4 processes, DetoStrategy given a Topology of 2 ranks: each rank's error."""
    import deto
    import lightning.pytorch as pl

    from deto.integrations.lightning import DetoStrategy

    integration.torchrun_env()
    _, module, loader = integration.load_example("lightning_fit").build(out, STEPS, common.topo())
    trainer = pl.Trainer(
        accelerator="cpu", devices=4, strategy=DetoStrategy(deto.Topology(1, 2, device="cpu")),
        max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=out,
    )  # fmt: skip
    try:
        trainer.fit(module, loader)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_a_topology_that_is_not_lightnings_world_stops_before_sharding(pool, tmp_path):
    errors = pool.run(mismatched, str(tmp_path))
    assert all(e.startswith("DetoStrategy: Lightning sees 4 process(es)") for e in errors), errors
    assert all("1 node(s) x 2 rank(s)" in e and "\n" not in e for e in errors)
