"""Which of deto's optional extras are installed, read from deto's own package metadata, so
that the extras are declared once (pyproject.toml) and checked against that declaration."""

from __future__ import annotations

import re
from importlib import metadata

PACKAGE = "deto"
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")
_NAME = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[([^\]]*)\])?")

INTEGRATIONS = {
    "hf": "deto.integrations.hf",
    "lightning": "deto.integrations.lightning",
    "torchtitan": "deto.integrations.torchtitan",
}
"""The extras that enable an integration, and its module."""


class MissingExtra(ImportError):
    """An optional part of deto needs an extra that is not (fully) installed."""

    def __init__(self, extra: str, missing: list[str], what: str) -> None:
        self.extra, self.missing = extra, missing
        super().__init__(
            f"{what} needs the '{extra}' extra (missing: {', '.join(missing)}): "
            f"pip install '{PACKAGE}[{extra}]'"
        )


def declared() -> dict[str, list[str]]:
    """Every extra and the distributions it names (an extra naming deto's own extras lists
    theirs); empty when deto runs from a source tree that was never installed."""
    try:
        requirements = metadata.requires(PACKAGE) or []
    except metadata.PackageNotFoundError:
        return {}
    own: dict[str, list[str]] = {}  # extra -> deto's extras it includes
    extras: dict[str, list[str]] = {}
    for req in requirements:
        marker = _EXTRA_MARKER.search(req)
        name = _NAME.match(req)
        if not (marker and name):
            continue
        extra = marker.group(1)
        if name.group(1) == PACKAGE:
            own.setdefault(extra, []).extend(e.strip() for e in (name.group(2) or "").split(","))
        else:
            extras.setdefault(extra, []).append(name.group(1))
    for extra, included in own.items():
        for other in included:
            extras.setdefault(extra, []).extend(extras.get(other, []))
    return extras


def _installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def missing(extra: str) -> list[str]:
    """The distributions of ``extra`` that are not installed (none when unknown)."""
    return [d for d in declared().get(extra, []) if not _installed(d)]


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtra` naming the install command unless ``extra`` is installed."""
    absent = missing(extra)
    if absent:
        raise MissingExtra(extra, absent, what)


def installed() -> dict[str, bool]:
    """Every declared extra, and whether all it names is installed."""
    return {extra: not missing(extra) for extra in sorted(declared())}
