"""``deto plan``: the cost model (:mod:`deto.plan`) on the command line.

It turns a ``--model`` (a ``deto train`` model at its task's defaults, or a parameter count)
and the ``--scheme`` presets into :class:`deto.plan.Scheme` inputs, prints one row per scheme
and the node counts at which each scheme's bytes pass HSDP's, and optionally writes JSON and a
plot of step time against bandwidth. Bad input raises :class:`UsageError` (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from deto import plan
from deto.launch.dispatch import UsageError
from deto.netem.rates import format_bandwidth, parse_latency, parse_rate
from deto.plan.auto import Decision, choose
from deto.plan.cost import MAX_NODES
from deto.replicators import make_replicator
from deto.run import config, tasks
from deto.run.presets import AUTO_SCHEME, OPTIMIZERS, PRESETS

logger = logging.getLogger(__name__)

BASELINE = "hsdp"
"""The scheme every crossover is measured against: torch's HSDP, a ring all-reduce."""
DEFAULT_COMPUTE_S = 1.0
PLOT_BANDWIDTHS_BPS = tuple(10 ** (6 + i / 4) for i in range(17))  # 1 Mbit/s .. 10 Gbit/s

DESCRIPTION = """\
Predict each scheme's inter-node traffic, step time and memory per rank on a cluster, without
running it: bytes per step are exact (the replicators' own rules), times are the bytes over
--bandwidth plus --latency per ring step, on top of --compute-s of compute per step."""


def add_parser(sub: Any) -> None:
    """Add ``deto plan`` to the ``deto`` command's subparsers."""
    p = sub.add_parser("plan", help="predict bytes, step time and memory of every scheme",
                       description=DESCRIPTION)  # fmt: skip
    p.add_argument("--model", required=True, metavar="NAME|CONFIG|PARAMS",
                   help=f"a deto train --model ({', '.join(config.MODEL_TASKS)}) at its task's "
                   "defaults, a Hugging Face config.json (or its folder), or a parameter count "
                   "such as 1.3e9 (a Llama-like layout)")
    p.add_argument("--nodes", type=int, default=2, metavar="R", help="nodes (default: 2)")
    p.add_argument("--ranks-per-node", type=int, default=1, metavar="G",
                   help="FSDP2 ranks per node (default: 1)")
    p.add_argument("--bandwidth", required=True, metavar="RATE",
                   help="each node's inter-node link, e.g. 100mbit, 1gbit, 25gbit")
    p.add_argument("--latency", default="0ms", metavar="DURATION",
                   help="one-way latency per message, e.g. 20ms (default: 0ms)")
    p.add_argument("--compute-s", type=float, default=DEFAULT_COMPUTE_S, metavar="SECONDS",
                   help=f"compute time of one step (default: {DEFAULT_COMPUTE_S:g})")
    p.add_argument("--schemes", default=None, metavar="A,B,...",
                   help="comma-separated --scheme presets (default: every one that fits the "
                   "cluster, except the none control)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per scheme")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="also plot step time against bandwidth per scheme (PNG)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    p.set_defaults(func=cmd_plan)


def model_shapes(text: str) -> plan.ModelShapes:
    """``--model``: a ``deto train`` model built on the meta device, a Hugging Face config, or
    a parameter count."""
    if text in config.MODEL_TASKS:
        try:
            cfg = config.resolve({"model": text})
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        with torch.device("meta"):
            module = tasks.task_model(cfg)
        return plan.from_module(
            module, f"deto train --model {text} (d_model {cfg.d_model}, {cfg.layers} layers)"
        )
    if text.endswith(".json") or Path(text).is_dir():
        return hf_config_shapes(Path(text))
    try:
        count = float(text)
    except ValueError:
        raise UsageError(
            f"Invalid --model: {text!r} (a model, one of {', '.join(config.MODEL_TASKS)}, a "
            "Hugging Face config.json or its folder, or a parameter count such as 1.3e9)"
        ) from None
    try:
        return plan.from_param_count(count)
    except ValueError as exc:
        raise UsageError(f"Invalid --model: {exc}") from None


