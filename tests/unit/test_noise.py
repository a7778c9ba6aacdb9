"""The 1-ulp perturbation behind the run-to-run noise floor."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deto.run.noise import perturb_ulps


def test_every_weight_moves_up_by_exactly_n_representable_values():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    before = [p.detach().clone() for p in model.parameters()]
    perturb_ulps(model, 2)
    up = torch.tensor(math.inf)
    for old, new in zip(before, model.parameters(), strict=True):
        assert torch.equal(new.detach(), torch.nextafter(torch.nextafter(old, up), up))
        assert (new.detach() > old).all()
    perturb_ulps(model, 0)  # nothing
    with pytest.raises(ValueError, match="Invalid ulps: -1"):
        perturb_ulps(model, -1)
