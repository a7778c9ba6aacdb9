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
