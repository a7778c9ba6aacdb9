"""Turning every node's sparse DCT coefficients back into one dense update, deterministically."""

from __future__ import annotations

import torch

from deto.compress.dct import idct_blocks
from deto.compress.topk import Aggregation, scale_entries, scatter_blocks


def decode_blocks(
    indices: list[torch.Tensor],
    values: list[torch.Tensor],
    rows: int,
    cols: int,
    mode: Aggregation = "selected",
) -> torch.Tensor:
    """Aggregate the nodes' ``(num_blocks, k)`` coefficients and inverse-DCT them to blocks.

    The scaled coefficients are scattered into dense blocks one node at a time (indices are
    distinct within a node, so no two writes race) and summed in node order: bitwise
    deterministic on CPU and CUDA, and the same on every node.
    """
    scaled = scale_entries(indices, values, rows * cols, mode)
    dense = scatter_blocks(indices[0], scaled[0], rows * cols)
    for idx, val in zip(indices[1:], scaled[1:], strict=True):
        dense = dense + scatter_blocks(idx, val, rows * cols)
    return idct_blocks(dense.view(-1, rows, cols))
