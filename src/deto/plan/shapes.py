"""What a plan needs to know about a model: its parameters' shapes, its synced buffers, and the
shard of each parameter that every rank of a node holds.

Bytes on the wire depend on shapes, not only on the parameter count: DeMo cuts each local
shard into blocks, the subset schemes send rows, and FSDP2 splits every parameter along its
first dimension. So a model enters a plan as its list of shapes, taken from a module (on the
meta device, nothing is allocated) or from a parameter count through an assumed layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from deto.buffers import synced_buffers

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ModelShapes:
    """A model as a plan sees it.

    Attributes:
        params: ``(name, shape)`` of every trainable parameter, in ``named_parameters`` order
            (the optimizer's order; a tied parameter once).
        buffers: ``(element size, numel)`` per dtype of the floating persistent buffers that
            deto averages over all ranks whenever the parameters sync (BatchNorm statistics).
        description: where the shapes came from, for the report.
    """

    params: tuple[tuple[str, Shape], ...]
    buffers: tuple[tuple[int, int], ...] = ()
    description: str = ""

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for _, s in self.params)


def from_module(model: nn.Module, description: str = "") -> ModelShapes:
    """The shapes of ``model``'s trainable parameters and synced buffers (any device, meta too)."""
    params = tuple(
        (name, tuple(int(d) for d in p.shape))
        for name, p in model.named_parameters()
        if p.requires_grad
    )
    if not params:
        raise ValueError("The model has no trainable parameters")
    by_dtype: dict[torch.dtype, int] = {}
    for b in synced_buffers(model):
        by_dtype[b.dtype] = by_dtype.get(b.dtype, 0) + b.numel()
    buffers = tuple((dtype.itemsize, n) for dtype, n in by_dtype.items())
    return ModelShapes(params, buffers, description or type(model).__name__)


LLAMA_VOCAB = 32_000
LLAMA_HEAD_DIM = 128
LLAMA_FFN_MULTIPLE = 256


def llama_like(layers: int) -> ModelShapes:
    """The shapes of a Llama-style decoder with ``layers`` layers of width ``128 * layers``.

    The assumed layout (Llama 2's proportions: 7B is 32 layers of width 4096): vocabulary
    32,000, untied input and output embeddings, per layer four ``d x d`` attention projections
    (no grouped-query sharing), a SwiGLU MLP of width ``8d/3`` rounded up to a multiple of 256
    (gate and up ``f x d``, down ``d x f``) and two RMSNorm weights, a final RMSNorm; no biases.
    """
    if layers < 1:
        raise ValueError(f"Invalid layers: {layers} (must be >= 1)")
    d = LLAMA_HEAD_DIM * layers
    f = LLAMA_FFN_MULTIPLE * math.ceil(8 * d / 3 / LLAMA_FFN_MULTIPLE)
    params: list[tuple[str, Shape]] = [("embed_tokens.weight", (LLAMA_VOCAB, d))]
    for i in range(layers):
        block = f"layers.{i}."
        params += [(block + f"self_attn.{p}_proj.weight", (d, d)) for p in "qkvo"]
        params += [
            (block + "mlp.gate_proj.weight", (f, d)),
            (block + "mlp.up_proj.weight", (f, d)),
            (block + "mlp.down_proj.weight", (d, f)),
            (block + "input_layernorm.weight", (d,)),
            (block + "post_attention_layernorm.weight", (d,)),
        ]
    params += [("norm.weight", (d,)), ("lm_head.weight", (LLAMA_VOCAB, d))]
    return ModelShapes(
        tuple(params), (), f"Llama-like, {layers} layers x width {d}, MLP {f}, vocab {LLAMA_VOCAB}"
    )


MAX_LAYERS = 512


def from_param_count(count: float) -> ModelShapes:
    """A :func:`llama_like` model whose parameter count is nearest ``count``."""
    if not math.isfinite(count) or count <= 0:
        raise ValueError(f"Invalid parameter count: {count!r} (must be a positive number)")
    smallest = llama_like(1).numel
    if count < smallest / 2:
        raise ValueError(
            f"Parameter count {count:.3g} is below the smallest Llama-like model "
            f"({smallest:,} parameters: one layer and the embeddings); pass a model instead"
        )
    largest = llama_like(MAX_LAYERS).numel
    if count > 2 * largest:
        raise ValueError(
            f"Parameter count {count:.3g} is above the largest Llama-like model "
            f"({largest:,} parameters: {MAX_LAYERS} layers); pass a model instead"
        )
    best = min(range(1, MAX_LAYERS + 1), key=lambda n: abs(llama_like(n).numel - count))
    shapes = llama_like(best)
    return ModelShapes(
        shapes.params, shapes.buffers,
        f"{shapes.description}: {shapes.numel:,} parameters (nearest to {count:.3g})",
    )


def shard_shape(shape: Shape, ranks: int, rank: int) -> Shape:
    """The local shard of a parameter on ``rank`` of ``ranks`` under FSDP2: its rule is
    ``torch.chunk`` along dim 0, with empty shards for the ranks past the last chunk, so this
    asks ``torch.chunk`` itself (on the meta device). One rank holds the whole parameter."""
    if ranks == 1:
        return shape
    if not shape:
        raise ValueError("A 0-d parameter cannot be sharded over the ranks of a node (FSDP2)")
    chunks = torch.chunk(torch.empty(shape, device="meta"), ranks, dim=0)
    if rank < len(chunks):
        return tuple(int(d) for d in chunks[rank].shape)
    return (0, *shape[1:])


def local_shapes(model: ModelShapes, ranks: int) -> list[list[Shape]]:
    """For each rank of a node, the local shard shape of every parameter, in order."""
    return [[shard_shape(s, ranks, r) for _, s in model.params] for r in range(ranks)]
