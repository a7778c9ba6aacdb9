"""Deprecated: ``deto.train``'s modules moved to :mod:`deto.run`, :mod:`deto.launch`,
:mod:`deto.netem`, :mod:`deto.proc` and :mod:`deto.bench` (see CHANGELOG.md).

For one release ``import deto.train.<old>`` still works: it imports the module at its new place,
under both names, with a ``DeprecationWarning`` naming the new one. It is the same module
object, so patching either name patches both.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "config": "deto.run.config", "presets": "deto.run.presets", "tasks": "deto.run.tasks",
    "models": "deto.run.models", "data": "deto.run.data", "spans": "deto.run.spans",
    "loop": "deto.run.loop", "optimizer": "deto.run.optimizer",
    "checkpoint": "deto.run.checkpoint", "snapshot": "deto.run.snapshot",
    "summary": "deto.run.summary", "report": "deto.run.report", "console": "deto.run.console",
    "integrity": "deto.run.integrity", "noise": "deto.run.noise", "ranks": "deto.run.ranks",
    "provenance": "deto.run.provenance", "processes": "deto.proc.processes",
    "lifetime": "deto.proc.lifetime", "orphans": "deto.netem.orphans",
    "launch": "deto.launch.dispatch", "elastic": "deto.launch.local",
    "netlaunch": "deto.launch.shaped", "ftlaunch": "deto.launch.ftcluster",
    "failures": "deto.launch.failures", "preflight": "deto.launch.preflight",
    "bench": "deto.bench.sweep", "bench_report": "deto.bench.report",
    "stats": "deto.bench.stats", "reproduce": "deto.bench.reproduce", "netem": "deto.netem",
}  # fmt: skip
"""Old name under ``deto.train`` -> the module's new dotted name."""


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``deto.train.<old>`` (and ``deto.train.netem.<x>``) to the moved module."""

    @staticmethod
    def new_name(fullname: str) -> str | None:
        prefix = __name__ + "."
        if not fullname.startswith(prefix):
            return None
        head, _, rest = fullname[len(prefix) :].partition(".")
        if head not in MOVED or (rest and head != "netem"):
            return None
        return MOVED[head] + ("." + rest if rest else "")

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(fullname, self) if self.new_name(fullname) else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = self.new_name(spec.name)
        assert new is not None  # find_spec answered for this name only
        warnings.warn(
            f"{spec.name} moved to {new}; the old name goes in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        self._own_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system gave the module the alias's spec; it keeps its own.
        module.__spec__ = self._own_spec


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())
