"""Every replicator on real gloo ranks (2 nodes x 2 ranks unless said otherwise)."""

from __future__ import annotations

import math

import common
import pytest
import torch
from torch.distributed.fsdp import fully_shard

import deto
from deto.comm import all_gather_bytes, all_reduce_bytes
from deto.replicators.subset import row_view

pytestmark = pytest.mark.dist

SYNCING = {
    "demo": {},
    "demo-1d": {"blocks": "1d"},
    "demo-bf16": {"values": "bf16", "aggregation": "all"},
    "demo-int8": {"values": "int8"},
    "demo-int2": {"values": "int2"},
    "demo-sign": {"values": "sign", "topk": 8, "chunk": 8},
    "demo-sparse": {"topk": 4, "chunk": 4, "dense_fallback": False},
    "demo-overlap": {"overlap": True, "values": "int8"},
    "demo-delayed": {"overlap": True, "overlap_mode": "delayed", "values": "int8"},
    "demo-after": {"overlap": True, "overlap_after": 2, "values": "int8"},
    "full": {},
    "full-overlap": {"overlap": True},
    "random": {"rate": 0.3},
    "striding": {"rate": 0.25},
    "slicing": {"rate": 0.4},
}


def _replicator(key: str, **extra):
    name = key.split("-")[0]
    return deto.make_replicator(name, **SYNCING.get(key, {}), **extra)


def train_digest(key: str, steps: int, nodes: int = 2, per_node: int = 2) -> tuple[str, list[float]]:
    model, opt = deto.prepare(
        common.make_model(), common.topo(nodes, per_node), replicator=_replicator(key), lr=1e-2
    )
    losses = common.train(model, opt, steps)
    with opt.consensus():  # eager overlap: the agreed parameters, not this node's live ones
        return common.shard_digest(model), losses


def _replicas(digests: list[str], per_node: int = 2) -> list[set[str]]:
    """Digests grouped by shard position: each set must hold one value if replicas agree."""
    return [set(digests[i::per_node]) for i in range(per_node)]


@pytest.mark.parametrize("key", sorted(SYNCING))
def test_replicas_bitwise_identical(pool, key):
    out = pool.run(train_digest, key, 6)
    digests = [d for d, _ in out]
    assert all(len(s) == 1 for s in _replicas(digests)), digests
    assert len(set(digests)) == 2  # the two shard positions differ, so the check has teeth


def eager_digests(steps: int) -> list[tuple[str, str]]:
    """Per step: the digest of the consensus and of the live shards, under eager overlap."""
    model, opt = deto.prepare(
        common.make_model(), common.topo(), replicator=_replicator("demo-overlap"), lr=1e-2
    )
    out = []
    for s in range(steps):
        common.train(model, opt, 1, start=s)
        live = common.shard_digest(model)
        with opt.consensus():
            out.append((common.shard_digest(model), live))
    return out


def test_eager_overlap_consensus_is_identical_after_every_step(pool):
    per_rank = pool.run(eager_digests, 5)
    for step in range(5):
        agreed = _replicas([rank[step][0] for rank in per_rank])
        live = _replicas([rank[step][1] for rank in per_rank])
        assert all(len(s) == 1 for s in agreed), step
        # live shards carry each node's own selection (where a shard sends any sparse tensor)
        assert any(len(s) == 2 for s in live), step


def test_none_replicas_diverge(pool):
    out = pool.run(train_digest, "none", 3)
    assert all(len(s) == 2 for s in _replicas([d for d, _ in out]))


def test_plain_demo_one_rank_per_node(pool):
    out = pool.run(train_digest, "demo", 30, 4, 1)
    digests, losses = zip(*out, strict=True)
    assert len(set(digests)) == 1
    first = sum(ls[0] for ls in losses) / 4
    last = sum(sum(ls[-5:]) / 5 for ls in losses) / 4
    assert last < first


