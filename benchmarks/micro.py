"""Microbenchmark: each replicator's local work per step, on the shard shapes of a model.

One process, no network: collectives are replaced by a loopback that keeps their local work
(packing, unpacking, one copy of the payload per node), so what is timed is what a rank
computes per step besides forward, backward and the wire. Contenders run in interleaved rounds
(every contender once per round), so a busy machine slows them alike; ratios are taken per
round and reported with their spread, on wall-clock time and on the thread's CPU time (which
a loaded machine inflates far less).

    python -m benchmarks.micro                        # byte GPT 4x256, 2 ranks per node, 2 nodes
    python -m benchmarks.micro --only demo,demo-lean --reference ~/src/DeToNATION
    python -m benchmarks.micro --baseline-src ../old/src --only demo,demo-lean

``--reference`` takes a checkout of the reference implementation (its ``detonation`` package
and its dependencies importable); it runs in this process, once at the block settings of each
DeMo contender (see :func:`reference_settings`). ``--baseline-src`` takes another deto's
``src`` folder; its contenders run in a child process, in the same rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("benchmarks.micro")

REPO = Path(__file__).resolve().parent.parent
# name -> (registry name, options)
CONTENDERS: dict[str, tuple[str, dict[str, Any]]] = {
    "demo": ("demo", {}),  # DeMo()'s defaults, the flexdemo preset's: 1-D, top 4 of 64, int2
    "demo-lean": ("demo", {"blocks": "2d", "chunk": 32, "topk": 14, "values": "int8"}),
    "demo-1d-top4-fp32": ("demo", {"values": "fp32"}),  # the reference's settings, fp32 values
    "random": ("random", {}),
    "striding": ("striding", {}),
    "slicing": ("slicing", {}),
    "full": ("full", {}),
    "diloco": ("diloco", {"every": 1}),
}


def reference_settings(name: str) -> tuple[str, int, int] | None:
    """``(blocks, chunk, topk)`` at which the reference runs beside DeMo contender ``name``
    (``None`` for other replicators). The reference always sends fp32 values with int32
    indices; it has no value codecs."""
    kind, options = CONTENDERS[name]
    if kind != "demo":
        return None
    from deto.replicators.demo import DeMoOptions

    demo = DeMoOptions(**options)
    return demo.blocks, demo.chunk, demo.topk


def reference_label(settings: tuple[str, int, int]) -> str:
    blocks, chunk, topk = settings
    return f"reference-{blocks}-{chunk}-top{topk}"


# -- shard shapes ----------------------------------------------------------------------------
def model_shapes(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of a named model, built on the meta device (no memory).

    ``bytegpt-LxD``: deto's byte GPT with L layers of width D (sequence length 64).
    """
    match = re.fullmatch(r"bytegpt-(\d+)x(\d+)", model)
    if match is None:
        raise ValueError(f"Invalid model: {model!r} (expected bytegpt-LAYERSxWIDTH)")
    from deto.run.models import ByteGPT, TransformerShape

    shape = TransformerShape(d_model=int(match[2]), layers=int(match[1]))
    with torch.device("meta"):
        net = ByteGPT(64, shape)
    return [(n, tuple(p.shape)) for n, p in net.named_parameters()]


def shard_shape(shape: tuple[int, ...], ranks: int, rank: int = 0) -> tuple[int, ...]:
    """FSDP2's dim-0 shard of ``shape`` on ``rank``: ``ceil(n / ranks)`` rows, the rest last."""
    if not shape:
        return shape
    rows = math.ceil(shape[0] / ranks)
    return (max(0, min(rows, shape[0] - rank * rows)),) + shape[1:]


# -- loopback collectives --------------------------------------------------------------------
def loopback_comm(nodes: int) -> Any:
    """A :class:`deto.comm.Comm` whose collectives keep their local work but send nothing.

    Every node's payload is this node's own, so decoding does the work of ``nodes`` payloads.
    """
    from deto.comm import Comm

    class Loopback:
        """A :class:`deto.comm.Transport` that hands this node's bytes back as every node's."""

        size, rank = nodes, 0

        def all_reduce_sum(self, flat: torch.Tensor, async_op: bool = False) -> None:
            flat.mul_(self.size)

        def all_gather(
            self, out: torch.Tensor, buffer: torch.Tensor, async_op: bool = False
        ) -> None:
            out.copy_(buffer.repeat(self.size))

        def broadcast(self, buffer: torch.Tensor, src: int) -> None:
            return None

    return Comm(transport=Loopback())


