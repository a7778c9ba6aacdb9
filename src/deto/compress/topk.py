"""Top-k selection per block.

How the selected indices and values are encoded for the network is :mod:`deto.compress.wire`'s
business, and how the nodes' selections are summed is :mod:`deto.compress.blockgroup`'s; here
they are plain ``int64`` positions.
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregation = Literal["selected", "all"]

# on short rows, up to this k, k max-reductions beat torch.topk's per-row partial sort on CPU
# (about 2x at 4 of 64); on long rows (a 32 x 32 block) the partial sort is as fast
KEYED_MAX_K = 8
KEYED_MAX_ROW = 256


def topk_indices(
    values: torch.Tensor, k: int, scratch: torch.Tensor | None = None, *, signed: bool = True
) -> torch.Tensor:
    """Positions of the ``k`` largest magnitudes of each row of ``(blocks, m)`` float32 values.

    Returns ``(blocks, k)`` ``int64`` indices, in no particular order within a row; among equal
    magnitudes any choice is a correct one. An ``int32`` ``scratch`` of the same size holds the
    magnitudes (no allocation), and with a small ``k`` on short rows :func:`keyed_topk`'s keys.
    ``signed=False`` says the values are magnitudes already, which saves a pass of ``abs``.
    """
    m = values.shape[-1]
    if not 1 <= k <= m:
        raise ValueError(f"Invalid top-k: {k} (block has {m} coefficients)")
    if scratch is not None and k <= KEYED_MAX_K and k < m <= KEYED_MAX_ROW:
        return keyed_topk(values, k, scratch.view(values.shape))
    if signed:
        out = None if scratch is None else scratch.view(values.shape).view(values.dtype)
        values = torch.abs(values, out=out)
    return values.topk(k, dim=-1, sorted=False).indices


def keyed_topk(values: torch.Tensor, k: int, keys: torch.Tensor) -> torch.Tensor:
    """Exact top-k of magnitudes by ``k`` max-reductions over integer keys that carry their
    own position.

    A float32's bits without the sign bit, read as an integer, order like its magnitude (so no
    pass of ``abs`` is needed). The lowest ``ceil(log2 m)`` bits are replaced by the (reversed)
    position in the row, so every key of a row is distinct and a row's maximum names its
    position: ``k`` rounds of "take the maximum, knock it out" select the top ``k`` without a
    sort. Rows where the ``k``-th and the next key share their high bits may have been ordered
    by position rather than value; only those rows (rare, and rows of equal values) are redone
    with :func:`torch.topk`, so the result is exact.
    """
    n, m = values.shape
    bits = max(1, (m - 1).bit_length())
    low = (1 << bits) - 1
    reversed_pos = torch.arange(m - 1, -1, -1, dtype=torch.int32, device=values.device)
    torch.bitwise_and(values.view(torch.int32), 0x7FFFFFFF & ~low, out=keys)
    keys.bitwise_or_(reversed_pos)
    flat = keys.view(-1)
    row_start = torch.arange(0, n * m, m, device=values.device)
    out = torch.empty(k, n, dtype=torch.int64, device=values.device)
    for i in range(k):
        top = keys.amax(dim=-1)
        torch.bitwise_and(top, low, out=out[i]).neg_().add_(m - 1)
        flat.index_fill_(0, row_start + out[i], -1)
    unsure = ((top ^ keys.amax(dim=-1)) <= low).nonzero().view(-1)
    indices = out.t().contiguous()
    if unsure.numel():
        indices[unsure] = values[unsure].abs().topk(k, dim=-1, sorted=False).indices
    return indices
