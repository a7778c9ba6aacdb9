"""Topology.from_env with simulated nodes (DETO_NODES or nodes=), and warn_once's rank rule."""

from __future__ import annotations

import logging

import pytest

import deto
from deto import ranklog


@pytest.fixture
def world(monkeypatch):
    def set_world(world: int, per_machine: int, nodes: str | None = None) -> None:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(per_machine))
        if nodes is None:
            monkeypatch.delenv("DETO_NODES", raising=False)
        else:
            monkeypatch.setenv("DETO_NODES", nodes)

    return set_world


def shape(topo: deto.Topology) -> tuple[int, int]:
    return topo.nodes, topo.ranks_per_node


def test_every_machine_is_one_node_by_default(world) -> None:
    world(8, 4)
    assert shape(deto.Topology.from_env(device="cpu")) == (2, 4)


@pytest.mark.parametrize(("env", "arg", "expected"), [
    ("2", None, (2, 2)), (None, 4, (4, 1)), ("4", 2, (2, 2)),  # the argument wins
])
def test_one_machine_splits_into_simulated_nodes(world, env, arg, expected) -> None:
    world(4, 4, env)
    assert shape(deto.Topology.from_env(device="cpu", nodes=arg)) == expected


def test_simulated_nodes_split_each_machine(world) -> None:
    world(8, 4, "4")
    assert shape(deto.Topology.from_env(device="cpu")) == (4, 2)


@pytest.mark.parametrize(("world_size", "per_machine", "env", "message"), [
    (4, 4, "3", "Invalid nodes: 3"),
    (8, 4, "1", "Invalid nodes: 1"),  # a simulated node may not span two machines
    (4, 4, "two", "Invalid DETO_NODES: 'two'"),
    (4, 4, "0", "Invalid DETO_NODES: 0"),
])
def test_impossible_splits_name_the_fix(world, world_size, per_machine, env, message) -> None:
    world(world_size, per_machine, env)
    with pytest.raises(ValueError, match=message):
        deto.Topology.from_env(device="cpu")


def test_warn_once_says_a_line_once(caplog) -> None:
    log = logging.getLogger("deto.test_ranklog")
    ranklog._said.discard("said %s")
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(3):
            ranklog.warn_once(log, "said %s", "once")
    assert [r.getMessage() for r in caplog.records] == ["said once"]
