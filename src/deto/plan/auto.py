"""Which DeMo setting a link can carry: a quality ladder of measured settings, and the rule that
takes the best one whose exchange fits a communication budget.

Quality is not predicted, it is measured: each :class:`Rung` carries the worst final validation
loss, against HSDP + AdamW on the same model and schedule, that its setting reached over the
cells it was run in (docs/benchmarks.md). Sending more than the default does not buy loss on
that frontier (int8 values at 1/23 of HSDP's bytes trailed int2 at 1/32 in the worst cell), so
the ladder starts at ``DeMo()``'s defaults and only goes down in bytes: it never sends more
than the default, it compresses harder, or hides the exchange, when the link is too slow.

A rung *fits* when its predicted step time is at most ``1 + budget`` times the compute time:
without overlap that is an exchange of at most ``budget`` of the compute, with overlap one that
the next step's compute hides (up to the budget's excess). The best-quality rung that fits is
chosen; when none fits, the link bounds the step whatever is chosen, and the rung with the
shortest predicted step wins (the better one on a tie).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from deto.plan.cost import Link, Prediction, Scheme, predict
from deto.plan.shapes import ModelShapes
from deto.replicators import DeMo, DeMoOptions

DEFAULT_BUDGET = 0.1
"""The share of the compute time an exchange may add to a step (the issue's default: 10%)."""


@dataclass(frozen=True)
class Rung:
    """One DeMo setting of the ladder.

    ``name`` is how ``deto bench`` runs it (a preset, or ``preset+knob=value``), so a choice can
    be compared with the fixed setting side by side. ``loss_vs_hsdp``: the worst final
    validation loss over the measured cells, as a fraction above HSDP's (``0.002``: +0.2%);
    a rung measured only as a change of another rung composes the two (an upper estimate).
    """

    name: str
    options: DeMoOptions
    loss_vs_hsdp: float
    evidence: str

    def replicator(self) -> DeMo:
        return DeMo(**self.options.changed())


_DEFAULT = DeMoOptions()
_BLOCKS_32 = DeMoOptions(blocks="2d", chunk=32, topk=32, values="int8")
_LEAN = DeMoOptions(blocks="2d", chunk=32, topk=14, values="int8")
_EAGER_LM, _EAGER_VISION, _EAGER_LEAN_LM = 0.034, 0.20, 0.060  # overlap remedies, 3 seeds


def _then(base: float, cost: float) -> float:
    return (1 + base) * (1 + cost) - 1


LADDER: tuple[Rung, ...] = tuple(sorted((
    Rung("flexdemo", _DEFAULT, 0.002,
         "frontier, 8 cells (4 models x 2 schedules, 2 seeds): worst +0.2% vs HSDP, 1/32 of its "
         "bytes"),
    Rung("flexdemo+overlap", replace(_DEFAULT, overlap=True),
         _then(0.002, max(_EAGER_LM, _EAGER_VISION)),
         "eager overlap over flexdemo, 3 seeds: +3.4% (LM), +20% (vision)"),
    Rung("flexdemo+blocks=2d+chunk=32+topk=32+values=int8", _BLOCKS_32, 0.557,
         "frontier, 6 cells: worst +55.7% vs HSDP (ViT, constant schedule), 1/53 of its bytes"),
    Rung("flexdemo-lean", _LEAN, 0.762,
         "frontier, 4 cells: worst +76.2% vs HSDP (ViT), 1/110 of its bytes"),
    Rung("flexdemo-lean+overlap", replace(_LEAN, overlap=True), _then(0.762, _EAGER_LEAN_LM),
         "eager overlap over flexdemo-lean, 3 seeds: +6.0% (LM; vision not measured)"),
), key=lambda r: r.loss_vs_hsdp))
"""The settings ``--scheme auto`` picks from, best quality first."""


@dataclass(frozen=True)
class Considered:
    """A rung priced on the measured link: its prediction, and whether it fits the budget."""

    rung: str
    loss_vs_hsdp: float
    node_bytes_per_step: float
    comm_s: float
    step_s: float
    fits: bool


@dataclass(frozen=True)
class Decision:
    """What ``--scheme auto`` chose and why, with every rung it weighed."""

    chosen: Rung
    reason: str
    considered: tuple[Considered, ...]
    link: Link
    compute_s: float
    budget: float

    def as_dict(self) -> dict[str, Any]:
        """For summary.json: the choice by name with its knobs, the inputs, every rung."""
        return {
            "chosen": self.chosen.name,
            "options": self.chosen.options.changed(),
            "reason": self.reason,
            "bandwidth_bps": self.link.bandwidth_bps,
            "latency_s": self.link.latency_s,
            "compute_s": self.compute_s,
            "budget": self.budget,
            "considered": [asdict(c) for c in self.considered],
        }


def check_budget(budget: float) -> None:
    if not (isinstance(budget, (int, float)) and 0 < budget <= 10 and math.isfinite(budget)):
        raise ValueError(f"Invalid budget: {budget!r} (must be in (0, 10], a share of compute)")


def _considered(rung: Rung, p: Prediction, budget: float) -> Considered:
    return Considered(
        rung=rung.name, loss_vs_hsdp=rung.loss_vs_hsdp, node_bytes_per_step=p.node_bytes_per_step,
        comm_s=p.comm_s, step_s=p.step_s, fits=p.step_s <= (1 + budget) * p.compute_s,
    )


def choose(
    model: ModelShapes,
    nodes: int,
    ranks_per_node: int,
    link: Link,
    compute_s: float,
    *,
    budget: float = DEFAULT_BUDGET,
    ladder: tuple[Rung, ...] = LADDER,
    optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
) -> Decision:
    """The best rung of ``ladder`` (ordered best first) whose predicted step on ``link`` is at
    most ``1 + budget`` times ``compute_s``; if none is, the one with the shortest step."""
    check_budget(budget)
    if not ladder:
        raise ValueError("Invalid ladder: it has no rungs")
    priced = [
        _considered(r, predict(Scheme(r.name, r.replicator(), optimizer), model, nodes,
                               ranks_per_node, link, compute_s), budget)
        for r in ladder
    ]  # fmt: skip
    share = f"{budget:.0%} of the {compute_s * 1e3:.0f} ms compute"
    if nodes < 2:
        pick, reason = 0, "1 node: nothing crosses nodes, the best setting costs nothing"
    elif any(c.fits for c in priced):
        pick = next(i for i, c in enumerate(priced) if c.fits)
        c = priced[pick]
        reason = (f"the best setting whose exchange ({c.comm_s * 1e3:.1f} ms) keeps the step "
                  f"within {share}")  # fmt: skip
        if pick:
            better = priced[pick - 1]
            reason += (f"; {better.rung} would take {better.step_s * 1e3:.0f} ms per step "
                       f"(limit {(1 + budget) * compute_s * 1e3:.0f} ms)")
    else:
        pick = min(range(len(priced)), key=lambda i: (priced[i].step_s, i))
        reason = (f"no setting keeps the step within {share}: the link bounds the step, and "
                  f"this one is the shortest ({priced[pick].step_s * 1e3:.0f} ms); a DiLoCo "
                  "scheme (sparseloco, streaming-diloco) sends far less, at a cost in loss")
    return Decision(ladder[pick], reason, tuple(priced), link, compute_s, budget)