def hf_config_shapes(path: Path) -> plan.ModelShapes:
    """``--model config.json`` (or its folder): the Hugging Face model it describes, built on
    the meta device (no weights, no download): a causal LM's head where the config has one."""
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"Invalid --model: no Hugging Face config at {file}")
    try:
        import transformers
    except ImportError:
        raise UsageError("--model with a Hugging Face config needs transformers: "
                         "pip install 'deto[hf]'") from None  # fmt: skip
    try:
        hf = transformers.AutoConfig.from_pretrained(str(file))
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"Invalid --model: {file} is not a Hugging Face config ({reason})"
        ) from None
    with torch.device("meta"):
        try:
            module = transformers.AutoModelForCausalLM.from_config(hf)
        except ValueError:  # an encoder-decoder or encoder: the bare model
            module = transformers.AutoModel.from_config(hf)
    return plan.from_module(module, f"{type(module).__name__} from {file}")


def schemes(text: str | None, ranks_per_node: int) -> list[plan.Scheme]:
    """``--schemes`` as plan inputs: each preset's replicator and base optimizer."""
    if text is None:
        names = [n for n, p in PRESETS.items()
                 if n != "none" and p.ranks_per_node in (None, ranks_per_node)]  # fmt: skip
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
    out = []
    for name in names:
        preset = PRESETS.get(name)
        if preset is None:
            raise UsageError(f"Invalid --schemes: {name!r} (valid: {', '.join(PRESETS)})")
        if preset.ranks_per_node not in (None, ranks_per_node):
            raise UsageError(f"Invalid --schemes: {name!r} needs --ranks-per-node "
                             f"{preset.ranks_per_node}")  # fmt: skip
        rep = None
        if name == AUTO_SCHEME:  # its replicator depends on the link: see priced()
            pass
        elif preset.replicator is not None and preset.options is not None:
            rep = make_replicator(preset.replicator, **preset.options.changed())
        out.append(plan.Scheme(name, rep, OPTIMIZERS[preset.defaults["optimizer"]]))
    if not out:
        raise UsageError("Invalid --schemes: none given")
    return out


def priced(chosen: list[plan.Scheme], decision: Decision | None) -> list[plan.Scheme]:
    """``chosen`` with ``auto`` standing for the setting it would train (``decision``'s)."""
    if decision is None:
        return chosen
    rep = decision.chosen.replicator()
    return [plan.Scheme(s.name, rep, s.optimizer) if s.name == AUTO_SCHEME else s
            for s in chosen]  # fmt: skip


MAX_RANKS_PER_NODE = 1 << 16


def _link(ns: argparse.Namespace) -> plan.Link:
    if not 1 <= ns.nodes <= MAX_NODES:
        raise UsageError(f"Invalid --nodes: {ns.nodes} (must be in [1, {MAX_NODES}])")
    if not 1 <= ns.ranks_per_node <= MAX_RANKS_PER_NODE:
        raise UsageError(f"Invalid --ranks-per-node: {ns.ranks_per_node} "
                         f"(must be in [1, {MAX_RANKS_PER_NODE}])")  # fmt: skip
    if not (math.isfinite(ns.compute_s) and ns.compute_s >= 0):
        raise UsageError(f"Invalid --compute-s: {ns.compute_s} (must be >= 0)")
    try:
        return plan.Link(parse_rate(ns.bandwidth), parse_latency(ns.latency))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _size(nbytes: float) -> str:
    """Bytes in decimal units, three significant digits."""
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= factor:
            return f"{nbytes / factor:.3g} {unit}"
    return f"{nbytes:.0f} B"


def table(predictions: Sequence[plan.Prediction]) -> str:
    """One row per scheme: bytes per rank per step (averaged over its period) and of its
    busiest step per node, times, utilization and memory per rank."""
    head = ("scheme", "bytes/step/rank", "sync step/node", "comm s", "step s", "util",
            "memory/rank")  # fmt: skip
    rows = [head] + [
        (p.scheme, _size(p.bytes_per_step), _size(p.peak_node_bytes), f"{p.comm_s:.3g}",
         f"{p.step_s:.3g}", f"{p.utilization:.0%}", _size(p.memory_bytes))
        for p in predictions
    ]  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    def line(row: tuple[str, ...]) -> str:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(cells)

    return "\n".join(map(line, rows))


def crossovers(flows: dict[str, plan.Traffic]) -> dict[str, int | None]:
    """For each scheme but HSDP: the fewest nodes at which it sends more than HSDP."""
    return {name: plan.crossover(flow, flows[BASELINE])
            for name, flow in flows.items() if name != BASELINE}  # fmt: skip


