"""What one scheme sends across nodes: the collectives each rank issues on each step of a
period, derived from the rules the replicators follow.

The collectives do not depend on the number of nodes R (only their byte counts do, through
:func:`deto.comm.all_reduce_bytes` and :func:`deto.comm.all_gather_bytes`), so a
:class:`Traffic` is built once per scheme and node shape and priced at any R. A collective with
an empty payload is not issued, as :class:`deto.comm.Comm` skips it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from deto.comm import all_gather_bytes, all_reduce_bytes
from deto.plan.shapes import ModelShapes, Shape, local_shapes
from deto.replicators import (
    DeMo,
    DiLoCo,
    Full,
    NoReplication,
    Replicator,
    StreamingDiLoCo,
    Striding,
)
from deto.replicators.demo import plan_shard
from deto.replicators.streaming import QUANT_BLOCK, quant_rows, split_fragments
from deto.replicators.subset import SubsetReplicator, subset_size

FP32 = 4
"""Bytes of one fp32 value: dense payloads (gradients, momenta, pseudo-gradients) are fp32."""


@dataclass(frozen=True)
class Collective:
    """One coalesced collective of one rank: ``nbytes`` all-reduced, or contributed to an
    all-gather."""

    kind: Literal["all_reduce", "all_gather"]
    nbytes: int

    def sent(self, nodes: int) -> int:
        """Bytes this rank sends (and receives), by :mod:`deto.comm`'s ring rules."""
        if self.kind == "all_reduce":
            return all_reduce_bytes(self.nbytes, nodes)
        return all_gather_bytes(self.nbytes, nodes)

    def hops(self, nodes: int) -> int:
        """Sequential ring steps, each paying the link's latency once: ``2 (R - 1)`` for an
        all-reduce (reduce-scatter then all-gather), ``R - 1`` for an all-gather."""
        return (2 if self.kind == "all_reduce" else 1) * (nodes - 1)


Step = tuple[tuple[Collective, ...], ...]
"""One step: the collectives of each rank of a node, ``[rank][i]``."""


@dataclass(frozen=True)
class Traffic:
    """A scheme's collectives over one period of its schedule (``steps[t]`` is step ``t + 1``),
    and how many steps of compute an exchange may run under before the step waits for it
    (``hidden_steps``: 0 without overlap)."""

    steps: tuple[Step, ...]
    hidden_steps: int = 0

    @property
    def period(self) -> int:
        return len(self.steps)

    def node_bytes(self, nodes: int) -> list[int]:
        """Bytes a node sends on each step of the period: the sum over its ranks."""
        return [sum(c.sent(nodes) for rank in step for c in rank) for step in self.steps]

    def hops(self, nodes: int) -> list[int]:
        """Latency-bound ring steps on each step: the busiest rank's (ranks run side by side)."""
        return [max((sum(c.hops(nodes) for c in rank) for rank in step), default=0)
                for step in self.steps]  # fmt: skip


def _all_reduce(nbytes: int) -> tuple[Collective, ...]:
    return (Collective("all_reduce", nbytes),) if nbytes else ()


def _numel(shapes: list[Shape]) -> int:
    return sum(math.prod(s) for s in shapes)


def demo_collectives(demo: DeMo, shapes: list[Shape]) -> tuple[Collective, ...]:
    """One DeMo exchange of a rank's shards (:meth:`DeMo.exchange`): the shards whose top-k
    pays, grouped by (block shape, k) as :meth:`DeMo.bind` groups them, in one all-gather of
    each group's wire bytes; the others all-reduced dense, in fp32."""
    groups: dict[tuple[int, int, int], int] = {}  # (rows, cols, k) -> blocks
    dense = 0
    for shape in shapes:
        plan = plan_shard(shape, topk=demo.topk, chunk=demo.chunk, blocks=demo.blocks,
                          wire=demo.wire, dense_fallback=demo.dense_fallback)  # fmt: skip
        layout = plan.layout
        if plan.k and layout.num_blocks:
            key = (layout.block_rows, layout.block_cols, plan.k)
            groups[key] = groups.get(key, 0) + layout.num_blocks
        else:
            dense += layout.numel
    gathered = sum(demo.wire.nbytes(blocks, k, rows * cols)
                   for (rows, cols, k), blocks in groups.items())  # fmt: skip
    out = _all_reduce(FP32 * dense)
    return out + ((Collective("all_gather", gathered),) if gathered else ())


