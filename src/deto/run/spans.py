"""T5's span-corruption objective over bytes (Raffel et al. 2020, section 3.1.4).

About 15% of a window's bytes, in spans of 3 on average, are dropped from the encoder's input,
each span replaced by its own sentinel token; the decoder writes the dropped spans back, each
after its sentinel, and a final sentinel ends the target. As in T5, the spans and the gaps
between them get random lengths (the window starts with a gap). Every window has the same
numbers of noise bytes and spans, so inputs and targets have fixed lengths and batch without
padding. Tokens: bytes are 0-255, ``PAD`` (256) starts the decoder, sentinels follow it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0
PAD = 256
FIRST_SENTINEL = PAD + 1


@dataclass(frozen=True)
class SpanLayout:
    """Lengths of a window of ``seq_len`` bytes under span corruption."""

    seq_len: int

    @property
    def noise(self) -> int:
        return max(1, min(self.seq_len - 1, round(self.seq_len * NOISE_DENSITY)))

    @property
    def spans(self) -> int:
        return max(1, min(self.noise, round(self.noise / MEAN_SPAN)))

    @property
    def source_len(self) -> int:
        return self.seq_len - self.noise + self.spans

    @property
    def target_len(self) -> int:
        return self.noise + self.spans + 1

    @property
    def vocab(self) -> int:
        return FIRST_SENTINEL + self.spans + 1


def _composition(total: int, parts: int, gen: torch.Generator) -> list[int]:
    """``total`` split into ``parts`` random positive lengths."""
    cuts = (torch.randperm(total - 1, generator=gen)[: parts - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def corrupt(window: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source, target)`` token tensors of one byte window (1-D, int64)."""
    layout = SpanLayout(window.numel())
    noise = _composition(layout.noise, layout.spans, gen)
    gaps = _composition(layout.seq_len - layout.noise, layout.spans, gen)
    source, target, at = [], [], 0
    for i, (gap, span) in enumerate(zip(gaps, noise, strict=True)):
        sentinel = torch.tensor([FIRST_SENTINEL + i])
        source += [window[at : at + gap], sentinel]
        target += [sentinel, window[at + gap : at + gap + span]]
        at += gap + span
    target.append(torch.tensor([FIRST_SENTINEL + layout.spans]))
    return torch.cat(source).long(), torch.cat(target).long()


def seq2seq_batch(
    windows: torch.Tensor, gens: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Model input ``[source | PAD, target[:-1]]`` (the decoder reads its target shifted right)
    and the target, for a batch of byte windows."""
    pairs = [corrupt(w, g) for w, g in zip(windows, gens, strict=True)]
    sources = torch.stack([s for s, _ in pairs])
    targets = torch.stack([t for _, t in pairs])
    start = torch.full((len(pairs), 1), PAD, dtype=torch.long)
    return torch.cat([sources, start, targets[:, :-1]], dim=1), targets
