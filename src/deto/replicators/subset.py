"""Random, Striding and Slicing: all-reduce a subset of the rows of each ``delta``.

No indices are sent: every node derives the same rows from the step count (and, for Random,
a shared seed). Rows are those of the shard viewed as ``(shape[0], -1)``; a 1-D shard's rows
are its elements. Random and Slicing send at least one row of every shard per replication,
however small it is; Striding sends every row exactly once per cycle of ``1 / rate``
replications.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from deto._validate import check_int
from deto.comm import Comm
from deto.replicators.base import MomentumReplicator, register
from deto.replicators.options import MomentumOptions, knob


def subset_size(rows: int, rate: float) -> int:
    """Rows sent per replication: ``round(rate * rows)``, at least 1, at most ``rows``."""
    return min(rows, max(1, round(rate * rows)))


def row_view(t: torch.Tensor) -> torch.Tensor:
    """The shard as ``(rows, rest)``; explicit sizes, so an empty shard (0 rows) reshapes too."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:])) if t.dim() >= 2 else t.reshape(-1, 1)


@dataclass(frozen=True)
class SubsetOptions(MomentumOptions):
    """The knobs of the row-subset schemes (Random, Striding, Slicing)."""

    rate: float = knob(
        1 / 16, "fraction of rows sent per replication", low=0.0, high=1.0, low_open=True,
        metavar="R",
    )


class SubsetReplicator(MomentumReplicator):
    """Shared mechanics of the row-subset schemes; subclasses only choose the rows.

    Keyword arguments: the knobs of :class:`SubsetOptions` (``rate=1/16, decay=0.999,
    every=1``), and the schedule's ``skip_every``, ``offset`` and ``include``.
    """

    Options = SubsetOptions

    def __init__(self, **kwargs: Any) -> None:
        self.options, schedule = SubsetOptions.take(kwargs)
        self.rate = self.options.rate
        super().__init__(decay=self.options.decay, every=self.options.every, **schedule)

    def extra_repr(self) -> str:
        return f"rate={self.rate}, decay={self.decay}"

    @abstractmethod
    def rows(self, index: int, n: int) -> torch.Tensor:
        """Row indices (CPU, int64, distinct) of parameter ``index`` with ``n`` rows to send."""

    def exchange(
        self, positions: list[int], deltas: list[torch.Tensor], comm: Comm
    ) -> list[torch.Tensor]:
        views = [row_view(d) for d in deltas]
        chosen = [
            self.rows(self.slots[p].index, v.shape[0]).to(v.device) if v.numel() else None
            for p, v in zip(positions, views, strict=True)
        ]
        picked = [v[c] for v, c in zip(views, chosen, strict=True) if c is not None]
        averaged = iter(comm.all_reduce_mean(picked))
        out = []
        for d, v, c in zip(deltas, views, chosen, strict=True):
            q = torch.zeros_like(d)
            if c is not None:
                row_view(q)[c] = next(averaged)
                v[c] = 0.0  # error feedback: the sent rows leave delta, after sending them
            out.append(q)
        return out


@register
class RandomSubset(SubsetReplicator):
    """A fresh random subset of rows each replication, drawn from a seed shared by all nodes."""

    name = "random"

    def __init__(self, *, seed: int = 0, **kwargs: Any) -> None:
        self.seed = check_int("seed", seed, 0)  # not an option: a fixed, shared choice of rows
        super().__init__(**kwargs)

    def rows(self, index: int, n: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.fired) * 65_537 + index)
        return torch.randperm(n, generator=gen)[: subset_size(n, self.rate)]


@register
class Striding(SubsetReplicator):
    """Rows ``o, o + s, o + 2s, ... < n`` with stride ``s = round(1 / rate)``, ``o`` cycling.

    Over ``s`` consecutive replications every row is sent exactly once (the reference never
    advanced ``o``, so it synchronised the same rows forever).
    """

    name = "striding"

    @property
    def stride(self) -> int:
        return max(1, round(1 / self.rate))

    def rows(self, index: int, n: int) -> torch.Tensor:
        start = self.fired % self.stride
        return torch.arange(start, max(start, n), self.stride)  # none when start >= n


@register
class Slicing(SubsetReplicator):
    """A contiguous window of rows that moves on by its own length each replication (wrapping)."""

    name = "slicing"

    def rows(self, index: int, n: int) -> torch.Tensor:
        count = subset_size(n, self.rate)
        return (self.fired * count + torch.arange(count)) % n
