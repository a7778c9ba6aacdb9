"""Models as users bring them: frozen, already sharded, on the meta device, with BatchNorm."""

from __future__ import annotations

import common
import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import deto
from deto.comm import all_reduce_bytes
from deto.replicators.base import local_tensor
from deto.run.models import ByteGPT, ResNet18, TransformerShape

pytestmark = pytest.mark.dist


def frozen(steps: int) -> dict:
    model = common.make_model()
    model.inp.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, opt = deto.prepare(model, common.topo(), replicator=deto.DeMo(blocks="2d", topk=8, chunk=8), lr=1e-2)
    common.train(model, opt, steps)
    after = common.full_params(model)
    return {
        "moved": sorted(n for n in before if not torch.equal(before[n], after[n])),
        "digest": common.shard_digest(model),
    }


def test_frozen_parameters_stay_and_the_rest_trains(pool):
    out = pool.run(frozen, 5)
    trainable = sorted(n for n, _ in common.make_model().named_parameters() if "inp" not in n)
    assert all(o["moved"] == trainable for o in out), out[0]["moved"]
    assert out[0]["digest"] == out[2]["digest"] and out[1]["digest"] == out[3]["digest"]


def already_sharded(mesh_kind: str) -> str:
    t = common.topo()
    mesh = t.init() if mesh_kind == "hsdp" else t.init()["shard"]
    model = common.make_model()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    if mesh_kind != "blocks-only":
        fully_shard(model, mesh=mesh)
    try:
        model, opt = deto.prepare(model, t, replicator="full", lr=1e-2)
    except ValueError as e:
        return f"ValueError: {e}"
    before = common.shard_digest(model)
    common.train(model, opt, 3)
    return f"trained {common.shard_digest(model) != before} {common.shard_digest(model)}"


@pytest.mark.parametrize("how", ["node", "blocks-only"])
def test_a_model_sharded_by_the_user_over_the_node_mesh_is_kept(pool, how):
    out = pool.run(already_sharded, how)
    assert all(o.startswith("trained True") for o in out), out
    assert out[0] == out[2] and out[1] == out[3]


def test_a_model_sharded_over_the_whole_mesh_is_refused(pool):
    out = pool.run(already_sharded, "hsdp")
    assert all("'inp.weight' is sharded over ranks [0, 1, 2, 3]" in o for o in out), out


def test_mixed_precision_on_a_sharded_model_is_refused(pool):
    out = pool.run(sharded_with_options)
    assert all("already sharded" in o for o in out), out


def sharded_with_options() -> str:
    t = common.topo()
    model = common.make_model()
    fully_shard(model, mesh=t.init()["shard"])
    try:
        deto.shard(model, t, mixed_precision="bf16")
    except ValueError as e:
        return str(e)
    return "no error"


def on_meta(kind: str) -> str:
    with torch.device("meta"):
        model = common.make_model() if kind == "tiny" else ByteGPT(8, TransformerShape(16, 1, 2))
    try:
        model, opt = deto.prepare(model, common.topo(), replicator="full", lr=1e-2)
    except ValueError as e:
        return f"ValueError: {e}"
    finite = all(torch.isfinite(local_tensor(p)).all() for p in model.parameters())
    before = common.shard_digest(model)
    common.train(model, opt, 3)
    moved = common.shard_digest(model) != before
    return f"finite={finite} moved={moved} {common.shard_digest(model)}"


def test_a_meta_device_model_is_materialised_and_trains(pool):
    out = pool.run(on_meta, "tiny")
    assert all(o.startswith("finite=True moved=True") for o in out), out
    assert out[0] == out[2] and out[1] == out[3]


def test_a_meta_model_without_reset_parameters_is_a_clear_error(pool):
    out = pool.run(on_meta, "gpt")
    assert all("Module 'root' (ByteGPT) has tensors on the meta device" in o for o in out), out


def unshardable() -> str:
    model = common.make_model()
    model.blocks[0].scale = nn.Parameter(torch.tensor(1.0))  # FSDP2 refuses 0-d parameters
    try:
        deto.prepare(model, common.topo())
    except ValueError as e:
        return str(e)
    return "no error"


def test_an_unshardable_module_is_named_in_a_value_error(pool):
    out = pool.run(unshardable)
    assert all(o.startswith("Cannot shard module 'blocks.0' (Block)") for o in out), out


def batchnorm(replicator: str, steps: int) -> dict:
    torch.manual_seed(0)
    model, opt = deto.prepare(
        ResNet18(channels=3, classes=4, width=4), common.topo(), replicator=replicator, lr=1e-2
    )
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=g)
        nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
        opt.step()
        opt.zero_grad()
    stats = [b.clone() for n, b in model.named_buffers() if "running" in n]
    grads = sum(local_tensor(p).numel() * 4 for p in model.parameters())
    floats = sum(b.numel() * 4 for b in model.buffers() if b.is_floating_point())
    return {"stats": stats, "bytes": opt.stats().bytes_sent, "grads": grads, "buffers": floats}


def test_batchnorm_statistics_are_averaged_over_all_ranks_when_parameters_sync(pool):
    out = pool.run(batchnorm, "full", 2)
    for o in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out[0]["stats"], o["stats"], strict=True))
    for o in out:  # the buffers' all-reduce is counted with the step's traffic
        assert o["bytes"] == all_reduce_bytes(o["grads"], 2) + all_reduce_bytes(o["buffers"], 2)
    unsynced = pool.run(batchnorm, "none", 2)
    assert not torch.equal(unsynced[0]["stats"][0], unsynced[2]["stats"][0])
