"""DeMo: send only the fast-moving components of the decoupled momentum.

Per local shard: blocks -> orthonormal DCT-II -> top-k per block -> subtract what is sent from
``delta`` -> all-gather (bit-packed indices, coded values; :mod:`deto.compress.wire`) over the
nodes -> deterministic aggregate -> inverse DCT. Shards whose blocks have the same shape form a
:class:`~deto.compress.blockgroup.BlockGroup`, which keeps their momentum in the DCT domain (one
forward transform of the gradient and one inverse transform of the aggregate per step) and is
encoded and decoded as one batch. Every node decodes the same gathered bytes with the same ops,
so replicas stay bitwise identical. FlexDeMo is this replicator on FSDP2 shards; plain DeMo is
one rank per node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deto._validate import check_choice, check_int
from deto.comm import Comm
from deto.compress.blockgroup import BlockGroup
from deto.compress.chunking import BlockLayout, BlockMode, make_layout
from deto.compress.wire import VALUE_CODECS, WireFormat
from deto.replicators.base import MomentumReplicator, register

logger = logging.getLogger(__name__)

# an all-gather started by an earlier step (a wait that returns every node's payload) and the
# (group, members) whose selections it carries
InFlight = tuple[Callable[[], list[list[torch.Tensor]]], list[tuple[int, list[int]]]]


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
        values: wire format of the values: ``"fp32"``, ``"bf16"``, or with one fp32 scale per
            block ``"int8"``, ``"int2"`` (4 levels) or ``"sign"`` (1 bit; Psyche-style); see
            :class:`~deto.compress.wire.WireFormat`. Indices always travel bit-packed,
            ``ceil(log2(block size))`` bits.
        aggregation: ``"selected"`` averages each coefficient over the nodes that sent it (the
            reference); ``"all"`` divides by the number of nodes.
        dense_fallback: all-reduce a shard dense when its top-k payload would not be smaller
            (tiny tensors); off, every shard goes through the DCT, whatever it costs.
        overlap: start each step's all-gather and return at once, applying the aggregate of
            the previous replication step (a one-step delay, as Psyche does): the exchange runs
            under the next forward and backward. Every node applies the same aggregate, so
            replicas stay identical; the first step applies nothing to sparse shards, and
            shards sent dense are still all-reduced in the step. Checkpoints hold the payload
            in flight.
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
        overlap: bool = False,
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
        if not isinstance(overlap, bool):
            raise TypeError(f"overlap must be a bool, got {type(overlap).__name__}")
        self.overlap = overlap
        super().__init__(decay=decay, **schedule)
        self.plans: list[Plan] = []
        self.groups: list[BlockGroup] = []
        self._member: dict[int, tuple[int, int]] = {}  # slot position -> (group, member)
        self._slot_of: dict[tuple[int, int], int] = {}
        self._in_flight: InFlight | None = None

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
        self._bind_groups()

    def _bind_groups(self) -> None:
        """One :class:`BlockGroup` per (block shape, k); sparse shards keep their momentum there."""
        keys: dict[tuple[int, int, int], list[int]] = {}
        for pos, plan in enumerate(self.plans):
            if plan.k and plan.layout.num_blocks:
                key = (plan.layout.block_rows, plan.layout.block_cols, plan.k)
                keys.setdefault(key, []).append(pos)
        self.groups = [
            BlockGroup(
                [self.plans[p].layout for p in members], k, self.slots[members[0]].local.device
            )
            for (_, _, k), members in keys.items()
        ]
        self._member = {}
        for g, members in enumerate(keys.values()):
            for i, pos in enumerate(members):
                self._member[pos] = (g, i)
                self.state[pos]["delta"] = self.groups[g].region(i)
        self._slot_of = {where: pos for pos, where in self._member.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for pos, (g, i) in self._member.items():
            region = self.groups[g].region(i)
            region.copy_(self.state[pos]["delta"])
            self.state[pos]["delta"] = region
        self._in_flight = None
        saved = state.get("in_flight")
        if saved is not None:
            device = self.groups[0].coeffs.device
            nodes = [[t.to(device, copy=True) for t in node] for node in saved["nodes"]]
            active = [(int(g), [int(i) for i in m]) for g, m in saved["active"]]
            self._in_flight = (lambda: nodes, active)

    def momentum(self, pos: int) -> torch.Tensor:
        """The decoupled momentum of ``slots[pos]`` in parameter space (a copy).

        Shards sent as DCT coefficients keep it in the DCT domain (``state[pos]["delta"]``);
        this transforms it back.
        """
        if pos in self._member:
            g, i = self._member[pos]
            return self.groups[g].momentum(i)
        return self.state[pos]["delta"].clone()

    def extra_repr(self) -> str:
        extra = ", overlap=True" if self.overlap else ""
        return (
            f"topk={self.topk}, chunk={self.chunk}, decay={self.decay}, "
            f"blocks={self.blocks!r}, values={self.values!r}{extra}"
        )

    def defer(self, positions: list[int], grads: list[torch.Tensor], lrs: list[float]) -> None:
        """``delta <- decay * delta + lr * grad``; in the DCT domain for sparse shards."""
        per_group: dict[int, tuple[list[int], list[torch.Tensor], list[float]]] = {}
        for pos, grad, lr in zip(positions, grads, lrs, strict=True):
            if pos in self._member:
                g, i = self._member[pos]
                entry = per_group.setdefault(g, ([], [], []))
                entry[0].append(i)
                entry[1].append(grad)
                entry[2].append(lr)
            else:
                self.state[pos]["delta"].mul_(self.decay).add_(grad, alpha=lr)
        for g, (members, gs, ls) in per_group.items():
            self.groups[g].accumulate(members, gs, ls, self.decay)

    def exchange(
        self, positions: list[int], deltas: list[torch.Tensor], comm: Comm
    ) -> list[torch.Tensor]:
        """Select and send each group's top-k, all-reduce the dense shards, decode.

        Sparse shards' ``deltas`` are their groups' coefficient regions, which the groups
        update in place; groups are encoded in bind order, members in slot order. With
        ``overlap``, this step's all-gather is left in flight and the previous one is decoded.
        """
        out: list[torch.Tensor | None] = [None] * len(positions)
        dense: list[int] = []
        present: dict[int, list[int]] = {}  # group -> members
        for j, (pos, delta) in enumerate(zip(positions, deltas, strict=True)):
            if pos in self._member:
                g, i = self._member[pos]
                present.setdefault(g, []).append(i)
            elif self.plans[pos].layout.numel == 0:
                out[j] = torch.zeros_like(delta)
            else:
                dense.append(j)
        active = sorted((g, sorted(members)) for g, members in present.items())
        payload: list[torch.Tensor] = []
        for g, members in active:
            idx, vals = self.groups[g].select(members, self.wire)
            payload += self.wire.encode(idx, vals, self.groups[g].m)

        if dense:
            averaged = comm.all_reduce_mean([deltas[j] for j in dense])
            for j, avg in zip(dense, averaged, strict=True):
                deltas[j].zero_()
                out[j] = avg
        if payload:
            if self.overlap:
                previous = self._in_flight
                self._in_flight = (comm.all_gather_async(payload).wait, active)
                decoded = self._decode(previous[1], previous[0]()) if previous else {}
            else:
                decoded = self._decode(active, comm.all_gather(payload))
            for j, pos in enumerate(positions):
                if pos in self._member:
                    out[j] = decoded.get(pos, None)
                    if out[j] is None:  # nothing in flight for it yet: no update this step
                        out[j] = torch.zeros(self.slots[pos].local.shape, device=deltas[j].device)
        return [t for t in out if t is not None]

    def _decode(
        self, active: list[tuple[int, list[int]]], nodes: list[list[torch.Tensor]]
    ) -> dict[int, torch.Tensor]:
        """Every node's payload -> the aggregate update of each slot position in ``active``."""
        parts, out = self.wire.parts, {}
        for n, (g, members) in enumerate(active):
            group = self.groups[g]
            num_blocks = sum(group.members[i].layout.num_blocks for i in members)
            received = [
                self.wire.decode(node[parts * n : parts * (n + 1)], num_blocks, group.k, group.m,
                                 torch.float32)
                for node in nodes
            ]
            decoded = group.decode(members, received, self.aggregation)  # type: ignore[arg-type]
            for i, t in zip(members, decoded, strict=True):
                out[self._slot_of[(g, i)]] = t
        return out

    def state_dict(self) -> dict[str, Any]:
        """With ``overlap``, also the payload in flight (waited for), so a resume is exact."""
        state = super().state_dict()
        if self._in_flight is not None:
            wait, active = self._in_flight
            state["in_flight"] = {"nodes": wait(), "active": [[g, list(m)] for g, m in active]}
        return state
