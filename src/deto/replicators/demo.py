"""DeMo: send only the fast-moving components of the decoupled momentum.

Per local shard: blocks -> orthonormal DCT-II -> top-k per block -> subtract what is sent from
``delta`` -> all-gather (bit-packed indices, coded values; :mod:`deto.compress.wire`) over the
nodes -> deterministic aggregate -> inverse DCT. Shards whose blocks have the same shape are encoded and decoded as one batch. Every node decodes the same gathered bytes with the same ops, so replicas stay bitwise
identical. FlexDeMo is this replicator on FSDP2 shards; plain DeMo is one rank per node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, get_args

import torch

from deto.comm import Comm
from deto.compress.chunking import BlockLayout, BlockMode, from_blocks, make_layout, to_blocks
from deto.compress.dct import dct_blocks
from deto.compress.decode import decode_blocks
from deto.compress.topk import topk_per_block
from deto.compress.wire import VALUE_CODECS, WireFormat
from deto.replicators.base import MomentumReplicator, register
from deto.replicators.options import MomentumOptions, knob

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """How one local shard is encoded; ``k == 0`` means it is sent dense (all-reduced)."""

    layout: BlockLayout
    k: int


def plan_shard(
    shape: tuple[int, ...],
    *,
    topk: int,
    chunk: int,
    blocks: BlockMode,
    wire: WireFormat,
    dense_fallback: bool = True,
) -> Plan:
    """Choose blocks and the per-block ``k`` of a shard.

    ``topk`` counts coefficients per nominal block (``chunk`` in 1-D, ``chunk x chunk`` in 2-D);
    smaller blocks keep the same fraction, at least one. A shard whose sparse payload would not
    be smaller than its dense fp32 bytes is sent dense instead, unless ``dense_fallback`` is off.
    """
    layout = make_layout(shape, chunk, blocks)
    if layout.num_blocks == 0:
        return Plan(layout, 0)
    nominal = chunk if blocks == "1d" else chunk * chunk
    m = layout.block_numel
    k = min(m, max(1, round(topk * m / nominal)))
    sparse = wire.nbytes(layout.num_blocks, k, m)
    return Plan(layout, 0 if dense_fallback and sparse >= layout.numel * 4 else k)


@dataclass(frozen=True)
class DeMoOptions(MomentumOptions):
    """DeMo's knobs.

    ``topk`` counts coefficients per nominal block (see :func:`plan_shard`), at most its
    ``chunk`` (1-D) or ``chunk x chunk`` (2-D) coefficients. ``blocks="2d"`` is a separable DCT
    on ``chunk x chunk`` blocks of the weight (DeMo's original, far better compression for
    matrices); ``"1d"`` cuts the flattened shard into chunks of ``chunk`` (the reference's
    behaviour on flat shards); 1-D tensors always use 1-D. ``values`` is the wire format of the
    values (:class:`~deto.compress.wire.WireFormat`; indices always travel bit-packed,
    ``ceil(log2(block size))`` bits). ``aggregation="selected"`` averages each coefficient over
    the nodes that sent it (the reference), ``"all"`` divides by the number of nodes. With
    ``dense_fallback`` a shard whose top-k payload would not be smaller than itself (tiny
    tensors) is all-reduced dense; off, every shard goes through the DCT, whatever it costs.
    """

    topk: int = knob(32, "DCT coefficients kept per chunk", low=1, metavar="K")
    chunk: int = knob(64, "chunk edge; 2-D blocks are chunk x chunk", low=1, metavar="C")
    blocks: str = knob(
        "2d", "DCT over 2-D blocks of the weight, or 1-D chunks of the flat shard",
        choices=get_args(BlockMode),
    )
    values: str = knob(
        "fp32", "wire format of the sent values; int8 has one fp32 scale per block",
        choices=VALUE_CODECS,
    )
    aggregation: str = knob(
        "selected", "average each coefficient over the nodes that sent it, or over all nodes",
        choices=("selected", "all"),
    )
    dense_fallback: bool = knob(
        True, "send a tensor dense when its top-k payload would not be smaller"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        nominal = self.chunk if self.blocks == "1d" else self.chunk * self.chunk
        if self.topk > nominal:
            raise ValueError(
                f"Invalid topk: {self.topk} (a {self.blocks} block of chunk {self.chunk} has "
                f"{nominal} coefficients)"
            )


@register
class DeMo(MomentumReplicator):
    """Decoupled momentum with DCT top-k compression.

    Keyword arguments: the knobs of :class:`DeMoOptions` (``topk=32, chunk=64, decay=0.999,
    blocks="2d", values="fp32", aggregation="selected", dense_fallback=True, every=1``), and
    the schedule's ``skip_every``, ``offset`` and ``include`` (see :class:`Replicator`).
    """

    name = "demo"
    Options = DeMoOptions

    def __init__(self, **kwargs: Any) -> None:
        self.options, schedule = DeMoOptions.take(kwargs)
        self.topk = self.options.topk
        self.chunk = self.options.chunk
        self.blocks: BlockMode = self.options.blocks  # type: ignore[assignment]
        self.wire = WireFormat(self.options.values)
        self.aggregation = self.options.aggregation
        self.dense_fallback = self.options.dense_fallback
        super().__init__(decay=self.options.decay, every=self.options.every, **schedule)
        self.plans: list[Plan] = []

    @property
    def values(self) -> str:
        """Wire format of the values (see :class:`deto.compress.wire.WireFormat`)."""
        return self.wire.values

    def bind(self, slots: list[Any]) -> None:
        super().bind(slots)
        self.plans = [
            plan_shard(
                tuple(s.local.shape), topk=self.topk, chunk=self.chunk, blocks=self.blocks,
                wire=self.wire, dense_fallback=self.dense_fallback,
            )
            for s in slots
        ]
        dense = [(s.name, s.local.numel()) for s, p in zip(slots, self.plans, strict=True)
                 if p.k == 0 and p.layout.numel]
        if dense:
            logger.warning(
                "DeMo sends %d small tensor(s) dense (%d elements) because top-k would not be "
                "smaller: %s", len(dense), sum(n for _, n in dense),
                ", ".join(n for n, _ in dense[:5]) + (" ..." if len(dense) > 5 else ""),
            )

    def extra_repr(self) -> str:
        return f"topk={self.topk}, chunk={self.chunk}, decay={self.decay}, blocks={self.blocks!r}, values={self.values!r}"

    def exchange(
        self, positions: list[int], deltas: list[torch.Tensor], comm: Comm
    ) -> list[torch.Tensor]:
        """Encode, send and decode; shards with the same block shape are batched together."""
        out: list[torch.Tensor | None] = [None] * len(positions)
        dense: list[int] = []
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, (pos, delta) in enumerate(zip(positions, deltas, strict=True)):
            plan = self.plans[pos]
            if plan.layout.numel == 0:
                out[i] = torch.zeros_like(delta)
            elif plan.k == 0:
                dense.append(i)
            else:
                key = (plan.layout.block_rows, plan.layout.block_cols, plan.k)
                groups.setdefault(key, []).append(i)

        payload: list[torch.Tensor] = []
        for (rows, cols, k), members in groups.items():
            layouts = [self.plans[positions[i]].layout for i in members]
            blocks = torch.cat([to_blocks(deltas[i], lay) for i, lay in zip(members, layouts, strict=True)])
            idx, vals = topk_per_block(dct_blocks(blocks).reshape(len(blocks), -1), k)
            # error feedback: what is sent (as the receivers will read it) leaves delta
            sent = decode_blocks([idx], [self.wire.round_trip(vals)], rows, cols, "all")
            for i, lay, part in zip(members, layouts, sent.split([lay.num_blocks for lay in layouts]), strict=True):
                deltas[i].sub_(from_blocks(part, lay))
            payload += self.wire.encode(idx, vals, rows * cols)

        if dense:
            averaged = comm.all_reduce_mean([deltas[i] for i in dense])
            for i, avg in zip(dense, averaged, strict=True):
                deltas[i].zero_()
                out[i] = avg
        if payload:
            nodes = comm.all_gather(payload)
            parts = self.wire.parts
            for g, ((rows, cols, k), members) in enumerate(groups.items()):
                layouts = [self.plans[positions[i]].layout for i in members]
                num_blocks = sum(lay.num_blocks for lay in layouts)
                received = [
                    self.wire.decode(node[parts * g : parts * (g + 1)], num_blocks, k, rows * cols, deltas[members[0]].dtype)
                    for node in nodes
                ]
                decoded = decode_blocks(
                    [idx for idx, _ in received],
                    [vals for _, vals in received],
                    rows,
                    cols,
                    self.aggregation,  # type: ignore[arg-type]
                )
                for i, lay, part in zip(members, layouts, decoded.split([lay.num_blocks for lay in layouts]), strict=True):
                    out[i] = from_blocks(part, lay)
        return [t for t in out if t is not None]
