"""Checks of the user's input that must fail before any rank starts (exit status 2).

A run that dies 20 seconds in, after four ranks have started, because ``--out`` names a file
wastes the user's time and prints a traceback per rank; the same mistake caught here is one
line at once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_output_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and prove it writable; ``ValueError`` (one line) if not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"Invalid --out: {path} exists and is not a directory") from None
    except OSError as exc:
        raise ValueError(f"Invalid --out: cannot create {path}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise ValueError(f"Invalid --out: {path} exists and is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".deto-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"Invalid --out: {path} is not writable: {exc.strerror or exc}") from None
    return path
