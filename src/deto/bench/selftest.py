"""``deto selftest``: the checks a machine with a GPU should run first, ready before one exists.

No line of deto had run on CUDA when this was written, and a lent GPU machine gives minutes,
not hours, so the checks are one prepared script: each reports pass, fail or skip with its
reason, its seconds and its numbers, and the whole writes ``results.json`` and ``report.md``.
``--device cpu`` runs the same steps on the CPU (a dry run, so the script itself cannot rot).

On a machine where deto is not installed (the GPU machine has torch but no registry), it runs
from a checkout as ``PYTHONPATH=src python3 -m deto selftest --device cuda``
(``make gpu-check``): everything here needs only torch and the standard library; the
integration checks import their framework in a child process and skip where it is missing.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import deto
from deto.bench import selftest_fsdp
from deto.run import provenance

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
STEPS = 4
LR = 1e-3
ATOL = 2e-4
"""Largest |device - CPU| difference a parameter may show after the replicator runs. Four AdamW
steps move a weight by at most ~4e-3; summation order differs between devices, and a top-k tie
broken the other way moves single weights by about one step, so 2e-4 separates rounding from a
wrong result. Two runs on one device must agree bitwise (deto promises it, on every device)."""
MEMORY_BAND = 0.9
"""On CUDA a rank's measured peak (``torch.cuda.max_memory_allocated``) must reach this share of
the persistent state ``deto.plan`` predicts. The plan counts parameters, gradients, optimizer
and replicator state only; activations, FSDP2's unsharded parameters and workspaces come on
top, so the band is a lower bound: a peak below it means the plan counts state a run does not
keep. On every device the state counted from the live tensors must equal the plan's."""
SUBPROCESS_TIMEOUT_S = 150
"""An integration example's child process: a few steps take seconds; a hang must not eat the
lent machine's minutes."""

REPLICATORS: dict[str, Callable[[], deto.Replicator]] = {
    "demo-1d": lambda: deto.DeMo(topk=4, chunk=16),
    "demo-2d": lambda: deto.DeMo(topk=8, chunk=8, blocks="2d", values="int8"),
    "demo-overlap": lambda: deto.DeMo(topk=4, chunk=16, overlap=True),
    "full": lambda: deto.Full(),
    "diloco": lambda: deto.DiLoCo(every=2),
    "diloco-topk": lambda: deto.DiLoCo(every=2, compress="topk", topk=4, chunk=16),
    "streaming-diloco": lambda: deto.StreamingDiLoCo(every=2, fragments=2),
}


@dataclass
class Check:
    """One check's outcome: ``status`` is pass, fail or skip; ``reason`` says why not pass."""

    name: str
    status: str = "pass"
    reason: str = ""
    seconds: float = 0.0
    numbers: dict[str, Any] = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        self.status, self.reason = "fail", reason

    def skip(self, reason: str) -> None:
        self.status, self.reason = "skip", reason


@contextmanager
def timed(check: Check) -> Iterator[Check]:
    """Time ``check``; an exception fails it (a failing check is reported, not raised)."""
    start = time.perf_counter()
    try:
        yield check
    except Exception as exc:  # noqa: BLE001 - reported in the check
        check.fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    check.seconds = time.perf_counter() - start


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


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def check_replicators(device: str) -> list[Check]:
    """Each replicator on ``device``: bitwise equal over two runs, and equal to the CPU within
    :data:`ATOL`."""
    torch.manual_seed(0)
    initial = _net().state_dict()  # built once: the nodes' threads share torch's RNG
    out = []
    for name in REPLICATORS:
        with timed(Check(f"replicator {name}")) as check:
            first = replicated_params(name, device, initial)
            second = replicated_params(name, device, initial)
            on_cpu = first if device == "cpu" else replicated_params(name, "cpu", initial)
            deterministic = all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
            diff = max_diff(first, on_cpu)
            check.numbers = {"deterministic": deterministic, "max_abs_diff_vs_cpu": diff,
                             "atol": ATOL}
            if not deterministic:
                check.fail("two runs differ")
            elif not diff <= ATOL:
                check.fail(f"differs from CPU by {diff:.2e} > {ATOL:.0e}")
        out.append(check)
    return out


