"""Streaming DiLoCo (Douillard et al., 2025): DiLoCo on parameter fragments at staggered steps,
each fragment's exchange running under ``overlap`` inner steps, its outer gradient quantized.

The covered parameters are cut into ``fragments`` groups of about equal size (in slot order,
by their full sizes, so every rank of every node cuts alike). Fragment ``f`` starts a
synchronisation on the steps ``t`` with ``t % every == (every - f * every // fragments) %
every``: its pseudo-gradient ``anchor - params`` is quantized (``values``, one fp32 scale per
:data:`QUANT_BLOCK` values) and all-gathered without waiting. ``overlap`` steps later the
nodes' mean is decoded, the anchor takes the outer step, and the fragment's parameters are
merged: ``params <- alpha * params + (1 - alpha) * anchor`` (``alpha=0``: they become the
anchor, as in DiLoCo). At most one fragment's exchange is in flight at each step boundary it
crosses, so the peak traffic is one fragment's: about ``1 / fragments`` of DiLoCo's.

With ``fragments=1, overlap=0, values="fp32"`` this is :class:`~deto.replicators.DiLoCo`,
bitwise. With ``alpha=0`` a fragment is bitwise identical on every node right after its merge;
the whole model never is at once (unless ``fragments=1``), so the scheme does not promise
identical replicas. A checkpoint holds each exchange in flight, decoded (``pending``), and the
step it merges at, so a resume is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from deto.comm import Comm
from deto.compress.wire import VALUE_CODECS, WireFormat
from deto.replicators.base import ParamReplicator, Slot, register
from deto.replicators.diloco import OuterOptions, outer_state, outer_step
from deto.replicators.options import knob

QUANT_BLOCK = 256
"""Values that share one fp32 scale when the outer gradient is quantized."""


@dataclass(frozen=True)
class StreamingDiLoCoOptions(OuterOptions):
    """Streaming DiLoCo's knobs: the outer optimisation's, the fragments, the overlap, the merge
    and the outer gradient's wire format."""

    fragments: int = knob(2, "parameter fragments, synchronised at staggered steps", low=1,
                          metavar="F")  # fmt: skip
    overlap_steps: int = knob(
        0, "inner steps a fragment's exchange runs under before it is merged (tau)", low=0,
        metavar="TAU",
    )
    alpha: float = knob(
        0.0, "share of the local parameters kept when a synced fragment is merged", low=0.0,
        high=1.0, high_open=True, metavar="A",
    )
    values: str = knob(
        "int4", "wire format of the outer gradient (int4: the paper's 4 bits)",
        choices=VALUE_CODECS,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fragments > self.every:
            raise ValueError(
                f"Invalid fragments: {self.fragments} (at most every = {self.every}: each "
                "fragment needs its own step in a period)"
            )
        if self.overlap_steps >= self.every:
            raise ValueError(
                f"Invalid overlap_steps: {self.overlap_steps} (must be in [0, {self.every - 1}]:"
                " an exchange must merge before its fragment's next one starts)"
            )
        if self.values == "sign":
            raise ValueError(
                "Invalid values: 'sign' (expected one of fp32, bf16, int8, int4, int2: a "
                "sign carries no magnitude for the outer step)"
            )


@dataclass
class _Exchange:
    """One fragment's synchronisation between its start and its merge."""

    fragment: int
    merge_at: int  # the step whose end merges it
    wait: Callable[[], list[torch.Tensor]] | None  # None once decoded into ``pending``


def split_fragments(sizes: list[int], fragments: int) -> list[list[int]]:
    """Slot positions cut into ``fragments`` contiguous groups of about equal total size: each
    slot goes to the fragment its middle element falls in (a group may be empty when there are
    fewer slots than fragments)."""
    total, before = sum(sizes), 0
    out: list[list[int]] = [[] for _ in range(fragments)]
    for pos, n in enumerate(sizes):
        middle = before + n / 2
        out[min(fragments - 1, int(middle * fragments / total) if total else 0)].append(pos)
        before += n
    return out


@register
class StreamingDiLoCo(ParamReplicator):
    """DiLoCo on staggered parameter fragments with overlapped, quantized exchanges.

    Keyword arguments: the knobs of :class:`StreamingDiLoCoOptions` (``every=100,
    fragments=2, overlap_steps=0, alpha=0.0, values="int4"`` and the outer
    optimisation's ``outer_lr=0.7, outer_momentum=0.9, nesterov=True``), and the schedule's
    ``include``. ``deto.StreamingDiLoCo(every=4, fragments=2)`` trains as it is. The overlap
    (the paper's tau) is ``overlap_steps``, since ``overlap`` is Full's and DeMo's switch.
    """

    name = "streaming-diloco"
    Options = StreamingDiLoCoOptions
    promises_identical_replicas = False  # fragments meet one at a time, never all at once

    def __init__(self, **kwargs: Any) -> None:
        self.options, schedule = StreamingDiLoCoOptions.take(kwargs)
        if set(schedule) - {"include"}:
            raise ValueError(
                f"StreamingDiLoCo takes no {sorted(set(schedule) - {'include'})}: its fragments"
                " keep their own schedule"
            )
        super().__init__(every=1, **schedule)  # called every step; the fragments decide
        self.wire = WireFormat(self.options.values)
        self.steps = 0  # optimizer steps seen
        self.fragment_of: list[list[int]] = []
        self._exchanges: list[_Exchange] = []

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"every={o.every}, fragments={o.fragments}, overlap_steps={o.overlap_steps}, "
            f"alpha={o.alpha}, values={o.values!r}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def init_state(self, local: torch.Tensor) -> dict[str, torch.Tensor]:
        state = outer_state(local)
        if self.options.overlap_steps:  # where a checkpoint keeps an exchange in flight
            state["pending"] = torch.zeros_like(local, dtype=torch.float32)
        return state

    def bind(self, slots: list[Slot]) -> None:
        super().bind(slots)
        self.fragment_of = split_fragments([s.param.numel() for s in slots], self.options.fragments)

    def starts(self, step: int) -> int | None:
        """The fragment whose synchronisation starts at the end of ``step``, if any."""
        o = self.options
        for f in range(o.fragments):
            if step % o.every == (o.every - f * o.every // o.fragments) % o.every:
                return f
        return None

    def syncs_at(self, step: int) -> bool:
        """Every fragment's sync: the buffers belong to no fragment, and are averaged before
        each one starts (F times per period, as DiLoCo's once; they are small)."""
        return self.starts(step) is not None

    # -- the step ---------------------------------------------------------------------------
    def after_step(self, comm: Comm) -> None:
        self.steps += 1
        f = self.starts(self.steps)
        if f is not None:
            self._start(f, comm)
        for ex in [e for e in self._exchanges if e.merge_at == self.steps]:
            self._merge(ex)
            self._exchanges.remove(ex)

    def _start(self, f: int, comm: Comm) -> None:
        positions = self.fragment_of[f]
        pseudo = [self.state[p]["anchor"] - self.slots[p].local.float() for p in positions]
        sizes = [t.numel() for t in pseudo]
        flat = torch.cat([t.reshape(-1) for t in pseudo]) if pseudo else torch.zeros(0)
        self.fired += 1
        # An exchange merged in the step it starts needs no asynchronous collective (a comm
        # without them, torchft's, runs overlap_steps=0); the bytes and results are the same.
        now = not self.options.overlap_steps
        if self.wire.values == "fp32":  # exact: an all-reduce of the mean, as DiLoCo's
            pending: Any = None
            if flat.numel():
                pending = (
                    _Done(comm.all_reduce_mean([flat])) if now
                    else comm.all_reduce_mean_async([flat])
                )  # fmt: skip
            wait = (lambda: pending.wait()[0]) if pending is not None else (lambda: flat)
        else:
            blocks, padded = _blocked(flat)
            values = self.wire.encode_values(blocks)
            gather = _Done(comm.all_gather(values)) if now else comm.all_gather_async(values)

            def wait() -> torch.Tensor:
                shape = (blocks.shape[0], blocks.shape[1])
                nodes = [self.wire.decode_values(parts, shape, torch.float32)
                         for parts in gather.wait()]  # fmt: skip
                total = nodes[0] / len(nodes)
                for other in nodes[1:]:  # in node order: the same sum on every node
                    total += other / len(nodes)
                return total.reshape(-1)[: flat.numel()] if padded else total.reshape(-1)

        def split() -> list[torch.Tensor]:
            mean = wait()
            return [m.view_as(t) for m, t in zip(mean.split(sizes), pseudo, strict=True)]

        self._exchanges.append(_Exchange(f, self.steps + self.options.overlap_steps, split))

    def _merge(self, ex: _Exchange) -> None:
        positions = self.fragment_of[ex.fragment]
        # decoded before a checkpoint, or restored from one: in ``pending``
        means = [self.state[p]["pending"] for p in positions] if ex.wait is None else ex.wait()
        alpha = self.options.alpha
        for p, g in zip(positions, means, strict=True):
            st, local = self.state[p], self.slots[p].local
            outer_step(st["anchor"], st["momentum"], g, self.options)
            if alpha:
                local.mul_(alpha).add_(st["anchor"].to(local.dtype), alpha=1 - alpha)
            else:
                local.copy_(st["anchor"])

    # -- checkpoints ------------------------------------------------------------------------
    def finish_in_flight(self) -> None:
        """Decode every exchange in flight into its fragment's ``pending`` buffers."""
        for ex in self._exchanges:
            if ex.wait is None:
                continue
            for p, mean in zip(self.fragment_of[ex.fragment], ex.wait(), strict=True):
                self.state[p]["pending"].copy_(mean)
            ex.wait = None

    def scalars(self) -> dict[str, int]:
        """``fired``, the steps seen, and for each fragment the step its exchange in flight
        merges at (0: none)."""
        out = {**super().scalars(), "steps": self.steps}
        merging = {ex.fragment: ex.merge_at for ex in self._exchanges}
        for f in range(self.options.fragments):
            out[f"merge_at_{f}"] = merging.get(f, 0)
        return out

    def load_scalars(self, scalars: dict[str, int]) -> None:
        super().load_scalars(scalars)
        self.steps = int(scalars["steps"])
        self._exchanges = [
            _Exchange(f, int(scalars[f"merge_at_{f}"]), None)
            for f in range(self.options.fragments)
            if int(scalars[f"merge_at_{f}"])
        ]


def quant_rows(numel: int) -> int:
    """Rows of :data:`QUANT_BLOCK` values (each with its scale) that a fragment of ``numel``
    values is sent as: at least one, so an empty fragment still takes part in the gather."""
    return max(1, math.ceil(numel / QUANT_BLOCK))


class _Done:
    """A collective that has already finished, waited on like one in flight."""

    def __init__(self, result: Any) -> None:
        self._result = result

    def wait(self) -> Any:
        return self._result


def _blocked(flat: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``flat`` as ``(blocks, QUANT_BLOCK)`` rows (zero-padded), and whether it was padded."""
    rows = quant_rows(flat.numel())
    padded = rows * QUANT_BLOCK != flat.numel()
    if padded:
        flat = torch.cat([flat, flat.new_zeros(rows * QUANT_BLOCK - flat.numel())])
    return flat.view(rows, QUANT_BLOCK), padded
