"""When a replicator runs: every ``every`` steps, except every ``skip_every``-th step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SyncSchedule:
    """Decides on which optimizer steps (counted from 1) a replicator fires.

    A step ``t`` fires when ``(t + offset) % every == 0`` and, if ``skip_every`` is set, not
    ``t % skip_every == 0``. ``every=1`` fires every step; ``every=H`` is DiLoCo's H inner steps.
    """

    every: int = 1
    skip_every: int = 0
    offset: int = 0

    def __post_init__(self) -> None:
        for name in ("every", "skip_every", "offset"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if self.every < 1:
            raise ValueError(f"Invalid every: {self.every} (must be >= 1)")
        if self.skip_every < 0 or self.skip_every == 1:
            raise ValueError(
                f"Invalid skip_every: {self.skip_every} "
                "(0 disables skipping; 1 would skip every step)"
            )
        if self.offset < 0:
            raise ValueError(f"Invalid offset: {self.offset} (must be >= 0)")

    def fires(self, step: int) -> bool:
        if step < 1:
            raise ValueError(f"Invalid step: {step} (steps count from 1)")
        if (step + self.offset) % self.every:
            return False
        return not (self.skip_every and step % self.skip_every == 0)