def crossover_lines(
    found: dict[str, int | None], past: Callable[[int], list[plan.Prediction]]
) -> list[str]:
    """The crossover of each scheme, and which schemes still send less than HSDP past the
    first one (``past(nodes)``: the predictions there)."""
    lines = [f"nodes at which a scheme sends more per step than {BASELINE}'s ring all-reduce:"]
    width = max(map(len, found), default=0)
    for name, nodes in found.items():
        lines.append(f"  {name:<{width}}  " + (f"R = {nodes}" if nodes else "never"))
    hits = [n for n in found.values() if n is not None and n > 2]
    if hits:
        first = min(hits)
        preds = past(first)
        base = next(p for p in preds if p.scheme == BASELINE)
        fit = [p for p in preds if p.node_bytes_per_step < base.node_bytes_per_step]
        crossed = ", ".join(n for n, at in found.items() if at == first)
        lines.append(f"from R = {first} on, more than {BASELINE}: {crossed}")
        if fit:
            best = min(fit, key=lambda p: p.step_s)
            names = ", ".join(p.scheme for p in fit)
            lines.append(f"  still below {BASELINE} there: {names}; fastest there on this "
                         f"link: {best.scheme} ({best.step_s:.3g} s/step)")  # fmt: skip
    return lines


def plot(path: Path, curves: dict[str, list[float]], compute_s: float, title: str) -> None:
    """Step time against bandwidth, one line per scheme, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    same: dict[tuple[float, ...], list[str]] = {}  # schemes whose lines coincide share one
    for name, times in curves.items():
        same.setdefault(tuple(times), []).append(name)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rates = [b / 1e6 for b in PLOT_BANDWIDTHS_BPS]
    for line, names in same.items():
        ax.plot(rates, line, label=" = ".join(names), marker=".")
    ax.axhline(compute_s, color="grey", linestyle=":", label="compute")
    ax.set(xscale="log", yscale="log", xlabel="bandwidth per node (Mbit/s)",
           ylabel="predicted step time (s)", title=title)  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_plan(ns: argparse.Namespace) -> int:
    link = _link(ns)
    model = model_shapes(ns.model)
    chosen = schemes(ns.schemes, ns.ranks_per_node)
    if BASELINE not in {s.name for s in chosen}:
        chosen = [*schemes(BASELINE, ns.ranks_per_node), *chosen]
    decision = None
    if any(s.name == AUTO_SCHEME for s in chosen):
        decision = choose(model, ns.nodes, ns.ranks_per_node, link, ns.compute_s)
    flows = {s.name: plan.traffic(model, s.replicator, ns.ranks_per_node)
             for s in priced(chosen, decision)}  # fmt: skip

    def at(nodes: int, on: plan.Link) -> list[plan.Prediction]:
        """The schemes at ``nodes`` on ``on``; auto as it would choose there."""
        here = None
        if decision is not None:
            here = choose(model, nodes, ns.ranks_per_node, on, ns.compute_s)
        out = []
        for s in priced(chosen, here):
            flow = flows[s.name] if here is None or s.name != AUTO_SCHEME else plan.traffic(
                model, s.replicator, ns.ranks_per_node)
            out.append(plan.predict_traffic(s, model, flow, nodes, ns.ranks_per_node, on,
                                            ns.compute_s))  # fmt: skip
        return out

    predictions = at(ns.nodes, link)
    if ns.plot:
        sweep = [at(ns.nodes, plan.Link(b, link.latency_s)) for b in PLOT_BANDWIDTHS_BPS]
        curves = {s.name: [row[i].step_s for row in sweep] for i, s in enumerate(chosen)}
        plot(Path(ns.plot), curves, ns.compute_s,
             f"{ns.nodes} x {ns.ranks_per_node} ranks, {model.numel:,} parameters")
        logger.info("plot in %s", ns.plot)
    if ns.json:
        print(json.dumps([p.as_dict() for p in predictions], indent=2))
        return 0
    print(f"model: {model.description}")
    print(f"cluster: {ns.nodes} nodes x {ns.ranks_per_node} ranks, "
          f"{format_bandwidth(round(link.bandwidth_bps))} per node, latency "
          f"{link.latency_s * 1e3:g} ms, compute {ns.compute_s:g} s/step")  # fmt: skip
    print(table(predictions))
    if decision is not None:
        print(f"{AUTO_SCHEME}: would train {decision.chosen.name}: {decision.reason}")
    print("\n".join(crossover_lines(crossovers(flows), lambda nodes: at(nodes, link))))
    return 0
