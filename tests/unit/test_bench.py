"""deto bench's derivations and outputs, with fake runs (no training, no processes)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from deto.bench import report as bench_report
from deto.bench import sweep
from deto.launch.shaped import RENDEZVOUS_PORT, node_argv, node_failure
from deto.netem import EmulatedCluster


def test_loss_at_interpolates_between_evaluations():
    val = [[10, 4.0], [20, 3.0], [30, 2.0]]
    assert sweep.loss_at(val, 15) == pytest.approx(3.5)
    assert sweep.loss_at(val, 5) == 4.0
    assert sweep.loss_at(val, 99) == 2.0
    with pytest.raises(ValueError, match="no validation loss"):
        sweep.loss_at([], 1)


def test_time_to_target_interpolates_the_crossing_between_evaluations():
    records = [{"step": 1, "wall_time_s": 1.0}, {"step": 2, "val_loss": 3.0, "wall_time_s": 2.0},
               {"step": 3, "val_loss": 2.0, "wall_time_s": 4.0}]
    assert sweep.time_to_target(records, 2.5) == pytest.approx(3.0)
    assert sweep.time_to_target(records, 2.0) == pytest.approx(4.0)
    assert sweep.time_to_target(records, 3.5) == 2.0  # already there at the first evaluation
    assert sweep.time_to_target(records, 1.0) is None


def _fake_run(
    out: Path,
    scheme: str,
    *,
    val: list[list[float]],
    step_time: float,
    sent: float,
    seconds_per_step: float,
    peak: float | None = None,
    knobs: dict | None = None,
) -> None:
    """A run's outputs; ``peak``: the most bytes one step sent (absent when ``None``, as in
    runs recorded before it was kept); ``knobs``: its config's replicator knobs."""
    out.mkdir(parents=True)
    steps = int(val[-1][0])
    records = [
        {"step": s, "val_loss": v, "wall_time_s": s * seconds_per_step,
         "inter_node_bytes_sent_total": s * sent}
        for s, v in val
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "scheme": scheme, "task": "lm", "nodes": 2, "ranks_per_node": 2, "steps": steps,
        "params": 1000,
        "final_val_loss": val[-1][1], "val_loss": val, "step_time_s_median": step_time,
        "inter_node_bytes_sent_per_step": sent, "full_sync_bytes_per_step": 4000.0,
        "replicas_identical": None if scheme == "none" else True,
        "wall_time_s": steps * seconds_per_step,
        "link": None, "versions": {"torch": "x"}, "git_sha": "abc",
        "config": {"seed": 0, **(knobs or {})},
    }
    if peak is not None:
        summary["inter_node_bytes_sent_peak"] = peak
    (out / "summary.json").write_text(json.dumps(summary))


