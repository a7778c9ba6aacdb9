"""``deto selftest``: the checks a machine with a GPU should run first, ready before one exists.

No line of deto had run on CUDA when this was written, and a lent GPU machine gives minutes,
not hours, so the checks are one prepared script: each reports pass, fail or skip with its
reason, its seconds and its numbers, and the whole writes ``results.json`` and ``report.md``.
``--device cpu`` runs the same steps on the CPU (a dry run, so the script itself cannot rot).

On a machine where deto is not installed (the GPU machine has torch but no registry), it runs
from a checkout as ``PYTHONPATH=src python3 -m deto selftest --device cuda``
(``make gpu-check``): everything here needs only torch and the standard library, and the
integration checks skip where their framework is missing.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deto
from deto.run import provenance

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
STEPS = 4
LR = 1e-3
ATOL = 2e-4
"""Largest |device - CPU| difference a parameter may show after the replicator runs. Four AdamW
steps move a weight by at most ~4e-3; summation order differs between devices, and a top-k tie
broken the other way moves single weights by about one step, so 2e-4 separates rounding from a
wrong result."""
SUBPROCESS_TIMEOUT_S = 240

REPLICATORS: dict[str, Callable[[], deto.Replicator]] = {
    "demo-1d": lambda: deto.DeMo(topk=4, chunk=16),
    "demo-2d": lambda: deto.DeMo(topk=8, chunk=8, blocks="2d", values="int8"),
    "demo-overlap": lambda: deto.DeMo(topk=4, chunk=16, overlap=True),
    "full": lambda: deto.Full(),
    "diloco": lambda: deto.DiLoCo(every=2),
    "sparseloco": lambda: deto.DiLoCo(every=2, compress="topk", topk=4, chunk=16),
    "streaming-diloco": lambda: deto.StreamingDiLoCo(every=2, fragments=2),
}


@dataclass
class Check:
    """One check's outcome."""

    name: str
    status: str = "pass"  # pass, fail or skip
    reason: str = ""
    seconds: float = 0.0
    numbers: dict[str, Any] = field(default_factory=dict)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))


