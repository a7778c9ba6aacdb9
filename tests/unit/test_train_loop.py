"""Pieces of the training loop that need no process group: schedule, models, checkpoint lookup."""

from __future__ import annotations

import json

import pytest
import torch

from deto.train import loop
from deto.train.config import resolve
from deto.train.models import ByteGPT, TransformerShape, ViT, count_params


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


def _fake_checkpoint(root, step: int, complete: bool, config: dict) -> None:
    d = root / loop.checkpoint_name(step)
    d.mkdir(parents=True)
    if complete:
        (d / loop.COMPLETE).write_text(json.dumps({"step": step, "config": config}))


def test_find_checkpoint_takes_the_latest_complete_one(tmp_path) -> None:
    cfg = resolve({"steps": 40})
    ckpts = tmp_path / "run" / loop.CHECKPOINTS
    _fake_checkpoint(ckpts, 10, True, cfg.to_dict())
    _fake_checkpoint(ckpts, 20, True, cfg.to_dict())
    _fake_checkpoint(ckpts, 30, False, cfg.to_dict())  # a crash mid-save
    assert loop.find_checkpoint(tmp_path / "run").name == "step_00000020"
    assert loop.find_checkpoint(ckpts).name == "step_00000020"
    assert loop.find_checkpoint(ckpts / "step_00000010").name == "step_00000010"
    with pytest.raises(ValueError, match="Not a complete checkpoint"):
        loop.find_checkpoint(ckpts / "step_00000030")
    with pytest.raises(ValueError, match="Checkpoint not found"):
        loop.find_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="No complete checkpoint"):
        loop.find_checkpoint(tmp_path)


def test_check_resumable(tmp_path) -> None:
    cfg = resolve({"steps": 40})
    _fake_checkpoint(tmp_path, 20, True, cfg.to_dict())
    path = tmp_path / "step_00000020"
    assert loop.check_resumable(path, cfg) == 20
    with pytest.raises(ValueError, match="nodes=2 .now 3."):
        loop.check_resumable(path, resolve({"steps": 40, "nodes": 3}))
    with pytest.raises(ValueError, match="scheme='flexdemo' .now 'hsdp'."):
        loop.check_resumable(path, resolve({"steps": 40, "scheme": "hsdp"}))
    with pytest.raises(ValueError, match="nothing to do"):
        loop.check_resumable(path, resolve({"steps": 20}))
