"""DiLoCo with a compressed pseudo-gradient (compress="topk": SparseLoCo; "demo": DCT blocks),
on simulated nodes in one process (FakeComm): equal to DiLoCo where nothing is dropped,
identical anchors across nodes, error feedback, exact bytes and an exact resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deto
from deto.comm import all_gather_bytes
from deto.compress.wire import WireFormat

EVERY = 3
LR = 0.05


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(24, 32), nn.Tanh(), nn.Linear(32, 5))


torch.manual_seed(0)
INITIAL = _net().state_dict()


def make(replicator: deto.Replicator, comm: deto.Comm) -> tuple[nn.Module, deto.DecoupledOptimizer]:
    model = _net()
    model.load_state_dict(INITIAL)
    names = {p: n for n, p in model.named_parameters()}
    base = torch.optim.SGD(model.parameters(), lr=LR)
    return model, deto.DecoupledOptimizer(base, [replicator], comm, param_names=names)


def train(model: nn.Module, opt: deto.DecoupledOptimizer, node: int, steps: range) -> list:
    """``steps`` of training on this node's own batches; the stats of each step."""
    stats = []
    for step in steps:
        x = torch.randn(8, 24, generator=torch.Generator().manual_seed(1000 * step + node))
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        stats.append(opt.stats())
    return stats


def run(make_replicator, steps: int = 2 * EVERY, nodes: int = 2) -> list:
    def node(comm):
        model, opt = make(make_replicator(), comm)
        stats = train(model, opt, comm.rank, range(steps))
        return [p.detach().clone() for p in model.parameters()], stats, opt

    return deto.FakeComm(nodes=nodes).run(node)


def test_compress_none_is_todays_diloco_bitwise() -> None:
    plain = run(lambda: deto.DiLoCo(every=EVERY))
    explicit = run(lambda: deto.DiLoCo(every=EVERY, compress=None))
    for (a, _, _), (b, _, opt) in zip(plain, explicit, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        assert all(set(st) == {"anchor", "momentum"} for st in opt.replicators[0].state)


@pytest.mark.parametrize("blocks", ["2d", "1d"])
def test_topk_with_every_value_in_fp32_equals_diloco(blocks: str) -> None:
    chunk = 8
    every_value = chunk * chunk if blocks == "2d" else chunk
    sparse = run(lambda: deto.DiLoCo(
        every=EVERY, compress="topk", topk=every_value, chunk=chunk, blocks=blocks,
        values="fp32", dense_fallback=False,
    ))  # fmt: skip
    exact = run(lambda: deto.DiLoCo(every=EVERY))
    for (a, _, _), (b, _, _) in zip(sparse, exact, strict=True):
        for x, y in zip(a, b, strict=True):
            # the mean is taken as a/2 + b/2 instead of (a + b)/2: equal to rounding
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("compress", ["topk", "demo"])
def test_compressed_anchors_are_identical_on_every_node_and_differ_from_exact(compress) -> None:
    make_rep = lambda: deto.DiLoCo(every=EVERY, compress=compress, topk=4, chunk=8)  # noqa: E731
    out = run(make_rep, steps=2 * EVERY, nodes=3)
    first = out[0][0]
    for params, _, _ in out[1:]:
        assert all(torch.equal(x, y) for x, y in zip(first, params, strict=True))
    exact = run(lambda: deto.DiLoCo(every=EVERY), steps=2 * EVERY, nodes=3)[0][0]
    assert any(not torch.allclose(x, y) for x, y in zip(first, exact, strict=True))


def test_what_is_not_sent_stays_in_the_error_buffer() -> None:
    # ef_decay 0, fp32, one sync: each node's error is its pseudo-gradient less the top 3 of
    # every 8x8 block, which it sent; the first weight (32 x 24) is 12 whole blocks
    def node(comm):
        model, opt = make(deto.DiLoCo(every=EVERY, compress="topk", topk=3, chunk=8,
                                      values="fp32", ef_decay=0.0), comm)  # fmt: skip
        anchor = model[0].weight.detach().clone()
        inner = []  # the weight after each base step, before DiLoCo acts on it
        opt.base.register_step_post_hook(lambda *_: inner.append(model[0].weight.detach().clone()))
        train(model, opt, comm.rank, range(EVERY))
        return anchor - inner[-1], opt.replicators[0].state[0]["error"].clone()

    for pseudo, error in deto.FakeComm(nodes=2).run(node):
        blocks = lambda t: t.reshape(4, 8, 3, 8).permute(0, 2, 1, 3).reshape(12, 64)  # noqa: E731
        kept, whole = blocks(error), blocks(pseudo)
        sent = kept == 0
        assert sent.sum(dim=1).tolist() == [3] * 12
        assert torch.equal(kept[~sent], whole[~sent])  # the rest stays, unchanged
        top3 = whole.abs().topk(3, dim=1).indices
        assert torch.equal(sent.nonzero()[:, 1].view(12, 3), top3.sort(dim=1).values)


@pytest.mark.parametrize("values", ["fp32", "int8", "int2"])
def test_bytes_of_a_sync_are_the_wire_format_of_every_block(values: str) -> None:
    chunk, topk, nodes = 8, 4, 3
    out = run(lambda: deto.DiLoCo(every=EVERY, compress="topk", topk=topk, chunk=chunk,
                                  values=values, dense_fallback=False),
              steps=EVERY, nodes=nodes)  # fmt: skip
    wire = WireFormat(values)
    _, stats, opt = out[0]
    payload = 0
    for group in opt.replicators[0].coder.groups:
        payload += wire.nbytes(group.num_blocks, group.k, group.m)
    assert [s.bytes_sent for s in stats[:-1]] == [0] * (EVERY - 1)
    assert stats[-1].bytes_sent == all_gather_bytes(payload, nodes)


def test_a_resume_mid_period_continues_bitwise() -> None:
    make_rep = lambda: deto.DiLoCo(every=EVERY, compress="demo", topk=4, chunk=8)  # noqa: E731
    split = EVERY + 1  # after one sync, inside the next period

    def node(comm):
        model, opt = make(make_rep(), comm)
        train(model, opt, comm.rank, range(split))
        saved = (
            {k: v.clone() for k, v in model.state_dict().items()},
            _clone(opt.state_dict()),
        )
        train(model, opt, comm.rank, range(split, 3 * EVERY))
        straight = [p.detach().clone() for p in model.parameters()]
        model2, opt2 = make(make_rep(), comm)
        model2.load_state_dict(saved[0])
        opt2.load_state_dict(saved[1])
        train(model2, opt2, comm.rank, range(split, 3 * EVERY))
        return straight, [p.detach().clone() for p in model2.parameters()]

    for straight, resumed in deto.FakeComm(nodes=2).run(node):
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    return tree


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compress": "zip"}, r"Invalid compress: 'zip' \(expected one of none, topk, demo\)"),
        ({"compress": "topk", "values": "int3"}, r"Invalid values: 'int3' \(expected one of"),
        ({"compress": "topk", "topk": 65, "chunk": 8}, r"Invalid topk: 65 .* 64 coefficients"),
        ({"ef_decay": 1.0}, r"Invalid ef_decay: 1.0 \(must be a number in \[0.0, 1.0\)\)"),
    ],
)
def test_bad_compression_settings_name_the_valid_range(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        deto.DiLoCo(**kwargs)