# -- contenders ------------------------------------------------------------------------------
# one step's (wall-clock seconds, this thread's CPU seconds)
Timing = tuple[float, float]


class Contender:
    """Something that does one step's local work; :meth:`run` times ``steps`` of them."""

    def __init__(self, label: str, step: Callable[[int], None]) -> None:
        self.label, self._step, self._count = label, step, 0

    def run(self, steps: int) -> list[Timing]:
        times = []
        for _ in range(steps):
            wall, cpu = time.perf_counter(), time.thread_time()
            self._step(self._count)
            times.append((time.perf_counter() - wall, time.thread_time() - cpu))
            self._count += 1
        return times


def _gradients(
    shapes: list[tuple[int, ...]], seed: int, device: str = "cpu"
) -> list[list[torch.Tensor]]:
    """Two gradient sets to alternate, drawn once so no random numbers are timed."""
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=g) * 1e-2).to(device) for s in shapes] for _ in range(2)]


def deto_contender(
    name: str, shapes: list[tuple[str, tuple[int, ...]]], nodes: int, device: str = "cpu"
) -> Contender:
    """A deto replicator, by contender name, bound to parameters of ``shapes`` on ``device``
    (on CUDA each step waits for its kernels, so the time is the work's, not the launches')."""
    import deto
    from deto.replicators.base import ParamReplicator, Slot

    kind, options = CONTENDERS[name]
    rep = deto.make_replicator(kind, **options)
    params = [torch.zeros(s, device=device) for _, s in shapes]
    rep.bind([Slot(i, n, p) for i, ((n, _), p) in enumerate(zip(shapes, params, strict=True))])
    comm = loopback_comm(nodes)
    positions = list(range(len(params)))
    lrs = [1e-3] * len(params)
    grads = _gradients([s for _, s in shapes], 0, device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None

    if isinstance(rep, ParamReplicator):

        def step(i: int) -> None:
            for p, g in zip(params, grads[i % 2], strict=True):
                p.sub_(g)  # an inner step moved the parameters
            rep.after_step(comm)
            sync()
    else:

        def step(i: int) -> None:
            rep.replicate(positions, grads[i % 2], lrs, comm)
            sync()

    return Contender(name, step)


def reference_contender(
    path: str,
    shapes: list[tuple[str, tuple[int, ...]]],
    nodes: int,
    settings: tuple[str, int, int],
) -> Contender:
    """The reference implementation's DeMo replicator at ``(blocks, chunk, topk)``.

    ``1d`` hands it flat shards (its FSDP1 layout), which it cuts into chunks; ``2d`` hands
    it the shards in their own shapes, which it cuts into 2-D blocks (1-D tensors in chunks).
    """
    blocks, chunk, topk = settings
    path = str(Path(path).expanduser())
    if path not in sys.path:
        sys.path.insert(0, path)
    from detonation.repl import demo_replicator  # type: ignore[import-not-found]

    def all_gather(
        outs: list[torch.Tensor], t: torch.Tensor, group: Any = None, async_op: bool = False
    ) -> Any:
        for o in outs:
            o.copy_(t)
        return types.SimpleNamespace(wait=lambda: None)

    demo_replicator.dist = types.SimpleNamespace(all_gather=all_gather)
    layout = [(math.prod(s),) if blocks == "1d" else s for _, s in shapes]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in layout]
    group = {"params": params, "lr": 1e-3}
    optim = types.SimpleNamespace(
        param_groups=[group],
        state={p: {} for p in params},
        replication_parallel_group=types.SimpleNamespace(size=lambda: nodes),
    )
    rep = demo_replicator.DeMoReplicator(compression_topk=topk, compression_chunk=chunk)
    with contextlib.redirect_stdout(sys.stderr):  # it prints its chunk sizes
        rep.init(optim)
    grads = [
        [g.reshape(s) for g, s in zip(gs, layout, strict=True)]
        for gs in _gradients([s for _, s in shapes], 0)
    ]

    def step(i: int) -> None:
        rep.pre_step()
        for p, g in zip(params, grads[i % 2], strict=True):
            rep.replicate(g, p, optim.state[p], group)
        rep.post_step()

    return Contender(reference_label(settings), step)


