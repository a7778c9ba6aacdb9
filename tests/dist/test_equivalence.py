"""Numerical equivalences between deto schemes and torch's own distributed training."""

from __future__ import annotations

import common
import pytest
import torch
from torch.distributed.fsdp import fully_shard

import deto

pytestmark = pytest.mark.dist


def full_vs_hsdp(steps: int) -> float:
    t = common.topo()
    model, opt = deto.prepare(
        common.make_model(), t, replicator="full", optimizer=torch.optim.AdamW, lr=1e-2,
        sign=False, weight_decay=0.1,
    )
    common.train(model, opt, steps)
    ours = common.full_params(model)

    ref = common.make_model()
    for b in ref.blocks:
        fully_shard(b, mesh=t.mesh)
    fully_shard(ref, mesh=t.mesh)  # 2-D mesh: torch's HSDP
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    common.train(ref, ref_opt, steps)
    theirs = common.full_params(ref)
    return max((ours[n] - theirs[n]).abs().max().item() for n in ours)


def test_full_adamw_matches_torch_hsdp(pool):
    diffs = pool.run(full_vs_hsdp, 5)
    assert max(diffs) < 1e-6, diffs
