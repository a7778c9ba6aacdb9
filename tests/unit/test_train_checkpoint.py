"""Checkpoint lookup and the resume check, which need no process group."""

from __future__ import annotations

import json

import pytest

from deto.run import checkpoint
from deto.run.config import resolve


def _fake_checkpoint(root, step: int, complete: bool, config: dict) -> None:
    d = root / checkpoint.checkpoint_name(step)
    d.mkdir(parents=True)
    if complete:
        (d / checkpoint.COMPLETE).write_text(json.dumps({"step": step, "config": config}))


def test_find_checkpoint_takes_the_latest_complete_one(tmp_path) -> None:
    cfg = resolve({"steps": 40})
    ckpts = tmp_path / "run" / checkpoint.CHECKPOINTS
    _fake_checkpoint(ckpts, 10, True, cfg.to_dict())
    _fake_checkpoint(ckpts, 20, True, cfg.to_dict())
    _fake_checkpoint(ckpts, 30, False, cfg.to_dict())  # a crash mid-save
    assert checkpoint.find_checkpoint(tmp_path / "run").name == "step_00000020"
    assert checkpoint.find_checkpoint(ckpts).name == "step_00000020"
    assert checkpoint.find_checkpoint(ckpts / "step_00000010").name == "step_00000010"
    with pytest.raises(ValueError, match="Not a complete checkpoint"):
        checkpoint.find_checkpoint(ckpts / "step_00000030")
    with pytest.raises(ValueError, match="Checkpoint not found"):
        checkpoint.find_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="No complete checkpoint"):
        checkpoint.find_checkpoint(tmp_path)


def test_check_resumable(tmp_path) -> None:
    cfg = resolve({"steps": 40})
    _fake_checkpoint(tmp_path, 20, True, cfg.to_dict())
    path = tmp_path / "step_00000020"
    assert checkpoint.check_resumable(path, cfg) == 20
    with pytest.raises(ValueError, match="nodes=2 .now 3."):
        checkpoint.check_resumable(path, resolve({"steps": 40, "nodes": 3}))
    with pytest.raises(ValueError, match="scheme='flexdemo' .now 'hsdp'."):
        checkpoint.check_resumable(path, resolve({"steps": 40, "scheme": "hsdp"}))
    with pytest.raises(ValueError, match="nothing to do"):
        checkpoint.check_resumable(path, resolve({"steps": 20}))
    (path / checkpoint.COMPLETE).write_text(json.dumps({"config": cfg.to_dict()}))
    with pytest.raises(ValueError, match="it has no step"):
        checkpoint.check_resumable(path, cfg)
