"""torchtitan's Llama 3 debug model on 2 nodes x 2 ranks: deto's model spec and optimizer
container with torchtitan's LR schedulers, loss, clipping and DCP checkpointer, resumed; no
rank prints a warning on the way."""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Iterator

import pytest

pytest.importorskip("torchtitan", reason="the torchtitan extra is not installed "
                    "(pip install 'deto[torchtitan]')")  # fmt: skip

import common  # noqa: E402
import integration  # noqa: E402
import torch.distributed as dist  # noqa: E402

from deto.integrations import torchtitan as titan  # noqa: E402

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 4  # checkpoints at steps 2 and 4


@contextlib.contextmanager
def warned() -> Iterator[list[str]]:
    """What this rank warns inside the block: Python warnings under the filters in force, and
    log records at WARNING or above (torchtitan warns through the root logger)."""
    lines: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield lines
        lines += [f"{w.filename}:{w.lineno}: {w.message}" for w in caught]
    finally:
        logging.getLogger().removeHandler(handler)


def run(folder: str, resume: bool) -> dict:
    with warned() as lines:
        result = titan.train_debug_model(folder, STEPS, common.topo(), checkpoint_every=2,
                                         resume=resume)  # fmt: skip
    opt = result.pop("optimizer")
    return {
        **result,
        "model": common.shard_digest(result.pop("model")),
        "optimizer": integration.optimizer_digest(opt),
        "opt_step": opt.step_count,
        "lr": opt.param_groups[0]["lr"],
        "warnings": lines,
    }


def copy_first_checkpoint(src: str, dst: str) -> None:
    if dist.get_rank() == 0:
        shutil.copytree(f"{src}/checkpoint/step-2", f"{dst}/checkpoint/step-2")
    dist.barrier()


@pytest.fixture(scope="module")
def straight(pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("titan")
    return out, pool.run(run, str(out / "straight"), False, timeout=600)


def test_trains_with_identical_replicas_and_counts_traffic(straight):
    _, ranks = straight
    assert ranks[0]["model"] == ranks[2]["model"] and ranks[1]["model"] == ranks[3]["model"]
    assert ranks[0]["model"] != ranks[1]["model"]  # FSDP2 shards differ inside a node
    assert all(r["step"] == r["opt_step"] == STEPS for r in ranks)
    assert all(b > 0 for r in ranks for b in r["node_bytes"])  # DeMo crosses nodes every step
    assert [r["warnings"] for r in ranks] == [[]] * len(ranks)


def test_resume_from_torchtitan_checkpoint_matches_straight_run(pool, straight):
    out, ranks = straight
    pool.run(copy_first_checkpoint, str(out / "straight"), str(out / "resumed"))
    resumed = pool.run(run, str(out / "resumed"), True, timeout=600)
    for want, got in zip(ranks, resumed, strict=True):
        assert got["model"] == want["model"]
        assert got["optimizer"] == want["optimizer"]  # base state, replicators, step count
        assert got["opt_step"] == STEPS and got["lr"] == want["lr"]
        assert got["losses"] == want["losses"][2:]  # the continuation's data and steps
        assert got["warnings"] == []  # loading torchtitan's LR schedulers too