def test_run_bench_writes_results_report_and_plots(tmp_path):
    fakes = {
        "hsdp": dict(val=[[10, 3.0], [20, 2.0]], step_time=1.0, sent=4000.0, seconds_per_step=1.0),
        "flexdemo-lean": dict(
            val=[[10, 2.9], [20, 2.05]], step_time=0.2, sent=20.0, seconds_per_step=0.2
        ),
        "none": dict(val=[[10, 3.5], [20, 3.0]], step_time=0.19, sent=0.0, seconds_per_step=0.19),
    }
    calls = []  # the bandwidth-first preset: its claims are 1/100 of the bytes, loss within 5%

    def runner(argv: list[str]) -> int:
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        _fake_run(out, argv[argv.index("--scheme") + 1], **fakes[argv[argv.index("--scheme") + 1]])
        return 0

    cfg = sweep.BenchConfig(schemes=("hsdp", "flexdemo-lean", "none"), bandwidths=("100mbit",),
                            out=tmp_path, train_args=("--steps", "20"))
    results = sweep.run_bench(cfg, runner=runner)
    assert [c[c.index("--scheme") + 1] for c in calls] == ["hsdp", "flexdemo-lean", "none"]
    assert all(c[-2:] == ["--bandwidth", "100mbit"] and "--steps" in c for c in calls)
    rows = {r["scheme"]: r for r in results["rows"]}
    # target: hsdp at 75% of 20 steps = 2.5, reached at 15 s; flexdemo-lean crosses it at
    # 10 + 10 * 0.4 / 0.85 steps of 0.2 s
    assert rows["hsdp"]["target_val_loss"] == pytest.approx(2.5)
    assert rows["hsdp"]["time_to_target_s"] == pytest.approx(15.0)
    flex_t = 0.2 * (10 + 10 * 0.4 / 0.85)
    assert rows["flexdemo-lean"]["time_to_target_s"] == pytest.approx(flex_t)
    assert rows["flexdemo-lean"]["time_to_target_vs_hsdp"] == pytest.approx(flex_t / 15.0)
    assert rows["flexdemo-lean"]["compression_vs_hsdp"] == pytest.approx(200)
    assert rows["flexdemo-lean"]["step_time_vs_none"] == pytest.approx(0.2 / 0.19 - 1)
    assert rows["none"]["time_to_target_s"] is None
    met = {claim: ok for claim, ok, _ in results["targets"]}
    assert met["flexdemo-lean inter-node bytes/step <= 1/100 of hsdp (100mbit)"] is True
    assert met["flexdemo-lean reaches the target in <= 1/3 of hsdp's time (100mbit)"] is True
    assert met["flexdemo-lean s/step within 15% of none (100mbit)"] is True
    assert met["flexdemo-lean final val loss within 5% of hsdp (100mbit)"] is True
    evidence = {claim: ev for claim, _, ev in results["targets"]}
    assert evidence["flexdemo-lean reaches the target in <= 1/3 of hsdp's time (100mbit)"].endswith(
        "(a scheme learning like hsdp at none's s/step: 0.19)"
    )
    report = (tmp_path / "report.md").read_text()
    assert (
        f"| flexdemo-lean | 2.0500 | {flex_t:.1f} | {flex_t / 15:.2f} |" in report
        and "not reached" in report
    )
    for name in ("results.json", "val_loss_vs_time.png", "val_loss_vs_bytes.png", "step_time.png"):
        assert (tmp_path / name).stat().st_size > 0


def _diloco_family(streaming_peak: float, fragments: int) -> dict[str, dict]:
    """hsdp, DiLoCo (the whole model, 4000 bytes, every 25th step: 160 on average),
    SparseLoCo (a 1/300 burst) and Streaming DiLoCo on ``fragments`` fragments."""
    val = [[10, 3.0], [20, 2.0]]
    run = dict(val=val, step_time=0.2, seconds_per_step=0.2)
    return {
        "hsdp": dict(run, sent=4000.0, peak=4000.0),
        "diloco": dict(run, sent=160.0, peak=4000.0),
        "sparseloco": dict(run, val=[[10, 3.0], [20, 2.05]], sent=20 / 25, peak=20.0),
        "streaming-diloco": dict(
            run, sent=fragments * streaming_peak / 25, peak=streaming_peak,
            knobs={"fragments": fragments},
        ),
    }


def _family_bench(tmp_path: Path, fakes: dict[str, dict], schemes: tuple[str, ...]) -> dict:
    def runner(argv: list[str]) -> int:
        scheme = argv[argv.index("--scheme") + 1]
        _fake_run(Path(argv[argv.index("--out") + 1]), scheme, **fakes[scheme])
        return 0

    cfg = sweep.BenchConfig(schemes=schemes, bandwidths=("100mbit",), out=tmp_path)
    return sweep.run_bench(cfg, runner=runner)


def test_the_peak_bytes_per_sync_are_reported_beside_the_mean(tmp_path):
    fakes = _diloco_family(streaming_peak=250.0, fragments=2)
    results = _family_bench(tmp_path, fakes, ("hsdp", "diloco", "streaming-diloco"))
    rows = {r["scheme"]: r for r in results["rows"]}
    assert rows["diloco"]["inter_node_mb_per_step"] == pytest.approx(160e-6)
    assert rows["diloco"]["peak_mb_per_sync"] == pytest.approx(4000e-6)  # 25x the mean
    assert rows["hsdp"]["peak_mb_per_sync"] == rows["hsdp"]["inter_node_mb_per_step"]
    agg = {a["scheme"]: a for a in results["aggregates"]}
    assert agg["streaming-diloco"]["peak_mb_per_sync"]["mean"] == pytest.approx(250e-6)
    report = (tmp_path / "report.md").read_text()
    assert "| inter-node MB/step | peak MB/sync |" in report
    assert "| 0.0002 | 0.0040 | 25x |" in report  # diloco: mean, peak, compression


