"""Full and None: the two ends of the spectrum, the baselines every scheme is measured against."""

from __future__ import annotations

import logging
from typing import Any

import torch

from deto.comm import Comm, PendingMean
from deto.ranklog import warn
from deto.replicators.base import GradReplicator, register
from deto.replicators.options import OverlapOptions

logger = logging.getLogger(__name__)


@register
class Full(GradReplicator):
    """All-reduce (average) of the sharded gradient: HSDP's full sync as a replicator.

    With an AdamW base and sign off this is numerically HSDP + AdamW. When the schedule skips
    steps, their gradients are summed into a ``pending`` buffer and sent with the next
    replication; the buffer exists from the start, so checkpoints always carry it.

    With ``overlap`` each gradient's all-reduce starts as soon as the backward pass has made it
    (FSDP2 calls a parameter's post-accumulate-grad hooks once its unit is reduce-scattered), so
    the exchange runs under the rest of the backward pass, as torch's HSDP does, and the step
    only waits for what is still in flight. The means are the same (bitwise with two nodes; with
    more, a ring may add a tensor's elements in another order when it is sent alone), and still
    identical on every node. Accumulating gradients over several backward passes needs FSDP2's
    ``set_requires_gradient_sync(False)`` on all but the last: a second gradient before the
    step resends that parameter in the step (correct, but not hidden).

    Keyword arguments: ``every`` and ``overlap`` (:class:`OverlapOptions`), and the schedule's
    ``skip_every``, ``offset`` and ``include``.
    """

    name = "full"
    Options = OverlapOptions

    def __init__(self, **kwargs: Any) -> None:
        self.options, schedule = OverlapOptions.take(kwargs)
        super().__init__(every=self.options.every, **schedule)
        self.overlap = self.options.overlap
        self._in_flight: dict[int, PendingMean] = {}  # position -> its all-reduce, with overlap
        self._resend: set[int] = set()  # positions whose gradient changed after it was sent
        self._warned = False

    def init_state(self, local: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.schedule.every == 1 and not self.schedule.skip_every:
            return {}  # fires on every step: nothing is ever pending
        return {"pending": torch.zeros_like(local, dtype=torch.float32)}

    def defer(self, positions: list[int], grads: list[torch.Tensor], lrs: list[float]) -> None:
        for pos, grad in zip(positions, grads, strict=True):
            self.state[pos]["pending"].add_(grad)

    @property
    def starts_early(self) -> bool:
        return self.overlap

    def _payload(self, position: int, grad: torch.Tensor) -> torch.Tensor:
        pending = self.state[position].get("pending")
        return grad.float() if pending is None else pending.add(grad)

    def start(self, position: int, grad: torch.Tensor, comm: Comm) -> None:
        if position in self._in_flight:
            self._resend.add(position)
            if not self._warned:
                self._warned = True
                warn(  # every rank runs the same backward: rank 0 says it
                    logger,
                    "Full(overlap=True): %s got a second gradient before the step; it is sent "
                    "again in the step (accumulate with FSDP2's set_requires_gradient_sync(False) "
                    "on all but the last backward to keep the exchange hidden)",
                    self.slots[position].name,
                )
            return
        self._in_flight[position] = comm.all_reduce_mean_async([self._payload(position, grad)])

    def finish_in_flight(self) -> None:
        for flight in self._in_flight.values():
            flight.finish()

    def replicate(
        self, positions: list[int], grads: list[torch.Tensor], lrs: list[float], comm: Comm
    ) -> list[torch.Tensor]:
        early = {
            pos: self._in_flight.pop(pos)
            for pos in positions
            if pos in self._in_flight and pos not in self._resend
        }
        late = [i for i, pos in enumerate(positions) if pos not in early]
        means = iter(comm.all_reduce_mean([self._payload(positions[i], grads[i]) for i in late]))
        out = [early[pos].wait()[0] if pos in early else next(means) for pos in positions]
        for flight in self._in_flight.values():  # superseded: finish them, drop the result
            flight.finish()
        self._in_flight.clear()
        self._resend.clear()
        for pos in positions:
            pending = self.state[pos].get("pending")
            if pending is not None:
                pending.zero_()
        self.fired += 1
        return out

    def extra_repr(self) -> str:
        return "overlap=True" if self.overlap else ""


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
