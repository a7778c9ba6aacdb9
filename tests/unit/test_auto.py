"""``--scheme auto``: the ladder, the choice on hand-computed links, the link probe's arithmetic,
the decision with stubbed measurements (two bandwidths, two choices), and its flags."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deto import plan
from deto.linkprobe import from_timings
from deto.plan.auto import DEFAULT_BUDGET, LADDER, Rung, choose
from deto.replicators import DeMoOptions
from deto.run import auto
from deto.run.config import resolve

MODEL = plan.from_module(nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256)))
COMPUTE_S = 0.5


def _node_bytes(rung: Rung, nodes: int = 2, ranks: int = 2) -> float:
    flow = plan.traffic(MODEL, rung.replicator(), ranks)
    return sum(flow.node_bytes(nodes)) / flow.period


def _bandwidth_for(rung: Rung, seconds: float) -> float:
    """The bandwidth at which ``rung``'s exchange takes ``seconds``."""
    return 8 * _node_bytes(rung) / seconds


def test_the_ladder_is_ordered_by_measured_quality_and_starts_at_the_default() -> None:
    assert LADDER[0].name == "flexdemo" and LADDER[0].options == DeMoOptions()
    losses = [r.loss_vs_hsdp for r in LADDER]
    assert losses == sorted(losses)
    assert len({r.name for r in LADDER}) == len(LADDER)
    # no rung sends more than the default: the frontier found no loss to buy with bytes
    assert all(_node_bytes(r) <= _node_bytes(LADDER[0]) for r in LADDER)


def test_a_fast_link_keeps_the_default() -> None:
    d = choose(MODEL, 2, 2, plan.Link(1e12), COMPUTE_S)
    assert d.chosen is LADDER[0] and all(c.fits for c in d.considered)
    assert "best setting" in d.reason


def test_the_budget_boundary_is_exact() -> None:
    """The default's exchange at exactly 10% of compute fits; a little slower does not, and
    the next rung that fits is taken: eager overlap, which hides the same bytes."""
    top = LADDER[0]
    at = _bandwidth_for(top, DEFAULT_BUDGET * COMPUTE_S)
    assert choose(MODEL, 2, 2, plan.Link(at * (1 + 1e-9)), COMPUTE_S).chosen is top
    slower = choose(MODEL, 2, 2, plan.Link(at * 0.99), COMPUTE_S)
    assert slower.chosen.name == "flexdemo+overlap" and slower.chosen.options.overlap
    assert not slower.considered[0].fits and "flexdemo would take" in slower.reason


def test_past_what_overlap_hides_it_compresses_harder() -> None:
    top = LADDER[0]
    hidden_limit = _bandwidth_for(top, (1 + DEFAULT_BUDGET) * COMPUTE_S)
    d = choose(MODEL, 2, 2, plan.Link(hidden_limit * 0.9), COMPUTE_S)
    chosen = next(c for c in d.considered if c.rung == d.chosen.name)
    assert d.chosen.options.blocks == "2d" and chosen.fits
    assert chosen.node_bytes_per_step < _node_bytes(top)


def test_when_nothing_fits_the_shortest_step_wins() -> None:
    d = choose(MODEL, 2, 2, plan.Link(1e3), COMPUTE_S)
    assert not any(c.fits for c in d.considered)
    shortest = min(c.step_s for c in d.considered)
    assert next(c for c in d.considered if c.rung == d.chosen.name).step_s == shortest
    assert "DiLoCo" in d.reason


def test_one_node_keeps_the_default() -> None:
    d = choose(MODEL, 1, 4, plan.Link(1.0), COMPUTE_S)
    assert d.chosen is LADDER[0] and "1 node" in d.reason


@pytest.mark.parametrize("budget", [0, -0.1, math.nan, math.inf, 11])
def test_a_bad_budget_is_one_line(budget: float) -> None:
    with pytest.raises(ValueError, match="Invalid budget"):
        choose(MODEL, 2, 2, plan.Link(1e9), COMPUTE_S, budget=budget)