def test_streaming_diloco_s_peak_is_judged_against_diloco_s_at_its_own_fragment_count(tmp_path):
    schemes = ("hsdp", "diloco", "streaming-diloco")
    claim = "streaming-diloco peak bytes/sync <= 1/4 of diloco's (100mbit)"
    # 4 fragments: a quarter of the model each, plus a little, misses 1/4; a fifth meets it
    for peak, met in ((1010.0, False), (800.0, True)):
        results = _family_bench(tmp_path / str(peak), _diloco_family(peak, 4), schemes)
        found = {c: (ok, ev) for c, ok, ev in results["targets"]}
        assert found[claim][0] is met
        assert f"{peak / 4000:.4f} of diloco's" in found[claim][1]
    # the same peak meets 1/2 with 2 fragments: the bound is the run's own knob
    results = _family_bench(tmp_path / "f2", _diloco_family(1010.0, 2), schemes)
    two = [(c, ok) for c, ok, _ in results["targets"] if "peak bytes/sync" in c]
    assert two == [("streaming-diloco peak bytes/sync <= 1/2 of diloco's (100mbit)", True)]


def test_no_peak_target_without_diloco_beside_streaming_diloco(tmp_path):
    fakes = _diloco_family(250.0, 2)
    results = _family_bench(tmp_path, fakes, ("hsdp", "streaming-diloco"))
    assert not [c for c, _, _ in results["targets"] if "peak" in c]


def test_sparseloco_is_judged_on_bytes_and_loss_not_on_the_link(tmp_path):
    results = _family_bench(tmp_path, _diloco_family(250.0, 2), ("hsdp", "sparseloco"))
    found = {c: (ok, ev) for c, ok, ev in results["targets"] if c.startswith("sparseloco")}
    assert found["sparseloco inter-node bytes/step <= 1/200 of hsdp (100mbit)"][0] is True
    loss = found["sparseloco final val loss within 3% of hsdp (100mbit)"]
    assert loss[0] is True and loss[1].startswith("+2.5% on the means")
    assert len(found) == 2  # no time-to-target or s/step claim: its bursts are not hidden


def test_runs_recorded_before_the_peak_was_kept_report_none(tmp_path):
    fakes = {k: {**v, "peak": None} for k, v in _diloco_family(250.0, 2).items()}
    results = _family_bench(tmp_path, fakes, ("hsdp", "diloco", "streaming-diloco"))
    assert {r["peak_mb_per_sync"] for r in results["rows"]} == {None}
    assert {a["peak_mb_per_sync"] for a in results["aggregates"]} == {None}
    found = {c: (ok, ev) for c, ok, ev in results["targets"] if "peak" in c}
    assert list(found.values()) == [(None, "no peak bytes recorded")]
    assert "| 0.0002 | — | 25x |" in (tmp_path / "report.md").read_text()


def test_a_failed_run_stops_the_bench(tmp_path):
    cfg = sweep.BenchConfig(schemes=("hsdp",), out=tmp_path)
    with pytest.raises(RuntimeError, match="unshaped-hsdp-seed0 failed with exit status 3"):
        sweep.run_bench(cfg, runner=lambda argv: 3)


def test_node_argv_runs_torchrun_inside_the_namespace():
    cluster = EmulatedCluster(2, run_id="123-abc")
    argv = node_argv(cluster, 1, 2, ["-m", "deto", "train"])
    assert argv[:4] == ["ip", "netns", "exec", "deto-123-abc-n1"]
    assert "GLOO_SOCKET_IFNAME=deto0" in argv and "OMP_NUM_THREADS=1" in argv
    assert "TORCH_CPP_LOG_LEVEL=ERROR" in argv
    i = argv.index("deto.launch.agent")  # torchrun, through the agent that stops quietly
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in argv  # restarts need a fresh store
    assert argv[i + 1 :] == [
        "--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=10.213.0.1:{RENDEZVOUS_PORT}", "--rdzv-id=deto-123-abc",
        "--rdzv-conf=is_host=false", "--local-addr=10.213.0.2", "--max-restarts=0",
        "-m", "deto", "train",
    ]
    argv = node_argv(cluster, 0, 2, ["-m", "deto"], tmp_dir=Path("/t/x"), max_restarts=3)
    assert "TMPDIR=/t/x" in argv and "--max-restarts=3" in argv
    assert "--rdzv-conf=is_host=true" in argv and "--local-addr=10.213.0.1" in argv


