"""The run-to-run noise floor: the same run with its initial weights moved by a few ulps.

A difference between two schemes' final losses means something only if it exceeds what the
smallest possible change of the start does to one scheme. Moving every initial weight by one
unit in the last place is that change: it is below any rounding difference two CPUs produce,
and FlexDeMo's discrete choices (top-k, sign) amplify it as they amplify those.
"""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def perturb_ulps(model: nn.Module, ulps: int) -> None:
    """Move every floating-point parameter ``ulps`` representable values towards +infinity.

    Deterministic and free of random numbers, so every rank perturbs its copy alike and the
    run's other random streams are untouched; ``ulps`` = 1, 2, ... give distinct starts.
    """
    if ulps < 0:
        raise ValueError(f"Invalid ulps: {ulps} (must be >= 0)")
    for p in model.parameters():
        if not p.is_floating_point():
            continue
        up = torch.full_like(p, math.inf)
        for _ in range(ulps):
            p.copy_(torch.nextafter(p, up))