def test_the_decision_records_every_rung() -> None:
    d = choose(MODEL, 2, 2, plan.Link(1e8, 1e-3), COMPUTE_S).as_dict()
    assert [c["rung"] for c in d["considered"]] == [r.name for r in LADDER]
    assert d["latency_s"] == 1e-3 and d["budget"] == DEFAULT_BUDGET and d["chosen"] == "flexdemo"


def test_link_from_timings() -> None:
    """1 MB in 0.5 s with 2 hops of 10 ms each: the wire took 0.48 s."""
    m = from_timings(1_000_000, 0.5, hops=2, small_seconds=0.02)
    assert m.latency_s == pytest.approx(0.01)
    assert m.bandwidth_bps == pytest.approx(8e6 / 0.48)


def test_two_measured_bandwidths_choose_differently(monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`deto.run.auto.decide` with the probe and the compute timing stubbed: the same
    model and compute at 1 Gbit/s and at 1 Mbit/s take different settings."""
    from deto.linkprobe import LinkMeasurement

    class Topo:
        nodes, ranks_per_node = 2, 2

    cfg = resolve({"scheme": "auto"})
    monkeypatch.setattr(auto, "measure_compute", lambda *a: COMPUTE_S)
    monkeypatch.setattr(auto, "from_rank0", lambda obj: obj)
    chosen = {}
    for bps in (1e9, 1e6):
        monkeypatch.setattr(auto, "measure_link", lambda topo, b=bps: LinkMeasurement(b, 0, 1, 1))
        chosen[bps] = auto.decide(cfg, Topo(), MODEL, nn.Identity(), None, 0).chosen  # type: ignore[arg-type]
    assert chosen[1e9] is LADDER[0]
    assert chosen[1e6] is not LADDER[0]
    assert auto.with_choice(cfg, chosen[1e6].options).replicator == chosen[1e6].options


def test_auto_flags() -> None:
    assert resolve({"scheme": "auto", "comm_budget": 0.3}).comm_budget == 0.3
    with pytest.raises(ValueError, match="--topk does not apply to --scheme auto"):
        resolve({"scheme": "auto", "topk": 8})
    with pytest.raises(ValueError, match="--comm-budget applies to --scheme auto only"):
        resolve({"scheme": "flexdemo", "comm_budget": 0.3})
    with pytest.raises(ValueError, match="--scheme auto does not apply with --ft"):
        resolve({"scheme": "auto", "ft": True})
    with pytest.raises(ValueError, match="comm_budget"):
        resolve({"scheme": "auto", "comm_budget": 0.0})


def test_a_resumed_auto_run_takes_the_saved_choice(tmp_path) -> None:
    """The setting comes from the checkpoint's config (a resume) or the run's config.json (a
    snapshot), never measured again."""
    import json

    from deto.run.loop import earlier_choice

    lean = LADDER[-1].options
    saved = resolve({"scheme": "auto"})
    saved_dict = auto.with_choice(saved, lean).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(saved_dict))
    ckpt = tmp_path / "step_00000002"
    ckpt.mkdir()
    (ckpt / "COMPLETE").write_text(json.dumps({"step": 2, "config": saved_dict}))
    assert earlier_choice(tmp_path, None, None) is None
    assert earlier_choice(tmp_path, None, 4) == lean
    assert earlier_choice(tmp_path, str(ckpt), None) == lean
    assert auto.record(None, lean) == {
        "source": "resumed", "chosen": LADDER[-1].name, "options": lean.changed()
    }


def test_calibration_leaves_no_trace() -> None:
    """Gradients, random state and BatchNorm statistics are as before the timed passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()

    class Task:
        @staticmethod
        def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
            g = torch.Generator().manual_seed(step)
            return torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)

        loss = staticmethod(nn.functional.cross_entropy)

    class Topo:
        torch_device = torch.device("cpu")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(auto.dist, "all_reduce", lambda t, op=None: None)
        seconds = auto.measure_compute(model, Task(), Topo(), 0)  # type: ignore[arg-type]
    assert seconds > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
