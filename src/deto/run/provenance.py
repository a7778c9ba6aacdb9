"""Where a number was measured: CPU, threads, torch build, packages, command, git state.

Two runs of the same commit can still differ in the last bits of every loss when the CPU's
vector extensions, the torch build or the thread count differ, and FlexDeMo's discrete choices
(top-k, sign) amplify such bits into visible differences of the final loss. A published number
is only checkable with all of this recorded next to it: ``summary.json`` and ``results.json``
carry :func:`collect`'s record under ``provenance``.

Results meant for committing (an output folder inside a ``benchmarks/results/`` folder) must
come from a clean working tree, so that the recorded git sha alone names the code that ran:
:func:`check_committable`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COMMAND_ENV = "DETO_COMMAND"
"""The command a user typed, as JSON, handed to the ranks a ``deto`` process launches (their
own argv is the launcher's ``-m deto train --config ...``, not what the user typed)."""

PACKAGES = (
    "torch",
    "numpy",
    "transformers",
    "accelerate",
    "scikit-learn",
    "scipy",
    "matplotlib",
    "tqdm",
    "tensorboard",
)
"""Installed packages whose versions can change a run's numbers or its outputs."""

THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "OMP_PROC_BIND",
    "OMP_PLACES",
    "KMP_AFFINITY",
    "GOMP_CPU_AFFINITY",
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
)
"""Environment variables that change how many threads run, where, or which kernels they use."""

VECTOR_FLAG = re.compile(r"^(sse|ssse|avx|fma|f16c|amx|asimd|sve|neon|bf16|i8mm|fphp)")
"""CPU flags that pick the floating-point kernels (x86 ``flags``, Arm ``Features``)."""

RESULTS_FOLDER = ("benchmarks", "results")
"""An output folder inside ``.../benchmarks/results/`` holds results meant for committing."""

MAX_CHANGED = 20  # changed paths listed in the record; the digest covers all of them


class DirtyTreeError(ValueError):
    """Results meant for committing asked for from a working tree with uncommitted changes."""


# --------------------------------------------------------------------------------------------
# The record


def collect(*, where: Path | None = None) -> dict[str, Any]:
    """Everything about this process and checkout that can change a run's numbers."""
    return {
        "command": command(),
        "cpu": cpu_info(),
        "threads": thread_settings(),
        "torch": torch_build(),
        "packages": package_versions(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()}",
        "git": git_state(where),
    }


def note_command(argv: Sequence[str], *, inherited: bool = False) -> None:
    """Remember the command this process runs, for the ranks it launches to record.

    ``inherited``: this process is a rank started by a launcher; an outer ``deto``'s command,
    if there is one, wins over this rank's own argv.
    """
    if inherited and COMMAND_ENV in os.environ:
        return
    os.environ[COMMAND_ENV] = json.dumps(list(argv))


def command() -> list[str]:
    """The command noted by :func:`note_command`, else this process's own arguments."""
    noted = os.environ.get(COMMAND_ENV)
    if noted:
        try:
            value = json.loads(noted)
        except ValueError:
            value = None
        if isinstance(value, list) and all(isinstance(a, str) for a in value):
            return value
    return [Path(sys.argv[0]).name or "python", *sys.argv[1:]]


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Model name and vector-extension flags from ``/proc/cpuinfo`` text (x86 or Arm)."""
    model = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if model is None and key in ("model name", "hardware", "cpu model"):
            model = value
        elif key in ("flags", "features") and not flags:
            flags = {f for f in value.split() if VECTOR_FLAG.match(f)}
    return {"model": model, "vector_flags": sorted(flags)}


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The CPU model, its vector extensions, and the cores this process may use."""
    try:
        info = parse_cpuinfo(cpuinfo.read_text(errors="replace"))
    except OSError:  # not Linux: only what the platform module knows
        info = {"model": None, "vector_flags": []}
    info["model"] = info["model"] or platform.processor() or None
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        **info,
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": len(affinity(0)) if affinity is not None else os.cpu_count(),
    }


def thread_settings() -> dict[str, Any]:
    """torch's thread counts in this process and the environment variables that set them."""
    import torch

    return {
        "torch_num_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
    }


def torch_build() -> dict[str, Any]:
    """The torch build and the CPU kernels it dispatches to on this machine.

    ``config_sha256`` digests ``torch.__config__.show()`` (compiler, BLAS, oneDNN, build flags
    and the CPU capability in use): equal digests, equal build on an equally capable CPU.
    """
    import torch

    config = torch.__config__.show()
    return {
        "version": torch.__version__,
        "git_version": torch.version.git_version,
        "debug": torch.version.debug,
        "cuda": torch.version.cuda,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
    }


def package_versions() -> dict[str, str]:
    """Versions of deto and of the installed packages in :data:`PACKAGES`."""
    import deto

    found = {"deto": deto.__version__}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


# --------------------------------------------------------------------------------------------
# Git


def source_dir() -> Path:
    """The directory deto is imported from (its checkout, when it runs from one)."""
    import deto

    return Path(deto.__file__).resolve().parent


