"""What crosses nodes, on simulated nodes in one process (FakeComm): aggregation, error
feedback, deferral and non-finite gradients. tests/dist covers the same on real gloo ranks."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import deto
from deto.comm import all_reduce_bytes

LR = 0.1


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


torch.manual_seed(0)
INITIAL = _net().state_dict()


def make_model() -> nn.Module:
    """The same model on every node (node threads share torch's global RNG, so no seeding)."""
    model = _net()
    model.load_state_dict(INITIAL)
    return model


def make_optimizer(model: nn.Module, replicator: deto.Replicator, comm: deto.Comm, **kw):
    names = {p: n for n, p in model.named_parameters()}
    base = torch.optim.SGD(model.parameters(), lr=LR)
    return deto.DecoupledOptimizer(base, [replicator], comm, param_names=names, **kw)


def backward(model: nn.Module, step: int, node: int) -> None:
    """A different batch on every node and step."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1000 * step + node))
    model(x).pow(2).mean().backward()


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def on_nodes(fn: Callable[[deto.Comm], object], nodes: int = 2) -> list:
    return deto.FakeComm(nodes=nodes).run(fn)


def test_full_averages_the_nodes_gradients_and_counts_ring_bytes():
    def node(comm):
        model = make_model()
        opt = make_optimizer(model, deto.Full(), comm)
        before = params(model)
        backward(model, 0, comm.rank)
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        return before, grads, params(model), opt.stats()

    out = on_nodes(node, nodes=3)
    numel = sum(p.numel() for p in make_model().parameters())
    for before, _, after, stats in out:
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            mean = sum(o[1][i] for o in out) / 3
            assert torch.allclose(a, b - LR * mean, atol=1e-6)
        assert stats.bytes_sent == all_reduce_bytes(4 * numel, 3) and stats.collectives == 1
    assert all(torch.equal(a, b) for a, b in zip(out[0][2], out[2][2], strict=True))


def test_demo_error_feedback_keeps_on_each_node_what_it_did_not_send():
    # decay 0 and aggregation "all": the applied update is the mean over nodes of what each
    # sent, and what each sent is lr * grad minus what stayed in its delta
    def node(comm):
        model = make_model()
        rep = deto.DeMo(
            blocks="2d", topk=3, chunk=8, decay=0.0, aggregation="all", dense_fallback=False
        )
        opt = make_optimizer(model, rep, comm)
        before = params(model)
        backward(model, 0, comm.rank)
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        # delta lives in the DCT domain: compare in parameter space
        sent = [LR * g - rep.momentum(i) for i, g in enumerate(grads)]
        return before, sent, params(model), rep.state

    out = on_nodes(node)
    for before, _, after, state in out:
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            applied = (b - a) / LR
            assert torch.allclose(applied, (out[0][1][i] + out[1][1][i]) / 2, atol=1e-5)
        assert all(st["delta"].abs().sum() > 0 for st in state)  # something was held back
    assert all(torch.equal(a, b) for a, b in zip(out[0][2], out[1][2], strict=True))
    assert not torch.equal(out[0][3][0]["delta"], out[1][3][0]["delta"])  # each node's own


def test_deferred_gradients_rest_then_travel_together():
    def node(comm):
        model = make_model()
        opt = make_optimizer(model, deto.Full(every=2), comm)
        start = params(model)
        grads = []
        for s in range(2):
            backward(model, s, comm.rank)
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
            if s == 0:
                rested = params(model)
                first_bytes = opt.stats().bytes_sent
        return start, rested, first_bytes, grads, params(model)

    out = on_nodes(node)
    for start, rested, first_bytes, _, final in out:
        assert first_bytes == 0 and all(
            torch.equal(a, b) for a, b in zip(start, rested, strict=True)
        )
        for i, (b, a) in enumerate(zip(start, final, strict=True)):
            total = sum(o[3][0][i] + o[3][1][i] for o in out) / 2
            assert torch.allclose(a, b - LR * total, atol=1e-6)


@pytest.mark.parametrize("replicator", ["full", "demo", "demo-int8"])
def test_a_nonfinite_gradient_on_one_node_raises_on_every_node(replicator):
    def node(comm):
        model = make_model()
        name, _, values = replicator.partition("-")
        rep = deto.make_replicator(
            name, **({"topk": 4, "chunk": 8, "values": values} if values else {})
        )
        opt = make_optimizer(model, rep, comm)
        backward(model, 0, comm.rank)
        if comm.rank == 1:
            model[2].bias.grad[0] = float("nan")
        try:
            opt.step()
        except FloatingPointError as e:
            return str(e)
        return "no error"

    first, second = on_nodes(node)
    assert first == second and first.startswith("Non-finite gradient at step 1"), (first, second)
    assert "2.bias" in first


def test_a_nonfinite_gradient_on_one_node_is_skipped_on_every_node():
    def node(comm):
        model = make_model()
        rep = deto.DeMo(blocks="2d", topk=4, chunk=8)
        opt = make_optimizer(model, rep, comm, nonfinite="skip")
        for s in range(3):
            backward(model, s, comm.rank)
            if comm.rank == 1 and s == 1:
                model[2].weight.grad[0, 0] = float("inf")
            opt.step()
            opt.zero_grad()
            if s == 1:
                skipped = opt.stats().nonfinite_skipped
        finite = all(st["delta"].isfinite().all() for st in rep.state)
        return skipped, finite, params(model)

    (skip0, finite0, p0), (skip1, finite1, p1) = on_nodes(node)
    assert skip0 == skip1 == 1
    assert finite0 and finite1
    assert all(torch.equal(a, b) and a.isfinite().all() for a, b in zip(p0, p1, strict=True))
