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
from typing import Any, get_args

import torch

from deto.comm import Comm
from deto.compress.blockgroup import BlockGroup
from deto.compress.chunking import BlockLayout, BlockMode, make_layout
from deto.compress.dct import Transform
from deto.compress.wire import VALUE_CODECS, WireFormat
from deto.ranklog import warn_once
from deto.replicators.base import MomentumReplicator, register
from deto.replicators.options import MomentumOptions, OverlapOptions, knob

logger = logging.getLogger(__name__)

# an all-gather started by an earlier step (a wait that returns every node's payload) and the
# (group, members) whose selections it carries
InFlight = tuple[Callable[[], list[list[torch.Tensor]]], list[tuple[int, list[int]]]]

OVERLAP_MODES = ("eager", "delayed")


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
class DeMoOptions(MomentumOptions, OverlapOptions):
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
    ``transform="none"`` selects the top-k of each block's own values instead of its DCT
    coefficients (chunked top-k, as SparseLoCo); DeMo's results are all with the DCT.
    With ``overlap`` each step starts its all-gather and returns at once: the exchange runs
    under the next forward and backward, and each aggregate is applied one step late. Shards
    sent dense are still all-reduced in the step. ``overlap_mode`` says what the step does
    meanwhile. ``"delayed"`` applies only the previous step's aggregate (as Psyche does); its
    gradients are then taken at parameters that lack the update in flight, and on the byte GPT
    that costs 23-28% of final loss, with or without compression (docs/benchmarks.md,
    "Overlap"). ``"eager"`` also applies this node's own selection at once, as its estimate of
    the aggregate, on top of a *consensus* copy of the parameters that only aggregates move:
    the live shard is the consensus plus that provisional update, and each step restores the
    consensus, applies the aggregate that arrived, and re-derives the live shard. Consensus
    copies are bitwise identical on every node (live shards differ by the provisional part);
    they cost one more copy of every sparse shard. Checkpoints hold the payload in flight and
    the consensus. With ``overlap_after`` N, the first N exchanges run in the step (nothing in
    flight, nothing provisional: the in-step path's numbers) and overlap starts at exchange
    N + 1; most of what the delay costs is paid early, at the peak learning rate.
    """

    topk: int = knob(4, "DCT coefficients kept per chunk", low=1, metavar="K")
    chunk: int = knob(64, "chunk edge; 2-D blocks are chunk x chunk", low=1, metavar="C")
    blocks: str = knob(
        "1d", "DCT over 2-D blocks of the weight, or 1-D chunks of the flat shard",
        choices=get_args(BlockMode),
    )
    values: str = knob(
        "int2", "wire format of the sent values; int8, int4, int2 and sign (1 bit) have one fp32 "
        "scale per block",
        choices=VALUE_CODECS,
    )
    aggregation: str = knob(
        "selected", "average each coefficient over the nodes that sent it, or over all nodes",
        choices=("selected", "all"),
    )
    dense_fallback: bool = knob(
        True, "send a tensor dense when its top-k payload would not be smaller"
    )
    transform: str = knob(
        "dct", "each block's transform before its top-k: the DCT, or none (the raw values)",
        choices=get_args(Transform),
    )
    overlap_mode: str = knob(
        "eager", "with --overlap, what a step applies while its aggregate is in flight: "
        "eager (this node's own selection at once, corrected by the aggregate a step later) or "
        "delayed (only the previous step's aggregate)", choices=OVERLAP_MODES,
    )
    overlap_after: int = knob(
        0, "with --overlap, run the first N exchanges in the step and overlap from then on "
        "(the delay costs most in the steps at the peak learning rate right after warm-up)",
        low=0, metavar="N",
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

    Keyword arguments: the knobs of :class:`DeMoOptions` (``topk=4, chunk=64, decay=0.999,
    blocks="1d", values="int2", aggregation="selected", dense_fallback=True, overlap=False,
    overlap_mode="eager", overlap_after=0, every=1``), and the schedule's ``skip_every``,
    ``offset`` and ``include`` (see :class:`Replicator`). The defaults come from a
    loss-vs-bytes sweep over four models (docs/benchmarks.md, "Choosing DeMo's defaults"): 4 of
    the 64 coefficients of each 1-D chunk, 2-bit values, 1/32 of a full all-reduce's bytes, at or
    below HSDP's loss on every model swept, where 2-D blocks at 1/50 and beyond fell behind on
    some.
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
        self.transform: Transform = self.options.transform  # type: ignore[assignment]
        self.overlap = self.options.overlap
        self.eager = self.overlap and self.options.overlap_mode == "eager"
        super().__init__(decay=self.options.decay, every=self.options.every, **schedule)
        self.plans: list[Plan] = []
        self.groups: list[BlockGroup] = []
        self._member: dict[int, tuple[int, int]] = {}  # slot position -> (group, member)
        self._slot_of: dict[tuple[int, int], int] = {}
        self._in_flight: InFlight | None = None
        self._pending = False  # with overlap: ``state[pos]["pending"]`` is the next update
        self._agreed = False  # eager: whether ``state[pos]["consensus"]`` holds the consensus
        self._own: dict[int, torch.Tensor] = {}  # eager: this node's selection now in flight

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
        if dense:  # the same tensors on every node: said once, by rank 0
            warn_once(
                logger,
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
                [self.plans[p].layout for p in members], k, self.slots[members[0]].local.device,
                self.transform,
            )
            for (_, _, k), members in keys.items()
        ]
        self._member = {}
        for g, members in enumerate(keys.values()):
            for i, pos in enumerate(members):
                self._member[pos] = (g, i)
                self.state[pos]["delta"] = self.groups[g].region(i)
        self._slot_of = {where: pos for pos, where in self._member.items()}
        if self.overlap:  # where a checkpoint keeps the aggregate still to be applied
            for pos in self._member:
                self.state[pos]["pending"] = torch.zeros_like(self.slots[pos].local,
                                                              dtype=torch.float32)
                if self.eager:  # filled from the live shard at the first step (see consensus)
                    self.state[pos]["consensus"] = torch.zeros_like(self.slots[pos].local)

    def scalars(self) -> dict[str, int]:
        """``fired``, and with ``overlap`` whether ``pending`` holds an aggregate to apply."""
        out = super().scalars()
        if self.overlap:
            out["pending"] = int(self._pending)
        if self.eager:
            out["agreed"] = int(self._agreed)
        return out

    def load_scalars(self, scalars: dict[str, int]) -> None:
        super().load_scalars(scalars)
        if self.overlap:
            self._pending = bool(scalars["pending"])
            self._in_flight = None
        if self.eager:  # the live shards a checkpoint restores already hold the provisional part
            self._agreed = bool(scalars["agreed"])
            self._own = {}

    def consensus(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Eager overlap: ``(live shard, consensus)`` of every sparse shard.

        The consensus is taken from the live shards the first time it is asked for (the first
        step), not when the optimizer is built, so weights loaded into the model in between
        are the ones training starts from.
        """
        if not self.eager:
            return []
        pairs = [(self.slots[pos].local, self.state[pos]["consensus"]) for pos in self._member]
        if not self._agreed:
            for live, agreed in pairs:
                agreed.copy_(live)
            self._agreed = True
        return pairs

    def provisional(self) -> dict[int, torch.Tensor]:
        return self._own

    def finish_in_flight(self) -> None:
        """Wait for the exchange in flight and keep its decoded aggregate in ``pending``.

        A checkpoint then holds the update the next step applies, per parameter, so a resume
        is exact; decoding now or at the next step gives the same bytes.
        """
        if self._in_flight is None:
            return
        wait, active = self._in_flight
        self._in_flight = None
        for pos, aggregate in self._decode(active, wait()).items():
            self.state[pos]["pending"].copy_(aggregate)
        self._pending = True

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
        if self.overlap and not self.eager:
            extra += f", overlap_mode={self.options.overlap_mode!r}"
        if self.overlap and self.options.overlap_after:
            extra += f", overlap_after={self.options.overlap_after}"
        if self.transform != "dct":
            extra += f", transform={self.transform!r}"
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
            idx, _, values = self.groups[g].select(members, self.wire)
            payload += [self.wire.encode_indices(idx, self.groups[g].m), *values]

        if dense:
            averaged = comm.all_reduce_mean([deltas[j] for j in dense])
            for j, avg in zip(dense, averaged, strict=True):
                deltas[j].zero_()
                out[j] = avg
        if payload:
            overlapping = self.overlapping
            if self.eager:  # this node's estimate of the aggregate now sent: its own selection
                # (copies: a group decodes into one buffer, which the aggregate's decode reuses)
                self._own = ({p: t.clone() for p, t in self._decode(active, [payload]).items()}
                             if overlapping else {})
            if overlapping:
                previous = self._in_flight
                self._in_flight = (comm.all_gather_async(payload).wait, active)
                if previous is not None:
                    decoded = self._decode(previous[1], previous[0]())
                elif self._pending:  # finished before a checkpoint, or restored from one
                    decoded = {pos: self.state[pos]["pending"].clone() for pos in self._member}
                    self._pending = False
                else:
                    decoded = {}
            else:
                decoded = self._decode(active, comm.all_gather(payload))
            for j, pos in enumerate(positions):
                if pos in self._member:
                    out[j] = decoded.get(pos, None)
                    if out[j] is None:  # nothing in flight for it yet: no update this step
                        out[j] = torch.zeros(self.slots[pos].local.shape, device=deltas[j].device)
        return [t for t in out if t is not None]

    @property
    def overlapping(self) -> bool:
        """Whether the exchange about to run is left in flight: ``overlap`` is on and the first
        ``overlap_after`` exchanges, which run in the step, are done (``fired`` counts them, and
        a checkpoint keeps it, so a resume is in the same phase)."""
        return self.overlap and self.fired >= self.options.overlap_after

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
