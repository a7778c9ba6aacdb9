"""Every ``--scheme`` preset builds its replicator, and copes with the small tensors of the
embedded models (a 10-class head's bias is 5 rows per rank of a 2-rank node)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import deto
from deto.replicators import make_replicator
from deto.run.config import resolve
from deto.run.presets import PRESETS


@pytest.mark.parametrize("scheme", sorted(name for name, p in PRESETS.items() if p.replicator))
def test_preset_builds_its_replicator(scheme: str) -> None:
    cfg = resolve({"scheme": scheme})
    rep = make_replicator(PRESETS[scheme].replicator, **cfg.replicator_options())
    assert rep.name == PRESETS[scheme].replicator


@pytest.mark.parametrize("rows", [1, 5, 15, 16, 17, 40])
def test_striding_rows_for_tensors_shorter_than_the_stride(rows: int) -> None:
    rep = deto.Striding(rate=1 / 16)
    seen: list[int] = []
    for fired in range(32):  # two cycles
        rep.fired = fired
        chosen = rep.rows(0, rows)
        assert chosen.dtype == torch.int64 and all(0 <= r < rows for r in chosen.tolist())
        seen.extend(chosen.tolist())
    assert sorted(seen) == sorted(list(range(rows)) * 2)  # every row once per cycle


def test_the_replicators_docs_integrations_spells_out_are_the_presets() -> None:
    """docs/integrations.md tells framework users which replicator a preset is: each row's
    constructor must build that preset's options."""
    text = (Path(__file__).parents[2] / "docs" / "integrations.md").read_text()
    rows = re.findall(r"^\| `([a-z-]+)` \| `(deto\.\w+\([^`]*\))`", text, flags=re.M)
    assert {name for name, _ in rows} == {"diloco", "sparseloco", "streaming-diloco"}
    for name, code in rows:
        assert eval(code, {"deto": deto}).options == PRESETS[name].options, name
