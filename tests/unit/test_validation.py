"""Bad input fails loudly, naming the parameter and the value."""

from __future__ import annotations

import pytest
import torch

import deto
from deto.comm import Comm
from deto.replicators import build_replicators


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: deto.DeMo(blocks="2d", topk=0), "Invalid topk: 0"),
        (lambda: deto.DeMo(chunk=0), "Invalid chunk: 0"),
        (lambda: deto.DeMo(blocks="2d", topk=65, chunk=8), "Invalid topk: 65"),
        (lambda: deto.DeMo(decay=1.0), "Invalid decay: 1.0"),
        (lambda: deto.DeMo(decay=-0.1), "Invalid decay: -0.1"),
        (lambda: deto.DeMo(blocks="3d"), "Invalid blocks: '3d'"),
        (lambda: deto.DeMo(values="fp8"), "Invalid values: 'fp8'"),
        (lambda: deto.DeMo(aggregation="max"), "Invalid aggregation"),
        (lambda: deto.RandomSubset(rate=0.0), "Invalid rate: 0.0"),
        (lambda: deto.Striding(rate=1.5), "Invalid rate: 1.5"),
        (lambda: deto.Slicing(rate=float("nan")), "Invalid rate: nan"),
        (lambda: deto.Full(every=0), "Invalid every: 0"),
        (lambda: deto.Full(skip_every=1), "Invalid skip_every: 1"),
        (lambda: deto.Full(offset=-1), "Invalid offset: -1"),
        (lambda: deto.DiLoCo(every=0), "Invalid every: 0"),
        (lambda: deto.DiLoCo(outer_lr=0.0), "Invalid outer_lr: 0.0"),
        (lambda: deto.DiLoCo(outer_momentum=1.0), "Invalid outer_momentum: 1.0"),
        (lambda: deto.Topology(nodes=0), "Invalid nodes: 0"),
        (lambda: deto.Topology(nodes=2, ranks_per_node=0), "Invalid ranks_per_node: 0"),
        (lambda: deto.Topology(nodes=2, device="tpu"), "Invalid device: 'tpu'"),
        (
            lambda: deto.make_replicator("diloko"),
            "Unknown replicator: 'diloko' \\(valid: demo, diloco",
        ),
        (lambda: build_replicators([], {}), "empty"),
        (lambda: build_replicators(["demo", "full"], {"topk": 3}), "exactly one replicator"),
    ],
)
def test_value_errors(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: deto.DeMo(blocks="2d", topk=2.5), "topk must be an int"),
        (lambda: deto.DeMo(blocks="2d", topk=True), "topk must be an int"),
        (lambda: deto.RandomSubset(rate="0.1"), "rate must be a number"),
        (lambda: deto.Full(every=1.0), "every must be an int"),
        (lambda: deto.Full(include="weight"), "include must be callable"),
        (lambda: deto.DiLoCo(nesterov=1), "nesterov must be a bool"),
        (lambda: deto.Topology(nodes="2"), "nodes must be an int"),
        (lambda: deto.make_replicator(3), "replicator name must be a str"),
        (lambda: build_replicators([3], {}), "replicator must be a name or a Replicator"),
    ],
)
def test_type_errors(factory, match):
    with pytest.raises(TypeError, match=match):
        factory()


def _optimizer(**kw):
    p = torch.nn.Parameter(torch.zeros(3))
    return deto.DecoupledOptimizer(torch.optim.SGD([p], lr=0.1), [deto.Full()], Comm(None, 1), **kw)


def test_optimizer_validation():
    with pytest.raises(ValueError, match="Invalid weight_decay: -1.0"):
        _optimizer(weight_decay=-1.0)
    with pytest.raises(ValueError, match="Invalid nonfinite: 'warn'"):
        _optimizer(nonfinite="warn")
    with pytest.raises(TypeError, match="sign must be a bool"):
        _optimizer(sign="yes")
    with pytest.raises(TypeError, match="base must be a torch.optim.Optimizer"):
        deto.DecoupledOptimizer(object(), [], Comm(None, 1))  # type: ignore[arg-type]


def test_prepare_rejects_bad_arguments():
    topo = deto.Topology(nodes=1, device="cpu")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        deto.prepare("model", topo)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        deto.prepare(torch.nn.Linear(2, 2), topo, lr=-1)
    with pytest.raises(TypeError, match="topology must be a deto.Topology"):
        deto.prepare(torch.nn.Linear(2, 2), (2, 2))  # type: ignore[arg-type]


def test_from_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    t = deto.Topology.from_env(device="cpu")
    assert (t.nodes, t.ranks_per_node, t.backend) == (2, 4, "gloo")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="WORLD_SIZE=8 is not a multiple of LOCAL_WORLD_SIZE=3"):
        deto.Topology.from_env()
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ValueError, match="WORLD_SIZE is not set"):
        deto.Topology.from_env()


def test_topology_timeout_is_checked_and_read_from_the_environment() -> None:
    from deto.topology import DEFAULT_TIMEOUT_S, Topology, timeout_from_env

    assert Topology(2).timeout == DEFAULT_TIMEOUT_S == 60.0
    assert Topology(2, timeout=5).collective_timeout.total_seconds() == 5
    with pytest.raises(ValueError, match="Invalid timeout: 0.0"):
        Topology(2, timeout=0)
    with pytest.raises(TypeError, match="timeout must be a number"):
        Topology(2, timeout="5")  # type: ignore[arg-type]
    assert timeout_from_env({}) == DEFAULT_TIMEOUT_S
    assert timeout_from_env({"DETO_TIMEOUT": "2.5"}) == 2.5
    with pytest.raises(ValueError, match="Invalid DETO_TIMEOUT: 'soon'"):
        timeout_from_env({"DETO_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="Invalid DETO_TIMEOUT: -1.0"):
        timeout_from_env({"DETO_TIMEOUT": "-1"})
