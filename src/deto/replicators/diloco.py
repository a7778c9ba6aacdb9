"""DiLoCo: H local steps of the inner optimizer, then an outer Nesterov step on the average
pseudo-gradient ``anchor - params`` (Douillard et al., 2023).

Between synchronisations the nodes train on their own gradients; after each one every node
holds the same anchor, so replicas are bitwise identical on replication steps.
"""

from __future__ import annotations

from typing import Any

import torch

from deto._validate import check_float
from deto.comm import Comm
from deto.replicators.base import ParamReplicator, register


@register
class DiLoCo(ParamReplicator):
    """Outer optimisation over nodes every ``every`` (H) steps.

    Args:
        every: inner steps between synchronisations (H).
        outer_lr: outer learning rate (0.7 in the paper).
        outer_momentum: outer Nesterov momentum (0.9 in the paper); 0 disables momentum.
        nesterov: use Nesterov momentum (default) or heavy-ball.
    """

    name = "diloco"

    def __init__(
        self,
        every: int = 100,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        *,
        nesterov: bool = True,
        **schedule: Any,
    ) -> None:
        self.outer_lr = check_float("outer_lr", outer_lr, 0.0, float("inf"), low_open=True)
        self.outer_momentum = check_float("outer_momentum", outer_momentum, 0.0, 1.0, high_open=True)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
        self.nesterov = nesterov
        super().__init__(every=every, **schedule)

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
        pseudo = comm.all_reduce_mean([a - p.float() for a, p in zip(anchors, locals_, strict=True)])
        mu = self.outer_momentum
        for st, g, p in zip(self.state, pseudo, locals_, strict=True):
            update = g
            if mu:
                st["momentum"].mul_(mu).add_(g)
                update = g.add(st["momentum"], alpha=mu) if self.nesterov else st["momentum"]
            st["anchor"].sub_(update, alpha=self.outer_lr)
            p.copy_(st["anchor"])
        self.fired += 1
