"""What the integrations need beyond deto's public API: recognising a sharded model, and
finding deto's optimizer inside a framework's optimizer wrappers."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.fsdp import FSDPModule

from deto.optim import DecoupledOptimizer


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


def find_decoupled(optimizer: Any) -> DecoupledOptimizer:
    """The :class:`DecoupledOptimizer` inside a framework's optimizer wrapper(s)."""
    seen = optimizer
    for _ in range(4):  # AcceleratedOptimizer.optimizer, LightningOptimizer._optimizer, ...
        if isinstance(seen, DecoupledOptimizer):
            return seen
        seen = getattr(seen, "optimizer", None) or getattr(seen, "_optimizer", None)
    raise TypeError(f"Expected a deto.DecoupledOptimizer (or a wrapper of one), got {optimizer!r}")
