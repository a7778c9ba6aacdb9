"""Schedules and the optimizer's single-node logic, with a one-node (no-op) comm."""

from __future__ import annotations

import pytest
import torch

import deto
from deto.comm import Comm, all_gather_bytes, all_reduce_bytes, broadcast_bytes
from deto.compress.chunking import to_blocks
from deto.compress.dct import dct_blocks
from deto.replicators.subset import subset_size


def test_schedule_every_skip_offset():
    s = deto.SyncSchedule(every=3, skip_every=2, offset=1)
    assert [t for t in range(1, 13) if s.fires(t)] == [5, 11]
    assert all(deto.SyncSchedule().fires(t) for t in range(1, 5))
    with pytest.raises(ValueError, match="Invalid step: 0"):
        s.fires(0)


def test_ring_byte_formulas():
    assert all_reduce_bytes(1000, 1) == 0
    assert all_reduce_bytes(1000, 2) == 1000
    assert all_reduce_bytes(1000, 4) == 1500
    assert all_gather_bytes(100, 4) == 300
    assert broadcast_bytes(1000, 4) == 750


def _single_node(replicator, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 3))
    names = {p: n for n, p in model.named_parameters()}
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = deto.DecoupledOptimizer(base, [replicator], Comm(None, 1), param_names=names, **kw)
    return model, opt


def _step(model, opt):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(opt.step_count))
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_one_node_full_is_plain_sgd():
    model, opt = _single_node(deto.Full())
    ref, ref_opt = _single_node(deto.NoReplication())
    for _ in range(3):
        _step(model, opt)
        _step(ref, ref_opt)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.stats().bytes_sent == 0  # nothing crosses a network of one node


def test_sign_and_weight_decay():
    model, opt = _single_node(deto.NoReplication(), sign=True, weight_decay=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 16)
    model(x).pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for b, g, p in zip(before, grads, model.parameters(), strict=True):
        assert torch.allclose(p, b * (1 - 0.1 * 0.5) - 0.1 * g.sign())


def test_demo_error_feedback_keeps_what_was_not_sent():
    rep = deto.DeMo(blocks="2d", topk=4, chunk=8, decay=0.0, dense_fallback=False)
    model, opt = _single_node(rep, sign=False)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 16)).pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    params = zip(before, grads, model.parameters(), rep.plans, strict=True)
    for pos, (b, g, p, plan) in enumerate(params):
        # one node decodes exactly what it sent; what it did not send stays in delta
        sent, delta = (b - p) / 0.1, rep.momentum(pos)
        assert torch.allclose(sent + delta, 0.1 * g, atol=1e-6)
        assert delta.abs().sum() > 0 and sent.abs().sum() > 0
        # and what was sent has at most k DCT coefficients per block
        coeffs = dct_blocks(to_blocks(sent, plan.layout)).reshape(plan.layout.num_blocks, -1)
        assert int((coeffs.abs() > 1e-6).sum(dim=1).max()) <= plan.k


@pytest.mark.parametrize("n", [1, 2, 5, 100])
def test_every_tensor_sends_at_least_one_row(n):
    for rate in (1e-6, 0.01, 0.5, 1.0):
        k = subset_size(n, rate)
        assert 1 <= k <= n


def test_striding_covers_every_row_once_per_cycle():
    rep = deto.Striding(rate=0.25)
    seen = []
    for fired in range(4):
        rep.fired = fired
        seen.extend(rep.rows(0, 10).tolist())
    assert sorted(seen) == list(range(10))


def test_slicing_window_moves_and_wraps():
    rep = deto.Slicing(rate=0.3)
    rep.fired = 3
    assert rep.rows(0, 10).tolist() == [9, 0, 1]


def test_random_rows_are_shared_by_seed_and_change_each_replication():
    a, b = deto.RandomSubset(rate=0.5, seed=7), deto.RandomSubset(rate=0.5, seed=7)
    assert torch.equal(a.rows(3, 20), b.rows(3, 20))
    first = a.rows(3, 20)
    a.fired += 1
    assert not torch.equal(a.rows(3, 20), first)
    assert len(set(first.tolist())) == 10


def test_parameters_without_gradients_are_skipped():
    model, opt = _single_node(deto.DeMo(blocks="2d", topk=4, chunk=8), sign=True)
    frozen, trained = model[1].weight, model[0].weight
    frozen_before, trained_before = frozen.detach().clone(), trained.detach().clone()
    model(torch.randn(4, 16)).pow(2).mean().backward()
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, frozen_before)
    assert not torch.equal(trained, trained_before)
