"""--out is checked before any rank starts: a file, an uncreatable path, a read-only mount."""

from __future__ import annotations

from pathlib import Path

import pytest

from deto.launch.preflight import check_output_dir


def test_creates_a_missing_directory(tmp_path: Path) -> None:
    assert check_output_dir(tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the write probe is gone


def test_a_file_is_not_an_output_directory(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match=f"Invalid --out: {f} exists and is not a directory"):
        check_output_dir(f)
    with pytest.raises(ValueError, match="Invalid --out: cannot create .*file/sub"):
        check_output_dir(f / "sub")


def test_a_read_only_file_system_is_refused() -> None:
    ro = Path("/proc/self")  # exists, is a directory, and nothing can be created in it
    with pytest.raises(ValueError, match="Invalid --out: /proc/self is not writable"):
        check_output_dir(ro)