def demo_vs_full(lr: float, steps: int) -> float:
    t = common.topo()
    chunk = 8
    m1, o1 = deto.prepare(
        common.make_model(), t,
        replicator=deto.DeMo(blocks="2d", topk=chunk * chunk, chunk=chunk, values="fp32",
                             decay=0.0, dense_fallback=False),
        lr=lr, sign=False,
    )
    m2, o2 = deto.prepare(common.make_model(), t, replicator="full", lr=lr * lr, sign=False)
    common.train(m1, o1, steps)
    common.train(m2, o2, steps)
    a, b = common.full_params(m1), common.full_params(m2)
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_demo_with_every_coefficient_matches_full(pool):
    # DeMo scales its momentum by lr and SGD steps by lr again: lr^2 against Full.
    diffs = pool.run(demo_vs_full, 0.3, 5)
    assert max(diffs) < 1e-6, diffs


def diloco_vs_sgd(lr: float, steps: int) -> float:
    t = common.topo()
    m1, o1 = deto.prepare(
        common.make_model(), t, replicator=deto.DiLoCo(every=1, outer_lr=1.0, outer_momentum=0.0),
        lr=lr, sign=False,
    )
    common.train(m1, o1, steps)
    ref = common.make_model()
    for b in ref.blocks:
        fully_shard(b, mesh=t.mesh)
    fully_shard(ref, mesh=t.mesh)
    common.train(ref, torch.optim.SGD(ref.parameters(), lr=lr), steps)
    a, b = common.full_params(m1), common.full_params(ref)
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_diloco_h1_matches_data_parallel_sgd(pool):
    diffs = pool.run(diloco_vs_sgd, 0.05, 5)
    assert max(diffs) < 1e-6, diffs


def diloco_schedule(every: int, steps: int) -> list[str]:
    model, opt = deto.prepare(
        common.make_model(), common.topo(), replicator=deto.DiLoCo(every=every), lr=1e-2,
        sign=False, optimizer=torch.optim.AdamW,
    )
    digests = []
    for s in range(steps):
        common.train(model, opt, 1, start=s)
        digests.append(common.shard_digest(model))
    return digests


def test_diloco_replicas_meet_on_sync_steps_only(pool):
    out = pool.run(diloco_schedule, 3, 6)
    for step in range(6):
        groups = _replicas([o[step] for o in out])
        synced = (step + 1) % 3 == 0
        assert all((len(g) == 1) == synced for g in groups), (step, groups)


# -- byte accounting --------------------------------------------------------------------------
def expected_rank_bytes(opt: deto.DecoupledOptimizer, rep: deto.Replicator, nodes: int) -> int:
    if isinstance(rep, deto.DeMo):
        # shards with the same block shape and k travel as one group: indices bit-packed at
        # ceil(log2(block size)) bits over the whole group, values at their width (int8: plus
        # one fp32 scale per block; int2 and sign: bit-packed over the group, plus the scales)
        dense = 0
        groups: dict[tuple[int, int, int], int] = {}
        for plan in rep.plans:
            if plan.k:
                key = (plan.layout.block_rows, plan.layout.block_cols, plan.k)
                groups[key] = groups.get(key, 0) + plan.layout.num_blocks
            else:
                dense += plan.layout.numel * 4
        sparse = 0
        for (rows, cols, k), blocks in groups.items():
            bits = math.ceil(math.log2(rows * cols)) if rows * cols > 1 else 1
            sparse += math.ceil(blocks * k * bits / 8)
            if rep.values in ("int2", "sign"):
                value_bits = 2 if rep.values == "int2" else 1
                sparse += math.ceil(blocks * k * value_bits / 8) + 4 * blocks
            else:
                sparse += blocks * {"fp32": 4 * k, "bf16": 2 * k, "int8": k + 4}[rep.values]
        return (all_gather_bytes(sparse, nodes) if sparse else 0) + (
            all_reduce_bytes(dense, nodes) if dense else 0
        )
    if isinstance(rep, deto.replicators.SubsetReplicator):
        n = 0
        for s in rep.slots:
            v = row_view(s.local)
            if v.numel():
                n += len(rep.rows(s.index, v.shape[0])) * v.shape[1]
        return all_reduce_bytes(4 * n, nodes)
    if isinstance(rep, deto.Full) and rep.overlap:  # one all-reduce per non-empty gradient
        return sum(all_reduce_bytes(4 * s.local.numel(), nodes) for s in rep.slots)
    numel = sum(s.local.numel() for s in rep.slots)
    return all_reduce_bytes(4 * numel, nodes)


