"""Top-k selection per block, and the deterministic aggregation of what the nodes sent.

How the selected indices and values are encoded for the network is :mod:`deto.compress.wire`'s
business; here they are plain ``int64`` positions and float values.
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["selected", "all"]


def topk_per_block(coeffs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``k`` largest-magnitude entries of each row of ``(num_blocks, m)`` coefficients.

    Returns ``(indices, values)``, both ``(num_blocks, k)``; indices are ``int64``.
    """
    m = coeffs.shape[-1]
    if not 1 <= k <= m:
        raise ValueError(f"Invalid top-k: {k} (block has {m} coefficients)")
    idx = coeffs.abs().topk(k, dim=-1, sorted=False).indices
    return idx, coeffs.gather(-1, idx)


def scatter_blocks(indices: torch.Tensor, values: torch.Tensor, m: int) -> torch.Tensor:
    """Dense ``(num_blocks, m)`` coefficients holding ``values`` at ``indices``, zero elsewhere."""
    dense = values.new_zeros(values.shape[:-1] + (m,))
    return dense.scatter_(-1, indices.long(), values)


def scale_entries(
    indices: list[torch.Tensor],
    values: list[torch.Tensor],
    m: int,
    mode: Aggregation = "selected",
) -> list[torch.Tensor]:
    """Weights applied to each node's sent values so that their sum is the aggregate.

    ``selected`` averages each coefficient over the nodes that sent it (the reference's
    semantics; unsent coefficients are 0): each value is divided by how many nodes sent that
    coefficient. ``all`` divides every value by the number of nodes.

    Bitwise deterministic: counts are added one node at a time, and within one node the indices
    of a block are distinct, so no two writes race (unlike ``scatter_reduce``).
    """
    if len(indices) != len(values) or not indices:
        raise ValueError("aggregation needs one (indices, values) pair per node")
    if mode not in ("selected", "all"):
        raise ValueError(f"Invalid aggregation: {mode!r} (expected 'selected' or 'all')")
    if mode == "all":
        return [v / len(values) for v in values]
    count = values[0].new_zeros(values[0].shape[:-1] + (m,))
    ones = torch.ones_like(values[0])
    for idx in indices:
        count.scatter_add_(-1, idx.long(), ones)
    return [v / count.gather(-1, idx.long()) for idx, v in zip(indices, values, strict=True)]