class RemoteContender:
    """A contender living in a child process that runs another deto (``--baseline-src``)."""

    def __init__(self, worker: subprocess.Popen[str], name: str) -> None:
        self.label, self._worker, self._name = f"baseline:{name}", worker, name

    def run(self, steps: int) -> list[Timing]:
        assert self._worker.stdin is not None and self._worker.stdout is not None
        self._worker.stdin.write(json.dumps({"run": self._name, "steps": steps}) + "\n")
        self._worker.stdin.flush()
        return [(wall, cpu) for wall, cpu in json.loads(self._worker.stdout.readline())]


def start_baseline(
    src: str, names: list[str], args: argparse.Namespace
) -> tuple[subprocess.Popen[str], list[RemoteContender]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(src).resolve()), str(REPO)]))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.micro",
        "--serve",
        "--model",
        args.model,
        "--nodes",
        str(args.nodes),
        "--ranks-per-node",
        str(args.ranks_per_node),
        "--only",
        ",".join(names),
    ]
    worker = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert worker.stdout is not None
    ready = json.loads(worker.stdout.readline())
    return worker, [RemoteContender(worker, n) for n in ready["contenders"]]


def serve(args: argparse.Namespace) -> None:
    """Child side of ``--baseline-src``: build the contenders, then time them on request."""
    torch.set_num_threads(1)
    shapes = rank_shapes(args)
    contenders = {n: deto_contender(n, shapes, args.nodes) for n in args.only}
    for c in contenders.values():
        c.run(args.warmup)
    print(json.dumps({"contenders": list(contenders)}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(contenders[request["run"]].run(request["steps"])), flush=True)


# -- running and reporting -------------------------------------------------------------------
def rank_shapes(args: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, shard_shape(s, args.ranks_per_node)) for n, s in model_shapes(args.model)]


def interleave(contenders: list[Any], rounds: int, steps: int) -> dict[str, list[list[Timing]]]:
    """Per contender, per round, the step times; every contender runs once per round."""
    times: dict[str, list[list[Timing]]] = {c.label: [] for c in contenders}
    for r in range(rounds):
        for c in contenders if r % 2 == 0 else contenders[::-1]:
            times[c.label].append(c.run(steps))
    return times


def _quartiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3


def summarize(
    times: dict[str, list[list[Timing]]], elements: int, pairs: list[tuple[str, str]]
) -> dict[str, Any]:
    """Per contender the step-time quartiles; per ``(slower, faster)`` pair the speedups, a
    ratio of medians per round, on the wall clock and on CPU time."""
    rows = []
    for label, per_round in times.items():
        wall = _quartiles(sorted(t[0] for r in per_round for t in r))
        cpu = _quartiles(sorted(t[1] for r in per_round for t in r))
        rows.append(
            {
                "contender": label,
                "ms_median": 1e3 * wall[1],
                "ms_p25": 1e3 * wall[0],
                "ms_p75": 1e3 * wall[2],
                "cpu_ms_median": 1e3 * cpu[1],
                "elements_per_s": elements / wall[1],
                "steps": sum(len(r) for r in per_round),
            }
        )
    ratios = []
    for slow, fast in pairs:
        entry: dict[str, Any] = {"slower": slow, "faster": fast}
        for clock, key in ((0, "speedup"), (1, "cpu_speedup")):
            per_round = sorted(
                statistics.median(t[clock] for t in a) / statistics.median(t[clock] for t in b)
                for a, b in zip(times[slow], times[fast], strict=True)
            )
            entry[f"{key}_median"] = statistics.median(per_round)
            entry[f"{key}_min"], entry[f"{key}_max"] = per_round[0], per_round[-1]
        ratios.append(entry)
    return {"results": rows, "speedups": ratios}


