"""DecoupledOptimizer behaviour users rely on: schedules, composition, checkpoints, torch tools."""

from __future__ import annotations

import copy
import logging
import os

import common
import pytest
import torch
import torch.distributed as dist
from torch import nn

import deto
from deto import ranklog
from deto.replicators.base import local_tensor

pytestmark = pytest.mark.dist


def is_matrix(name: str, p: torch.Tensor) -> bool:
    return p.dim() >= 2


def composed(steps: int) -> dict:
    demo = deto.DeMo(blocks="2d", topk=8, chunk=8, include=is_matrix)
    full = deto.Full()
    model, opt = deto.prepare(common.make_model(), common.topo(), replicator=[demo, full], lr=1e-2)
    common.train(model, opt, steps)
    return {
        "digest": common.shard_digest(model),
        "demo": sorted(s.name for s in demo.slots),
        "full": len(full.slots),
        "demo_fired": demo.fired,
        "full_fired": full.fired,
        "delta_nonzero": all(
            demo.momentum(pos).abs().sum() > 0
            for pos, s in enumerate(demo.slots)
            if s.local.numel()
        ),
    }


def test_first_covering_replicator_owns_each_parameter(pool):
    out = pool.run(composed, 4)
    assert all(o["demo"] and all("weight" in n for n in o["demo"]) for o in out)
    assert all(o["demo_fired"] == 4 and o["full_fired"] == 4 for o in out)
    assert all(o["delta_nonzero"] for o in out)
    assert len({out[0]["digest"], out[2]["digest"]}) == 1
    assert len({out[1]["digest"], out[3]["digest"]}) == 1


def scheduled(every: int, skip_every: int, steps: int) -> dict:
    rep = deto.DeMo(blocks="2d", topk=8, chunk=8, every=every, skip_every=skip_every)
    model, opt = deto.prepare(common.make_model(), common.topo(), replicator=rep, lr=1e-2)
    sent = []
    for s in range(steps):
        before = common.shard_digest(model)
        common.train(model, opt, 1, start=s)
        sent.append((opt.stats().bytes_sent > 0, common.shard_digest(model) != before))
    return {"fired": rep.fired, "sent": sent, "digest": common.shard_digest(model)}


def test_schedule_every_and_skip_every(pool):
    out = pool.run(scheduled, 2, 3, 8)
    # fires on even steps except multiples of 3: steps 2, 4, 8
    expected = [s in (2, 4, 8) for s in range(1, 9)]
    for o in out:
        assert o["fired"] == 3
        assert [sent for sent, _ in o["sent"]] == expected
        assert [moved for _, moved in o["sent"]] == expected  # parameters rest on skipped steps
    assert out[0]["digest"] == out[2]["digest"] and out[1]["digest"] == out[3]["digest"]