def _git(args: Sequence[str], where: Path, *, text: bool = True) -> Any:
    """``git args`` in ``where``: its stdout, or ``None`` if git is missing or fails."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=where, capture_output=True, text=text, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def repo_root(where: Path | None = None) -> Path | None:
    """The top of the git checkout deto runs from, or ``None`` outside one."""
    top = _git(["rev-parse", "--show-toplevel"], where or source_dir())
    return Path(top.strip()) if top and top.strip() else None


def git_state(where: Path | None = None) -> dict[str, Any] | None:
    """The commit, and whether the code that ran differs from it (``None``: no checkout).

    Dirty means: a tracked file differs from the commit (staged or not), or the package
    directory holds an untracked file Python could import. Untracked outputs elsewhere (run and
    bench folders) are not code and do not count. ``diff_sha256`` digests the diff of the
    tracked files and the untracked files' names and contents, so two dirty trees can be told
    apart.
    """
    where = where or source_dir()
    top = repo_root(where)
    sha = _git(["rev-parse", "HEAD"], where)
    if top is None or sha is None:
        return None
    diff = _git(["diff", "HEAD", "--binary"], top, text=False)
    names = _git(["diff", "HEAD", "--name-only", "-z"], top) or ""
    untracked = (
        _git(["ls-files", "--others", "--exclude-standard", "--full-name", "-z"], where) or ""
    )
    changed = sorted({*filter(None, names.split("\0")), *filter(None, untracked.split("\0"))})
    h = hashlib.sha256(diff or b"")
    for rel in sorted(filter(None, untracked.split("\0"))):
        h.update(rel.encode())
        try:
            h.update(hashlib.sha256((top / rel).read_bytes()).digest())
        except OSError:
            h.update(b"unreadable")
    return {
        "sha": sha.strip(),
        "dirty": bool(changed),
        "diff_sha256": h.hexdigest() if changed else None,
        "changed": changed[:MAX_CHANGED],
        "changed_count": len(changed),
    }


def meant_for_committing(out: Path, where: Path | None = None) -> bool:
    """Whether ``out`` lies inside a ``benchmarks/results/`` folder of deto's checkout (or of
    any folder, when deto does not run from a checkout), where committed results live."""
    out = out.resolve()
    top = repo_root(where)
    if top is not None:
        return out.is_relative_to(top.joinpath(*RESULTS_FOLDER))
    parts = out.parts
    n = len(RESULTS_FOLDER)
    return any(parts[i : i + n] == RESULTS_FOLDER for i in range(len(parts) - n))


def check_committable(
    out: Path, *, allow_dirty: bool, where: Path | None = None
) -> dict[str, Any] | None:
    """Refuse results meant for committing from a dirty (or unreadable) working tree.

    Returns the git state (``None`` outside a checkout). Raises :class:`DirtyTreeError` unless
    ``allow_dirty``, in which case the caller must say so wherever the results are shown.
    """
    state = git_state(where)
    if not meant_for_committing(out, where) or allow_dirty:
        return state
    if state is None:
        raise DirtyTreeError(
            f"cannot read the git state of deto's checkout, and {out} is meant for committed "
            "results; run from a git checkout, or pass --allow-dirty"
        )
    if state["dirty"]:
        listed = ", ".join(state["changed"][:5]) + (", ..." if state["changed_count"] > 5 else "")
        raise DirtyTreeError(
            f"the working tree has uncommitted changes ({listed}) and {out} is meant for "
            "committed results; commit or stash them, or pass --allow-dirty"
        )
    return state


def dirty_warning(git: Mapping[str, Any] | None) -> str | None:
    """One line for the top of a report whose numbers did not come from a clean commit."""
    if git is None:
        return "**Not from a git checkout**: the code that produced these numbers is not recorded."
    if not git.get("dirty"):
        return None
    return (
        f"**Not from a clean commit**: the working tree differed from {git['sha'][:10]} in "
        f"{git['changed_count']} file(s) ({', '.join(git['changed'][:5])}"
        f"{', ...' if git['changed_count'] > 5 else ''}; diff sha256 {git['diff_sha256'][:16]}), "
        "so the git sha alone does not name the code that ran."
    )


# --------------------------------------------------------------------------------------------
# Comparing two records


COMPARED = (
    ("cpu", "model"),
    ("cpu", "vector_flags"),
    ("cpu", "usable_cores"),
    ("torch", "version"),
    ("torch", "cpu_capability"),
    ("torch", "config_sha256"),
    ("threads", "torch_num_threads"),
    ("threads", "env"),
    ("packages", None),
    ("python", None),
)
"""What, when it differs, explains different numbers on a re-run."""

NUMERIC = frozenset(
    {
        "cpu.model",
        "cpu.vector_flags",
        "torch.version",
        "torch.cpu_capability",
        "torch.config_sha256",
        "threads.torch_num_threads",
        "threads.env",
        "packages",
    }
)
"""Differences that change floating-point rounding (the others change only timings)."""


def differences(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(what, recorded, now)`` for every entry of :data:`COMPARED` that differs."""
    out = []
    for section, key in COMPARED:
        a, b = recorded.get(section), now.get(section)
        if key is not None:
            a = a.get(key) if isinstance(a, Mapping) else None
            b = b.get(key) if isinstance(b, Mapping) else None
        if a != b:
            out.append((section if key is None else f"{section}.{key}", a, b))
    return out
