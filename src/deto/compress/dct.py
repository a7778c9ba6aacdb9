"""Orthonormal DCT-II over blocks, as matrix products.

Matrix products are deterministic on CPU and CUDA and the bases are built once per
(size, device, dtype); orthonormality makes the inverse the transpose.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch


@functools.lru_cache(maxsize=64)
def dct_matrix(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The ``n x n`` orthonormal DCT-II matrix ``D`` (``X = D @ x``; ``x = D.T @ X``)."""
    if n < 1:
        raise ValueError(f"Invalid DCT size: {n}")
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(device=device, dtype=dtype)


Transform = Literal["dct", "none"]
"""What a block is before its top-k: its DCT-II coefficients (DeMo), or its own values (none:
chunked top-k of the raw tensor, as SparseLoCo sends its pseudo-gradient)."""


def transform_matrix(
    kind: Transform, n: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The orthonormal ``n x n`` matrix of a block transform: the DCT-II, or the identity."""
    if kind == "none":
        return torch.eye(n, device=device, dtype=dtype)
    return dct_matrix(n, device, dtype)


def dct_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Separable 2-D DCT-II of ``(num_blocks, r, c)`` blocks (1-D when ``r == 1``)."""
    r, c = blocks.shape[-2:]
    dc = dct_matrix(c, blocks.device, blocks.dtype)
    out = blocks @ dc.T
    if r > 1:
        out = dct_matrix(r, blocks.device, blocks.dtype) @ out
    return out


def idct_blocks(coeffs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct_blocks`."""
    r, c = coeffs.shape[-2:]
    out = coeffs @ dct_matrix(c, coeffs.device, coeffs.dtype)
    if r > 1:
        out = dct_matrix(r, coeffs.device, coeffs.dtype).T @ out
    return out

