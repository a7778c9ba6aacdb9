"""The replica digest: every change to one element shows, and the majority picks the source."""

from __future__ import annotations

import pytest
import torch

from deto.replicas import majority, tensor_digest


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float64, torch.int8, torch.bool]
)
def test_digest_changes_with_any_single_element(dtype: torch.dtype) -> None:
    t = (torch.arange(40) % 3).to(dtype).reshape(5, 8)
    base = tensor_digest(t)
    assert tensor_digest(t.clone()) == base
    for i in (0, 17, 39):
        changed = t.clone().reshape(-1)
        changed[i] = (not bool(changed[i])) if dtype == torch.bool else changed[i] + 1
        assert tensor_digest(changed.reshape(5, 8)) != base


def test_digest_sees_order_and_sign_of_zero() -> None:
    t = torch.tensor([1.0, 2.0, 3.0])
    assert tensor_digest(t) != tensor_digest(t.flip(0))
    assert tensor_digest(torch.tensor([0.0])) != tensor_digest(torch.tensor([-0.0]))
    assert tensor_digest(torch.empty(0)) == 0


def test_majority_ties_go_to_the_lowest_node() -> None:
    assert majority([(1,), (2,)]) == 0
    assert majority([(1,), (2,), (2,)]) == 1
    assert majority([(5,), (5,), (7,), (7,)]) == 0
