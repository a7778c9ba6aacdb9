"""Packing tensors of mixed dtypes into one byte buffer, so a step needs one collective."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSpec:
    """Dtype and shape of one packed tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def pack(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[TensorSpec]]:
    """Concatenate the raw bytes of ``tensors`` into one ``uint8`` buffer."""
    specs = [TensorSpec(t.dtype, tuple(t.shape)) for t in tensors]
    if not tensors:
        return torch.empty(0, dtype=torch.uint8), specs
    flat = [t.contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    return torch.cat(flat), specs


def unpack(buffer: torch.Tensor, specs: list[TensorSpec]) -> list[torch.Tensor]:
    """Split a buffer made by :func:`pack` back into tensors (views where alignment allows)."""
    expected = sum(s.nbytes for s in specs)
    if buffer.numel() != expected:
        raise ValueError(f"Buffer holds {buffer.numel()} bytes, specs need {expected}")
    out, offset = [], 0
    for s in specs:
        chunk = buffer[offset : offset + s.nbytes]
        offset += s.nbytes
        out.append(chunk.clone().view(s.dtype).reshape(s.shape))
    return out