def compare_memory(
    held: dict[str, int], planned: dict[str, int], peak_bytes: int | None = None,
    copies: int = 1,
) -> tuple[dict[str, Any], str]:
    """A rank's persistent state (``selftest_fsdp.held_bytes``) and, on CUDA, its measured peak
    (of ``copies`` such ranks in one process) against ``deto.plan``'s prediction: the numbers
    to report, and why the check fails ('' when it passes). The counted state must equal the
    plan kind by kind; the peak must reach :data:`MEMORY_BAND` of the plan."""
    counted = {kind: held[kind] for kind in planned}
    plan_total = sum(planned.values())
    numbers: dict[str, Any] = {
        "memory_held_bytes": sum(counted.values()), "memory_plan_bytes": plan_total,
        "memory_held_by_kind": counted,
        "optimizer_other_bytes_not_in_plan": held.get("optimizer_other", 0),
    }
    reason = ""
    if counted != planned:
        wrong = ", ".join(f"{kind} {counted[kind]} B, plan {planned[kind]} B"
                          for kind in planned if counted[kind] != planned[kind])  # fmt: skip
        reason = f"persistent state differs from deto.plan: {wrong}"
    if peak_bytes is not None:
        ratio = peak_bytes / (copies * plan_total)
        numbers.update(memory_peak_bytes=peak_bytes, memory_peak_vs_plan=round(ratio, 3),
                       memory_band=f">= {MEMORY_BAND}")  # fmt: skip
        if not reason and ratio < MEMORY_BAND:
            reason = (f"peak {peak_bytes} B is {ratio:.2f} x the plan's {copies} x {plan_total} "
                      f"B, below {MEMORY_BAND}")
    return numbers, reason


def check_fsdp_one_rank(device: str) -> list[Check]:
    """FSDP2 + DeMo and Full on a one-rank world of ``device``'s backend, 2 FakeComm nodes:
    replicas bitwise equal, parameters equal to the same run without FSDP2 within ATOL."""
    out = []
    torch.manual_seed(0)
    initial = selftest_fsdp.net().state_dict()
    backend = "nccl" if device == "cuda" else "gloo"
    setup = Check(f"fsdp2 world of 1 ({backend})")
    with timed(setup):
        meshes = selftest_fsdp.one_rank_world(device)
    if setup.status == "fail":
        return [setup]
    try:
        for scheme in selftest_fsdp.SCHEMES:
            with timed(Check(f"fsdp2 {scheme} 2 fake nodes x 1 {backend} rank")) as check:
                with selftest_fsdp.peak_window(meshes[0].device_type) as peak:  # both nodes
                    found = selftest_fsdp.fake_nodes_run(scheme, meshes, initial)
                plain = selftest_fsdp.plain_run(scheme, device, initial)
                diff = max_diff(found["params"], plain)
                memory, memory_failed = compare_memory(
                    found["held_bytes"], selftest_fsdp.planned_bytes(scheme, 1),
                    peak[0] if peak else None, copies=len(meshes))
                check.numbers = {
                    "replicas_identical": found["replicas_identical"],
                    "max_abs_diff_vs_unsharded": diff, "atol": ATOL,
                    "inter_node_bytes_sent_per_step": found["bytes_sent_per_step"], **memory,
                    "peak_memory_mb_so_far": _peak_mb(device),  # the process's: both nodes
                }
                if memory_failed:
                    check.fail(memory_failed)
                elif not found["sharded"]:
                    check.fail("FSDP2 left parameters unsharded")
                elif not found["replicas_identical"]:
                    check.fail("replicas differ across nodes")
                elif not diff <= ATOL:
                    check.fail(f"differs from the unsharded run by {diff:.2e} > {ATOL:.0e}")
            out.append(check)
    finally:
        dist.destroy_process_group()
    return out


