"""The integrations' checks that need no process group."""

from __future__ import annotations

import pytest
import torch

from deto.integrations._compat import check_world, find_decoupled


def test_find_decoupled_names_what_it_got():
    sgd = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(TypeError, match=r"Expected a deto.DecoupledOptimizer .* got SGD"):
        find_decoupled(sgd)


def test_unsupported_transformers_fails_clearly(monkeypatch):
    hf = pytest.importorskip("deto.integrations.hf", reason="transformers is not installed")
    hf.check_transformers()  # the installed one is supported
    monkeypatch.setattr(hf.transformers, "__version__", "4.57.1")
    with pytest.raises(RuntimeError, match=r"transformers >=5.24,<6 .* found 4.57.1"):
        hf.check_transformers()


def test_trainer_without_a_replaced_method_fails_clearly(monkeypatch):
    hf = pytest.importorskip("deto.integrations.hf", reason="transformers is not installed")
    monkeypatch.delattr(hf.Trainer, "_load_best_model")
    with pytest.raises(RuntimeError, match="without _load_best_model"):
        hf.check_transformers()


def test_a_framework_world_other_than_the_topology_stops_with_the_fix():
    from types import SimpleNamespace

    topo = SimpleNamespace(world_size=4, rank=2, nodes=2, ranks_per_node=2, device_type="cpu")
    check_world("X", 4, 2, "cpu", topo, "do Y")  # type: ignore[arg-type]
    for world, rank, device in ((1, 0, "cpu"), (4, 1, "cpu"), (4, 2, "cuda")):
        with pytest.raises(ValueError, match=r"^X sees .* 2 node\(s\) x 2 rank\(s\).*: do Y$"):
            check_world("X", world, rank, device, topo, "do Y")  # type: ignore[arg-type]


def test_cpu_topologies_get_use_cpu():
    hf = pytest.importorskip("deto.integrations.hf", reason="transformers is not installed")
    from types import SimpleNamespace

    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused", report_to=[])
    assert hf.cpu_args(args, SimpleNamespace(device_type="cpu")).use_cpu is True
    assert hf.cpu_args(args, SimpleNamespace(device_type="cuda")) is args
