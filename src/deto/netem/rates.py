"""Link rates: parsing and formatting bandwidths, and the tbf parameters of one link."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

MIN_BANDWIDTH_BPS = 1000
"""Below 1 kbit/s a value is almost certainly a forgotten unit ("100" meant as 100mbit)."""
MAX_BANDWIDTH_BPS = 10 * 1000**3
"""Above 10 Gbit/s an unshaped veth between namespaces is rarely faster, so the probe could not
tell a shaped link from an unshaped one: such a rate cannot be verified, and is refused."""
MIN_BURST_BYTES = 32 * 1024
BURST_SECONDS = 0.010
"""Default tbf burst covers 10 ms at the rate: enough for timer granularity up to HZ=100."""

_UNITS: dict[str, int] = {
    "bit": 1,
    "kbit": 1000,
    "mbit": 1000**2,
    "gbit": 1000**3,
    "tbit": 1000**4,
    "kibit": 1024,
    "mibit": 1024**2,
    "gibit": 1024**3,
    "tibit": 1024**4,
}
_BANDWIDTH_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)(?:/s)?\s*$")


# --------------------------------------------------------------------------------------------
# Bandwidth parsing and formatting


def parse_bandwidth(text: str) -> int:
    """Parse a link rate to emulate into bits per second: :func:`parse_rate`, at most
    :data:`MAX_BANDWIDTH_BPS` (the fastest rate the probe can verify)."""
    bps = parse_rate(text)
    if bps > MAX_BANDWIDTH_BPS:
        raise ValueError(
            f"Bandwidth too high: {text!r} (at most {format_bandwidth(MAX_BANDWIDTH_BPS)}: above "
            "that the probe cannot tell a shaped link from an unshaped one)"
        )
    return bps


def parse_rate(text: str) -> int:
    """Parse a link rate into bits per second.

    Accepted: tc-style bit units ``bit``, ``kbit``, ``mbit``, ``gbit``, ``tbit`` (powers of 1000)
    and ``kibit``..``tibit`` (powers of 1024), case-insensitive, optionally with ``/s``, e.g.
    ``"100mbit"``, ``"1.5Gbit"``, ``"500kbit/s"``; a bare integer is bit/s. Byte units such as
    ``"10mbps"`` are rejected on purpose: tc reads ``mbps`` as megaBYTES per second while people
    usually mean megabits, and a silent factor of 8 would make every benchmark wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"Invalid bandwidth: {text!r} (expected a string such as '100mbit')")
    m = _BANDWIDTH_RE.match(text.lower())
    if m is None:
        raise ValueError(
            f"Invalid bandwidth: {text!r} (expected e.g. '100mbit', '1gbit', '500kbit')"
        )
    number, unit = m.group(1), m.group(2)
    if unit.endswith("bps") or unit in ("b", "kb", "mb", "gb", "tb", "bytes"):
        raise ValueError(
            f"Ambiguous bandwidth: {text!r}; byte units are not accepted (tc reads 'mbps' as "
            "megabytes/s). Write the rate in bits, e.g. '100mbit'"
        )
    if unit == "":
        if "." in number:
            raise ValueError(
                f"Invalid bandwidth: {text!r} (a bare number is bit/s and must be an integer)"
            )
        factor = 1
    elif unit in _UNITS:
        factor = _UNITS[unit]
    else:
        raise ValueError(
            f"Invalid bandwidth unit in {text!r}: {unit!r} (use one of {', '.join(_UNITS)})"
        )
    try:
        bps = int((Decimal(number) * factor).to_integral_value())
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only valid decimals
        raise ValueError(f"Invalid bandwidth: {text!r}") from exc
    if bps < MIN_BANDWIDTH_BPS:
        raise ValueError(
            f"Bandwidth too low: {text!r} = {bps} bit/s (minimum {MIN_BANDWIDTH_BPS}); "
            "did you forget a unit such as 'mbit'?"
        )
    return bps


_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(us|ms|s)\s*$")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_latency(text: str) -> float:
    """Parse a one-way latency such as ``"20ms"``, ``"150us"`` or ``"0.1s"`` into seconds (tc's
    units; the unit is required, so a forgotten one is not read as seconds)."""
    m = _DURATION_RE.match(text.lower()) if isinstance(text, str) else None
    if m is None:
        raise ValueError(
            f"Invalid latency: {text!r} (expected a duration with a unit, e.g. '20ms', '150us')"
        )
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def format_bandwidth(bps: int) -> str:
    """Format bits per second with the largest decimal tc unit, exactly (``parse`` round-trips).

    ``100_000_000 -> "100mbit"``, ``1_500_000_000 -> "1.5gbit"``, ``999 -> "999bit"``.
    """
    if isinstance(bps, bool) or not isinstance(bps, int) or bps <= 0:
        raise ValueError(f"Invalid bandwidth: {bps!r} (expected a positive integer bit/s)")
    for unit in ("tbit", "gbit", "mbit", "kbit"):
        factor = _UNITS[unit]
        if bps >= factor:
            value = Decimal(bps) / Decimal(factor)
            text = format(value.normalize(), "f")
            return f"{text}{unit}"
    return f"{bps}bit"


# --------------------------------------------------------------------------------------------
# Link parameters


def default_burst_bytes(bandwidth_bps: int) -> int:
    """tbf bucket size for a rate: 10 ms worth of bytes, at least 32 KiB.

    The bucket must hold what accumulates between two timer ticks (``rate / HZ``, up to 10 ms
    for HZ=100) or the qdisc cannot reach its rate, and it must exceed the MTU. It should not be
    much larger, since a full bucket lets a burst leave at line rate: 10 ms at the rate distorts
    a one-second measurement by about 1%.
    """
    return max(MIN_BURST_BYTES, math.ceil(bandwidth_bps / 8 * BURST_SECONDS))


@dataclass(frozen=True)
class LinkSpec:
    """Parameters of the tbf qdisc that shapes each emulated link.

    ``latency_ms`` is tbf's queue bound (how long a packet may wait for tokens before it is
    dropped; it sizes the queue), not an added propagation delay: without netem no delay is
    emulated. ``burst_bytes=None`` picks :func:`default_burst_bytes`.
    """

    bandwidth_bps: int
    burst_bytes: int | None = None
    latency_ms: float = 50.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.bandwidth_bps, bool)
            or not isinstance(self.bandwidth_bps, int)
            or self.bandwidth_bps < MIN_BANDWIDTH_BPS
        ):
            raise ValueError(
                f"Invalid bandwidth_bps: {self.bandwidth_bps!r} (integer >= {MIN_BANDWIDTH_BPS})"
            )
        if self.burst_bytes is not None and (
            not isinstance(self.burst_bytes, int) or self.burst_bytes < 2048
        ):
            raise ValueError(f"Invalid burst_bytes: {self.burst_bytes!r} (integer >= 2048)")
        if not (isinstance(self.latency_ms, int | float) and 0 < self.latency_ms <= 10_000):
            raise ValueError(f"Invalid latency_ms: {self.latency_ms!r} (0 < latency_ms <= 10000)")

    @classmethod
    def from_text(cls, bandwidth: str) -> LinkSpec:
        """A link with default burst and queue bound for a rate such as ``"100mbit"``."""
        return cls(bandwidth_bps=parse_bandwidth(bandwidth))

    @property
    def burst(self) -> int:
        """The tbf burst actually used, in bytes."""
        if self.burst_bytes is not None:
            return self.burst_bytes
        return default_burst_bytes(self.bandwidth_bps)

