"""DeMo's fast path (DCT-domain momentum, one aggregate buffer) against the parameter-space math.

The reference below is DeMo's step as the paper and the reference implementation write it:
the momentum in parameter space, DCT of its blocks, top-k, the inverse DCT of what was sent
subtracted, and the nodes' coefficients scattered into dense blocks and summed one node at a
time. The fast path must select the same coefficients, keep the same momentum to rounding
(it reassociates ``DCT(decay * delta + lr * g)`` as ``decay * DCT(delta) + lr * DCT(g)``), and
aggregate bitwise identically.
"""

from __future__ import annotations

import pytest
import torch

from deto.compress.blockgroup import BlockGroup
from deto.compress.chunking import from_blocks, make_layout, to_blocks
from deto.compress.dct import dct_blocks, idct_blocks
from deto.compress.wire import WireFormat

# 2-D shards that fit their blocks, and ones that overhang (padding), plus flat ones
SHAPES_2D = [(16, 24), (8, 8), (15, 23), (24, 15), (23, 16)]
SHAPES_1D = [(96,), (47,), (8, 4), (23,)]


def reference_step(delta, layout, grad, lr, decay, k, wire):
    """One parameter-space step: returns the (indices, values) sent; updates ``delta``."""
    delta.mul_(decay).add_(grad, alpha=lr)
    coeffs = dct_blocks(to_blocks(delta, layout)).reshape(layout.num_blocks, -1)
    idx = coeffs.abs().topk(k, dim=-1, sorted=False).indices
    vals = coeffs.gather(-1, idx)
    sent = torch.zeros_like(coeffs).scatter_(-1, idx, wire.round_trip(vals))
    blocks = idct_blocks(sent.view(-1, layout.block_rows, layout.block_cols))
    delta.sub_(from_blocks(blocks, layout))
    return idx, vals


def reference_aggregate(received, m, mode):
    """Dense ``(blocks, m)`` aggregate: scaled values scattered per node, summed in node order."""
    indices = [i for i, _ in received]
    values = [v for _, v in received]
    if mode == "all":
        scaled = [v / len(values) for v in values]
    else:
        count = values[0].new_zeros(values[0].shape[:-1] + (m,))
        for idx in indices:
            count.scatter_add_(-1, idx, torch.ones_like(values[0]))
        scaled = [v / count.gather(-1, idx) for idx, v in zip(indices, values, strict=True)]
    dense = torch.zeros(values[0].shape[:-1] + (m,)).scatter_(-1, indices[0], scaled[0])
    for idx, v in zip(indices[1:], scaled[1:], strict=True):
        dense = dense + torch.zeros_like(dense).scatter_(-1, idx, v)
    return dense


def _group(shapes, chunk, mode):
    layouts = [make_layout(s, chunk, mode) for s in shapes]
    return layouts, BlockGroup(layouts, 3 if mode == "1d" else 5, torch.device("cpu"))


@pytest.mark.parametrize("values", ["fp32", "int8"])
@pytest.mark.parametrize(("shapes", "mode"), [(SHAPES_2D, "2d"), (SHAPES_1D, "1d")])
def test_dct_domain_momentum_matches_parameter_space(shapes, mode, values):
    wire = WireFormat(values)
    layouts, group = _group(shapes, 8, mode)
    deltas = [torch.zeros(s) for s in shapes]
    g = torch.Generator().manual_seed(0)
    present = list(range(len(shapes)))
    for step in range(6):
        grads = [torch.randn(s, generator=g) for s in shapes]
        group.accumulate(present, grads, [0.1] * len(shapes), 0.9)
        idx, vals, encoded = group.select(present, wire)
        assert torch.equal(wire.decode_values(encoded, vals.shape, torch.float32),
                           wire.round_trip(vals))
        ref = [
            reference_step(d, lay, gr, 0.1, 0.9, group.k, wire)
            for d, lay, gr in zip(deltas, layouts, grads, strict=True)
        ]
        ref_idx = torch.cat([i for i, _ in ref])
        ref_vals = torch.cat([v for _, v in ref])
        # the same coefficients are chosen, with the same values to rounding
        assert torch.equal(idx.sort(dim=1).values, ref_idx.sort(dim=1).values), step
        order, ref_order = idx.argsort(dim=1), ref_idx.argsort(dim=1)
        torch.testing.assert_close(
            vals.gather(1, order), ref_vals.gather(1, ref_order), rtol=1e-5, atol=1e-6
        )
        for i, d in enumerate(deltas):
            torch.testing.assert_close(group.momentum(i), d, rtol=1e-5, atol=1e-6)
    assert any(d.abs().sum() > 0 for d in deltas)


