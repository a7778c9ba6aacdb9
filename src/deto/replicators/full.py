"""Full and None: the two ends of the spectrum, the baselines every scheme is measured against."""

from __future__ import annotations

import torch

from deto.comm import Comm
from deto.replicators.base import Replicator, register


@register
class Full(Replicator):
    """All-reduce (average) of the sharded gradient: HSDP's full sync as a replicator.

    With an AdamW base and sign off this is numerically HSDP + AdamW. On steps the schedule
    skips, gradients are summed into a pending buffer and sent with the next replication.
    """

    name = "full"

    def defer(self, positions: list[int], grads: list[torch.Tensor], lrs: list[float]) -> None:
        for pos, grad in zip(positions, grads, strict=True):
            pending = self.state[pos].get("pending")
            if pending is None:
                self.state[pos]["pending"] = grad.detach().to(torch.float32, copy=True)
            else:
                pending.add_(grad)

    def replicate(
        self, positions: list[int], grads: list[torch.Tensor], lrs: list[float], comm: Comm
    ) -> list[torch.Tensor]:
        send = []
        for pos, grad in zip(positions, grads, strict=True):
            pending = self.state[pos].pop("pending", None)
            send.append(grad.float() if pending is None else pending.add_(grad))
        self.fired += 1
        return comm.all_reduce_mean(send)


@register
class NoReplication(Replicator):
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
