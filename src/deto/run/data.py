"""Real data every machine has, split the same way on every rank.

* ``lm``: the bytes of the Python standard library's own ``.py`` files (tests, ``idlelib``,
  ``lib2to3`` and installed packages left out), in sorted path order. A file goes to the
  validation split when a hash of its relative path falls below ``val_fraction``, so the split
  depends on nothing but the file names.
* ``vision``: scikit-learn's 8x8 handwritten digits (shipped inside the package), split by a
  fixed permutation.

Training batches are a pure function of ``(seed, step, global rank)``: every rank draws
different examples, and a resumed run draws exactly the batches the uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SPLIT_SEED = 0
"""Seed of the train/validation split: fixed, so runs with different ``--seed`` compare."""
VAL_FRACTION = 0.1
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "idlelib", "lib2to3", "__pycache__"})


def _skipped(part: str) -> bool:
    return part in SKIP_DIRS or part.startswith("test")


def stdlib_files(root: Path | None = None) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of the standard library's sources, sorted by the former."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Python standard library not found at {root}")
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(_skipped(part) for part in rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        out.append((rel.as_posix(), path))
    out.sort(key=lambda item: item[0])
    return out


def in_validation(rel: str, fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED) -> bool:
    """Whether file ``rel`` belongs to the validation split (a hash of its path decides)."""
    digest = hashlib.sha256(f"{seed}:{rel}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass(frozen=True)
class TextCorpus:
    """Train and validation bytes (``uint8`` tensors) and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: int
    val_files: int
    digest: str  # sha256 over the file names and bytes: equal on every rank that read the same
    source: str


def load_stdlib_corpus(
    root: Path | None = None, *, val_fraction: float = VAL_FRACTION
) -> TextCorpus:
    (
        """Read the standard library sources into a :class:`TextCorpus` """
        """(files joined by blank lines)."""
    )
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    digest = hashlib.sha256()
    files = stdlib_files(root)
    for rel, path in files:
        data = path.read_bytes()
        digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
        parts[in_validation(rel, val_fraction)].append(data)
    if not parts[False] or not parts[True]:
        raise ValueError(f"Too few standard library files for a split: found {len(files)}")

    def join(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"\n\n".join(chunks)), dtype=torch.uint8)

    source = str(root) if root is not None else sysconfig.get_paths()["stdlib"]
    return TextCorpus(
        train=join(parts[False]),
        val=join(parts[True]),
        train_files=len(parts[False]),
        val_files=len(parts[True]),
        digest=digest.hexdigest(),
        source=source,
    )


def unigram_entropy(data: torch.Tensor) -> float:
    """Entropy of the byte frequencies of ``data`` in nats: the loss of a model without context."""
    counts = torch.bincount(data.reshape(-1).long(), minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def batch_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of ``rank``'s batch at ``step``: different for every rank and step."""
    mixed = hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(mixed[:8], "big") >> 1)


def lm_batch(
    data: torch.Tensor, seq_len: int, batch_size: int, *, seed: int, step: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``data``: inputs and next-byte targets, both ``(batch_size, seq_len)``."""
    if data.numel() <= seq_len + 1:
        raise ValueError(f"Text of {data.numel()} bytes is too short for seq_len={seq_len}")
    gen = batch_generator(seed, step, rank)
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=gen)
    windows = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()]).long()
    return windows[:, :-1], windows[:, 1:]


def eval_windows(data: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """``count`` evenly spaced start offsets of validation windows (no randomness)."""
    last = data.numel() - seq_len - 1
    if last < 0:
        raise ValueError(
            f"Validation text of {data.numel()} bytes is too short for seq_len={seq_len}"
        )
    return torch.linspace(0, last, count).round().long()


def shard_evenly(count: int, parts: int, index: int) -> tuple[list[int], int]:
    """Items ``index, index + parts, ...`` of ``range(count)``, and the length every part pads to.

    Ranks of one node must run the same number of forward passes (FSDP gathers parameters in
    each), so every part is padded to the same length with items of weight zero.
    """
    mine = list(range(index, count, parts))
    return mine, math.ceil(count / parts)


@dataclass(frozen=True)
class Digits:
    """scikit-learn's digits as ``(N, 1, 8, 8)`` floats in ``[0, 1]`` and labels, split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    classes: int = 10


def load_digits_split(val_fraction: float = 0.2) -> Digits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = round(val_fraction * len(y))
    val, train = perm[:n_val], perm[n_val:]
    return Digits(x[train], y[train], x[val], y[val], classes=int(y.max()) + 1)


def vision_batch(
    digits: Digits, batch_size: int, *, seed: int, step: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = batch_generator(seed, step, rank)
    idx = torch.randint(0, len(digits.train_y), (batch_size,), generator=gen)
    return digits.train_x[idx], digits.train_y[idx]


def chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
