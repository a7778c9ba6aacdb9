"""CI guard: every committed benchmark result still describes what the code computes.

For each results folder under benchmarks/results/, the first recorded seed's hsdp and
flexdemo runs are re-run for their first logged steps (the recorded command's configuration,
same schedule, simulated cluster, no link shaping) and compared with the record: the resolved
configuration, the inter-node bytes and the training losses of those steps. A change that
alters the numerics (or a preset) fails here until the results are regenerated
(docs/benchmarks.md says how).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deto.bench import reproduce, sweep
pytestmark = [pytest.mark.dist, pytest.mark.slow]

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
GUARDED = ("hsdp", "flexdemo")
WORLD = 4  # the pool's ranks


def train_prefix(cfg_dict: dict[str, Any], run_dir: str) -> dict[str, Any] | None:
    """One rank of a `deto train` run, in the pool's process group."""
    from deto.topology import Topology
    from deto.run import loop
    from deto.run.config import TrainConfig

    cfg = TrainConfig.from_dict(cfg_dict)
    return loop.run(
        cfg,
        Topology(nodes=cfg.nodes, ranks_per_node=cfg.ranks_per_node, device="cpu"),
        run_dir=run_dir,
    )


def planned(run: sweep.RunResult, train_args: list[str], stop_at: int, out: Path) -> dict[str, Any]:
    """The configuration `deto bench` resolves today for the recorded run's command, stopped
    after ``stop_at`` steps."""
    from deto.cli import build_parser
    from deto.run.config import KEYS, load_toml, resolve

    preset, flags = sweep.variant(run.scheme)
    argv = ["train", "--scheme", preset, *flags, "--seed", str(run.seed), *train_args]
    ns = build_parser().parse_args(argv)
    values = load_toml(ns.config) if hasattr(ns, "config") else {}
    values.update({k: v for k, v in vars(ns).items() if k in KEYS})
    return resolve({**values, "stop_at": stop_at, "out": str(out)}).to_dict()


_reruns: dict[str, sweep.RunResult] = {}


@pytest.mark.parametrize("scheme", GUARDED)
@pytest.mark.parametrize("folder", sorted(p.parent.name for p in RESULTS.glob("*/results.json")))
def test_committed_results_reproduce_their_first_steps(folder, scheme, pool, tmp_path_factory):
    results = reproduce.load_results(RESULTS / folder)
    runs = [r for r in reproduce.recorded_runs(results) if r.scheme == scheme]
    if not runs:
        pytest.skip(f"{folder} records no {scheme} run")
    first_seed = min(r.seed for r in runs)
    runs = [r for r in runs if r.seed == first_seed]
    logged = [r["step"] for r in runs[0].records if "train_loss" in r]
    if not logged:
        pytest.skip(f"{folder}'s {scheme} run records no training loss")
    out = tmp_path_factory.mktemp(f"{folder}-{scheme}")
    cfg = planned(runs[0], results["meta"].get("train_args", []), min(logged), out)
    if cfg["nodes"] * cfg["ranks_per_node"] != WORLD:
        pytest.skip(f"{folder}'s {scheme} run needs {cfg['nodes']} x {cfg['ranks_per_node']} ranks")
    key = json.dumps({k: v for k, v in cfg.items() if k != "out"}, sort_keys=True)
    if key not in _reruns:  # runs at several links compute the same: train once
        pool.run(train_prefix, cfg, str(out), timeout=600)
        _reruns[key] = sweep.load_run(scheme, None, first_seed, out)
    rerun = _reruns[key]
    checks = [
        c
        for r in runs
        for c in reproduce.compare_run(
            r, rerun, same_link=False, same_machine=reproduce.same_machine(r, rerun)
        )
    ]
    failed = [c for c in checks if c.status == reproduce.FAIL]
    assert not failed, (
        f"{folder} no longer matches the code (regenerate it, see docs/benchmarks.md):\n"
        + "\n".join(
            f"{c.run}: {c.what}: recorded {c.recorded}, now {c.now} (tolerance {c.tolerance})"
            for c in failed
        )
    )
    assert {c.what.split(" by ")[0].split(",")[0] for c in checks} >= {
        "config",
        "inter-node bytes",
        "train loss",
    }
