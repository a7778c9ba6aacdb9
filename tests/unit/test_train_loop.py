"""Pieces of the training loop that need no process group: schedule, models, history."""

from __future__ import annotations

import pytest
import torch

from deto.run import loop
from deto.run.config import resolve
from deto.run.models import ByteGPT, TransformerShape, ViT, count_params


def test_lr_schedule() -> None:
    cfg = resolve({"steps": 100, "warmup": 10})
    assert loop.lr_factor(cfg, 1) == pytest.approx(0.1)
    assert loop.lr_factor(cfg, 10) == pytest.approx(1.0)
    assert loop.lr_factor(cfg, 11) == pytest.approx(1.0, abs=1e-3)
    assert loop.lr_factor(cfg, 100) == pytest.approx(loop.FINAL_LR_RATIO)
    factors = [loop.lr_factor(cfg, s) for s in range(10, 101)]
    assert factors == sorted(factors, reverse=True)
    const = resolve({"steps": 100, "warmup": 0, "lr_schedule": "constant"})
    assert {loop.lr_factor(const, s) for s in range(1, 101)} == {1.0}


def test_models_forward() -> None:
    shape = TransformerShape(d_model=32, layers=1, heads=2)
    lm = ByteGPT(16, shape)
    assert lm(torch.randint(0, 256, (3, 16))).shape == (3, 16, 256)
    assert lm(torch.randint(0, 256, (3, 5))).shape == (3, 5, 256)  # shorter contexts work
    vit = ViT(8, 1, 10, patch=2, shape=shape)
    assert vit(torch.rand(4, 1, 8, 8)).shape == (4, 10)
    assert count_params(lm) > count_params(vit) > 0
    with pytest.raises(ValueError, match="Invalid heads: 3"):
        TransformerShape(d_model=32, heads=3)


def test_lm_is_causal() -> None:
    torch.manual_seed(0)
    lm = ByteGPT(8, TransformerShape(d_model=16, layers=1, heads=2))
    x = torch.randint(0, 256, (1, 8))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 256
    assert torch.equal(lm(x)[0, :-1], lm(y)[0, :-1])


def test_history_survives_its_checkpoint_form() -> None:
    history = loop.History()
    history.advance(1, 0.5, 100, 90, 2.0)
    shared, own = history.to_checkpoint()
    assert "loss_sum" not in shared and own == {"loss_sum": 2.0, "loss_count": 1}
    assert loop.History.from_checkpoint(shared, own) == history
    fresh, own = loop.History().to_checkpoint()
    assert fresh["last_loss"] is None  # NaN is not JSON


def test_history_keeps_the_most_bytes_any_one_step_sent() -> None:
    """A DiLoCo-like run: nothing for 3 steps, a burst, nothing, then a smaller burst; the
    peak is the burst, the mean its share of the steps, and both survive a checkpoint."""
    history = loop.History()
    for step, sent in enumerate([0, 0, 0, 4000, 0, 1000], start=1):
        history.advance(step, 0.1, sent, sent, 2.0)
    assert history.sent_peak == 4000 and history.sent_total == 5000
    resumed = loop.History.from_checkpoint(*history.to_checkpoint())
    resumed.advance(7, 0.1, 3000, 3000, 2.0)
    assert resumed.sent_peak == 4000  # a smaller burst after a resume keeps the peak
    resumed.advance(8, 0.1, 5000, 5000, 2.0)
    assert resumed.sent_peak == 5000


def test_a_checkpoint_written_before_the_peak_was_kept_resumes_from_no_peak() -> None:
    shared, own = loop.History(step=3, sent_total=300).to_checkpoint()
    del shared["sent_peak"]
    assert loop.History.from_checkpoint(shared, own).sent_peak == 0