def check_fsdp_torchrun(device: str, work: Path) -> Check:
    """FSDP2 + DeMo and Full under torchrun, 2 simulated nodes (``DETO_NODES=2``): real
    collectives inside and across the nodes; each rank's peak memory."""
    gpus = torch.cuda.device_count() if device == "cuda" else 4
    ranks = gpus - gpus % 2
    check = Check(f"fsdp2 torchrun 2 nodes x {max(ranks // 2, 1)} ranks")
    if ranks < 2:
        check.skip(f"needs 2 GPUs (NCCL takes one a rank), found {gpus}")
        return check
    with timed(check):
        out = work / "fsdp"
        proc = _run([*TORCHRUN, "--nproc-per-node",
                     str(ranks), "-m", "deto.bench.selftest_fsdp", "--device", device,
                     "--out", str(out)], work, {"DETO_NODES": "2"})
        if proc.returncode:
            check.fail(_last_line(proc))
            return check
        per_rank = [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
        check.numbers = {"peak_memory_mb_per_rank": [r["peak_memory_mb"] for r in per_rank]}
        for scheme in selftest_fsdp.SCHEMES:
            mine = [r[scheme] for r in per_rank]
            check.numbers[f"{scheme}_node_bytes_sent_per_step"] = mine[0][
                "node_bytes_sent_per_step"]
            # the plan's rank is rank 0 (the largest shards; the net's dims divide evenly, so
            # every rank's are the same size): each rank's state and peak against it
            found = [compare_memory(r["held_bytes"], r["planned_bytes"], r["peak_bytes"])
                     for r in mine]  # fmt: skip
            check.numbers[f"{scheme}_memory"] = found[0][0]
            check.numbers[f"{scheme}_memory_peak_vs_plan_per_rank"] = [
                n.get("memory_peak_vs_plan") for n, _ in found]
            failed = next((reason for _, reason in found if reason), "")
            if not all(r["replicas_identical"] for r in mine):
                check.fail(f"{scheme}: replicas differ across nodes")
            elif failed:
                check.fail(f"{scheme}: {failed}")
    return check


def check_micro(device: str, quick: bool) -> Check:
    """benchmarks/micro.py's DeMo contenders (local work per step on FSDP2 shard shapes) on
    ``device``, in few rounds; the reference implementation only where ``--reference`` is
    given to the benchmark itself."""
    check = Check("demo microbenchmark")
    with timed(check):
        if not (REPO / "benchmarks" / "micro.py").is_file():
            check.skip("benchmarks/micro.py is not in this checkout")
            return check
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        micro = importlib.import_module("benchmarks.micro")
        model = "bytegpt-2x128" if quick else "bytegpt-4x256"
        shapes = [(n, micro.shard_shape(s, 2)) for n, s in micro.model_shapes(model)]
        names = ["demo", "demo-lean", "demo-1d-top4-fp32"]
        contenders = [micro.deto_contender(n, shapes, 2, device) for n in names]
        for c in contenders:
            c.run(1)  # kernels and caches warm
        rounds, steps = (2, 2) if quick else (3, 5)
        summary = micro.summarize(micro.interleave(contenders, rounds, steps), 0, [])
        check.numbers = {"model": model, "ranks_per_node": 2, "nodes": 2,
                         "rounds": rounds, "steps_per_round": steps,
                         **{f"{r['contender']}_ms": round(r["ms_median"], 3)
                            for r in summary["results"]},
                         "reference": "not run (python -m benchmarks.micro --reference PATH)"}
    return check


def check_example(device: str, example: str, module: str, work: Path) -> Check:
    """An integration's example under torchrun for a few steps (skipped without its framework).
    The example splits an even world into 2 nodes; on one GPU it runs 1 node of 1 rank."""
    check = Check(f"integration {example}")
    ranks = min(torch.cuda.device_count(), 4) if device == "cuda" else 2
    with timed(check):
        if importlib.util.find_spec(module) is None:
            check.skip(f"{module} is not installed")
            return check
        proc = _run([*TORCHRUN, "--nproc-per-node",
                     str(ranks), str(REPO / "examples" / example), "--out",
                     str(work / example), "--steps", "4"], work, {})
        if proc.returncode:
            check.fail(_last_line(proc))
        else:
            check.numbers = {"ranks": ranks, "nodes": 2 if ranks % 2 == 0 else 1,
                             "last_line": (proc.stdout.strip().splitlines() or [""])[-1][:160]}
    return check


def check_torchtitan(device: str) -> Check:
    """torchtitan's Llama 3 debug model on 2 simulated nodes, checkpointed and resumed by its
    checkpointer (skipped without torchtitan, or with too few GPUs for one a rank)."""
    check = Check("integration torchtitan")
    with timed(check):
        try:
            from deto.integrations.torchtitan import run_torchtitan_check

            found = run_torchtitan_check(device)
        except (ImportError, RuntimeError) as exc:
            check.skip(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return check
        check.numbers = {k: found.get(k) for k in (
            "replicas_identical", "resume_bitwise", "inter_node_bytes_per_step")}
        if not (found.get("replicas_identical") and found.get("resume_bitwise")):
            check.fail("replicas differ or the resume is not bitwise")
    return check


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
"""torchrun on a free port of its own (``--standalone``): the checks start one after another,
and the default port may still be held by the one before."""


def _run(argv: list[str], cwd: Path, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    src = str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S)


def _last_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"exit {proc.returncode}, no output"


def _peak_mb(device: str) -> float:
    return selftest_fsdp.peak_memory_mb(torch.device(device))


def peak_memory(device: str) -> Check:
    """This process's peak memory over every check: the CUDA allocator's, or the RSS."""
    key = "cuda_max_allocated_mb" if device == "cuda" else "rss_mb"
    return Check("peak memory", numbers={key: _peak_mb(device)})


def default_out(device_name: str) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in device_name.lower()).strip("-")
    return REPO / "benchmarks" / "results" / f"{datetime.date.today()}-gpu-{slug}"


def run_selftest(device: str, out: Path | None, *, quick: bool = False) -> int:
    """Run every check on ``device``; write results.json and report.md; 1 if any failed.

    ``quick`` keeps the in-process checks (replicators, FSDP2 on a one-rank world, the
    microbenchmark on a small model, memory): the CI dry run. The full run adds FSDP2 under
    torchrun where the device allows several ranks, and the integrations in child processes.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible (torch.cuda.is_available())")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    out = out or default_out(name)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission: bad input, said before any check
        raise ValueError(f"--out {out}: cannot make the folder ({exc.strerror})") from None
    checks: list[Check] = []

    def record(found: Check | list[Check]) -> None:
        for c in found if isinstance(found, list) else [found]:
            checks.append(c)
            logger.info("selftest: %-44s %-4s %6.1f s  %s", c.name, c.status, c.seconds,
                        c.reason or json.dumps(c.numbers, default=str)[:160])

    started = time.perf_counter()
    logger.info("selftest: %s (%s), torch %s, deto %s", device, name, torch.__version__,
                deto.__version__)
    record(check_replicators(device))
    record(check_fsdp_one_rank(device))
    record(check_micro(device, quick))
    with tempfile.TemporaryDirectory(prefix="deto-selftest-") as tmp:
        work = Path(tmp)
        if quick:
            for label in ("fsdp2 torchrun", "integration hf_trainer.py",
                          "integration lightning_fit.py", "integration torchtitan"):
                c = Check(label)
                c.skip("--quick: in-process checks only")
                record(c)
        else:
            record(check_fsdp_torchrun(device, work))
            record(check_example(device, "hf_trainer.py", "transformers", work))
            record(check_example(device, "lightning_fit.py", "lightning", work))
            record(check_torchtitan(device))
    record(peak_memory(device))
    failed = [c.name for c in checks if c.status == "fail"]
    result = {"device": device, "device_name": name, "quick": quick,
              "seconds": time.perf_counter() - started,
              "versions": {"torch": torch.__version__, "deto": deto.__version__,
                           "cuda": torch.version.cuda, "python": sys.version.split()[0]},
              "provenance": provenance.collect(where=REPO),
              "checks": [asdict(c) for c in checks], "failed": failed}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (out / "report.md").write_text(report(result))
    logger.info("selftest: %d checks, %d failed, %.0f s; results in %s", len(checks),
                len(failed), result["seconds"], out)
    return 1 if failed else 0


def report(result: dict[str, Any]) -> str:
    """report.md, from results.json's content alone."""
    git = result["provenance"].get("git") or {"sha": "unknown (not run from a git checkout)"}
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    lines = [
        f"# deto selftest on {result['device_name']} ({result['device']})", "",
        f"- git: {git.get('sha', '?')}{' (dirty)' if git.get('dirty') else ''}",
        f"- {versions}", f"- {result['seconds']:.0f} s"
        + (", quick (in-process checks only)" if result["quick"] else ""),
        f"- tolerance: {ATOL:.0e} absolute against the CPU; bitwise between two runs", "",
        "| check | result | seconds | numbers or reason |", "|---|---|---|---|",
    ]
    for c in result["checks"]:
        detail = c["reason"] or ", ".join(f"{k}: {v}" for k, v in c["numbers"].items())
        lines.append(f"| {c['name']} | {c['status']} | {c['seconds']:.1f} | {detail} |")
    return "\n".join(lines) + "\n"
