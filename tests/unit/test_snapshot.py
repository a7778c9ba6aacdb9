"""In-memory snapshots, one rank's side: naming, keeping the newest two, a full /dev/shm."""

from __future__ import annotations

import logging

import pytest
import torch

from deto.run import snapshot


@pytest.fixture
def one_rank(monkeypatch, tmp_path):
    """Rank 0 of a world of one, snapshots under ``tmp_path``, a model state of one tensor."""
    monkeypatch.setattr(snapshot.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(snapshot, "all_gather", lambda obj: [obj])
    monkeypatch.setattr(snapshot, "snapshot_root", lambda: tmp_path / "shm")
    monkeypatch.setattr(snapshot, "training_state", lambda model, opt: {"w": torch.arange(3.0)})
    return tmp_path / "run"


def save(run, step: int):
    return snapshot.save_snapshot(run, step, None, None, history={"step": step}, rank_state={})


def test_the_place_is_named_by_the_run_directory(tmp_path) -> None:
    assert snapshot.snapshot_dir(tmp_path / "a") == snapshot.snapshot_dir(tmp_path / "a" / ".")
    assert snapshot.snapshot_dir(tmp_path / "a") != snapshot.snapshot_dir(tmp_path / "b")


def test_each_rank_keeps_its_two_newest_and_drops_them_at_the_end(one_rank) -> None:
    for step in (2, 4, 6):
        assert save(one_rank, step) is not None
    where = snapshot.snapshot_dir(one_rank)
    assert sorted(p.name for p in where.iterdir()) == [
        "rank00000-step00000004.pt", "rank00000-step00000006.pt"
    ]
    assert snapshot.newest_common_step(one_rank) == 6
    snapshot.drop_snapshots(one_rank)
    assert not where.exists()
    assert snapshot.newest_common_step(one_rank) is None


def test_a_snapshot_that_cannot_be_written_warns_and_the_run_goes_on(
    one_rank, monkeypatch, caplog
) -> None:
    assert save(one_rank, 2) is not None

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot.torch, "save", full)
    with caplog.at_level(logging.WARNING):
        assert save(one_rank, 4) is None
    assert "could not keep the snapshot of step 4" in caplog.text
    assert snapshot.newest_common_step(one_rank) == 2  # the older one still protects the run
    assert not list(snapshot.snapshot_dir(one_rank).glob("*.incomplete"))
