"""Checkpoint integrity: damaged checkpoints are found before a resume, and passed over."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch.distributed import checkpoint as dcp

from deto.run.integrity import (
    COMPLETE,
    MANIFEST,
    CheckpointError,
    latest_usable,
    problems,
    select_checkpoint,
    write_manifest,
)

WORLD = 2
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def make_checkpoint(run: Path, step: int, *, manifest: bool = True) -> Path:
    """A checkpoint laid out as deto train writes one (DCP shards, rank files, marker last)."""
    path = run / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    torch.manual_seed(step)
    dcp.save({"node0": {"model": {"w": torch.randn(64, 64)}}}, checkpoint_id=str(path))
    for r in range(WORLD):
        torch.save({"rank": r, "rng": torch.get_rng_state()}, path / f"rank{r:05d}.pt")
    (path / "trainer.json").write_text(json.dumps({"history": {"step": step}}))
    if manifest:
        write_manifest(path)
    (path / COMPLETE).write_text(json.dumps({"step": step, "world_size": WORLD}))
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def distcp(path: Path) -> Path:
    return next(path.glob("*.distcp"))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20)
    return tmp_path


def newest(run: Path) -> Path:
    return run / "checkpoints" / "step_00000020"


def test_whole_checkpoint_verifies_and_is_chosen(run: Path) -> None:
    assert problems(newest(run)) == []
    manifest = json.loads((newest(run) / MANIFEST).read_text())
    assert set(manifest["files"]) >= {".metadata", "rank00000.pt", "rank00001.pt", "trainer.json"}
    assert select_checkpoint(run).path == newest(run)
    assert select_checkpoint(run).skipped == []
    assert select_checkpoint(newest(run)).path == newest(run)


@pytest.mark.parametrize(
    ("damage", "found"),
    [
        (lambda p: truncate(distcp(p)), r"__0_0.distcp has \d+ bytes, \d+ were written"),
        (lambda p: (p / ".metadata").unlink(), r"\.metadata is missing"),
        (
            lambda p: (p / COMPLETE).write_text(json.dumps({"world_size": 2})),
            "COMPLETE marker has no step",
        ),
        (lambda p: (p / COMPLETE).write_text("{"), "unreadable COMPLETE marker"),
        (lambda p: truncate(p / "rank00001.pt"), r"rank00001.pt has \d+ bytes"),
        (lambda p: (p / "rank00000.pt").unlink(), "rank00000.pt is missing"),
    ],
)
def test_damaged_latest_falls_back_to_the_previous(run: Path, damage, found: str) -> None:
    damage(newest(run))
    [problem] = problems(newest(run))
    assert problem.startswith("step_00000020: ")
    choice = select_checkpoint(run)
    assert choice.path == run / "checkpoints" / "step_00000010"
    assert len(choice.skipped) == 1
    assert re.search(found, choice.skipped[0])


def test_same_size_corruption_fails_the_checksum(run: Path) -> None:
    f = distcp(newest(run))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert problems(newest(run)) == ["step_00000020: __0_0.distcp does not match its checksum"]


def test_no_usable_checkpoint_is_one_line(run: Path) -> None:
    truncate(distcp(newest(run)))
    (run / "checkpoints" / "step_00000010" / ".metadata").unlink()
    with pytest.raises(CheckpointError) as info:
        select_checkpoint(run)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"No usable checkpoint in {run}: step_00000020: ")
    assert "step_00000010: .metadata is missing" in message


def test_a_named_damaged_checkpoint_is_an_error(run: Path) -> None:
    truncate(newest(run) / "rank00000.pt")
    with pytest.raises(
        CheckpointError, match=r"Checkpoint .*step_00000020 is damaged: .*rank00000.pt"
    ):
        select_checkpoint(newest(run))


def test_unfinished_save_is_passed_over(run: Path) -> None:
    (newest(run) / COMPLETE).unlink()
    choice = select_checkpoint(run)
    assert choice.path.name == "step_00000010"
    assert choice.skipped == ["step_00000020: no COMPLETE marker (the save did not finish)"]


def test_empty_or_missing_directories(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="No checkpoint in"):
        select_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="Checkpoint not found"):
        select_checkpoint(tmp_path / "nope")


def test_checkpoint_without_manifest_is_checked_for_structure(tmp_path: Path) -> None:
    old = make_checkpoint(tmp_path, 5, manifest=False)
    assert problems(old) == []
    truncate(old / "rank00001.pt")
    (old / ".metadata").unlink()
    found = problems(old)
    assert found[0] == "step_00000005: .metadata is missing"
    assert found[1].startswith("step_00000005: rank00001.pt is damaged")


def test_resume_auto_starts_afresh_only_without_checkpoints(tmp_path: Path) -> None:
    assert latest_usable(tmp_path / "new-run") is None
    assert latest_usable(tmp_path) is None
    make_checkpoint(tmp_path, 10)
    selection = latest_usable(tmp_path)
    assert selection is not None and selection.path.name == "step_00000010"
    (selection.path / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="No usable checkpoint"):
        latest_usable(tmp_path)
