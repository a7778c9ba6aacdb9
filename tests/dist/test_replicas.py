"""Replica integrity: divergence injected on one node is found, named, repaired, and stays gone."""

from __future__ import annotations

import common
import pytest
import torch
import torch.distributed as dist

import deto
from deto.replicators.base import local_tensor

pytestmark = pytest.mark.dist

TARGET = "out.weight"


def diverge_and_repair(where: str) -> dict:
    model, opt = deto.prepare(
        common.make_model(), common.topo(), replicator="demo", optimizer=torch.optim.AdamW,
        sign=False, topk=8, chunk=8, lr=1e-2,
    )
    common.train(model, opt, 2)
    clean = deto.check_replicas(model, opt)
    if dist.get_rank() == 3:  # node 1, second shard
        param = dict(model.named_parameters())[TARGET]
        with torch.no_grad():
            victim = local_tensor(param) if where == "param" else local_tensor(opt.state[param]["exp_avg"])
            victim.view(-1)[0] += 1e-3
    found = deto.check_replicas(model, opt, repair=True)
    after = deto.check_replicas(model, opt)
    common.train(model, opt, 2, start=2)
    return {"clean": clean, "found": found, "after": after, "digest": common.shard_digest(model)}


@pytest.mark.parametrize("where", ["param", "optimizer state"])
def test_divergence_is_found_repaired_and_stays_repaired(pool, where):
    out = pool.run(diverge_and_repair, where)
    assert all(o["clean"].identical for o in out)
    for rank, o in enumerate(out):
        found = o["found"]
        assert found.diverged == [1] and found.source == 0 and found.repaired
        expected = TARGET if where == "param" else f"{TARGET}:exp_avg"
        assert found.tensors == ([expected] if rank % 2 == 1 else [])
        assert o["after"].identical
    assert out[0]["digest"] == out[2]["digest"]
    assert out[1]["digest"] == out[3]["digest"]


def without_repair() -> dict:
    model, opt = deto.prepare(common.make_model(), common.topo(), replicator="full", lr=1e-2)
    if dist.get_rank() == 2:  # node 1, first shard
        with torch.no_grad():
            local_tensor(dict(model.named_parameters())["inp.weight"]).view(-1)[0] += 1.0
    first = deto.check_replicas(model, opt, repair=False)
    second = deto.check_replicas(model, opt, repair=False)
    return {"first": first, "second": second}


def test_check_without_repair_reports_and_leaves_the_bytes(pool):
    out = pool.run(without_repair)
    for o in out:
        assert o["first"].diverged == [1] and not o["first"].repaired
        assert o["second"].diverged == [1]
