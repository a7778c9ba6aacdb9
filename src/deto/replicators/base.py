"""The replicator interfaces: what crosses the node boundary, and when.

A replicator owns the parameters it covers (optionally filtered by name) and keeps its own
per-parameter state, so several replicators never share or overwrite each other's buffers.
Two kinds exist, each a small ABC: a :class:`GradReplicator` turns each node's (node-averaged,
sharded) gradient into the gradient the base optimizer uses; a :class:`ParamReplicator` acts on
the parameters after the base step. :class:`Replicator` holds what both share: the schedule,
the coverage filter, the per-parameter state and the count of replications.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.distributed.tensor import DTensor

from deto._validate import check_float
from deto.comm import Comm
from deto.replicators.options import Options
from deto.schedule import SyncSchedule

ParamFilter = Callable[[str, torch.Tensor], bool]


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly sharded) tensor; in-place changes reach the parameter."""
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class Slot:
    """One parameter as a replicator sees it."""

    index: int  # position among all the optimizer's parameters; equal on every node
    name: str
    param: torch.Tensor

    @property
    def local(self) -> torch.Tensor:
        return local_tensor(self.param)


class Replicator(ABC):
    """What every scheme shares; subclass :class:`GradReplicator` or :class:`ParamReplicator`.

    Args:
        every: fire on every ``every``-th optimizer step.
        skip_every: additionally skip every ``skip_every``-th step (0 = never).
        offset: shift the schedule by this many steps.
        include: ``(name, param) -> bool`` choosing the parameters this replicator covers
            (default: all). With several gradient replicators, a parameter is replicated by the
            first one in order that covers it and fires on the step.

    ``state[pos]`` holds the buffers of ``slots[pos]``, each shaped like that parameter's local
    shard; they are created in :meth:`bind` (so a fresh optimizer's state dict already has every
    key a checkpoint will have) and checkpointed by the optimizer with the base optimizer's state.
    """

    name: ClassVar[str]
    promises_identical_replicas: ClassVar[bool] = True
    Options: ClassVar[type[Options]] = Options  # the knobs its constructor takes by keyword

    def __init__(
        self,
        *,
        every: int = 1,
        skip_every: int = 0,
        offset: int = 0,
        include: ParamFilter | None = None,
    ) -> None:
        self.schedule = SyncSchedule(every=every, skip_every=skip_every, offset=offset)
        if include is not None and not callable(include):
            raise TypeError(f"include must be callable, got {type(include).__name__}")
        self.include = include
        self.fired = 0  # replication steps done so far
        self.slots: list[Slot] = []
        self.state: list[dict[str, torch.Tensor]] = []

    def covers(self, name: str, param: torch.Tensor) -> bool:
        return self.include is None or bool(self.include(name, param))

    def bind(self, slots: list[Slot]) -> None:
        """Attach to the covered parameters and create their state."""
        self.slots = slots
        self.state = [self.init_state(s.local) for s in slots]

    def init_state(self, local: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter state for a local shard; stateless schemes keep the empty default."""
        return {}

    def syncs_at(self, step: int) -> bool:
        """Whether optimizer step ``step`` brings the nodes' parameters together, so that the
        floating buffers (BatchNorm statistics) are averaged before it (:mod:`deto.buffers`):
        a step on which a scheme that keeps replicas identical fires."""
        return self.promises_identical_replicas and self.schedule.fires(step)

    def scalars(self) -> dict[str, int]:
        """The replicator's counters, checkpointed next to its per-parameter state."""
        return {"fired": self.fired}

    def load_scalars(self, scalars: dict[str, int]) -> None:
        self.fired = int(scalars["fired"])

    def finish_in_flight(self) -> None:
        """Complete any exchange still in flight into ``state``, before it is checkpointed.

        Schemes that overlap their exchange with the next step's compute override this; the
        others have nothing in flight.
        """
        return None

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        s = self.schedule
        sched = f"every={s.every}" + (f", skip_every={s.skip_every}" if s.skip_every else "")
        extra = self.extra_repr()
        return f"{type(self).__name__}({extra}{', ' if extra else ''}{sched})"


class GradReplicator(Replicator):
    """Replaces each node's gradient by one that every node agrees on (or folds it away)."""

    @abstractmethod
    def replicate(
        self, positions: list[int], grads: list[torch.Tensor], lrs: list[float], comm: Comm
    ) -> list[torch.Tensor]:
        """Exchange what this scheme sends for ``slots[positions]`` and return their gradients.

        Every node calls this with the same positions (the schedule and coverage depend only on
        the step and the model), so the collectives line up.
        """

    @abstractmethod
    def defer(self, positions: list[int], grads: list[torch.Tensor], lrs: list[float]) -> None:
        """Fold a step's gradients into the state on a step the schedule skips; nothing is sent."""

    @property
    def starts_early(self) -> bool:
        """Whether :meth:`start` wants each gradient as soon as the backward pass has made it."""
        return False

    def start(self, position: int, grad: torch.Tensor, comm: Comm) -> None:
        """Begin the exchange of ``slots[position]``'s gradient during the backward pass, on a
        step where this replicator will replicate it; :meth:`replicate` finishes it. Called
        only when :attr:`starts_early`, in the order the backward pass makes the gradients,
        which is the same on every node."""
        raise NotImplementedError(f"{type(self).__name__} does not start exchanges early")

    def consensus(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(live shard, consensus)`` pairs of the shards this replicator updates eagerly.

        A scheme that applies this node's own contribution before the aggregate arrives keeps,
        per shard, the parameters every node agrees on (the *consensus*, which only aggregates
        move); the live parameters are the consensus plus this node's provisional update. The
        optimizer steps the base on the consensus and re-derives the live shard from it. Empty
        (the default): live and agreed parameters are the same tensor.
        """
        return []

    def provisional(self) -> dict[int, torch.Tensor]:
        """Slot position -> this node's own estimate of the aggregate in flight, in gradient
        units, for the shards of :meth:`consensus`; the optimizer applies it to the live shard
        as the base optimizer would. Empty when nothing is in flight."""
        return {}


class ParamReplicator(Replicator):
    """Acts on the covered parameters after the base optimizer's step, on the steps it fires."""

    @abstractmethod
    def after_step(self, comm: Comm) -> None:
        """Bring the covered parameters (and this replicator's state) into agreement."""


class MomentumReplicator(GradReplicator):
    """A gradient replicator with a decoupled momentum buffer ``delta`` per local shard.

    ``delta <- decay * delta + lr * grad`` every step; what a scheme sends is subtracted from
    ``delta`` (error feedback), so what is not sent now is sent later.
    """

    def __init__(self, *, decay: float, **schedule: Any) -> None:
        self.decay = check_float("decay", decay, 0.0, 1.0, high_open=True)
        super().__init__(**schedule)

    def init_state(self, local: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"delta": torch.zeros_like(local, dtype=torch.float32)}

    def defer(self, positions: list[int], grads: list[torch.Tensor], lrs: list[float]) -> None:
        for pos, grad, lr in zip(positions, grads, lrs, strict=True):
            self.state[pos]["delta"].mul_(self.decay).add_(grad, alpha=lr)

    def replicate(
        self, positions: list[int], grads: list[torch.Tensor], lrs: list[float], comm: Comm
    ) -> list[torch.Tensor]:
        self.defer(positions, grads, lrs)
        out = self.exchange(positions, [self.state[p]["delta"] for p in positions], comm)
        self.fired += 1
        return out

    @abstractmethod
    def exchange(
        self, positions: list[int], deltas: list[torch.Tensor], comm: Comm
    ) -> list[torch.Tensor]:
        """Send part of each ``delta`` (subtracting it in place); return the decoded averages."""


REGISTRY: dict[str, type[Replicator]] = {}


def register(cls: type[Replicator]) -> type[Replicator]:
    """Class decorator adding a replicator to the name registry under ``cls.name``."""
    REGISTRY[cls.name] = cls
    return cls


def make_replicator(name: str, **options: Any) -> Replicator:
    """Build a replicator from its registry name; unknown names list the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"replicator name must be a str, got {type(name).__name__}")
    try:
        cls = REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(
            f"Unknown replicator: {name!r} (valid: {', '.join(sorted(REGISTRY))})"
        ) from None
    return cls(**options)


ReplicatorSpec = str | Replicator | Sequence[str | Replicator]


def build_replicators(spec: ReplicatorSpec, options: dict[str, Any]) -> list[Replicator]:
    """Turn a name, an instance or a list of either into replicators.

    ``options`` configure a replicator given by name; they are an error with instances (which
    carry their own settings) or with a list of several names (ambiguous).
    """
    items = [spec] if isinstance(spec, (str, Replicator)) else list(spec)
    if not items:
        raise ValueError("replicator list is empty (use 'none' for no replication)")
    names = [it for it in items if isinstance(it, str)]
    if options and len(names) != 1:
        raise ValueError(
            f"Options {sorted(options)} need exactly one replicator given by name, got {items!r}"
        )
    out = []
    for it in items:
        if isinstance(it, Replicator):
            out.append(it)
        elif isinstance(it, str):
            out.append(make_replicator(it, **options))
        else:
            raise TypeError(f"replicator must be a name or a Replicator, got {type(it).__name__}")
    return out
