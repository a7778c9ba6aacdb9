"""Judging a measured link rate against the configured limit: pure, so that the cluster that
holds a judgement and the probe that makes one both import it without importing each other."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

VERIFY_MAX_BPS = 300_000_000
"""Above this rate a lower bound is not checked: the Python probe may be the bottleneck."""
VERIFY_UPPER = 1.15
VERIFY_LOWER = 0.5


@dataclass(frozen=True)
class ShapingCheck:
    """Result of :func:`deto.netem.probe.verify_shaping`: the measured rate and whether it
    matches the limit.

    ``ok`` is None when there is nothing to judge strictly (no limit configured); above
    ``VERIFY_MAX_BPS`` only the upper bound is judged, because falling short there may be the
    probe's own limit rather than the link's.
    """

    measured_bps: float
    configured_bps: int | None
    ok: bool | None
    src: int
    dst: int
    seconds: float
    note: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge_rate(measured_bps: float, configured_bps: int | None) -> tuple[bool | None, str]:
    """Whether a measured rate is consistent with the configured limit, with a reason."""
    if configured_bps is None:
        return None, "no limit configured"
    upper = VERIFY_UPPER * configured_bps
    if measured_bps > upper:
        return (
            False,
            f"measured rate exceeds {VERIFY_UPPER}x the configured limit: shaping is not in effect",
        )
    if configured_bps > VERIFY_MAX_BPS:
        return True, "above the verified range; only the upper bound is checked"
    if measured_bps < VERIFY_LOWER * configured_bps:
        return False, f"measured rate is below {VERIFY_LOWER}x the configured limit"
    return True, f"within [{VERIFY_LOWER}, {VERIFY_UPPER}] x the configured limit"