def replicated_params(
    name: str, device: str, initial: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    """Node 0's parameters after ``STEPS`` steps of replicator ``name`` on 2 simulated nodes."""

    def node(comm: deto.Comm) -> list[torch.Tensor]:
        model = _net().to(device)
        model.load_state_dict(initial)
        base = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
        names: dict[torch.Tensor, str] = {p: n for n, p in model.named_parameters()}
        opt = deto.DecoupledOptimizer(base, [REPLICATORS[name]()], comm, param_names=names)
        for t in range(STEPS):
            g = torch.Generator().manual_seed(100 * t + comm.rank)
            x = torch.randn(16, 32, generator=g).to(device)
            model(x).sub(x.flip(1)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        with opt.consensus():
            return [p.detach().cpu().clone() for p in model.parameters()]

    return deto.FakeComm(nodes=2, timeout_s=120).run(node)[0]


def check_replicators(device: str) -> list[Check]:
    """Each replicator on ``device``: bitwise equal over two runs, and equal to CPU within
    :data:`ATOL`."""
    torch.manual_seed(0)
    initial = _net().state_dict()  # built once: the nodes' threads share torch's RNG
    out = []
    for name in REPLICATORS:
        check, start = Check(f"replicator {name}"), time.perf_counter()
        try:
            first = replicated_params(name, device, initial)
            second = replicated_params(name, device, initial)
            on_cpu = replicated_params(name, "cpu", initial)
            deterministic = all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
            diff = max(float((a - b).abs().max()) for a, b in zip(first, on_cpu, strict=True))
            check.numbers = {"deterministic": deterministic, "max_abs_diff_vs_cpu": diff,
                             "atol": ATOL}
            if not deterministic or diff > ATOL:
                check.status = "fail"
                check.reason = ("two runs differ" if not deterministic
                                else f"differs from CPU by {diff:.2e} > {ATOL:.0e}")
        except Exception as exc:  # noqa: BLE001 - a failing check is reported, not raised
            check.status, check.reason = "fail", f"{type(exc).__name__}: {exc}"
        check.seconds = time.perf_counter() - start
        out.append(check)
    return out


def check_local_work(device: str) -> Check:
    """DeMo's local work per step (select, encode, decode, error feedback) on the byte GPT
    4x256's shard shapes at 2 ranks per node, on ``device`` and on the CPU, interleaved."""
    check, start = Check("demo local work"), time.perf_counter()
    shapes = [(768, 256)] * 4 + [(512, 1024)] * 4 + [(128, 256)] * 4 + [(128,)] * 20
    timings: dict[str, list[float]] = {device: [], "cpu": []}  # one entry on a CPU dry run
    try:
        reps = {}
        for where in timings:
            rep = deto.DeMo()
            rep.bind([deto.replicators.base.Slot(i, f"p{i}", torch.zeros(s, device=where))
                      for i, s in enumerate(shapes)])
            reps[where] = rep
        comm = deto.Comm(None, 1)
        positions = list(range(len(shapes)))
        for round_ in range(6):
            for where, rep in reps.items():
                grads = [torch.randn(s, device=where) for s in shapes]
                _sync(where)
                t0 = time.perf_counter()
                rep.replicate(positions, grads, [LR] * len(shapes), comm)
                _sync(where)
                if round_ >= 2:  # the first rounds warm caches and kernels up
                    timings[where].append(time.perf_counter() - t0)
        ms = {w: 1000 * sorted(t)[len(t) // 2] for w, t in timings.items()}
        check.numbers = {"elements": sum(torch.Size(s).numel() for s in shapes),
                         **{f"ms_per_step_{w}": v for w, v in ms.items()},
                         "reference": "not run: python -m benchmarks.micro --reference PATH "
                                      "compares with the reference implementation"}
    except Exception as exc:  # noqa: BLE001
        check.status, check.reason = "fail", f"{type(exc).__name__}: {exc}"
    check.seconds = time.perf_counter() - start
    return check


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cluster_shape(device: str) -> tuple[int, int]:
    """Nodes x ranks per node that ``device`` can host on this machine (NCCL: a GPU a rank)."""
    if device == "cpu":
        return 2, 2
    gpus = torch.cuda.device_count()
    if gpus >= 4:
        return 2, 2
    return (2, 1) if gpus >= 2 else (1, 1)


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)


def check_training(device: str, scheme: str, work: Path) -> Check:
    """``deto train`` end to end (FSDP2 inside a node, ``scheme`` across nodes) on ``device``."""
    nodes, per_node = cluster_shape(device)
    check, start = Check(f"deto train {scheme} {nodes}x{per_node}"), time.perf_counter()
    out = work / f"train-{scheme}"
    proc = _run([sys.executable, "-m", "deto", "train", "-q", "--scheme", scheme,
                 "--device", device, "--nodes", str(nodes), "--ranks-per-node", str(per_node),
                 "--steps", "6", "--eval-every", "6", "--log-every", "2", "--out", str(out)],
                work)
    summary = out / "summary.json"
    if proc.returncode or not summary.is_file():
        check.status = "fail"
        check.reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    else:
        s = json.loads(summary.read_text())
        check.numbers = {k: s.get(k) for k in (
            "final_val_loss", "replicas_identical", "inter_node_bytes_sent_per_step",
            "peak_rss_mb_per_rank")}
        if s.get("replicas_identical") is False:
            check.status, check.reason = "fail", "replicas differ across nodes"
    check.seconds = time.perf_counter() - start
    return check


def check_example(device: str, example: str, module: str, work: Path) -> Check:
    """An integration's example under torchrun for a few steps (skipped without its framework)."""
    check, start = Check(f"integration {example}"), time.perf_counter()
    try:
        __import__(module)
    except ImportError:
        check.status, check.reason = "skip", f"{module} is not installed"
        return check
    nodes, per_node = cluster_shape(device)
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                 str(nodes * per_node), str(REPO / "examples" / example), "--out",
                 str(work / example), "--steps", "4"], work)
    if proc.returncode:
        check.status = "fail"
        check.reason = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    else:
        check.numbers = {"last_line": (proc.stdout.strip().splitlines() or [""])[-1][:200]}
    check.seconds = time.perf_counter() - start
    return check


def check_torchtitan(device: str) -> Check:
    check, start = Check("integration torchtitan"), time.perf_counter()
    try:
        from deto.integrations.torchtitan import run_torchtitan_check

        found = run_torchtitan_check(device)
    except ImportError as exc:
        check.status, check.reason = "skip", str(exc).splitlines()[0]
    except RuntimeError as exc:
        check.status, check.reason = "skip", str(exc).splitlines()[0]
    else:
        check.numbers = {k: found.get(k) for k in ("replicas_identical", "resume_bitwise")}
        if not (found.get("replicas_identical") and found.get("resume_bitwise")):
            check.status, check.reason = "fail", "replicas differ or the resume is not exact"
    check.seconds = time.perf_counter() - start
    return check


def peak_memory(device: str) -> Check:
    """This process's peak memory over the checks: the device's allocator, or the CPU's RSS."""
    if device.startswith("cuda"):
        return Check("peak memory", numbers={"cuda_max_allocated_mb":
                                             torch.cuda.max_memory_allocated() / 1e6})
    return Check("peak memory", numbers={
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3})


def run_selftest(device: str, out: Path | None, *, quick: bool = False) -> int:
    """Run every check on ``device``; write results.json and report.md; 1 if any failed.

    ``quick`` keeps the in-process checks only (replicators, local work, memory): the CI dry
    run; the full run adds ``deto train`` and the integrations in child processes.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible (torch.cuda.is_available())")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    if out is None:
        slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
        out = REPO / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-gpu-{slug}"
    out.mkdir(parents=True, exist_ok=True)
    checks: list[Check] = []

    def record(found: Check | list[Check]) -> None:
        for c in found if isinstance(found, list) else [found]:
            checks.append(c)
            logger.info("selftest: %-34s %-4s %6.1f s %s", c.name, c.status, c.seconds,
                        c.reason or json.dumps(c.numbers, default=str)[:160])

    record(check_replicators(device))
    record(check_local_work(device))
    if not quick:
        with tempfile.TemporaryDirectory(prefix="deto-selftest-") as tmp:
            work = Path(tmp)
            for scheme in ("flexdemo", "full"):
                record(check_training(device, scheme, work))
            record(check_example(device, "hf_trainer.py", "transformers", work))
            record(check_example(device, "lightning_fit.py", "lightning", work))
            record(check_torchtitan(device))
    record(peak_memory(device))
    failed = [c.name for c in checks if c.status == "fail"]
    result = {"device": device, "device_name": name, "quick": quick,
              "provenance": provenance.collect(), "checks": [asdict(c) for c in checks],
              "failed": failed}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "report.md").write_text(report(result))
    logger.info("selftest: %d checks, %d failed; results in %s", len(checks), len(failed), out)
    return 1 if failed else 0


def report(result: dict[str, Any]) -> str:
    git = result["provenance"].get("git") or {}  # a copied tree may have no .git
    sha = git.get("sha")
    lines = [
        f"# deto selftest on {result['device_name']} ({result['device']})", "",
        f"- git: {sha}{' (dirty)' if git.get('dirty') else ''}" if sha
        else "- git: not run from a git checkout",
        f"- torch {torch.__version__}, deto {deto.__version__}"
        + (", quick (in-process checks only)" if result["quick"] else ""), "",
        "| check | result | seconds | numbers or reason |", "|---|---|---|---|",
    ]
    for c in result["checks"]:
        detail = c["reason"] or ", ".join(f"{k}: {v}" for k, v in c["numbers"].items())
        lines.append(f"| {c['name']} | {c['status']} | {c['seconds']:.1f} | {detail} |")
    return "\n".join(lines) + "\n"
