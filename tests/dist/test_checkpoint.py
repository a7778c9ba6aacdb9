"""DecoupledOptimizer through DCP on real gloo ranks (2 nodes x 2 ranks): resume is bitwise."""

from __future__ import annotations

import common
import pytest
import torch
import torch.distributed as dist
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

import deto
from deto.replicators.base import local_tensor

pytestmark = pytest.mark.dist

REPLICATORS = {
    "demo": lambda: deto.DeMo(blocks="2d", topk=8, chunk=8),
    "demo-every-2": lambda: deto.DeMo(blocks="2d", topk=8, chunk=8, every=2),
    "full-every-3": lambda: deto.Full(every=3),
}


def fresh(key: str):
    return deto.prepare(
        common.make_model(), common.topo(), replicator=REPLICATORS[key](),
        optimizer=torch.optim.AdamW, lr=1e-2,
    )


def dcp_resume(key: str, path: str) -> tuple[list[float], list[float], bool, bool]:
    """5 steps straight, against 3 steps, a plain DCP save of get_state_dict, a fresh model and
    optimizer loaded through DCP alone, and 2 more steps."""
    model, opt = fresh(key)
    common.train(model, opt, 3)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    tail = common.train(model, opt, 2, start=3)
    final = common.shard_digest(model)
    delta_differs = None
    if key.startswith("demo"):
        mine = local_tensor(opt.replicators[0].state[0]["delta"]).flatten()[:4].tolist()
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        delta_differs = every[0] != every[2]  # the nodes' deltas differ: each must get its own

    model2, opt2 = fresh(key)
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    tail2 = common.train(model2, opt2, 2, start=3)
    return tail, tail2, common.shard_digest(model2) == final, delta_differs is not False


@pytest.mark.parametrize("key", sorted(REPLICATORS))
def test_resume_through_dcp_alone_is_bitwise(pool, key, tmp_path):
    for tail, tail2, same, deltas_differ in pool.run(dcp_resume, key, str(tmp_path / key)):
        assert tail == tail2
        assert same
        assert deltas_differ


def nan_on_node_1(mode: str) -> str:
    model, opt = deto.prepare(
        common.make_model(), common.topo(), replicator=deto.DeMo(blocks="2d", topk=8, chunk=8), lr=1e-2,
        nonfinite=mode,
    )
    common.train(model, opt, 1)
    x, y = common.batch(1, dist.get_rank())
    torch.nn.functional.mse_loss(model(x), y).backward()
    if dist.get_rank() == 2:  # node 1, first rank: one element of its shard of inp.weight
        local_tensor(model.inp.weight.grad)[0, 0] = float("nan")
    try:
        opt.step()
    except FloatingPointError as e:
        return f"raised: {e}"
    opt.zero_grad()
    common.train(model, opt, 1, start=2)  # the next steps run in step on every rank
    finite = all(torch.isfinite(local_tensor(p)).all() for p in model.parameters())
    return f"skipped finite={finite} {common.shard_digest(model)}"


def test_nan_on_one_node_raises_on_every_rank(pool):
    out = pool.run(nan_on_node_1, "raise")
    assert all(o.startswith("raised: Non-finite gradient at step 2") for o in out), out
    # the node-1 rank and its replicate peer name the tensor; their node mates learn it too
    assert out[0] == out[2] and "inp.weight" in out[0]
    assert out[1] == out[3] and "another rank of this node" in out[1]


def test_nan_on_one_node_is_skipped_on_every_rank(pool):
    out = pool.run(nan_on_node_1, "skip")
    assert all(o.startswith("skipped finite=True") for o in out), out
    assert out[0] == out[2] and out[1] == out[3]  # replicas still bitwise identical


def user_sharded(steps: int) -> tuple[list[float], list[float]]:
    """from_model on a model the user sharded with fully_shard equals deto.prepare."""
    topo = common.topo()
    mesh = topo.init()
    model = common.make_model()
    for block in model.blocks:
        fully_shard(block, mesh=mesh["shard"])
    fully_shard(model, mesh=mesh["shard"])
    opt = deto.DecoupledOptimizer.from_model(
        model, topo, torch.optim.AdamW, replicator="demo", lr=1e-2, blocks="2d", topk=8, chunk=8
    )
    got = common.train(model, opt, steps)
    ref_model, ref_opt = deto.prepare(
        common.make_model(), topo, optimizer=torch.optim.AdamW, replicator="demo", lr=1e-2,
        blocks="2d", topk=8, chunk=8,
    )
    return got, common.train(ref_model, ref_opt, steps)


def test_from_model_on_a_user_sharded_model(pool):
    for got, ref in pool.run(user_sharded, 3):
        assert got == ref


def unsharded() -> str:
    try:
        deto.DecoupledOptimizer.from_model(common.make_model(), common.topo())
    except ValueError as e:
        return str(e)
    return "no error"


def test_from_model_refuses_an_unsharded_model(pool):
    assert all("is not sharded" in m for m in pool.run(unsharded))


def cli_checkpoint(scheme: str, path: str) -> tuple[list[float], list[float], bool]:
    """deto train's checkpoints keep each node's model and optimizer, so schemes whose replicas
    differ between synchronisations (DiLoCo, none) resume bitwise too."""
    from pathlib import Path

    from deto.run.checkpoint import load_checkpoint, save_checkpoint

    topo = common.topo()

    def build():
        return deto.prepare(
            common.make_model(), topo, replicator=scheme, optimizer=torch.optim.AdamW, lr=1e-2,
            sign=False, **({"every": 4} if scheme == "diloco" else {}),
        )

    model, opt = build()
    common.train(model, opt, 2)  # DiLoCo: between synchronisations, the nodes differ
    save_checkpoint(
        Path(path), 2, model, opt, topo, history={"note": "kept"}, config={}, rank_state={"n": 1}
    )
    tail = common.train(model, opt, 4, start=2)
    final = common.shard_digest(model)

    model2, opt2 = build()
    history, own = load_checkpoint(Path(path) / "step_00000002", model2, opt2, topo)
    assert history == {"note": "kept"} and own == {"n": 1}
    tail2 = common.train(model2, opt2, 4, start=2)
    return tail, tail2, common.shard_digest(model2) == final


@pytest.mark.parametrize("scheme", ["diloco", "none"])
def test_cli_checkpoints_keep_every_nodes_state(pool, scheme, tmp_path):
    for tail, tail2, same in pool.run(cli_checkpoint, scheme, str(tmp_path)):
        assert tail == tail2
        assert same