def checkpoint_roundtrip(key: str) -> tuple[list[float], list[float], bool]:
    rep_options = {
        "demo": {"topk": 8, "chunk": 8},
        "demo-overlap": {"topk": 8, "chunk": 8, "overlap": True},  # a payload in flight
        "demo-delayed": {"topk": 8, "chunk": 8, "overlap": True, "overlap_mode": "delayed"},
        # saved right after the first overlapped exchange, the first two ran in the step
        "demo-after": {"topk": 8, "chunk": 8, "overlap": True, "overlap_after": 2},
        "random": {"rate": 0.3},
        "diloco": {"every": 2},
    }
    t = common.topo()

    def fresh():
        return deto.prepare(
            common.make_model(), t, replicator=key.split("-")[0], optimizer=torch.optim.AdamW,
            lr=1e-2, **rep_options[key],
        )

    model, opt = fresh()
    common.train(model, opt, 3)
    saved_model = {n: local_tensor(p).detach().clone() for n, p in model.named_parameters()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict holds references, as torch's
    tail = common.train(model, opt, 3, start=3)
    final = common.shard_digest(model)

    model2, opt2 = fresh()
    with torch.no_grad():
        for n, p in model2.named_parameters():
            local_tensor(p).copy_(saved_model[n])
    opt2.load_state_dict(saved_opt)
    tail2 = common.train(model2, opt2, 3, start=3)
    return tail, tail2, common.shard_digest(model2) == final


@pytest.mark.parametrize(
    "key", ["demo", "demo-overlap", "demo-delayed", "demo-after", "random", "diloco"]
)
def test_state_dict_round_trip_resumes_identically(pool, key):
    for tail, tail2, same in pool.run(checkpoint_roundtrip, key):
        assert tail == tail2
        assert same


def torch_tools(steps: int) -> list[float]:
    """LR scheduler, clipping, gradient accumulation and bf16 autocast-by-FSDP together."""
    model, opt = deto.prepare(
        common.make_model(), common.topo(), replicator=deto.DeMo(blocks="2d", topk=8, chunk=8),
        optimizer=torch.optim.AdamW, lr=3e-3, sign=False, mixed_precision="bf16",
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    rank = dist.get_rank()
    lrs = []
    for s in range(steps):
        for micro in range(2):
            x, y = common.batch(10 * s + micro, rank)
            (nn.functional.mse_loss(model(x), y) / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_lr_scheduler_clipping_accumulation_bf16(pool):
    out = pool.run(torch_tools, 3)
    assert out[0] == pytest.approx([3e-3 / 2, 3e-3 / 3, 3e-3 / 4])


def nonfinite(mode: str) -> str:
    model, opt = deto.prepare(
        common.make_model(), common.topo(), replicator="full", lr=1e-2, nonfinite=mode
    )
    x, y = common.batch(0, dist.get_rank())
    nn.functional.mse_loss(model(x), y).backward()
    local_tensor(model.out.bias.grad).fill_(float("inf"))
    try:
        opt.step()
    except FloatingPointError as e:
        return f"raised: {e}"
    finite = all(torch.isfinite(local_tensor(p)).all() for p in model.parameters())
    return f"skipped={opt.stats().nonfinite_skipped} finite={finite}"


def test_nonfinite_gradient_raises_or_is_skipped(pool):
    raised = pool.run(nonfinite, "raise")
    assert all(r.startswith("raised: Non-finite gradient") and "out.bias" in r for r in raised)
    skipped = pool.run(nonfinite, "skip")
    # FSDP shards the 7-element bias 4 + 3, so every rank holds (and skips) a part of it
    assert all(s.endswith("finite=True") for s in skipped)
    assert all("skipped=1" in s for s in skipped)


def bad_topology() -> str:
    try:
        deto.Topology(nodes=3, ranks_per_node=2, device="cpu").init()
    except ValueError as e:
        return str(e)
    return "no error"


def test_world_size_mismatch_is_a_clear_error(pool):
    assert all("World size 4 does not equal" in m for m in pool.run(bad_topology))


def hf_model(steps: int) -> tuple[list[float], str]:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model, opt = deto.prepare(
        transformers.GPT2LMHeadModel(cfg), common.topo(), replicator="demo", lr=3e-3,
        topk=16, chunk=16,
    )
    g = torch.Generator().manual_seed(dist.get_rank())
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 8, (4, 16), generator=g)  # a small alphabet: learnable quickly
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, common.shard_digest(model)


def test_hugging_face_model_trains_through_prepare(pool):
    out = pool.run(hf_model, 12)
    for losses, _ in out:
        assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses
    assert out[0][1] == out[2][1] and out[1][1] == out[3][1]


def prebuilt_optimizer(steps: int) -> tuple[list[float], list[float]]:
    """An optimizer built before prepare() is re-pointed at the sharded parameters."""
    model = common.make_model()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model, opt = deto.prepare(model, common.topo(), replicator="full", optimizer=base, sign=False)
    assert opt.base is base and all(isinstance(p, torch.distributed.tensor.DTensor) for p in opt.params)
    got = common.train(model, opt, steps)
    ref_model, ref_opt = deto.prepare(
        common.make_model(), common.topo(), replicator="full", optimizer=torch.optim.AdamW,
        lr=1e-2, sign=False,
    )
    return got, common.train(ref_model, ref_opt, steps)


def test_prepare_accepts_a_built_optimizer(pool):
    for got, ref in pool.run(prebuilt_optimizer, 3):
        assert got == ref


def simulated_nodes(nodes: str | None) -> tuple[int, int, int, int]:
    """Under torchrun on one machine (LOCAL_WORLD_SIZE = WORLD_SIZE = 4): the Topology from
    the environment, the bytes one step sends across its nodes, and how many 1-node warnings
    this rank logged."""
    os.environ["LOCAL_WORLD_SIZE"] = "4"
    if nodes is not None:
        os.environ["DETO_NODES"] = nodes
    ranklog._said.clear()  # the pool's processes outlive a case
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger("deto.optim").addHandler(handler)
    try:
        topo = deto.Topology.from_env(device="cpu")
        model, opt = deto.prepare(common.make_model(), topo, replicator="demo", lr=1e-2)
        common.train(model, opt, 2)
    finally:
        logging.getLogger("deto.optim").removeHandler(handler)
    warned = sum("nothing crosses nodes" in r.getMessage() for r in seen)
    return topo.nodes, topo.ranks_per_node, opt.stats().bytes_sent, warned


def explicit_bytes() -> int:
    model, opt = deto.prepare(common.make_model(), common.topo(2, 2), replicator="demo", lr=1e-2)
    common.train(model, opt, 2)
    return opt.stats().bytes_sent


def test_deto_nodes_splits_one_machine_into_simulated_nodes(pool):
    split = pool.run(simulated_nodes, "2")
    explicit = pool.run(explicit_bytes)
    assert [(n, s) for n, s, _, _ in split] == [(2, 2)] * 4
    assert [b for _, _, b, _ in split] == explicit and all(b > 0 for b in explicit)
    assert [w for *_, w in split] == [0] * 4
    single = pool.run(simulated_nodes, None)
    assert [(n, s, b) for n, s, b, _ in single] == [(1, 4, 0)] * 4
    assert [w for *_, w in single] == [1, 0, 0, 0]  # once, on rank 0
