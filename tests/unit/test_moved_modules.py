"""The deprecated ``deto.train`` names: each old module imports the moved one, with a warning."""

from __future__ import annotations

import importlib
import sys

import pytest

from deto.train import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_name_is_the_moved_module_with_a_warning(old: str) -> None:
    sys.modules.pop(f"deto.train.{old}", None)
    with pytest.warns(DeprecationWarning, match=f"deto.train.{old} moved to {MOVED[old]}"):
        module = importlib.import_module(f"deto.train.{old}")
    assert module is importlib.import_module(MOVED[old])
    assert module.__spec__.name == MOVED[old]  # the module keeps its own spec


def test_a_name_from_an_old_module_and_a_netem_submodule() -> None:
    with pytest.warns(DeprecationWarning):
        from deto.train.data import lm_batch
        from deto.train.netem.rates import parse_bandwidth
    from deto.netem.rates import parse_bandwidth as moved
    from deto.run.data import lm_batch as moved_batch

    assert (lm_batch, parse_bandwidth) == (moved_batch, moved)


def test_an_unknown_old_name_is_not_found() -> None:
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("deto.train.nosuchmodule")