def test_a_torchft_node_runs_its_own_world_under_a_host_name_of_its_own():
    from deto.launch import ftcluster
    argv = ftcluster.node_argv(1, 2, ["-m", "deto", "train"], lighthouse="http://h:1",
                              max_restarts=2)  # fmt: skip
    i = argv.index("deto.launch.agent")  # torchrun, through the agent that stops quietly
    assert argv[i + 1 :] == [
        "--standalone", "--nnodes=1", "--nproc-per-node=2", "--max-restarts=2",
        "-m", "deto", "train", "--node-index", "1", "--lighthouse", "http://h:1",
    ]  # fmt: skip
    cluster = EmulatedCluster(2, run_id="123-abc")
    prefix = ftcluster._inside(cluster, 1)
    assert prefix[:4] == ["ip", "netns", "exec", "deto-123-abc-n1"]
    # torchft advertises the host name: inside the node it is the node's own address
    shell = prefix.index("sh")
    assert prefix[4:shell] == ["unshare", "--uts"]
    assert prefix[shell + 3] == "10.213.0.2" and 'hostname "$0"' in prefix[shell + 2]
    assert prefix[shell + 4 :] == ["env", "GLOO_SOCKET_IFNAME=deto0", "TORCH_CPP_LOG_LEVEL=ERROR"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--schemes", "foo"], "Invalid --schemes: unknown scheme 'foo'"),
        (["bench", "--schemes", "hsdp+overlap"], "scheme 'hsdp' has no knob 'overlap'"),
        (["bench", "--schemes", "none,flexdemo+topk"], "topk needs a value (topk=VALUE)"),
        (["bench", "--schemes", "hsdp", "--bandwidth", "10mbps"], "byte units are not accepted"),
    ],
)
def test_bench_bad_input_is_one_line_and_status_2(argv, message, capsys):
    from deto.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deto bench: error:") and message in err[0]


def test_a_variant_runs_its_preset_with_the_knobs_changed(tmp_path):
    assert sweep.variant("flexdemo") == ("flexdemo", [])
    assert sweep.variant("flexdemo+overlap+dense_fallback=false+topk=8") == (
        "flexdemo", ["--overlap", "--no-dense-fallback", "--topk", "8"]
    )
    argv = sweep.train_argv("full+overlap", "3mbit", 1, tmp_path / "r", ["--steps", "5"])
    i = argv.index("--scheme")
    assert argv[i : i + 3] == ["--scheme", "full", "--overlap"]
    assert argv[-4:] == ["--steps", "5", "--bandwidth", "3mbit"]
    assert sweep.run_name("full+overlap", "3mbit", 1) == "3mbit-full+overlap-seed1"
    sweep.check_variant("flexdemo-lean+overlap+values=fp32")  # no error


def test_an_overlapped_variant_is_judged_against_max_of_compute_and_exchange():
    def agg(scheme: str, step: float, mb: float) -> dict:
        return {
            "scheme": scheme, "bandwidth": "8mbit", "step_time_s_median": {"mean": step},
            "inter_node_mb_per_step": {"mean": mb}, "replicas_identical_runs": [1, 1],
        }  # fmt: skip

    # compute 0.2 s; 0.25 MB per step over 8 Mbit/s is 0.25 s of exchange; their sum is 0.45 s
    group = [agg("none", 0.2, 0.0), agg("flexdemo+topk=8", 0.45, 0.25)]
    hidden = sweep.targets([*group, agg("flexdemo+topk=8+overlap", 0.27, 0.25)])
    claim, met, evidence = hidden[0]
    assert claim == "flexdemo+topk=8+overlap s/step <= 1.1 x max(compute, exchange) (8mbit)"
    assert met is True and "0.250 s exchange" in evidence and "without overlap: 0.450 s" in evidence
    exposed = sweep.targets([*group, agg("flexdemo+topk=8+overlap", 0.3, 0.25)])
    assert exposed[0][1] is False  # above 1.1 x 0.25 s


def test_auto_is_judged_against_the_fastest_fixed_preset_beside_it():
    def agg(scheme: str, seconds: float | None) -> dict:
        return {
            "scheme": scheme, "bandwidth": "25mbit", "seeds": [0, 1],
            "reached_target": 0 if seconds is None else 2,
            "time_to_target_s": None if seconds is None else {"mean": seconds},
            "replicas_identical_runs": [2, 2],
        }  # fmt: skip

    rows = [{"scheme": "auto", "bandwidth": "25mbit", "auto_choice": c}
            for c in ("flexdemo", "flexdemo+overlap")]  # fmt: skip
    group = [agg("hsdp", 90.0), agg("full", 40.0), agg("diloco+every=5", 30.0),
             agg("none", None), agg("diloco", None)]  # fmt: skip
    claim, met, evidence = sweep.targets([*group, agg("auto", 38.0)], rows=rows)[0]
    assert claim == "auto reaches the target no later than the best fixed preset (25mbit)"
    assert met is True  # a variant is not a fixed preset; full is the best of them
    assert "full's 40.0 s" in evidence and "flexdemo (1x), flexdemo+overlap (1x)" in evidence
    assert sweep.targets([*group, agg("auto", 41.0)], rows=rows)[0][1] is False
    assert sweep.targets([*group, agg("auto", None)], rows=rows)[0][1] is False


