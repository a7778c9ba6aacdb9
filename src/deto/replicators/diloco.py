"""DiLoCo: H local steps of the inner optimizer, then an outer Nesterov step on the average
pseudo-gradient ``anchor - params`` (Douillard et al., 2023).

Between synchronisations the nodes train on their own gradients; after each one every node
holds the same anchor, so replicas are bitwise identical on replication steps.

With ``compress`` the pseudo-gradient crosses the network the way DeMo sends its momentum: it
is added to an error-feedback buffer (``error <- ef_decay * error + pseudo``), each block's top-k
is sent (bit-packed indices, coded values), and what was not sent stays in the buffer for the
next synchronisation. ``compress="topk"`` takes the top-k of each block's own values: Sparse
DiLoCo (SparseLoCo, Templar 2025); ``compress="demo"`` of its DCT coefficients. Every node
decodes the same gathered bytes, so the anchors stay identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

import torch

from deto.comm import Comm
from deto.compress.chunking import BlockMode
from deto.compress.wire import VALUE_CODECS
from deto.replicators.base import ParamReplicator, Slot, register
from deto.replicators.demo import DeMo
from deto.replicators.options import MAX_LR, ReplicatorOptions, knob

COMPRESSION = ("none", "topk", "demo")
"""How the pseudo-gradient crosses nodes: exactly (an all-reduce), or its top-k per block of
the raw values or of their DCT, with error feedback."""


@dataclass(frozen=True)
class OuterOptions(ReplicatorOptions):
    """The outer optimisation every DiLoCo-family scheme runs; ``outer_momentum=0`` disables
    the outer momentum."""

    every: int = knob(100, "inner steps between synchronisations (H)", low=1, metavar="N")
    outer_lr: float = knob(
        0.7, "outer learning rate", low=0.0, low_open=True, high=MAX_LR, metavar="LR"
    )
    outer_momentum: float = knob(
        0.9, "outer momentum", low=0.0, high=1.0, high_open=True, metavar="M"
    )
    nesterov: bool = knob(True, "Nesterov outer momentum (else heavy-ball)")


def outer_step(
    anchor: torch.Tensor, momentum: torch.Tensor, pseudo: torch.Tensor, o: OuterOptions
) -> None:
    """``anchor`` takes one outer (Nesterov or heavy-ball) SGD step on the nodes' mean
    pseudo-gradient; ``momentum`` is its buffer."""
    update = pseudo
    if o.outer_momentum:
        momentum.mul_(o.outer_momentum).add_(pseudo)
        update = pseudo.add(momentum, alpha=o.outer_momentum) if o.nesterov else momentum
    anchor.sub_(update, alpha=o.outer_lr)


def outer_state(local: torch.Tensor) -> dict[str, torch.Tensor]:
    """A DiLoCo-family scheme's per-parameter state: the anchor every node agrees on, and the
    outer momentum."""
    return {
        "anchor": local.detach().to(torch.float32, copy=True),
        "momentum": torch.zeros_like(local, dtype=torch.float32),
    }


@dataclass(frozen=True)
class DiLoCoOptions(OuterOptions):
    """DiLoCo's knobs: the outer optimisation's, and how the pseudo-gradient is compressed."""

    compress: str = knob(
        "none", "send the pseudo-gradient exactly (none), or its top-k per block of the raw "
        "values (topk: SparseLoCo) or of the DCT (demo), with error feedback",
        choices=COMPRESSION,
    )
    topk: int = knob(64, "values kept per block when compressing", low=1, metavar="K")
    chunk: int = knob(64, "block edge when compressing; 2-D blocks are chunk x chunk", low=1,
                      metavar="C")  # fmt: skip
    blocks: str = knob("2d", "blocks of the weight, or 1-D chunks of the flat shard",
                       choices=get_args(BlockMode))  # fmt: skip
    values: str = knob("int2", "wire format of the sent values", choices=VALUE_CODECS)
    ef_decay: float = knob(
        0.95, "decay of the compressed pseudo-gradient's error feedback", low=0.0, high=1.0,
        high_open=True, metavar="BETA",
    )
    dense_fallback: bool = knob(
        True, "send a tensor dense when its top-k payload would not be smaller"
    )


@register
class DiLoCo(ParamReplicator):
    """Outer optimisation over nodes every H (``every``) steps.

    Keyword arguments: the knobs of :class:`DiLoCoOptions` (``every=100, outer_lr=0.7,
    outer_momentum=0.9, nesterov=True``; the paper's values), and the schedule's
    ``skip_every``, ``offset`` and ``include``. ``compress`` (``None`` or ``"none"``: exact,
    ``"topk"``, ``"demo"``) compresses the pseudo-gradient with ``topk`` of each ``chunk x
    chunk`` block (``blocks="2d"``), ``values`` on the wire and error feedback decaying by
    ``ef_decay``; the defaults are SparseLoCo's (64 of 4096, 2-bit values, 0.95). Compressed,
    each parameter also keeps its error buffer (``error``, in the transform's domain).
    """

    name = "diloco"
    Options = DiLoCoOptions

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("compress", "none") is None:
            kwargs = {**kwargs, "compress": "none"}
        self.options, schedule = DiLoCoOptions.take(kwargs)
        super().__init__(every=self.options.every, **schedule)
        o = self.options
        # The pseudo-gradient's coder is DeMo's, fed once per synchronisation: its momentum
        # ("delta") is the error feedback, its decay ef_decay, each node's share divided by
        # the number of nodes (as the exact all-reduce's mean).
        self.coder = None if o.compress == "none" else DeMo(
            topk=o.topk, chunk=o.chunk, blocks=o.blocks, values=o.values, decay=o.ef_decay,
            aggregation="all", dense_fallback=o.dense_fallback,
            transform="none" if o.compress == "topk" else "dct",
        )  # fmt: skip

    def extra_repr(self) -> str:
        extra = f"outer_lr={self.options.outer_lr}, outer_momentum={self.options.outer_momentum}"
        if self.coder is not None:
            o = self.options
            extra += f", compress={o.compress!r}, topk={o.topk}, values={o.values!r}"
        return extra

    def bind(self, slots: list[Slot]) -> None:
        super().bind(slots)
        if self.coder is not None:
            self.coder.bind(slots)
            for mine, coded in zip(self.state, self.coder.state, strict=True):
                mine["error"] = coded["delta"]  # the same tensor: checkpoints reach the coder

    def init_state(self, local: torch.Tensor) -> dict[str, torch.Tensor]:
        return outer_state(local)

    def after_step(self, comm: Comm) -> None:
        anchors = [st["anchor"] for st in self.state]
        locals_ = [s.local for s in self.slots]
        pseudo = [a - p.float() for a, p in zip(anchors, locals_, strict=True)]
        pseudo = self._average(pseudo, comm)
        for st, g, p in zip(self.state, pseudo, locals_, strict=True):
            outer_step(st["anchor"], st["momentum"], g, self.options)
            p.copy_(st["anchor"])
        self.fired += 1

    def _average(self, pseudo: list[torch.Tensor], comm: Comm) -> list[torch.Tensor]:
        """The nodes' mean pseudo-gradient: exact, or as the coder decodes it."""
        if self.coder is None:
            return comm.all_reduce_mean(pseudo)
        positions = list(range(len(pseudo)))
        self.coder.defer(positions, pseudo, [1.0] * len(pseudo))
        errors = [st["delta"] for st in self.coder.state]
        return self.coder.exchange(positions, errors, comm)
