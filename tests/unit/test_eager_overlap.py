"""Eager overlap on simulated nodes (FakeComm): the consensus moves exactly as the plain
one-step delay's parameters do, the live shards add this node's own selection, the base's
state is the consensus's, and the consensus starts from the weights the first step sees."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deto

LR = 0.01
OPTIONS = {"topk": 4, "chunk": 8, "blocks": "2d"}


def _shape() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(16, 1))


torch.manual_seed(0)
INITIAL = _shape().state_dict()  # built once: the nodes' threads share torch's global RNG


def _net() -> nn.Module:
    model = _shape()
    model.load_state_dict(INITIAL)
    return model


def _make(comm: deto.Comm, mode: str | None, base: str, after: int = 0):
    """``mode`` None: the exchange in the step."""
    model = _net()
    overlap = {} if mode is None else {"overlap": True, "overlap_mode": mode,
                                       "overlap_after": after}
    rep = deto.DeMo(**overlap, **OPTIONS)
    if base == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        sign = True
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        sign = False
    names = {p: n for n, p in model.named_parameters()}
    return model, rep, deto.DecoupledOptimizer(
        opt, [rep], comm, sign=sign, weight_decay=0.1, param_names=names
    )


def _give_grads(model: nn.Module, node: int, t: int) -> None:
    """The same gradients whichever parameters they are taken at: the paths are compared on
    equal inputs, so any difference is the optimizer's arithmetic."""
    g = torch.Generator().manual_seed(100 * t + node)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _trajectory(mode: str | None, base: str, steps: int, after: int = 0) -> list:
    def node(comm):
        model, rep, opt = _make(comm, mode, base, after)
        out = []
        for t in range(steps):
            _give_grads(model, comm.rank, t)
            opt.step()
            live = [p.detach().clone() for p in model.parameters()]
            with opt.consensus():
                agreed = [p.detach().clone() for p in model.parameters()]
            own = {rep.slots[pos].index: e.clone() for pos, e in rep.provisional().items()}
            out.append((live, agreed, own))
        return out

    return deto.FakeComm(nodes=2).run(node)


@pytest.mark.parametrize("after", [0, 2])
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_consensus_moves_exactly_as_the_plain_delay(base: str, after: int) -> None:
    eager, delayed = _trajectory("eager", base, 5, after), _trajectory("delayed", base, 5, after)
    for node_eager, node_delayed in zip(eager, delayed, strict=True):
        for (_, agreed, _), (params, _, _) in zip(node_eager, node_delayed, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(agreed, params, strict=True))
    for step in range(5):  # and the consensus is the same bytes on both nodes
        a, b = eager[0][step][1], eager[1][step][1]
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_live_shards_add_this_nodes_own_selection_as_sign_sgd_steps_it() -> None:
    nodes = _trajectory("eager", "sgd", 3)
    for (_, _, own0), (_, _, own1) in zip(*nodes, strict=True):  # each node's own, not the mean
        assert all(not torch.equal(own0[i], own1[i]) for i in own0)
    for node in nodes:
        for live, agreed, own in node:
            assert set(own) == {0, 1, 2, 3, 4}  # the last bias, 1 element, is sent dense
            for i, (x, c) in enumerate(zip(live, agreed, strict=True)):
                if i in own:
                    assert torch.equal(x, c - LR * own[i].sign())
                else:
                    assert torch.equal(x, c)


def _base_state_after(mode: str, steps: int = 3) -> list[dict[str, torch.Tensor]]:
    """Per node: AdamW's state of the first parameter after ``steps`` steps in ``mode``."""

    def node(comm):
        model, _, opt = _make(comm, mode, "adamw")
        for t in range(steps):
            _give_grads(model, comm.rank, t)
            opt.step()
        return {k: v.clone() for k, v in opt.base.state[next(model.parameters())].items()}

    return deto.FakeComm(nodes=2).run(node)


def test_the_trial_step_leaves_the_base_state_of_the_consensus() -> None:
    for a, b in zip(_base_state_after("eager"), _base_state_after("delayed"), strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_consensus_starts_from_the_weights_the_first_step_sees() -> None:
    def node(comm):
        model, rep, opt = _make(comm, "eager", "sgd")
        with torch.no_grad():  # weights loaded after the optimizer was built
            for p in model.parameters():
                p.fill_(0.5)
        _give_grads(model, comm.rank, 0)
        opt.step()
        with opt.consensus():
            return [p.detach().clone() for p in model.parameters()]

    for params in deto.FakeComm(nodes=2).run(node):
        # nothing arrived yet on the sparse shards: their consensus is the loaded weights,
        # decayed once (weight decay 0.1 at lr 0.01)
        assert torch.equal(params[0], torch.full_like(params[0], 0.5) * (1 - LR * 0.1))


@pytest.mark.parametrize("mode", ["eager", "delayed"])
def test_overlap_after_runs_the_first_exchanges_in_the_step(mode: str) -> None:
    """With ``overlap_after=2`` steps 1-2 are the in-step path's bytes, with nothing
    provisional; from step 3 on the exchange is in flight and the paths part."""
    in_step, late = _trajectory(None, "sgd", 4), _trajectory(mode, "sgd", 4, after=2)
    for node_in_step, node_late in zip(in_step, late, strict=True):
        for step, ((want, _, _), (live, agreed, own)) in enumerate(
            zip(node_in_step, node_late, strict=True), start=1
        ):
            same = all(torch.equal(a, b) for a, b in zip(want, agreed, strict=True))
            assert same == (step <= 2), step
            assert bool(own) == (mode == "eager" and step > 2), step
            if step <= 2:
                assert all(torch.equal(a, b) for a, b in zip(live, agreed, strict=True))


def test_overlap_mode_is_checked_and_shown() -> None:
    assert "overlap_mode" not in repr(deto.DeMo(overlap=True))
    assert "overlap_mode='delayed'" in repr(deto.DeMo(overlap=True, overlap_mode="delayed"))
    with pytest.raises(ValueError, match="expected one of eager, delayed"):
        deto.DeMo(overlap=True, overlap_mode="late")
    assert "overlap_after=30" in repr(deto.DeMo(overlap=True, overlap_after=30))
    with pytest.raises(ValueError, match="overlap_after"):
        deto.DeMo(overlap=True, overlap_after=-1)


def test_a_deferred_step_keeps_the_update_in_flight_on_the_live_shard() -> None:
    """every=2: on the steps between exchanges the aggregate is still in flight, so the live
    shard stays consensus + this node's own selection, and the gradients stay unset."""

    def node(comm):
        model = _net()
        rep = deto.DeMo(overlap=True, every=2, **OPTIONS)
        base = torch.optim.SGD(model.parameters(), lr=LR)
        opt = deto.DecoupledOptimizer(base, [rep], comm, sign=True)
        out = []
        for t in range(1, 5):
            _give_grads(model, comm.rank, t)
            opt.step()
            own = {rep.slots[pos].index: e.sign() for pos, e in rep.provisional().items()}
            live = [p.detach().clone() for p in model.parameters()]
            with opt.consensus():
                agreed = [p.detach().clone() for p in model.parameters()]
            out.append((own, live, agreed, [p.grad is None for p in model.parameters()]))
        return out

    for steps in deto.FakeComm(nodes=2).run(node):
        for t, (own, live, agreed, unset) in enumerate(steps, start=1):
            assert bool(own) == (t >= 2)  # the first exchange is at step 2
            for i, sign in own.items():
                assert torch.equal(live[i], agreed[i] - LR * sign), (t, i)
            if t % 2:  # deferred: the optimizer took the gradients
                assert all(unset)