def test_bench_passes_arguments_after_the_separator_to_every_run(tmp_path, monkeypatch):
    from deto import cli

    seen = {}

    def fake(cfg, **kw):
        seen["cfg"] = cfg
        (cfg.out).mkdir(parents=True, exist_ok=True)
        (cfg.out / "report.md").write_text("# deto bench\n")
        return {"runs": []}

    monkeypatch.setattr(sweep, "run_bench", fake)
    assert cli.main(
        ["bench", "--schemes", "hsdp,none", "--out", str(tmp_path / "b"), "--", "--steps", "5"]
    ) == 0
    cfg = seen["cfg"]
    assert (
        cfg.schemes == ("hsdp", "none")
        and cfg.bandwidths == (None,)
        and cfg.train_args == ("--steps", "5")
    )


def _seeded_runner(fakes: dict[tuple[str, int], dict]):
    def runner(argv: list[str]) -> int:
        out = Path(argv[argv.index("--out") + 1])
        scheme, seed = argv[argv.index("--scheme") + 1], int(argv[argv.index("--seed") + 1])
        _fake_run(out, scheme, **fakes[(scheme, seed)])
        return 0

    return runner


def test_seeds_give_means_and_spreads_and_the_targets_are_judged_on_the_means(tmp_path):
    # flexdemo's final loss is 8% above hsdp's in seed 1 and below it in seeds 0 and 2: one
    # seed alone would miss the 2% target, the mean over seeds meets it
    hsdp_final, flex_final = [2.0, 2.0, 2.0], [1.9, 2.16, 1.94]
    fakes = {}
    for seed in range(3):
        fakes[("hsdp", seed)] = dict(
            val=[[10, 3.0], [20, hsdp_final[seed]]],
            step_time=1.0,
            sent=4000.0,
            seconds_per_step=1.0 + 0.1 * seed,
        )
        fakes[("flexdemo", seed)] = dict(
            val=[[10, 2.4], [20, flex_final[seed]]],
            step_time=0.2 + 0.01 * seed,
            sent=20.0,
            seconds_per_step=0.2,
        )
        fakes[("none", seed)] = dict(
            val=[[10, 3.5], [20, 3.0]], step_time=0.19, sent=0.0, seconds_per_step=0.19
        )
    cfg = sweep.BenchConfig(
        schemes=("hsdp", "flexdemo", "none"), bandwidths=("100mbit",), seeds=(0, 1, 2), out=tmp_path
    )
    results = sweep.run_bench(cfg, runner=_seeded_runner(fakes))
    assert sorted({(r["scheme"], r["seed"]) for r in results["rows"]}) == sorted(fakes)
    agg = {a["scheme"]: a for a in results["aggregates"]}
    flex = agg["flexdemo"]
    assert flex["seeds"] == [0, 1, 2]
    assert flex["final_val_loss"]["mean"] == pytest.approx(2.0)
    assert (flex["final_val_loss"]["min"], flex["final_val_loss"]["max"]) == (1.9, 2.16)
    assert flex["final_val_loss"]["std"] == pytest.approx(statistics.stdev(flex_final))
    # per seed, hsdp reaches its own target (2.5) at 15 steps; flexdemo at 10 steps of 0.2 s
    hsdp_times = [15 * (1.0 + 0.1 * s) for s in range(3)]
    assert agg["hsdp"]["time_to_target_s"]["mean"] == pytest.approx(statistics.fmean(hsdp_times))
    assert flex["time_to_target_vs_hsdp"] == pytest.approx(2.0 / statistics.fmean(hsdp_times))
    assert flex["time_to_target_vs_hsdp_per_seed"]["max"] == pytest.approx(2.0 / 15)
    assert flex["step_time_vs_none"] == pytest.approx(0.21 / 0.19 - 1)
    met = {claim: ok for claim, ok, _ in results["targets"]}
    evidence = {claim: ev for claim, _, ev in results["targets"]}
    loss_claim = "flexdemo final val loss within 2% of hsdp (100mbit)"
    assert met[loss_claim] is True and "1.9000–2.1600 over 3 seeds" in evidence[loss_claim]
    assert (
        "per seed 0.11–0.13"
        in evidence["flexdemo reaches the target in <= 1/3 of hsdp's time (100mbit)"]
    )
    report = (tmp_path / "report.md").read_text()
    assert "| flexdemo | 2.0000 (1.9000–2.1600, σ 0.1400) |" in report
    assert "| flexdemo | 1 | 2.1600 |" in report  # the per-seed table
    for name in ("val_loss_vs_time.png", "val_loss_vs_bytes.png", "step_time.png"):
        assert (tmp_path / name).stat().st_size > 0
    # results.json alone redraws the report: every run keeps its trace
    assert bench_report.markdown(json.loads((tmp_path / "results.json").read_text())) == report


