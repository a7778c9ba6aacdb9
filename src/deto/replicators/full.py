"""Full and None: the two ends of the spectrum, the baselines every scheme is measured against."""

from __future__ import annotations

from typing import Any

import torch

from deto.comm import Comm
from deto.replicators.base import GradReplicator, register
from deto.replicators.options import ReplicatorOptions


@register
class Full(GradReplicator):
    """All-reduce (average) of the sharded gradient: HSDP's full sync as a replicator.

    With an AdamW base and sign off this is numerically HSDP + AdamW. When the schedule skips
    steps, their gradients are summed into a ``pending`` buffer and sent with the next
    replication; the buffer exists from the start, so checkpoints always carry it.

    Keyword arguments: ``every`` (:class:`ReplicatorOptions`), and the schedule's
    ``skip_every``, ``offset`` and ``include``.
    """

    name = "full"
    Options = ReplicatorOptions

    def __init__(self, **kwargs: Any) -> None:
        self.options, schedule = ReplicatorOptions.take(kwargs)
        super().__init__(every=self.options.every, **schedule)

    def init_state(self, local: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.schedule.every == 1 and not self.schedule.skip_every:
            return {}  # fires on every step: nothing is ever pending
        return {"pending": torch.zeros_like(local, dtype=torch.float32)}

    def defer(self, positions: list[int], grads: list[torch.Tensor], lrs: list[float]) -> None:
        for pos, grad in zip(positions, grads, strict=True):
            self.state[pos]["pending"].add_(grad)

    def replicate(
        self, positions: list[int], grads: list[torch.Tensor], lrs: list[float], comm: Comm
    ) -> list[torch.Tensor]:
        pending = [self.state[pos].get("pending") for pos in positions]
        send = [g.float() if p is None else p.add(g) for p, g in zip(pending, grads, strict=True)]
        for p in pending:
            if p is not None:
                p.zero_()
        self.fired += 1
        return comm.all_reduce_mean(send)


@register
class NoReplication(GradReplicator):
    """Nothing crosses the network: every node steps on its own gradient (a control).

    Replicas diverge from the first step, by design.
    """

    name = "none"
    promises_identical_replicas = False

    def defer(self, positions: list[int], grads: list[torch.Tensor], lrs: list[float]) -> None:
        """Nothing to fold: skipped steps leave the parameters where they are."""

    def replicate(
        self, positions: list[int], grads: list[torch.Tensor], lrs: list[float], comm: Comm
    ) -> list[torch.Tensor]:
        self.fired += 1
        return list(grads)
