"""The two small models of the embedded tasks: a GPT-style byte LM and a ViT for 8x8 digits.

Both keep their transformer layers in an ``nn.ModuleList`` named ``blocks``, so
:func:`deto.sharding.shard_model` shards them per layer. Any ``nn.Module`` works with deto;
these exist so that ``deto train`` needs no download.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deto._validate import check_int


@dataclass(frozen=True)
class TransformerShape:
    """Width, depth and heads of a pre-LayerNorm transformer."""

    d_model: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        check_int("d_model", self.d_model, 1)
        check_int("layers", self.layers, 1)
        check_int("heads", self.heads, 1)
        check_int("mlp_ratio", self.mlp_ratio, 1)
        if self.d_model % self.heads:
            raise ValueError(
                f"Invalid heads: {self.heads} (d_model={self.d_model} must be divisible by it)"
            )


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, *, causal: bool) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LN transformer layer: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, shape: TransformerShape, *, causal: bool) -> None:
        super().__init__()
        d = shape.d_model
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, shape.heads, causal=causal)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, shape.mlp_ratio * d)
        self.out = nn.Linear(shape.mlp_ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


def init_weights(model: nn.Module, layers: int) -> None:
    """GPT-2 style: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers), zero biases."""
    for name, p in model.named_parameters():
        if p.dim() >= 2 or name.endswith(("pos", "cls")):
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
            nn.init.normal_(p, std=std)
        elif name.endswith("bias"):
            nn.init.zeros_(p)


class ByteGPT(nn.Module):
    """A decoder-only LM over bytes (vocabulary 256); ``forward(x) -> logits (B, T, 256)``."""

    vocab = 256

    def __init__(self, seq_len: int, shape: TransformerShape) -> None:
        super().__init__()
        self.seq_len = check_int("seq_len", seq_len, 1)
        d = shape.d_model
        self.embed = nn.Embedding(self.vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq_len, d))
        self.blocks = nn.ModuleList(Block(shape, causal=True) for _ in range(shape.layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, self.vocab, bias=False)
        init_weights(self, shape.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


class ViT(nn.Module):
    """A vision transformer: ``patch x patch`` patches, a class token, ``forward -> logits``."""

    def __init__(
        self, image_size: int, channels: int, classes: int, patch: int, shape: TransformerShape
    ) -> None:
        super().__init__()
        check_int("patch", patch, 1)
        if image_size % patch:
            raise ValueError(f"Invalid patch: {patch} (image size {image_size} is not a multiple)")
        self.patch = patch
        d = shape.d_model
        self.embed = nn.Linear(channels * patch * patch, d)
        self.cls = nn.Parameter(torch.zeros(d))  # 1-D, so every rank of a node holds a part
        self.pos = nn.Parameter(torch.zeros((image_size // patch) ** 2 + 1, d))
        self.blocks = nn.ModuleList(Block(shape, causal=False) for _ in range(shape.layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        init_weights(self, shape.layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = images.shape
        p = self.patch
        patches = images.unfold(2, p, p).unfold(3, p, p)  # (B, C, H/p, W/p, p, p)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * p * p)
        h = torch.cat([self.cls.expand(b, 1, -1), self.embed(patches)], dim=1) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h[:, 0]))


def count_params(model: nn.Module) -> int:
    """Number of parameters (of the unsharded model: call before sharding)."""
    return sum(p.numel() for p in model.parameters())
