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
    """(With overlap too: it gives Full's numbers bitwise, below.)"""
    diffs = pool.run(full_vs_hsdp, 5)
    assert max(diffs) < 1e-6, diffs


def full_overlap_vs_sync(
    steps: int, every: int, accumulate: int
) -> tuple[float, list[int], int]:
    """Full(overlap=True) against Full() on the same batches; ``accumulate`` backward passes
    per step (plain FSDP2 accumulation: every pass reduce-scatters). Also returns, per step,
    how many all-reduces the overlapped run issued."""
    t = common.topo()
    runs, counts = [], []
    for overlap in (False, True):
        model, opt = deto.prepare(
            common.make_model(), t, replicator=deto.Full(overlap=overlap, every=every),
            optimizer=torch.optim.AdamW, lr=1e-2, sign=False,
        )
        rank = torch.distributed.get_rank()
        for s in range(steps):
            for micro in range(accumulate):
                x, y = common.batch(s * accumulate + micro, rank)
                torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            if overlap:
                counts.append(opt.stats().collectives)
        runs.append(common.full_params(model))
    a, b = runs
    sent = sum(1 for p in model.parameters() if p.to_local().numel())  # shards that travel
    return max((a[n] - b[n]).abs().max().item() for n in a), counts, sent


@pytest.mark.parametrize(("every", "accumulate"), [(1, 1), (2, 1), (1, 2)])
def test_full_overlap_gives_the_same_numbers(pool, every, accumulate):
    """Two nodes add the same two values either way: bitwise equal, with skipped steps (the
    pending sum rides along) and with a second backward pass (its parameters are resent)."""
    out = pool.run(full_overlap_vs_sync, 4, every, accumulate)
    assert all(diff == 0.0 for diff, _, _ in out), out
    for _, counts, sent in out:
        if every == 1 and accumulate == 1:  # one all-reduce per gradient, started in backward
            assert counts == [sent] * 4, (counts, sent)
        if every == 2:  # nothing on skipped steps
            assert counts[0] == 0 and counts[1] == sent, (counts, sent)
        if accumulate == 2:  # the first pass's early sends, superseded, then one resend
            assert counts == [sent + 1] * 4, (counts, sent)
