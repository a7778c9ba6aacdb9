"""The rank rule of deto.ranklog: a line every rank would write alike is written by rank 0 of
the group that would write it alike (the world by default, a Comm's node 0), not by every one."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed as dist
from torch import nn

import deto
from deto import ranklog


@pytest.fixture
def rank_of(monkeypatch):
    """Pretend a process group is set up, this process holding the given rank per group."""
    ranks: dict[object, int] = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: ranks[group])
    return ranks


def test_without_a_process_group_every_caller_speaks() -> None:
    assert ranklog.speaks() and ranklog.speaks(None)


def test_only_rank_0_of_the_world_or_of_the_given_group_speaks(rank_of) -> None:
    node_group = object()
    rank_of.update({None: 3, node_group: 0})  # global rank 3, first of its node
    assert not ranklog.speaks()
    assert ranklog.speaks(node_group)  # type: ignore[arg-type]
    rank_of.update({None: 0, node_group: 1})
    assert ranklog.speaks() and not ranklog.speaks(node_group)  # type: ignore[arg-type]


def test_a_comm_speaks_on_node_0_only(rank_of) -> None:
    rank_of[None] = 5  # the world's rank does not matter for a replicate group's line
    first, second = deto.FakeComm(nodes=2).comms
    assert ranklog.speaks(first) and not ranklog.speaks(second)


def test_warn_writes_on_the_speaker_only(rank_of, caplog) -> None:
    log = logging.getLogger("deto.test_ranklog_rule")
    with caplog.at_level(logging.WARNING, logger=log.name):
        rank_of[None] = 1
        ranklog.warn(log, "from %s", "rank 1")
        ranklog.warn_once(log, "once from %s", "rank 1")
        rank_of[None] = 0
        ranklog.warn(log, "from %s", "rank 0")
    assert [r.getMessage() for r in caplog.records] == ["from rank 0"]


def test_skipped_nonfinite_gradients_are_named_by_node_0_alone(caplog) -> None:
    torch.manual_seed(0)
    initial = nn.Linear(4, 2).state_dict()

    def node(comm: deto.Comm) -> None:
        model = nn.Linear(4, 2)
        model.load_state_dict(initial)
        opt = deto.DecoupledOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                      [deto.Full()], comm, nonfinite="skip")
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        opt.step()

    with caplog.at_level(logging.WARNING, logger="deto.optim"):
        deto.FakeComm(nodes=2).run(node)
    lines = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(lines) == 1 and "skipping non-finite gradients" in lines[0]
