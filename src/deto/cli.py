"""The ``deto`` command: ``deto train`` (the main job), ``deto bench``, ``deto info`` and
``deto plan`` (:mod:`deto.plan_cli`).

This module parses flags, configures logging and maps what goes wrong to exit statuses; the
work happens in :mod:`deto.launch` (a run) and :mod:`deto.bench`. Bad input ends with one line
on stderr and exit status 2; a failed rank with 1; Ctrl-C with 130; SIGTERM with 143.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from deto import extras
from deto.launch.dispatch import UsageError
from deto.run.console import configure_logging

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

logger = logging.getLogger("deto.cli")


class _Parser(argparse.ArgumentParser):
    commands: Mapping[str, argparse.ArgumentParser] = {}
    """The subcommands' parsers, by name (the top-level parser's)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # Python 3.11's argparse drops the "--" of "--flag=--" and hands the flag [] for its
        # one argument, which every flag's parsing then trips over: say what argparse says of
        # a missing argument instead.
        if action.nargs is None and action.option_strings and arg_strings == ["--"]:
            raise argparse.ArgumentError(action, "expected one argument")
        return super()._get_values(action, arg_strings)


def _log_level(ns: argparse.Namespace) -> int:
    return logging.DEBUG if ns.verbose else logging.WARNING if ns.quiet else logging.INFO


# --------------------------------------------------------------------------------------------
# deto train


TRAIN_DESCRIPTION = """\
Train a model with decoupled, network-aware replication across nodes.

With no arguments: a small GPT-style byte-level LM on the Python standard library's own
sources, FlexDeMo (DeMo replication + sign-SGD) on a simulated cluster of 2 nodes x 2 ranks
on this machine's CPU. Under torchrun the same command runs as one rank of a real cluster.
Values come from: scheme and task defaults < --config FILE.toml < flags."""


def _scheme_epilog() -> str:
    from deto.run.presets import PRESETS

    width = max(map(len, PRESETS))
    lines = ["schemes (--scheme):"]
    for p in PRESETS.values():
        lines.append(f"  {p.name:<{width}}  {p.summary}")
    lines.append("")
    lines.append(
        "outputs in --out: metrics.jsonl, summary.json, loss.png, config.json, checkpoints/"
    )
    return "\n".join(lines)