@pytest.mark.parametrize("mode", ["selected", "all"])
@pytest.mark.parametrize(("shapes", "blocks"), [(SHAPES_2D, "2d"), (SHAPES_1D, "1d")])
def test_decode_matches_dense_aggregation_and_leaves_buffers_zero(shapes, blocks, mode):
    layouts, group = _group(shapes, 8, blocks)
    g = torch.Generator().manual_seed(1)
    nb = group.num_blocks
    received = [
        (
            torch.rand(nb, group.m, generator=g).argsort(dim=1)[:, : group.k],
            torch.randn(nb, group.k, generator=g),
        )
        for _ in range(3)
    ]
    present = list(range(len(shapes)))
    got = group.decode(present, received, mode)
    dense = reference_aggregate(received, group.m, mode)
    start = 0
    for lay, out in zip(layouts, got, strict=True):
        part = dense[start : start + lay.num_blocks].view(-1, lay.block_rows, lay.block_cols)
        start += lay.num_blocks
        # the sums are bitwise those of the dense blocks; the inverse DCT runs as one product
        # per dimension over the whole shard instead of per block, so it may round differently
        torch.testing.assert_close(out, from_blocks(idct_blocks(part), lay), rtol=1e-6, atol=1e-7)
    assert not group._aggregate.any() and not group._count.any()
    again = group.decode(present, received, mode)
    assert all(torch.equal(a, b) for a, b in zip(got, again, strict=True))


def test_decode_sums_bitwise_like_dense_blocks():
    # one shard of one block per row: the aggregate is visible through an identity transform
    layouts, group = _group([(1, 64)], 64, "1d")
    group.dc = torch.eye(64)
    g = torch.Generator().manual_seed(2)
    received = [
        (torch.randperm(64, generator=g)[:20].view(1, -1), torch.randn(1, 20, generator=g))
        for _ in range(4)
    ]
    for mode in ("selected", "all"):
        got = group.decode([0], received, mode)[0]
        assert torch.equal(got.view(1, -1), reference_aggregate(received, 64, mode))


def test_aggregate_selected_and_all_by_hand():
    _, group = _group([(4,)], 4, "1d")
    group.dc = torch.eye(4)  # identity transform: the output is the aggregate itself
    received = [
        (torch.tensor([[0, 1]]), torch.tensor([[2.0, 4.0]])),
        (torch.tensor([[1, 2]]), torch.tensor([[6.0, 8.0]])),
    ]
    assert group.decode([0], received, "selected")[0].tolist() == [2.0, 5.0, 8.0, 0.0]
    assert group.decode([0], received, "all")[0].tolist() == [1.0, 5.0, 4.0, 0.0]


def test_subset_of_members_and_bad_groups():
    layouts, group = _group(SHAPES_2D, 8, "2d")
    grads = [torch.randn(s) for s in SHAPES_2D]
    group.accumulate([1, 3], [grads[1], grads[3]], [1.0, 1.0], 0.0)
    idx, _, _ = group.select([1, 3], WireFormat("fp32"))
    assert idx.shape == (layouts[1].num_blocks + layouts[3].num_blocks, group.k)
    assert group.momentum(0).abs().sum() == 0  # an absent member is untouched
    with pytest.raises(ValueError, match="one block shape"):
        BlockGroup(
            [make_layout((8, 8), 8, "2d"), make_layout((4, 4), 8, "2d")], 1, torch.device("cpu")
        )