def expected_collectives(rep: deto.Replicator) -> tuple[int, ...]:
    if isinstance(rep, deto.Full) and rep.overlap:
        return (sum(1 for s in rep.slots if s.local.numel()),)
    return (1, 2)  # coalesced: one per step (DeMo: + one for dense tensors)


def measured_bytes(key: str) -> tuple[list[tuple[int, int, int, int, int]], int]:
    rep = _replicator(key)
    model, opt = deto.prepare(common.make_model(), common.topo(), replicator=rep, lr=1e-2)
    rows = []
    for s in range(3):
        expected = expected_rank_bytes(opt, rep, 2)  # before the step: rows depend on the count
        common.train(model, opt, 1, start=s)
        st = opt.stats()
        rows.append((expected, st.bytes_sent, st.bytes_received, st.collectives, st.node_bytes_sent, st.node_bytes_received, expected_collectives(rep)))
    return rows


@pytest.mark.parametrize("key", sorted(SYNCING))
def test_stats_bytes_equal_analytical_payload(pool, key):
    out = pool.run(measured_bytes, key)
    for rank, rows in enumerate(out):
        peer = out[rank ^ 1]  # the other rank of the same node
        for step, (expected, sent, received, collectives, node_sent, node_received, allowed) in enumerate(rows):
            assert sent == received == expected > 0, (rank, step, sent, expected)
            assert collectives in allowed, (collectives, allowed)
            assert node_sent == node_received == expected + peer[step][0], (rank, node_sent)


class ClassToken(torch.nn.Module):
    """A (1, 1, d) parameter: FSDP2 gives the second rank of a node an empty shard."""

    def __init__(self) -> None:
        super().__init__()
        self.token = torch.nn.Parameter(torch.randn(1, 1, 12))
        self.body = common.make_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x + self.token[0])


def empty_shards(key: str) -> str:
    torch.manual_seed(0)
    model, opt = deto.prepare(ClassToken(), common.topo(), replicator=_replicator(key), lr=1e-2)
    common.train(model, opt, 3)
    return common.shard_digest(model)


@pytest.mark.parametrize("key", ["demo", "random", "striding", "slicing", "full"])
def test_empty_local_shards_are_fine(pool, key):
    digests = pool.run(empty_shards, key)
    assert all(len(s) == 1 for s in _replicas(digests))


def sparse_diloco(compress: str, every: int, steps: int) -> list[tuple[str, int, int]]:
    """Per step on FSDP2 shards: the shard digest, the bytes this rank sent and the bytes the
    compressed pseudo-gradient's wire format says it sends on a sync."""
    rep = deto.DiLoCo(every=every, compress=compress, topk=4, chunk=4)
    model, opt = deto.prepare(
        common.make_model(), common.topo(), replicator=rep, lr=1e-2, sign=False,
        optimizer=torch.optim.AdamW,
    )  # fmt: skip
    rows = []
    for s in range(steps):
        common.train(model, opt, 1, start=s)
        rows.append((common.shard_digest(model), opt.stats().bytes_sent,
                     expected_rank_bytes(opt, rep.coder, 2)))  # fmt: skip
    return rows


@pytest.mark.parametrize("compress", ["topk", "demo"])
def test_compressed_diloco_on_fsdp2_meets_on_syncs_and_sends_its_wire_format(pool, compress):
    out = pool.run(sparse_diloco, compress, 3, 6)
    for step in range(6):
        synced = (step + 1) % 3 == 0
        groups = _replicas([o[step][0] for o in out])
        assert all((len(g) == 1) == synced for g in groups), (step, groups)
        for rows in out:
            _, sent, expected = rows[step]
            assert sent == (expected if synced else 0) and expected > 0