class _Number(argparse.Action):
    """A numeric flag checked as it is parsed: ``parse(text)`` gives its value or raises
    ``ValueError`` with the whole message (the flag, its range and what was given)."""

    def __init__(self, *args: Any, parse: Callable[[str], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parse = parse

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
        option_string: str | None = None,
    ) -> None:
        try:
            setattr(namespace, self.dest, self.parse(values))
        except ValueError as exc:
            parser.error(str(exc))


def _parse_field(option: str, f: Any, text: str) -> Any:
    """Numeric field ``f``'s value from ``option``'s text, checked against its bounds."""
    from deto.replicators.options import parse_knob

    try:
        return parse_knob(f, text)
    except ValueError as exc:
        raise ValueError(f"{option} {exc}") from None


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :data:`~deto.run.config.KEYS` entry (the run's settings and the
    replicator knobs); unset flags stay unset."""
    from deto.run.config import KEYS, flag, key_help

    parser.add_argument("--config", metavar="FILE.toml", default=argparse.SUPPRESS,
                        help="read settings from a flat TOML file (flags override it)")
    for name, f in KEYS.items():
        meta = f.metadata
        kwargs: dict[str, Any] = {
            "default": argparse.SUPPRESS, "help": key_help(name), "dest": name
        }
        if f.type in ("bool", bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif meta["choices"]:
            kwargs["choices"] = meta["choices"]
        else:
            if f.type in ("int", "float"):  # its bounds are declared with the key
                kwargs.update(action=_Number, parse=functools.partial(_parse_field, flag(name), f))
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag(name), **kwargs)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")


def cmd_train(ns: argparse.Namespace) -> int:
    from deto.launch import dispatch
    from deto.run import report
    from deto.run.config import KEYS

    summary = dispatch.train(
        {k: v for k, v in vars(ns).items() if k in KEYS},
        config_file=getattr(ns, "config", None),
        bandwidth=ns.bandwidth,
        log_level=_log_level(ns),
    )
    if summary is not None:
        print(report.format_table(summary), flush=True)
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# deto bench


BENCH_DESCRIPTION = """\
Run several schemes on the same task, data and step budget, side by side, over one or more
seeds, optionally over emulated slow inter-node links, and write results.json, report.md and
plots to --out. Each run is a separate `deto train`; arguments after `--` are passed to every
one of them (e.g. `deto bench -- --steps 200 --task vision`). With --reproduce DIR, re-run the
runs DIR's results.json records and compare them with the record instead."""


def _csv(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


def _bench_lists(ns: argparse.Namespace) -> tuple[Any, Any, Any]:
    """--schemes, --bandwidth and --seeds as tuples (``None`` where not given)."""
    from deto.bench import sweep
    from deto.replicators.options import describe_range, parse_knob
    from deto.run.config import KEYS
    from deto.run.presets import PRESETS

    schemes = _csv(ns.schemes)
    if schemes is not None and not schemes:
        raise UsageError(f"Invalid --schemes: {ns.schemes!r} (valid: {', '.join(PRESETS)})")
    try:
        for spec in schemes or ():
            sweep.check_variant(spec)
    except ValueError as exc:
        raise UsageError(f"Invalid --schemes: {exc}") from None
    bandwidths = None
    if ns.bandwidth is not None:
        given = (b.strip() for b in ns.bandwidth.split(","))
        bandwidths = tuple(None if b in ("none", "") else b for b in given)
    if bandwidths is not None and any(b is not None for b in bandwidths):
        from deto import netem
        try:
            for b in bandwidths:
                if b is not None:
                    netem.parse_bandwidth(b)
            netem.check_requirements()
        except (ValueError, RuntimeError) as exc:
            raise UsageError(str(exc)) from None
    seed_texts, seeds = _csv(ns.seeds), None
    if seed_texts is not None:
        seed = KEYS["seed"]  # every seed as --seed takes it
        try:
            seeds = tuple(parse_knob(seed, x) for x in seed_texts)
        except ValueError:
            seeds = ()
        if not seeds or len(set(seeds)) != len(seeds):
            raise UsageError(
                f"Invalid --seeds: {ns.seeds!r} (distinct, each {describe_range(seed)}; "
                "e.g. 0,1,2)"
            )
    if any(a == "--seed" or a.startswith("--seed=") for a in ns.train_args):
        raise UsageError("Invalid --seed after --: give seeds with deto bench --seeds")
    return schemes, bandwidths, seeds


def cmd_bench(ns: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from deto.bench import sweep
    from deto.run import provenance
    schemes, bandwidths, seeds = _bench_lists(ns)

    def progress(i: int, n: int, name: str) -> None:
        logger.info("[%d/%d] %s", i + 1, n, name)

    if ns.reproduce is not None:
        return _reproduce(ns, schemes, bandwidths, seeds, progress)
    if ns.steps_fraction is not None:
        raise UsageError("--steps-fraction applies to --reproduce only")
    out = Path(ns.out or f"bench/{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = sweep.BenchConfig(
        schemes=schemes or sweep.DEFAULT_SCHEMES, bandwidths=bandwidths or (None,),
        seeds=seeds or sweep.DEFAULT_SEEDS, out=out, train_args=tuple(ns.train_args),
        allow_dirty=ns.allow_dirty,
    )
    try:
        results = sweep.run_bench(cfg, on_run=progress)
    except provenance.DirtyTreeError as exc:
        raise UsageError(str(exc)) from None
    except RuntimeError as exc:
        print(f"deto bench: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print((out / "report.md").read_text(), flush=True)
    logger.info("results in %s (%d runs)", out, len(results["runs"]))
    return EXIT_OK


def _reproduce(
    ns: argparse.Namespace, schemes: Any, bandwidths: Any, seeds: Any, progress: Any
) -> int:
    import time
    from pathlib import Path

    from deto.bench import reproduce
    if ns.train_args:
        raise UsageError("--reproduce re-runs the recorded commands: no arguments after --")
    out = Path(ns.out or f"bench/reproduce-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        cfg = reproduce.ReproduceConfig(
            recorded=Path(ns.reproduce), out=out, schemes=schemes, seeds=seeds,
            bandwidths=bandwidths,
            steps_fraction=1.0 if ns.steps_fraction is None else ns.steps_fraction,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        outcome = reproduce.reproduce(cfg, on_run=progress)
    except reproduce.RecordError as exc:
        raise UsageError(str(exc)) from None
    print((out / "reproduce.md").read_text(), flush=True)
    return EXIT_OK if outcome["ok"] else EXIT_FAILED


# --------------------------------------------------------------------------------------------
# deto info


def info() -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import deto
    from deto.replicators import REGISTRY
    from deto.run import report
    from deto.run.presets import PRESETS

    cuda = torch.cuda.is_available()
    return {
        "versions": report.versions(),
        "git_sha": report.git_sha(),
        "device": {
            "default": "cuda" if cuda else "cpu",
            "cuda_devices": [
                torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
            ],
            "cpu_cores": os.cpu_count(),
        },
        "backend": deto.Topology(nodes=1).backend,
        "backends_available": {
            "gloo": dist.is_available() and dist.is_gloo_available(),
            "nccl": dist.is_available() and dist.is_nccl_available(),
        },
        "replicators": {
            name: cls.__doc__.strip().splitlines()[0] if cls.__doc__ else ""
            for name, cls in sorted(REGISTRY.items())
        },
        "schemes": {name: p.summary for name, p in PRESETS.items()},
        "extras": extras.installed(),
        "integrations": {
            name: not extras.missing(name) for name in sorted(extras.INTEGRATIONS)
        },
    }


_RST_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def plain_text(doc: str) -> str:
    """A docstring line as a terminal shows it: no reST roles or literal backticks."""
    return _RST_ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], doc).replace("``", "")


def cmd_selftest(ns: argparse.Namespace) -> int:
    from deto.bench.selftest import run_selftest

    try:
        return run_selftest(ns.device, ns.out, quick=ns.quick)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_info(ns: argparse.Namespace) -> int:
    data = info()
    if ns.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    v = data["versions"]
    lines = [
        f"deto {v['deto']}  (python {v['python']}, torch {v['torch']}, "
        f"git {data['git_sha'] or '-'})",
        f"device: {data['device']['default']}"
        + (f" ({', '.join(cuda)})" if (cuda := data["device"]["cuda_devices"]) else "")
        + f", {data['device']['cpu_cores']} CPU core(s)",
        f"backend: {data['backend']}  (available: "
        + ", ".join(k for k, ok in data["backends_available"].items() if ok) + ")",
        "replicators:",
        *(f"  {k:<9} {plain_text(doc)}" for k, doc in data["replicators"].items()),
        "schemes (deto train --scheme):",
        *(f"  {k:<15} {plain_text(doc)}" for k, doc in data["schemes"].items()),
        "extras (pip install 'deto[NAME]'): "
        + (", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in data["extras"].items())
           or "unknown (deto is not installed, only on the path)"),
        "integrations: "
        + ", ".join(f"{k} {'yes' if ok else 'no'}" for k, ok in data["integrations"].items()),
    ]
    print("\n".join(lines))
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# Entry point


def _bench_defaults() -> tuple[str, ...]:
    from deto.bench.sweep import DEFAULT_SCHEMES

    return DEFAULT_SCHEMES


def _bench_minutes() -> int:
    from deto.bench.sweep import DEFAULT_MINUTES

    return DEFAULT_MINUTES


def build_parser() -> _Parser:
    import deto
    from deto.bench.reproduce import steps_fraction_field
    from deto.replicators.options import describe_range

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
        "namespace, links shaped to RATE with tc tbf (e.g. 100mbit, 1gbit; needs root and "
        "iproute2)",
    )
    train.set_defaults(func=cmd_train)
    bench_p = sub.add_parser(
        "bench", help="several schemes side by side, optionally over emulated slow links",
        description=BENCH_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench_p.add_argument("--schemes", default=None, metavar="A,B,...",
                         help="comma-separated schemes; SCHEME+KNOB[=VALUE]... runs a preset "
                         "with knobs changed as a scheme of its own, e.g. flexdemo+overlap or "
                         "flexdemo+topk=8 "
                         f"(default: {','.join(_bench_defaults())}: {len(_bench_defaults())} "
                         f"runs of the default task, about {_bench_minutes()} minutes on 2 cores "
                         "per link and seed; with --reproduce: every recorded one)")
    bench_p.add_argument("--bandwidth", default=None, metavar="RATE,...",
                         help="comma-separated link rates, 'none' for unshaped (default: none; "
                         "with --reproduce: each run's recorded link)")
    bench_p.add_argument("--seeds", default=None, metavar="N,N,...",
                         help="comma-separated seeds; every scheme runs with each (default: 0; "
                         "with --reproduce: every recorded one)")
    bench_p.add_argument("--out", default=None, metavar="DIR",
                         help="output directory (default: bench/<timestamp>, "
                         "bench/reproduce-<timestamp>)")
    bench_p.add_argument("--allow-dirty", action="store_true",
                         help="allow an --out inside benchmarks/results/ (results meant for "
                         "committing) from a working tree with uncommitted changes; the report "
                         "says so at the top")
    bench_p.add_argument("--reproduce", default=None, metavar="DIR",
                         help="re-run the runs recorded in DIR/results.json and compare (exit 1 "
                         "on a mismatch of config, bytes, training losses or final loss)")
    fraction = steps_fraction_field()
    bench_p.add_argument("--steps-fraction", action=_Number, default=None, metavar="F",
                         parse=functools.partial(_parse_field, "--steps-fraction", fraction),
                         help=f"with --reproduce: {fraction.metadata['help']} "
                         f"({describe_range(fraction)})")
    bench_p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    bench_p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    bench_p.set_defaults(func=cmd_bench, train_args=[])
    self_p = sub.add_parser(
        "selftest", help="the checks to run first on a new machine (CUDA/NCCL, determinism)",
        description="Run deto's replicators on --device (two runs bitwise equal, equal to the "
        "CPU within a stated tolerance), DeMo's local work per step, deto train (flexdemo, "
        "full) and the integrations' examples for a few steps, and write results.json and "
        "report.md. On a GPU: make gpu-check. --device cpu is a dry run of the same steps.",
    )
    self_p.add_argument("--device", choices=("cpu", "cuda"), default="cuda",
                        help="device to check (default: cuda)")
    self_p.add_argument("--out", type=Path, default=None,
                        help="output folder (default: benchmarks/results/<date>-gpu-<device>)")
    self_p.add_argument("--quick", action="store_true",
                        help="in-process checks only (no deto train, no integrations)")
    self_p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    self_p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    self_p.set_defaults(func=cmd_selftest)
    info_p = sub.add_parser("info", help="versions, device, replicators, schemes, extras")
    info_p.add_argument("--json", action="store_true", help="machine-readable output")
    info_p.set_defaults(func=cmd_info)
    from deto import plan_cli

    plan_cli.add_parser(sub)
    parser.commands = sub.choices
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    passed: list[str] = []
    if args[:1] == ["bench"] and "--" in args:  # `deto bench [flags] -- [deto train flags]`
        cut = args.index("--")
        args, passed = args[:cut], args[cut + 1 :]
    ns, unknown = parser.parse_known_args(args)
    if unknown:  # argparse would blame the top-level parser: name the subcommand instead
        parser.commands.get(ns.command, parser).error(
            f"unrecognized arguments: {' '.join(unknown)}"
        )
    if passed:
        ns.train_args = passed
    if ns.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if ns.command == "info":
        configure_logging(logging.WARNING)
    else:
        configure_logging(_log_level(ns))
    from deto.launch.dispatch import under_torchrun
    from deto.launch.local import RankFailure
    from deto.run import provenance

    typed = ["deto", *(sys.argv[1:] if argv is None else argv)]
    provenance.note_command(typed, inherited=under_torchrun())

    try:
        if ns.command in ("train", "bench"):
            extras.require("cli", f"deto {ns.command}")
        return int(ns.func(ns))
    except extras.MissingExtra as exc:
        print(f"deto {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"deto {ns.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RankFailure as exc:
        if exc.traceback:
            logger.debug("rank %d: %s", exc.rank, exc.traceback.rstrip())
        hint = ""
        if exc.traceback and not ns.verbose:
            where = f"in {exc.log_file}" if exc.log_file else "with -v"
            hint = f" (traceback {where})"
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

