"""DeMo: send only the fast-moving components of the decoupled momentum.

Per local shard: blocks -> orthonormal DCT-II -> top-k per block -> subtract what is sent from
``delta`` -> all-gather (bit-packed indices, coded values; :mod:`deto.compress.wire`) over the
nodes -> deterministic aggregate -> inverse DCT. Shards whose blocks have the same shape are encoded and decoded as one batch. Every node decodes the same gathered bytes with the same ops, so replicas stay bitwise
identical. FlexDeMo is this replicator on FSDP2 shards; plain DeMo is one rank per node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from deto._validate import check_choice, check_int
from deto.comm import Comm
from deto.compress.chunking import BlockLayout, BlockMode, from_blocks, make_layout, to_blocks
from deto.compress.dct import dct_blocks
from deto.compress.decode import decode_blocks
from deto.compress.topk import topk_per_block
from deto.compress.wire import VALUE_CODECS, WireFormat
from deto.replicators.base import MomentumReplicator, register

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


@register
class DeMo(MomentumReplicator):
    """Decoupled momentum with DCT top-k compression.

    Args:
        topk: coefficients kept per nominal block (see :func:`plan_shard`).
        chunk: nominal block edge; 2-D blocks are ``chunk x chunk``.
        decay: momentum decay ``beta`` in ``[0, 1)``.
        blocks: ``"2d"`` (default; separable DCT on c x c blocks of the weight, DeMo's original
            and far better compression for matrices) or ``"1d"`` (the flattened shard in chunks
            of ``chunk``, the reference's behaviour on flat shards). 1-D tensors always use 1-D.
        values: wire format of the values: ``"fp32"``, ``"bf16"``, or ``"int8"`` (one fp32
            scale per block). Indices always travel bit-packed, ``ceil(log2(block size))`` bits.
        aggregation: ``"selected"`` averages each coefficient over the nodes that sent it (the
            reference); ``"all"`` divides by the number of nodes.
        dense_fallback: all-reduce a shard dense when its top-k payload would not be smaller
            (tiny tensors); off, every shard goes through the DCT, whatever it costs.
    """

    name = "demo"

    def __init__(
        self,
        topk: int = 32,
        chunk: int = 64,
        decay: float = 0.999,
        *,
        blocks: BlockMode = "2d",
        values: str = "fp32",
        aggregation: str = "selected",
        dense_fallback: bool = True,
        **schedule: Any,
    ) -> None:
        self.topk = check_int("topk", topk, 1)
        self.chunk = check_int("chunk", chunk, 1)
        nominal = chunk if blocks == "1d" else chunk * chunk
        if topk > nominal:
            raise ValueError(f"Invalid topk: {topk} (a {blocks} block of chunk {chunk} has {nominal})")
        self.blocks: BlockMode = check_choice("blocks", blocks, ("1d", "2d"))  # type: ignore[assignment]
        self.wire = WireFormat(check_choice("values", values, VALUE_CODECS))
        self.aggregation = check_choice("aggregation", aggregation, ("selected", "all"))
        if not isinstance(dense_fallback, bool):
            raise TypeError(f"dense_fallback must be a bool, got {type(dense_fallback).__name__}")
        self.dense_fallback = dense_fallback
        super().__init__(decay=decay, **schedule)
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
