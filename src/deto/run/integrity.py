"""Checkpoint integrity: a manifest of checksums written with a checkpoint, verified before resume.

A checkpoint directory (see :mod:`deto.run.loop`) holds DCP shards (``*.distcp``) and their
``.metadata``, one ``rank<r>.pt`` per rank, ``trainer.json``, and ``COMPLETE`` written last.
``MANIFEST.json``, written just before ``COMPLETE``, lists every other file with its size and
sha256. A file that was truncated, rewritten or deleted after the save (a full disk, a crash of
the file system, a careless ``rm``) then shows before any rank loads it, and a resume falls back
to the newest checkpoint that is whole, instead of dying in the middle of ``dcp.load`` with
twenty tracebacks.

Checkpoints written before manifests existed are checked for structure only: the marker, the
DCP metadata, one readable ``rank<r>.pt`` (a zip archive, whose CRCs are tested) per rank.
Everything here is a pure function of the directory's contents.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "MANIFEST.json"
COMPLETE = "COMPLETE"
CHECKPOINTS = "checkpoints"
DCP_METADATA = ".metadata"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """No usable checkpoint where one was asked for; the message is one line."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _payload_files(directory: Path) -> list[Path]:
    """Every file of a checkpoint except the marker and the manifest, sorted."""
    return sorted(
        p for p in directory.rglob("*")
        if p.is_file() and p.relative_to(directory).as_posix() not in (COMPLETE, MANIFEST)
    )


def build_manifest(directory: Path) -> dict[str, Any]:
    """``{"version": 1, "files": {relative path: {"size", "sha256"}}}`` of ``directory``."""
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _payload_files(directory)
    }
    return {"version": MANIFEST_VERSION, "files": files}


def write_manifest(directory: str | Path) -> Path:
    """Write ``MANIFEST.json`` for the files now in ``directory`` (atomically: temp + rename).

    Call it once every rank has written its files and before ``COMPLETE``.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(build_manifest(directory), indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_marker(directory: Path) -> dict[str, Any]:
    """The ``COMPLETE`` marker; ``CheckpointError`` when it is missing, unreadable or has no
    integer ``step``."""
    try:
        marker = json.loads((directory / COMPLETE).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{directory.name}: no {COMPLETE} marker (the save did not finish)"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{directory.name}: unreadable {COMPLETE} marker ({exc})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        raise CheckpointError(f"{directory.name}: {COMPLETE} marker has no step")
    return marker


def problems(directory: str | Path) -> list[str]:
    """What is wrong with the checkpoint in ``directory``: an empty list when it is whole."""
    directory = Path(directory)
    try:
        marker = read_marker(directory)
    except CheckpointError as exc:
        return [str(exc)]
    manifest_path = directory / MANIFEST
    if manifest_path.is_file():
        return _check_manifest(directory, manifest_path)
    return _check_structure(directory, marker)


def _check_manifest(directory: Path, manifest_path: Path) -> list[str]:
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{directory.name}: unreadable {MANIFEST} ({exc})"]
    found = []
    for name, expected in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            found.append(f"{directory.name}: {name} is missing")
            continue
        size = path.stat().st_size
        if size != expected["size"]:
            found.append(
                f"{directory.name}: {name} has {size} bytes, {expected['size']} were written"
            )
        elif sha256_file(path) != expected["sha256"]:
            found.append(f"{directory.name}: {name} does not match its checksum")
    return found


def _check_structure(directory: Path, marker: dict[str, Any]) -> list[str]:
    """Checks for a checkpoint without a manifest (written by an older deto)."""
    found = []
    if not (directory / DCP_METADATA).is_file():
        found.append(f"{directory.name}: {DCP_METADATA} is missing")
    world = marker.get("world_size")
    ranks = [directory / f"rank{r:05d}.pt" for r in range(world)] if isinstance(world, int) else []
    for path in ranks:
        if not path.is_file():
            found.append(f"{directory.name}: {path.name} is missing")
            continue
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile) as exc:
            found.append(f"{directory.name}: {path.name} is damaged ({exc})")
            continue
        if bad is not None:
            found.append(f"{directory.name}: {path.name} is damaged (bad CRC in {bad})")
    return found


def candidates(path: Path) -> list[Path]:
    """The ``step_*`` directories of a run directory (or of its ``checkpoints/``), newest first."""
    for where in (path / CHECKPOINTS, path):
        if where.is_dir():
            found = [p for p in where.iterdir() if p.is_dir() and p.name.startswith("step_")]
            if found:
                return sorted(found, reverse=True)
    return []


@dataclass(frozen=True)
class Selection:
    """The checkpoint to resume from, and the newer ones passed over (with why)."""

    path: Path
    skipped: list[str] = field(default_factory=list)


def select_checkpoint(path: str | Path) -> Selection:
    """The checkpoint to resume from, verified.

    ``path`` is a checkpoint directory (it must verify) or a run directory: then the newest
    checkpoint in it that verifies, and the newer ones that do not, in ``skipped``. Raises
    :class:`CheckpointError`, one line, when there is none.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint not found: {path}")
    if (path / COMPLETE).exists() or path.name.startswith("step_"):
        found = problems(path)
        if found:
            raise CheckpointError(f"Checkpoint {path} is damaged: {'; '.join(found)}")
        return Selection(path)
    skipped: list[str] = []
    for candidate in candidates(path):
        found = problems(candidate)
        if not found:
            return Selection(candidate, skipped)
        skipped.append("; ".join(found))
    if not skipped:
        raise CheckpointError(f"No checkpoint in {path}")
    raise CheckpointError(f"No usable checkpoint in {path}: {' | '.join(skipped)}")


def latest_usable(run_dir: str | Path) -> Selection | None:
    """What ``--resume auto`` resumes from: ``None`` when the run has no checkpoint yet (start
    afresh), else :func:`select_checkpoint` of the run directory (which raises when none of
    its checkpoints is usable: silently starting over would throw the run away)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not candidates(run_dir):
        return None
    return select_checkpoint(run_dir)
