"""DiLoCo: H local steps of the inner optimizer, then an outer Nesterov step on the average
pseudo-gradient ``anchor - params`` (Douillard et al., 2023).

Between synchronisations the nodes train on their own gradients; after each one every node
holds the same anchor, so replicas are bitwise identical on replication steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deto.comm import Comm
from deto.replicators.base import ParamReplicator, register
from deto.replicators.options import ReplicatorOptions, knob


@dataclass(frozen=True)
class DiLoCoOptions(ReplicatorOptions):
    """DiLoCo's knobs; ``outer_momentum=0`` disables the outer momentum."""

    every: int = knob(100, "inner steps between synchronisations (H)", low=1, metavar="N")
    outer_lr: float = knob(0.7, "outer learning rate", low=0.0, low_open=True, metavar="LR")
    outer_momentum: float = knob(
        0.9, "outer momentum", low=0.0, high=1.0, high_open=True, metavar="M"
    )
    nesterov: bool = knob(True, "Nesterov outer momentum (else heavy-ball)")


@register
class DiLoCo(ParamReplicator):
    """Outer optimisation over nodes every H (``every``) steps.

    Keyword arguments: the knobs of :class:`DiLoCoOptions` (``every=100, outer_lr=0.7,
    outer_momentum=0.9, nesterov=True``; the paper's values), and the schedule's
    ``skip_every``, ``offset`` and ``include``.
    """

    name = "diloco"
    Options = DiLoCoOptions

    def __init__(self, **kwargs: Any) -> None:
        self.options, schedule = DiLoCoOptions.take(kwargs)
        self.outer_lr = self.options.outer_lr
        self.outer_momentum = self.options.outer_momentum
        self.nesterov = self.options.nesterov
        super().__init__(every=self.options.every, **schedule)

    def extra_repr(self) -> str:
        return f"outer_lr={self.outer_lr}, outer_momentum={self.outer_momentum}"

    def init_state(self, local: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "anchor": local.detach().to(torch.float32, copy=True),
            "momentum": torch.zeros_like(local, dtype=torch.float32),
        }

    def after_step(self, comm: Comm) -> None:
        anchors = [st["anchor"] for st in self.state]
        locals_ = [s.local for s in self.slots]
        pseudo = comm.all_reduce_mean(
            [a - p.float() for a, p in zip(anchors, locals_, strict=True)]
        )
        mu = self.outer_momentum
        for st, g, p in zip(self.state, pseudo, locals_, strict=True):
            update = g
            if mu:
                st["momentum"].mul_(mu).add_(g)
                update = g.add(st["momentum"], alpha=mu) if self.nesterov else st["momentum"]
            st["anchor"].sub_(update, alpha=self.outer_lr)
            p.copy_(st["anchor"])
        self.fired += 1
