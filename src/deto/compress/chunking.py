"""Cutting a tensor into DCT blocks: block sizes, padding and (un)blocking.

Written once and shared by every scheme that works on blocks. A dimension that does not split
into equal chunks is zero-padded by less than one element per block, instead of collapsing to
tiny chunks (the reference implementation's silent failure mode, which can send more than the
dense tensor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

BlockMode = Literal["1d", "2d"]


def block_size(n: int, chunk: int) -> int:
    """Block length for a dimension of length ``n`` given a nominal ``chunk``.

    A dimension no longer than ``chunk`` is one block. Otherwise the dimension is cut into
    ``ceil(n / chunk)`` blocks of equal length, so the zero padding at its end is shorter than
    the number of blocks (the length is ``chunk`` exactly when ``chunk`` divides ``n``).
    """
    if n < 0:
        raise ValueError(f"Invalid dimension length: {n}")
    if chunk < 1:
        raise ValueError(f"Invalid chunk: {chunk}")
    if n <= chunk:
        return max(n, 1)
    return math.ceil(n / math.ceil(n / chunk))


@dataclass(frozen=True)
class BlockLayout:
    """How a tensor of ``shape`` is viewed as a ``rows x cols`` matrix cut into blocks.

    ``1d`` mode flattens the tensor into one row (the reference's flat-shard behaviour);
    ``2d`` mode keeps the leading dimension as rows and folds the rest into columns, the
    original DeMo's separable 2-D blocks.
    """

    shape: tuple[int, ...]
    rows: int
    cols: int
    block_rows: int
    block_cols: int

    @property
    def grid(self) -> tuple[int, int]:
        return (math.ceil(self.rows / self.block_rows), math.ceil(self.cols / self.block_cols))

    @property
    def num_blocks(self) -> int:
        if self.rows == 0 or self.cols == 0:
            return 0
        g = self.grid
        return g[0] * g[1]

    @property
    def block_numel(self) -> int:
        return self.block_rows * self.block_cols

    @property
    def numel(self) -> int:
        return self.rows * self.cols


def make_layout(shape: tuple[int, ...] | torch.Size, chunk: int, mode: BlockMode) -> BlockLayout:
    """Choose the block layout of a tensor; 0-d and 1-d tensors always use one row."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if mode not in ("1d", "2d"):
        raise ValueError(f"Invalid block mode: {mode!r} (expected '1d' or '2d')")
    if mode == "1d" or len(shape) < 2:
        rows, cols = 1, numel
        return BlockLayout(shape, rows, cols, 1, block_size(cols, chunk))
    rows = shape[0]
    cols = numel // rows if rows else 0
    return BlockLayout(shape, rows, cols, block_size(rows, chunk), block_size(cols, chunk))


def to_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Return ``(num_blocks, block_rows, block_cols)`` blocks of ``x``, zero-padded at the ends."""
    g0, g1 = layout.grid
    b0, b1 = layout.block_rows, layout.block_cols
    m = x.reshape(layout.rows, layout.cols)
    pad_r, pad_c = g0 * b0 - layout.rows, g1 * b1 - layout.cols
    if pad_r or pad_c:
        m = torch.nn.functional.pad(m, (0, pad_c, 0, pad_r))
    return m.reshape(g0, b0, g1, b1).permute(0, 2, 1, 3).reshape(g0 * g1, b0, b1)


def from_blocks(blocks: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: reassemble, drop the padding, restore ``layout.shape``."""
    g0, g1 = layout.grid
    b0, b1 = layout.block_rows, layout.block_cols
    m = blocks.reshape(g0, g1, b0, b1).permute(0, 2, 1, 3).reshape(g0 * b0, g1 * b1)
    return m[: layout.rows, : layout.cols].reshape(layout.shape)
