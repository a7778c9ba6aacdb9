"""Which replicator handles each gradient on a step: a pure function of coverage and schedule.

For every parameter with a gradient, the first gradient replicator (in list order) that covers
it and fires on the step replicates it. If replicators cover it but none fires, the first one
*defers* it: it folds the gradient into its state and the parameter rests this step. A parameter
no gradient replicator covers keeps the node's own gradient. Coverage and schedules are the
same on every node, so every node routes alike and the collectives line up.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Routes:
    """One step's assignment; replicators are named by their position in the optimizer's list.

    ``fired[r]`` and ``deferred[r]`` list parameter indices in increasing order; ``uncovered``
    holds the parameters that use their own gradient.
    """

    fired: dict[int, list[int]] = field(default_factory=dict)
    deferred: dict[int, list[int]] = field(default_factory=dict)
    uncovered: list[int] = field(default_factory=list)


def owner(owners: Sequence[int], fires: Sequence[bool]) -> int | None:
    """The replicator that replicates a parameter covered by ``owners`` (in list order) on a
    step where ``fires`` says which replicators fire; ``None`` if none of them fires."""
    return next((r for r in owners if fires[r]), None)


def route(
    coverage: Sequence[Sequence[int]], fires: Sequence[bool], present: Iterable[int]
) -> Routes:
    """Assign every parameter in ``present`` (those with a gradient) for this step.

    Args:
        coverage: for every parameter, the positions of the gradient replicators covering it,
            in list order.
        fires: for every replicator position, whether its schedule fires on this step.
        present: indices of the parameters that have a gradient.
    """
    routes = Routes()
    for i in sorted(present):
        owners = coverage[i]
        if not owners:
            routes.uncovered.append(i)
            continue
        firing = owner(owners, fires)
        if firing is None:
            routes.deferred.setdefault(owners[0], []).append(i)
        else:
            routes.fired.setdefault(firing, []).append(i)
    return routes
