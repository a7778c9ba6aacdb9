"""Small models of the embedded tasks that need no download: a GPT-style byte LM, a ViT and a
ResNet-18 for 8x8 digits, and Hugging Face Llama and T5 built from configs (``deto[hf]``).

The transformers keep their layers in an ``nn.ModuleList``; the ResNet keeps its residual
blocks in ``nn.Sequential`` stages, as torchvision's does. The default policy of
:func:`deto.shard` shards both per block. Any ``nn.Module`` works with deto.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
            std = (
                0.02 / math.sqrt(2 * layers)
                if name.endswith(("proj.weight", "out.weight"))
                else 0.02
            )
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


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with BatchNorm and an identity (or 1x1) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.downsample(x))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (four ``nn.Sequential`` stages of two basic blocks,
    widths ``w, 2w, 4w, 8w``), built from plain torch modules, with a 3x3 stem without
    max-pooling for small images (as for CIFAR). ``width=64`` is the original's."""

    def __init__(self, channels: int, classes: int, width: int = 64) -> None:
        super().__init__()
        check_int("width", width, 1)
        self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, c_in = [], width
        for i in range(4):
            c_out = width * 2**i
            stride = 1 if i == 0 else 2
            blocks = (BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1))
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(c_in, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(images)))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class LogitsOf(nn.Module):
    """A Hugging Face causal LM as ``forward(ids) -> logits``, like :class:`ByteGPT`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


class Seq2SeqLogitsOf(nn.Module):
    """A Hugging Face encoder-decoder as ``forward([source | decoder input]) -> logits``: one
    tensor in, split at ``source_len``, so it trains like a decoder-only model."""

    def __init__(self, model: nn.Module, source_len: int) -> None:
        super().__init__()
        self.model = model
        self.source_len = check_int("source_len", source_len, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        source, decoder = ids[:, : self.source_len], ids[:, self.source_len :]
        return self.model(input_ids=source, decoder_input_ids=decoder).logits


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ValueError(
            "This model needs Hugging Face transformers: pip install 'deto[hf]'"
        ) from None
    return transformers


def hf_llama(vocab: int, seq_len: int, shape: TransformerShape) -> nn.Module:
    """A Llama (RMSNorm, rotary positions, SwiGLU) of ``shape``, from a config."""
    hf = _transformers()
    config = hf.LlamaConfig(
        vocab_size=vocab, hidden_size=shape.d_model,
        intermediate_size=shape.mlp_ratio * shape.d_model, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=seq_len,
    )
    return LogitsOf(hf.LlamaForCausalLM(config))


def hf_t5(vocab: int, source_len: int, shape: TransformerShape, decoder_start: int) -> nn.Module:
    """A T5 encoder-decoder of ``shape`` (as many decoder as encoder layers), from a config."""
    hf = _transformers()
    config = hf.T5Config(
        vocab_size=vocab, d_model=shape.d_model, d_kv=shape.d_model // shape.heads,
        d_ff=shape.mlp_ratio * shape.d_model, num_layers=shape.layers, num_heads=shape.heads,
        decoder_start_token_id=decoder_start, pad_token_id=decoder_start,
    )
    return Seq2SeqLogitsOf(hf.T5ForConditionalGeneration(config), source_len)


def count_params(model: nn.Module) -> int:
    """Number of parameters (of the unsharded model: call before sharding)."""
    return sum(p.numel() for p in model.parameters())
