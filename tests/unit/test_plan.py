"""The cost model (deto.plan) and deto plan: bytes exactly what the real replicators count on
simulated nodes, FSDP2's shards, hand-computed bytes, times, memory and crossover, and the
command line end to end."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import nn

import deto
from deto import plan
from deto.cli import main
from deto.comm import all_gather_bytes, all_reduce_bytes

SGD, ADAMW = torch.optim.SGD, torch.optim.AdamW


def _net() -> nn.Module:
    """Shapes that exercise every rule: a matrix DeMo sends sparse in 1-D and 2-D blocks (with
    padding), a tiny one it sends dense, 1-D biases, and a fragment split for Streaming."""
    return nn.Sequential(nn.Linear(48, 100), nn.Linear(100, 40), nn.Linear(40, 3))


torch.manual_seed(0)
INITIAL = _net().state_dict()  # built once: the nodes' threads share torch's RNG
MODEL = plan.from_module(_net())


def measured(make_rep, nodes: int, steps: int) -> list[list[int]]:
    """Per node, the bytes the real replicator counted on each step (one rank per node)."""

    def node(comm: deto.Comm) -> list[int]:
        model = _net()
        model.load_state_dict(INITIAL)
        names = {p: n for n, p in model.named_parameters()}
        opt = deto.DecoupledOptimizer(
            ADAMW(model.parameters(), lr=1e-3), [make_rep()], comm, param_names=names
        )
        out = []
        for t in range(steps):
            x = torch.randn(4, 48, generator=torch.Generator().manual_seed(100 * t + comm.rank))
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            out.append(opt.stats().bytes_sent)
        return out

    return deto.FakeComm(nodes=nodes).run(node)


REPLICATORS = {
    "demo": lambda: deto.DeMo(),
    "demo-2d-int8": lambda: deto.DeMo(blocks="2d", chunk=32, topk=14, values="int8"),
    "demo-every-2": lambda: deto.DeMo(every=2, values="fp32"),
    "demo-overlap": lambda: deto.DeMo(overlap=True),
    "full": lambda: deto.Full(),
    "full-every-3": lambda: deto.Full(every=3),
    "diloco": lambda: deto.DiLoCo(every=3),
    "sparseloco": lambda: deto.DiLoCo(every=3, compress="topk", topk=16, chunk=16),
    "streaming": lambda: deto.StreamingDiLoCo(every=4, fragments=2, overlap_steps=1),
    "streaming-fp32": lambda: deto.StreamingDiLoCo(every=3, fragments=3, values="fp32"),
    "striding": lambda: deto.Striding(rate=1 / 3),
    "random": lambda: deto.RandomSubset(rate=0.1),
    "slicing": lambda: deto.Slicing(rate=0.25),
}


@pytest.mark.parametrize("nodes", [2, 4])
@pytest.mark.parametrize("name", sorted(REPLICATORS))
def test_predicted_bytes_are_what_the_replicators_count(name: str, nodes: int) -> None:
    steps = 12
    flow = plan.traffic(MODEL, REPLICATORS[name](), 1)
    per_step = flow.node_bytes(nodes)
    predicted = [per_step[t % flow.period] for t in range(steps)]
    for counted in measured(REPLICATORS[name], nodes, steps):
        assert counted == predicted
    assert any(predicted)


def test_shards_are_fsdp2s_dim0_chunks() -> None:
    assert [plan.shard_shape((10, 3), 4, r) for r in range(4)] == [(3, 3)] * 3 + [(1, 3)]
    assert [plan.shard_shape((2, 5), 4, r) for r in range(4)] == [(1, 5)] * 2 + [(0, 5)] * 2
    assert [plan.shard_shape((7,), 2, r) for r in range(2)] == [(4,), (3,)]
    assert plan.shard_shape((7, 7), 1, 0) == (7, 7)


def _square(side: int = 64) -> plan.ModelShapes:
    return plan.from_module(nn.Linear(side, side, bias=False))


def test_bytes_by_hand_full_over_uneven_shards_and_demo() -> None:
    # a (3, 10) weight over 4 ranks: three ranks hold one row (40 bytes), the last none
    shapes = plan.from_module(nn.Linear(10, 3, bias=False))
    flow = plan.traffic(shapes, deto.Full(), 4)
    assert flow.node_bytes(4) == [3 * math.ceil(2 * 3 / 4 * 40)]
    # DeMo's defaults on 64 x 64: 64 chunks of 64, top 4: 6-bit indices (192 bytes), 2-bit
    # values (64) and an fp32 scale per chunk (256): 512 bytes, 1/32 of the 16384 dense
    demo = plan.traffic(_square(), deto.DeMo(), 1)
    assert demo.steps == (((plan.Collective("all_gather", 512),),),)
    assert demo.node_bytes(2) == [512] and demo.node_bytes(5) == [4 * 512]
    hsdp = plan.traffic(_square(), None, 1)
    assert hsdp.node_bytes(2) == [16384]
    assert plan.traffic(_square(), deto.DiLoCo(every=4), 1).node_bytes(2) == [0, 0, 0, 16384]
    assert plan.traffic(_square(), deto.DeMo(), 1).node_bytes(1) == [0]


def test_crossover_where_the_all_gather_passes_the_all_reduce() -> None:
    # (R - 1) * 512 > 2 (R - 1) / R * 16384 exactly when R > 64
    demo, hsdp = (plan.traffic(_square(), r, 1) for r in (deto.DeMo(), None))
    assert plan.crossover(demo, hsdp) == 65
    assert all_gather_bytes(512, 64) <= all_reduce_bytes(16384, 64)
    assert all_gather_bytes(512, 65) > all_reduce_bytes(16384, 65)
    assert plan.crossover(plan.traffic(_square(), deto.DiLoCo(every=2), 1), hsdp) is None


def test_times_from_bandwidth_latency_and_compute() -> None:
    link = plan.Link(8e6, latency_s=0.01)  # 1 MB/s
    full = plan.predict(plan.Scheme("full", deto.Full(), SGD), _square(), 2, 1, link, 0.1)
    comm = 16384 / 1e6 + 2 * 0.01  # the bytes, and the all-reduce's 2 (R - 1) ring steps
    assert full.comm_s == pytest.approx(comm)
    assert full.step_s == full.step_s_serial == pytest.approx(0.1 + comm)
    assert full.step_s_overlapped == pytest.approx(0.1)
    assert full.utilization == pytest.approx(0.1 / (0.1 + comm))
    overlap = plan.Scheme("demo", deto.DeMo(overlap=True), SGD)
    slow = plan.predict(overlap, _square(), 2, 1, plan.Link(8e3), 0.1)  # 1 kB/s: 0.512 s
    assert slow.step_s == pytest.approx(0.512)
    diloco = plan.predict(plan.Scheme("d", deto.DiLoCo(every=4), ADAMW), _square(), 2, 1,
                          link, 0.1)  # fmt: skip
    assert diloco.peak_node_bytes == 16384 and diloco.node_bytes_per_step == 4096
    assert diloco.step_s == pytest.approx(0.1 + comm / 4)


def test_memory_per_rank() -> None:
    fp32 = 4 * 64 * 64
    demo = plan.memory_per_rank(plan.Scheme("demo", deto.DeMo(), SGD), _square(), 1)
    assert demo == {"params": fp32, "grads": fp32, "optimizer": 0, "replicator": fp32}
    diloco = plan.memory_per_rank(plan.Scheme("d", deto.DiLoCo(), ADAMW), _square(), 2)
    assert diloco == {"params": fp32 // 2, "grads": fp32 // 2, "optimizer": fp32,
                      "replicator": fp32}  # fmt: skip


def test_a_parameter_count_becomes_the_nearest_llama_like_model() -> None:
    shapes = plan.from_param_count(1e9)
    assert abs(shapes.numel - 1e9) < 0.1e9
    assert "Llama-like" in shapes.description
    with pytest.raises(ValueError):
        plan.from_param_count(-1)


def test_bad_links_are_refused() -> None:
    for bandwidth in (0, -1, math.inf):
        with pytest.raises(ValueError, match="bandwidth"):
            plan.Link(bandwidth)
    with pytest.raises(ValueError, match="latency"):
        plan.Link(1e9, -0.1)


def test_deto_plan_json_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--model", "gpt", "--nodes", "4", "--ranks-per-node", "2",
            "--bandwidth", "100mbit", "--latency", "5ms", "--compute-s", "0.2", "--json"]
    assert main(argv) == 0
    rows = {r["scheme"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"hsdp", "flexdemo", "diloco", "sparseloco", "streaming-diloco"} <= set(rows)
    assert "demo" not in rows  # plain DeMo needs one rank per node
    for r in rows.values():
        assert {"bytes_per_step", "comm_s", "step_s", "memory_bytes"} <= set(r)
        assert r["step_s"] >= r["compute_s"] == 0.2
    assert rows["flexdemo"]["bytes_per_step"] < rows["hsdp"]["bytes_per_step"]


def test_deto_plan_table_and_plot(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    png = tmp_path / "plan.png"
    argv = ["plan", "--model", "1.3e9", "--nodes", "8", "--ranks-per-node", "8",
            "--bandwidth", "1gbit", "--schemes", "flexdemo,diloco", "--plot", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Llama-like" in out and "flexdemo" in out and "hsdp" in out
    assert re.search(r"^  flexdemo +R = 6[45]$", out, re.MULTILINE)  # near 2 x 32 (1/32 at R=2)
    assert png.stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--bandwidth", "0mbit"], "Bandwidth too low"),
    (["--bandwidth", "-5mbit"], "Invalid bandwidth"),
    (["--nodes", "0"], "Invalid --nodes"),
    (["--nodes", str(2**21)], "Invalid --nodes"),
    (["--ranks-per-node", "100000000000000000000"], "Invalid --ranks-per-node"),
    (["--model", "1e308"], "above the largest Llama-like model"),
    (["--latency", "20"], "Invalid latency"),
    (["--model", "gpt-9"], "Invalid --model"),
    (["--schemes", "demo"], "needs --ranks-per-node 1"),
])  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = {"--model": "gpt", "--bandwidth": "1gbit", "--ranks-per-node": "2"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    assert main(["plan", *(f"{flag}={value}" for flag, value in base.items())]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_streaming_diloco_averages_the_buffers_on_each_fragment_s_sync() -> None:
    """BatchNorm's statistics are all-reduced before every fragment's sync (steps 2 and 4 of
    H=4 on 2 fragments), as deto.buffers does, and on no other step."""
    shapes = plan.from_module(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)))
    flow = plan.traffic(shapes, deto.StreamingDiLoCo(every=4, fragments=2), 1)
    buffers = [plan.Collective("all_reduce", 4 * 16)]  # running mean and variance, fp32
    assert [list(step[0][:1]) == buffers for step in flow.steps] == [False, True, False, True]


@pytest.mark.parametrize("bandwidth", ["10gbit", "1mbit"])
def test_deto_plan_prices_auto_as_the_setting_it_would_train(
    bandwidth: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``auto`` is priced as the ladder's choice on the given link: the default's bytes on a
    fast link, fewer on a slow one; the table says what it would train and why."""
    base = ["plan", "--model", "gpt", "--nodes", "2", "--ranks-per-node", "2",
            "--bandwidth", bandwidth, "--compute-s", "0.2", "--schemes", "flexdemo,auto"]
    assert main([*base, "--json"]) == 0
    rows = {r["scheme"]: r for r in json.loads(capsys.readouterr().out)}
    fast = bandwidth == "10gbit"
    assert (rows["auto"]["bytes_per_step"] == rows["flexdemo"]["bytes_per_step"]) is fast
    assert main(base) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("auto: "))
    assert line.startswith("auto: would train flexdemo: " if fast else "auto: would train ")


def test_deto_plan_takes_a_hf_config(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config.json (or its folder) is built on the meta device: its parameters are the
    model's, counted exactly; a file that is not a config is one line, exit 2."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=300)  # fmt: skip
    hf.to_json_file(str(tmp_path / "config.json"))
    with torch.device("meta"):
        expected = sum(p.numel() for p in transformers.LlamaForCausalLM(hf).parameters())
    for where in (tmp_path, tmp_path / "config.json"):
        argv = ["plan", "--model", str(where), "--bandwidth", "1gbit", "--schemes", "hsdp",
                "--json"]  # fmt: skip
        assert main(argv) == 0
        (row,) = json.loads(capsys.readouterr().out)
        assert row["memory"]["params"] == 4 * expected  # one rank per node holds all of it
    (tmp_path / "other.json").write_text('{"a": 1}')
    assert main(["plan", "--model", str(tmp_path / "other.json"), "--bandwidth", "1gbit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a Hugging Face config" in err[0]