def test_a_scheme_that_misses_the_target_in_one_seed_misses_the_time_target(tmp_path):
    fakes = {}
    for seed in range(2):
        fakes[("hsdp", seed)] = dict(
            val=[[10, 3.0], [20, 2.0]], step_time=1.0, sent=4000.0, seconds_per_step=1.0
        )
        flex_end = 2.0 if seed == 0 else 2.9  # seed 1 never reaches hsdp's 2.5
        fakes[("flexdemo", seed)] = dict(
            val=[[10, 3.0], [20, flex_end]], step_time=0.2, sent=20.0, seconds_per_step=0.2
        )
    cfg = sweep.BenchConfig(
        schemes=("hsdp", "flexdemo"), bandwidths=("100mbit",), seeds=(0, 1), out=tmp_path
    )
    results = sweep.run_bench(cfg, runner=_seeded_runner(fakes))
    claim = "flexdemo reaches the target in <= 1/3 of hsdp's time (100mbit)"
    ((met, evidence),) = [(ok, ev) for c, ok, ev in results["targets"] if c == claim]
    assert met is False and evidence == "reached the target in 1 of 2 seeds"
    assert "reached in 1/2" in (tmp_path / "report.md").read_text()


def test_results_written_before_seeds_and_traces_still_load():
    entry = {
        "scheme": "hsdp",
        "bandwidth": "1gbit",
        "summary": {
            "config": {"seed": 3},
            "train_loss": [[10, 4.5], [20, 4.0]],
            "val_loss": [[20, 4.1]],
        },
    }
    run = sweep.run_from_entry(entry)
    assert run.seed == 3
    assert run.records == [
        {"step": 10, "train_loss": 4.5},
        {"step": 20, "train_loss": 4.0, "val_loss": 4.1},
    ]
    records = [
        {"step": 1, "train_loss": 2.0, "lr": 0.1},
        {"step": 2, "train_loss": 1.5, "val_loss": 1.7},
    ]
    back = sweep.records_from_trace(sweep.trace(records))
    assert back == [{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5, "val_loss": 1.7}]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--seeds", "0,x"], "Invalid --seeds: '0,x'"),
        (["bench", "--seeds", "1,1"], "Invalid --seeds: '1,1'"),
        (["bench", "--", "--seed", "3"], "give seeds with deto bench --seeds"),
        (["bench", "--steps-fraction", "0.5"], "--steps-fraction applies to --reproduce only"),
    ],
)
def test_bench_seed_options_refuse_bad_input(argv, message, capsys):
    from deto.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_failed_shaped_node_is_told_by_its_ranks_cause(tmp_path):
    (tmp_path / "node1.log").write_text(
        "W1128 torch noise\n"
        "deto train: error: node 1, rank 3: a peer closed its connection (RuntimeError: "
        "Connection closed by peer [10.213.0.1]:1); see that peer's error\n"
        "deto train: error: node 1, rank 2: the disk is full (OSError: [Errno 28] No space "
        "left on device); free space under --out or point --out elsewhere\n"
    )
    assert node_failure(tmp_path, 1) == (
        "node 1, rank 2: the disk is full (OSError: [Errno 28] No space left on device); free "
        f"space under --out or point --out elsewhere (logs of nodes 1 and up: {tmp_path})"
    )
    (tmp_path / "node1.log").write_text("Traceback (most recent call last):\n")
    assert node_failure(tmp_path, 1).startswith("a node exited with status 1 (node 0's output")