def _subset_collectives(
    rep: SubsetReplicator, shapes: list[Shape], fired: int
) -> tuple[Collective, ...]:
    """The rows a row-subset scheme all-reduces on its ``fired``-th replication
    (:meth:`SubsetReplicator.exchange`): rows of the shard viewed as ``(shape[0], -1)``."""
    total = 0
    for shape in shapes:
        numel = math.prod(shape)
        if not numel:
            continue
        rows = shape[0] if len(shape) >= 2 else numel
        if isinstance(rep, Striding):
            count = len(range(fired % rep.stride, rows, rep.stride))
        else:
            count = subset_size(rows, rep.rate)
        total += count * (numel // rows)
    return _all_reduce(FP32 * total)


def _fired_collectives(
    rep: Replicator | None, shapes: list[Shape], fired: int
) -> tuple[Collective, ...]:
    """What a rank sends on a step its scheme fires (``fired`` replications before it)."""
    if rep is None or isinstance(rep, Full) and not rep.overlap:  # torch's HSDP, or Full
        return _all_reduce(FP32 * _numel(shapes))
    if isinstance(rep, Full):  # one all-reduce per gradient, started in the backward pass
        return tuple(c for s in shapes for c in _all_reduce(FP32 * math.prod(s)))
    if isinstance(rep, NoReplication):
        return ()
    if isinstance(rep, DeMo):
        return demo_collectives(rep, shapes)
    if isinstance(rep, SubsetReplicator):
        return _subset_collectives(rep, shapes, fired)
    if isinstance(rep, DiLoCo):
        if rep.coder is not None:
            return demo_collectives(rep.coder, shapes)
        return _all_reduce(FP32 * _numel(shapes))
    raise ValueError(f"The plan does not know replicator {type(rep).__name__}")


def _schedule_period(rep: Replicator | None) -> int:
    if rep is None:
        return 1
    s = rep.schedule
    period = math.lcm(s.every, s.skip_every or 1)
    return period * (rep.stride if isinstance(rep, Striding) else 1)


def _hidden_steps(rep: Replicator | None) -> int:
    if isinstance(rep, StreamingDiLoCo):
        return rep.options.overlap_steps
    return int(bool(getattr(rep, "overlap", False)))


def _syncs(rep: Replicator | None, step: int) -> bool:
    """Whether ``step`` syncs the parameters, so the floating buffers are averaged
    (:func:`deto.buffers.syncs_parameters`)."""
    return rep is None or rep.syncs_at(step)


def traffic(model: ModelShapes, rep: Replicator | None, ranks_per_node: int) -> Traffic:
    """The collectives of scheme ``rep`` (``None``: torch's HSDP, an all-reduce of every fp32
    gradient shard each step) on a node of ``ranks_per_node`` FSDP2 ranks."""
    ranks = local_shapes(model, ranks_per_node)
    buffers = tuple(Collective("all_reduce", size * n) for size, n in model.buffers if n)
    if isinstance(rep, StreamingDiLoCo):
        return _streaming(rep, model, ranks, buffers)
    steps, fired = [], 0
    for t in range(1, _schedule_period(rep) + 1):
        if rep is None or rep.schedule.fires(t):
            step = [_fired_collectives(rep, shapes, fired) for shapes in ranks]
            fired += 1
        else:
            step = [() for _ in ranks]
        if _syncs(rep, t):
            step = [rank + buffers for rank in step]
        steps.append(tuple(step))
    return Traffic(tuple(steps), _hidden_steps(rep))


def _streaming(
    rep: StreamingDiLoCo, model: ModelShapes, ranks: list[list[Shape]],
    buffers: tuple[Collective, ...],
) -> Traffic:
    """One fragment's exchange on each step :meth:`StreamingDiLoCo.starts` names: an all-reduce
    of its fp32 pseudo-gradient, or an all-gather of it quantized in blocks of
    :data:`QUANT_BLOCK` values (at least one block, even for a rank whose shards are empty),
    after the floating buffers' all-reduce (:meth:`StreamingDiLoCo.syncs_at`)."""
    fragments = split_fragments([math.prod(s) for _, s in model.params], rep.options.fragments)
    steps = []
    for t in range(1, rep.options.every + 1):
        f = rep.starts(t)
        step: list[tuple[Collective, ...]] = []
        for shapes in ranks:
            if f is None:
                step.append(())
                continue
            n = _numel([shapes[p] for p in fragments[f]])
            if rep.wire.values == "fp32":
                step.append(buffers + _all_reduce(FP32 * n))
            else:
                nbytes = rep.wire.value_nbytes(quant_rows(n), QUANT_BLOCK)
                step.append((*buffers, Collective("all_gather", nbytes)))
        steps.append(tuple(step))
    return Traffic(tuple(steps), _hidden_steps(rep))