def markdown(report: dict[str, Any]) -> str:
    """The report as the tables that ``report.md`` holds."""
    env = report["environment"]
    lines = [
        f"# Local work per step: {report['model']}, {report['elements_per_rank']:,} elements per "
        f"rank, {report['nodes']} nodes' payloads",
        "",
        f"{env['date']}, deto {env['git_sha'][:10]}, torch {env['torch']}, {env['cpu']} "
        f"({env['cpus']} CPUs, {env['threads']} thread, "
        f"load average {env['load_average'][0]:.1f}); "
        f"{report['rounds']} interleaved rounds x {report['steps_per_round']} steps.",
        "",
        "| contender | ms/step (median) | p25 | p75 | CPU ms/step (median) | elements/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['contender']} | {r['ms_median']:.1f} | {r['ms_p25']:.1f} | {r['ms_p75']:.1f} | "
        f"{r['cpu_ms_median']:.1f} | {r['elements_per_s']:.3g} |"
        for r in report["results"]
    ]
    if report["speedups"]:
        lines += [
            "",
            "| faster | slower | speedup (median of rounds) | range over rounds "
            "| CPU-time speedup | range |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {s['faster']} | {s['slower']} | {s['speedup_median']:.2f}x | "
            f"{s['speedup_min']:.2f}-{s['speedup_max']:.2f}x | {s['cpu_speedup_median']:.2f}x | "
            f"{s['cpu_speedup_min']:.2f}-{s['cpu_speedup_max']:.2f}x |"
            for s in report["speedups"]
        ]
    return "\n".join(lines) + "\n"


def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown"
    import deto

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_sha": sha,
        "deto": getattr(deto, "__version__", "unknown"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.micro", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", default="bytegpt-4x256", help="bytegpt-LAYERSxWIDTH")
    p.add_argument("--nodes", type=int, default=2, help="payloads decoded per step")
    p.add_argument("--ranks-per-node", type=int, default=2, help="FSDP2 shards per node")
    p.add_argument(
        "--only",
        type=lambda s: s.split(","),
        default=list(CONTENDERS),
        help=f"comma-separated contenders (default all: {','.join(CONTENDERS)})",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where deto's contenders run (the reference stays on the CPU)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="timed steps per contender per round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reference", help="checkout of the reference implementation (DeToNATION)")
    p.add_argument("--baseline-src", help="another deto's src folder, timed in a child process")
    p.add_argument("--out", help="folder for micro.json and report.md")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.only) - set(CONTENDERS))
    if unknown:
        p.error(f"unknown contenders {unknown} (valid: {', '.join(CONTENDERS)})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.serve:
        serve(args)
        return {}
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    shapes = rank_shapes(args)
    elements = sum(math.prod(s) for _, s in shapes)
    contenders: list[Any] = [
        deto_contender(n, shapes, args.nodes, args.device) for n in args.only
    ]
    pairs: list[tuple[str, str]] = []
    if args.reference:
        demos = {n: reference_settings(n) for n in args.only}
        for settings in dict.fromkeys(s for s in demos.values() if s is not None):
            contenders.append(reference_contender(args.reference, shapes, args.nodes, settings))
        pairs += [(reference_label(s), n) for n, s in demos.items() if s is not None]
    worker = None
    if args.baseline_src:
        worker, remote = start_baseline(args.baseline_src, args.only, args)
        contenders += remote
        pairs += [(r.label, r.label.split(":", 1)[1]) for r in remote]
    for c in contenders:
        if not isinstance(c, RemoteContender):
            c.run(args.warmup)
    try:
        times = interleave(contenders, args.rounds, args.steps)
    finally:
        if worker is not None:
            assert worker.stdin is not None
            worker.stdin.close()
            worker.wait()
    report = {
        "environment": environment(),
        "model": args.model,
        "device": args.device,
        "nodes": args.nodes,
        "ranks_per_node": args.ranks_per_node,
        "elements_per_rank": elements,
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        **summarize(times, elements, pairs),
    }
    logger.info(
        "%s, %d elements per rank, %d nodes' payloads, %d rounds x %d steps",
        args.model,
        elements,
        args.nodes,
        args.rounds,
        args.steps,
    )
    columns = ("contender", "ms/step", "p25", "p75", "CPU ms", "elements/s")
    logger.info("%-28s %10s %10s %10s %10s %14s", *columns)
    for r in report["results"]:
        logger.info(
            "%-28s %10.2f %10.2f %10.2f %10.2f %14.3g",
            r["contender"],
            r["ms_median"],
            r["ms_p25"],
            r["ms_p75"],
            r["cpu_ms_median"],
            r["elements_per_s"],
        )
    for s in report["speedups"]:
        logger.info(
            "%s is %.2fx faster than %s (per-round range %.2f-%.2f; CPU time %.2fx, %.2f-%.2f)",
            s["faster"],
            s["speedup_median"],
            s["slower"],
            s["speedup_min"],
            s["speedup_max"],
            s["cpu_speedup_median"],
            s["cpu_speedup_min"],
            s["cpu_speedup_max"],
        )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "micro.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "report.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
