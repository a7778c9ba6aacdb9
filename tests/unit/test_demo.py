"""DeMo on one process: the one-step-delayed overlap and its checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch

import deto
from deto.comm import Comm
from deto.replicators.base import Slot

SHAPES = [(24, 16), (16,), (40, 8), (1,)]  # the (1,) one is sent dense


def _bound(**options):
    rep = deto.DeMo(blocks="2d", topk=4, chunk=8, **options)
    rep.bind([Slot(i, f"p{i}", torch.zeros(s)) for i, s in enumerate(SHAPES)])
    return rep


def _grads(step):
    g = torch.Generator().manual_seed(step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _run(rep, steps, start=0):
    comm, positions = Comm(None, 1), list(range(len(SHAPES)))
    return [
        [t.clone() for t in rep.replicate(positions, _grads(s), [0.1] * len(SHAPES), comm)]
        for s in range(start, start + steps)
    ]


def test_overlap_applies_the_previous_aggregate():
    plain, delayed = _run(_bound(), 4), _run(_bound(overlap=True), 4)
    sparse = [i for i, s in enumerate(SHAPES) if s != (1,)]
    for i in sparse:
        assert not delayed[0][i].any()  # nothing in flight on the first step
        for t in range(1, 4):
            assert torch.equal(delayed[t][i], plain[t - 1][i])
    for t in range(4):  # shards sent dense are not delayed
        assert torch.equal(delayed[t][3], plain[t][3])


def _checkpoint(rep):
    """What the optimizer's state dict keeps of a replicator: its buffers and counters."""
    rep.finish_in_flight()
    return copy.deepcopy(rep.state), dict(rep.scalars())


def _restore(rep, saved):
    buffers, scalars = saved
    for live, kept in zip(rep.state, buffers, strict=True):
        assert live.keys() == kept.keys()
        for key, buf in live.items():
            buf.copy_(kept[key])
    rep.load_scalars(scalars)


def test_overlap_checkpoint_holds_the_aggregate_in_flight():
    rep = _bound(overlap=True)
    _run(rep, 3)
    saved = _checkpoint(rep)
    assert saved[1]["pending"] == 1
    tail = _run(rep, 2, start=3)  # continuing after a checkpoint changes nothing
    resumed = _bound(overlap=True)
    _restore(resumed, saved)
    again = _run(resumed, 2, start=3)
    straight = _run(_bound(overlap=True), 5)[3:]
    for runs in (tail, again):
        assert all(
            torch.equal(a, b)
            for x, y in zip(straight, runs, strict=True)
            for a, b in zip(x, y, strict=True)
        )
    assert "pending" not in _checkpoint(_bound())[1]


def test_overlap_option():
    assert "overlap=True" in repr(deto.DeMo(overlap=True))
    assert "overlap" not in repr(deto.DeMo())
    with pytest.raises(TypeError, match="overlap must be a bool"):
        deto.DeMo(overlap=1)
