"""One unit convention for bytes in everything deto shows: SI (kB, MB, GB; powers of 1000)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import deto
from deto.run.report import MIB, format_bytes, format_table


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (None, "-"), (0, "0 B"), (999, "999 B"), (999.6, "1.0 kB"), (1000, "1.0 kB"),
        (58_800, "58.8 kB"), (999_949, "999.9 kB"), (999_951, "1.0 MB"),
        (1_882_112, "1.9 MB"), (4.5e9, "4.5 GB"), (2.3e12, "2.3 TB"), (-3000, "-3.0 kB"),
    ],
)  # fmt: skip
def test_bytes_are_shown_in_si_units(n, shown) -> None:
    assert format_bytes(n) == shown


def test_the_summary_table_shows_every_byte_figure_in_si_units() -> None:
    summary = {
        "scheme": "flexdemo", "model": "gpt", "task": "lm", "nodes": 2, "ranks_per_node": 2,
        "steps": 300, "params": 470_528, "final_val_loss": 2.046, "wall_time_s": 92.0,
        "step_time_s_median": 0.29, "inter_node_bytes_sent_per_step": 58_800,
        "inter_node_bytes_sent_peak": 1_470_000, "full_sync_bytes_per_step": 1_882_112,
        "compression_ratio": 32.0,
        "replicas_identical": True, "peak_rss_mb_per_rank": [400.0, 430.0],  # MiB
    }  # fmt: skip
    rows = dict(line.strip().split("  ", 1) for line in format_table(summary).splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["inter-node sent/step"] == "58.8 kB per node"
    assert rows["inter-node peak/step"] == "1.5 MB per node"
    assert rows["full sync/step"] == "1.9 MB per node"
    assert rows["peak RSS/rank"] == format_bytes(430 * MIB) == "450.9 MB"


BINARY_OR_UPPER = re.compile(r"\b(KB|KiB|MiB|GiB|TiB)\b")


def test_no_other_byte_unit_is_written_anywhere() -> None:
    """No string deto prints (docstrings aside) names a binary or upper-case-K unit: every
    byte figure goes through format_bytes or a fixed SI unit (MB/step in reports)."""
    root = Path(deto.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docstrings
                and BINARY_OR_UPPER.search(node.value)
            ):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
    assert found == []
