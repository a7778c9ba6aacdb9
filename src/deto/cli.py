"""The ``deto`` command: ``deto train`` (the main job), ``deto bench`` and ``deto info``.

This is the only module that reads environment variables and configures logging. Bad input
ends with one line on stderr and exit status 2; a failed rank with 1; Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_SIMULATED_RANKS = 64
LINK_ENV = "DETO_LINK"
"""JSON description of an emulated inter-node link, set for every rank by the launcher that
emulates it (summary.json's ``link``)."""

logger = logging.getLogger("deto.cli")


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------
# Logging


class _ProgressAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Write log lines above a tqdm progress bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def configure_logging(level: int, rank: int | None = None) -> None:
    """Configure the root logger once per process; ranks other than 0 only report errors."""
    prefix = f"[rank {rank}] " if rank not in (None, 0) else ""
    handler = _ProgressAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if rank in (None, 0) else max(level, logging.ERROR))
    for noisy in ("torch.distributed.elastic", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


# --------------------------------------------------------------------------------------------
# deto train


TRAIN_DESCRIPTION = """\
Train a model with decoupled, network-aware replication across nodes.

With no arguments: a small GPT-style byte-level LM on the Python standard library's own
sources, FlexDeMo (DeMo replication + sign-SGD) on a simulated cluster of 2 nodes x 2 ranks
on this machine's CPU. Under torchrun the same command runs as one rank of a real cluster.
Values come from: scheme and task defaults < --config FILE.toml < flags."""


def _scheme_epilog() -> str:
    from deto.train.presets import PRESETS

    width = max(map(len, PRESETS))
    lines = ["schemes (--scheme):"]
    for p in PRESETS.values():
        lines.append(f"  {p.name:<{width}}  {p.summary}")
    lines.append("")
    lines.append("outputs in --out: metrics.jsonl, summary.json, loss.png, config.json, checkpoints/")
    return "\n".join(lines)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer: {text!r}") from None


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~deto.train.config.TrainConfig` field; unset flags stay unset."""
    from deto.train.config import FIELDS, flag

    parser.add_argument("--config", metavar="FILE.toml", default=argparse.SUPPRESS,
                        help="read settings from a flat TOML file (flags override it)")
    for name, f in FIELDS.items():
        meta = f.metadata
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": meta["help"], "dest": name}
        if name == "sign":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta["choices"]:
            kwargs["choices"] = meta["choices"]
        else:
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
            kwargs["type"] = {"int": _int, "float": _float}.get(kind, str)
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag(name), **kwargs)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def train_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """Config file values overridden by the flags given (nothing else)."""
    from deto.train.config import FIELDS, load_toml

    values: dict[str, Any] = {}
    if hasattr(ns, "config"):
        values.update(load_toml(ns.config))
    values.update({k: v for k, v in vars(ns).items() if k in FIELDS})
    return values


def _torchrun_topology(values: dict[str, Any]) -> dict[str, Any]:
    """Take nodes x ranks-per-node from the torchrun environment; flags must agree with it."""
    world = int(os.environ["WORLD_SIZE"])
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    if per_node < 1 or world % per_node:
        raise UsageError(f"Invalid topology: WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={per_node}")
    env = {"nodes": world // per_node, "ranks_per_node": per_node}
    for key, value in env.items():
        if key in values and values[key] != value:
            raise UsageError(
                f"Invalid topology: --{key.replace('_', '-')} {values[key]} disagrees with torchrun's "
                f"{env['nodes']} node(s) x {env['ranks_per_node']} rank(s)"
            )
    return {**values, **env}


def rank_entry(
    cfg_dict: dict[str, Any],
    run_dir: str | None,
    resume: str | None,
    log_level: int,
    device: str | None,
    link: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """What every rank runs, spawned for a simulated cluster or started by torchrun."""
    import torch.distributed as dist

    from deto.topology import Topology
    from deto.train import loop
    from deto.train.config import TrainConfig

    configure_logging(log_level, rank=int(os.environ.get("RANK", "0")))
    cfg = TrainConfig(**cfg_dict)
    topo = Topology(nodes=cfg.nodes, ranks_per_node=cfg.ranks_per_node, device=device)
    try:
        return loop.run(cfg, topo, run_dir=run_dir, resume=resume, link=link)
    except KeyboardInterrupt:
        # the launcher forwards the terminal's Ctrl-C: leave quietly, once
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cmd_train(ns: argparse.Namespace) -> int:
    from deto.train import checkpoint, launch, loop, report
    from deto.train.config import resolve

    level = logging.DEBUG if ns.verbose else logging.WARNING if ns.quiet else logging.INFO
    torchrun = launch.under_torchrun()
    if torchrun and ns.bandwidth is not None:
        raise UsageError("--bandwidth emulates links between simulated nodes; under torchrun the links are real")
    try:
        values = train_overrides(ns)
        if torchrun:
            values = _torchrun_topology(values)
        cfg = resolve(values)
        resume = None
        if cfg.resume is not None:
            path = checkpoint.find_checkpoint(cfg.resume)
            checkpoint.check_resumable(path, cfg)
            resume = str(path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    if torchrun:
        device = None if cfg.device == "auto" else cfg.device
        try:
            link = json.loads(os.environ[LINK_ENV]) if LINK_ENV in os.environ else None
        except ValueError:
            raise UsageError(f"Invalid {LINK_ENV}: not JSON") from None
        configure_logging(level, rank=int(os.environ["RANK"]))
        summary = rank_entry(cfg.to_dict(), cfg.out, resume, level, device, link)
        if summary is not None:
            print(report.format_table(summary), flush=True)
        return EXIT_OK

    if cfg.device == "cuda":
        raise UsageError("Invalid device: 'cuda' (the simulated cluster runs on CPU; use torchrun for GPUs)")
    if cfg.world_size > MAX_SIMULATED_RANKS:
        raise UsageError(
            f"Invalid topology: {cfg.nodes} x {cfg.ranks_per_node} = {cfg.world_size} ranks is too many "
            f"to simulate on one machine (at most {MAX_SIMULATED_RANKS}); use torchrun"
        )
    cpus = os.cpu_count() or 1
    if cfg.world_size > 2 * cpus:
        logger.warning("%d ranks on %d CPU core(s): expect a slow run", cfg.world_size, cpus)
    run_dir = cfg.out or loop.default_run_dir(cfg.scheme)
    logger.info(
        "deto train: %s on %s, %d node(s) x %d rank(s) simulated on this machine; output in %s",
        cfg.scheme, cfg.task, cfg.nodes, cfg.ranks_per_node, run_dir,
    )
    if ns.bandwidth is not None:
        return _train_over_emulated_links(ns, values, cfg.nodes, cfg.ranks_per_node, run_dir, level)
    results = launch.launch_local(
        rank_entry, (cfg.to_dict(), run_dir, resume, level, "cpu", None), world_size=cfg.world_size
    )
    summary = results.get(0)
    if summary is None:
        raise RuntimeError("rank 0 returned no summary")
    print(report.format_table(summary), flush=True)
    return EXIT_OK


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _train_over_emulated_links(
    ns: argparse.Namespace,
    values: dict[str, Any],
    nodes: int,
    ranks_per_node: int,
    run_dir: str,
    level: int,
) -> int:
    """Run the simulated cluster with each node in its own network namespace, links shaped.

    Every node starts torch's own launcher in its namespace with a static rendezvous at node 0
    (the real multi-node path); each rank reads the same settings from ``train.toml``.
    """
    from pathlib import Path

    from deto.train import netem, netlaunch, report

    try:
        link = netem.LinkSpec.from_text(ns.bandwidth)
        if nodes < 2:
            raise ValueError(f"--bandwidth needs at least 2 nodes, got {nodes}")
        netem.check_requirements(nodes)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    removed = netem.cleanup_stale()
    if removed:
        logger.info("removed %d namespace(s) left by earlier runs", len(removed))
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {**values, "out": str(out)}
    (out / "train.toml").write_text(
        "".join(f"{k} = {_toml_value(v)}\n" for k, v in settings.items() if v is not None)
    )
    verbosity = ["-v"] if level == logging.DEBUG else ["-q"] if level == logging.WARNING else []
    program = ["-m", "deto", "train", "--config", str(out / "train.toml"), *verbosity]
    with netem.EmulatedCluster(nodes, link) as cluster:
        check = netem.verify_shaping(cluster)
        if not check.ok:
            raise RuntimeError(f"the emulated link is not what was asked for: {check.note}")
        logger.info("link %s verified: probe measured %.1f Mbit/s", ns.bandwidth, check.measured_bps / 1e6)
        code = netlaunch.run_nodes(
            cluster, ranks_per_node, program, log_dir=out / "logs",
            extra_env={LINK_ENV: json.dumps(cluster.describe())},
        )
    if code != 0:
        raise RuntimeError(f"a node exited with status {code} (other nodes' logs: {out / 'logs'})")
    summary = json.loads((out / "summary.json").read_text())
    logger.debug("summary: %s", report.format_table(summary))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# deto bench


BENCH_DESCRIPTION = """\
Run several schemes on the same task, seed, data and step budget, side by side, optionally
over emulated slow inter-node links, and write results.json, report.md and plots to --out.
Each run is a separate `deto train`; arguments after `--` are passed to every one of them
(e.g. `deto bench -- --steps 200 --task vision`)."""


def cmd_bench(ns: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from deto.train import bench
    from deto.train.presets import PRESETS

    schemes = tuple(s.strip() for s in ns.schemes.split(",") if s.strip())
    unknown = [s for s in schemes if s not in PRESETS]
    if not schemes or unknown:
        raise UsageError(f"Invalid --schemes: {ns.schemes!r} (valid: {', '.join(PRESETS)})")
    bandwidths = tuple(None if b.strip() in ("none", "") else b.strip() for b in ns.bandwidth.split(","))
    if any(b is not None for b in bandwidths):
        from deto.train import netem

        try:
            for b in bandwidths:
                if b is not None:
                    netem.parse_bandwidth(b)
            netem.check_requirements()
        except (ValueError, RuntimeError) as exc:
            raise UsageError(str(exc)) from None
    out = Path(ns.out or f"bench/{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = bench.BenchConfig(schemes=schemes, bandwidths=bandwidths, out=out, train_args=tuple(ns.train_args))

    def progress(i: int, n: int, name: str) -> None:
        logger.info("[%d/%d] %s", i + 1, n, name)

    try:
        results = bench.run_bench(cfg, on_run=progress)
    except RuntimeError as exc:
        print(f"deto bench: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print((out / "report.md").read_text(), flush=True)
    logger.info("results in %s (%d runs)", out, len(results["runs"]))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# deto info


def info() -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import deto
    from deto.replicators import REGISTRY
    from deto.train import report
    from deto.train.presets import PRESETS

    cuda = torch.cuda.is_available()
    return {
        "versions": report.versions(),
        "git_sha": report.git_sha(),
        "device": {
            "default": "cuda" if cuda else "cpu",
            "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "cpu_cores": os.cpu_count(),
        },
        "backend": deto.Topology(nodes=1).backend,
        "backends_available": {
            "gloo": dist.is_available() and dist.is_gloo_available(),
            "nccl": dist.is_available() and dist.is_nccl_available(),
        },
        "replicators": {name: cls.__doc__.strip().splitlines()[0] if cls.__doc__ else "" for name, cls in sorted(REGISTRY.items())},
        "schemes": {name: p.summary for name, p in PRESETS.items()},
    }


def cmd_info(ns: argparse.Namespace) -> int:
    data = info()
    if ns.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    v = data["versions"]
    lines = [
        f"deto {v['deto']}  (python {v['python']}, torch {v['torch']}, git {data['git_sha'] or '-'})",
        f"device: {data['device']['default']}"
        + (f" ({', '.join(data['device']['cuda_devices'])})" if data["device"]["cuda_devices"] else "")
        + f", {data['device']['cpu_cores']} CPU core(s)",
        f"backend: {data['backend']}  (available: "
        + ", ".join(k for k, ok in data["backends_available"].items() if ok) + ")",
        "replicators:",
        *(f"  {k:<9} {doc}" for k, doc in data["replicators"].items()),
        "schemes (deto train --scheme):",
        *(f"  {k:<15} {doc}" for k, doc in data["schemes"].items()),
    ]
    print("\n".join(lines))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# Entry point


def _bench_defaults() -> tuple[str, ...]:
    from deto.train.bench import DEFAULT_SCHEMES

    return DEFAULT_SCHEMES


def build_parser() -> argparse.ArgumentParser:
    import deto

    parser = _Parser(prog="deto", description="Decoupled, network-aware distributed training.")
    parser.add_argument("--version", action="version", version=f"deto {deto.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    train = sub.add_parser(
        "train", help="train a model (the main job)", description=TRAIN_DESCRIPTION,
        epilog=_scheme_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(train)
    train.add_argument(
        "--bandwidth", metavar="RATE", default=None,
        help="emulate slow links between the simulated nodes: each node in its own network "
        "namespace, links shaped to RATE with tc tbf (e.g. 100mbit, 1gbit; needs root and iproute2)",
    )
    train.set_defaults(func=cmd_train)
    bench_p = sub.add_parser(
        "bench", help="several schemes side by side, optionally over emulated slow links",
        description=BENCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_p.add_argument("--schemes", default=",".join(_bench_defaults()), metavar="A,B,...",
                         help="comma-separated schemes (default: %(default)s)")
    bench_p.add_argument("--bandwidth", default="none", metavar="RATE,...",
                         help="comma-separated link rates, 'none' for unshaped (default: none)")
    bench_p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: bench/<timestamp>)")
    bench_p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    bench_p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    bench_p.set_defaults(func=cmd_bench, train_args=[])
    info_p = sub.add_parser("info", help="versions, device, backend, replicators")
    info_p.add_argument("--json", action="store_true", help="machine-readable output")
    info_p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    passed: list[str] = []
    if args[:1] == ["bench"] and "--" in args:  # `deto bench [flags] -- [deto train flags]`
        cut = args.index("--")
        args, passed = args[:cut], args[cut + 1 :]
    ns = parser.parse_args(args)
    if passed:
        ns.train_args = passed
    if ns.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if ns.command == "info":
        configure_logging(logging.WARNING)
    else:
        configure_logging(logging.DEBUG if ns.verbose else logging.WARNING if ns.quiet else logging.INFO)
    from deto.train.launch import RankFailure

    try:
        return int(ns.func(ns))
    except UsageError as exc:
        print(f"deto {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RankFailure as exc:
        if exc.traceback:
            logger.debug("rank %d: %s", exc.rank, exc.traceback.rstrip())
        hint = " (run with -v for its traceback)" if exc.traceback and not ns.verbose else ""
        print(f"deto {ns.command}: error: {exc}{hint}", file=sys.stderr)
        return EXIT_FAILED
    except RuntimeError as exc:  # e.g. a node of an emulated cluster failed
        print(f"deto {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"deto {ns.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

