"""``deto train --model``: which architecture a config picks, and T5's span corruption."""

from __future__ import annotations

import pytest
import torch

from deto.run import spans
from deto.run.config import resolve


def test_model_defaults_follow_the_task_and_the_task_follows_the_model() -> None:
    assert resolve({}).model == "gpt"
    assert resolve({"task": "vision"}).model == "vit"
    resnet = resolve({"model": "resnet"})
    assert (resnet.task, resnet.d_model) == ("vision", 16)  # d_model: the first stage's width
    assert resolve({"model": "t5"}).task == "lm"
    assert resolve({"model": "resnet", "d_model": 8}).d_model == 8


@pytest.mark.parametrize("seq_len", [2, 5, 16, 64])
def test_span_corruption_hides_spans_that_the_target_gives_back(seq_len: int) -> None:
    layout = spans.SpanLayout(seq_len)
    window = torch.randint(0, 256, (seq_len,), generator=torch.Generator().manual_seed(seq_len))
    source, target = spans.corrupt(window, torch.Generator().manual_seed(0))
    assert (source.numel(), target.numel()) == (layout.source_len, layout.target_len)
    assert 1 <= layout.spans <= layout.noise < seq_len
    # put every span back in place of its sentinel: the window again
    pieces, filled = target.tolist(), []
    for token in source.tolist():
        if token < spans.FIRST_SENTINEL:
            filled.append(token)
            continue
        at = pieces.index(token) + 1
        while at < len(pieces) and pieces[at] < spans.FIRST_SENTINEL:
            filled.append(pieces[at])
            at += 1
    assert filled == window.tolist()
    assert target[-1] == spans.FIRST_SENTINEL + layout.spans < layout.vocab


def test_span_batches_have_fixed_shapes_and_a_shifted_decoder_input() -> None:
    layout = spans.SpanLayout(16)
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    x, y = spans.seq2seq_batch(windows, [gen] * 3)
    assert (
        x.shape == (3, layout.source_len + layout.target_len) and y.shape == (3, layout.target_len)
    )
    decoder = x[:, layout.source_len :]
    assert (decoder[:, 0] == spans.PAD).all() and torch.equal(decoder[:, 1:], y[:, :-1])
    again, _ = spans.seq2seq_batch(windows, [torch.Generator().manual_seed(2)] * 3)
    assert torch.equal(x, again)  # a pure function of the windows and the generator
