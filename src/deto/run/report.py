"""What a run leaves behind: metric sinks, ``summary.json``, ``loss.png`` and the summary table.

Metrics are plain dicts (one per logged step) handed to sinks; the loop does not know where
they go. Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = (
    "scheme", "task", "nodes", "ranks_per_node", "steps", "params", "final_val_loss",
    "val_loss", "train_loss", "wall_time_s", "step_time_s_median",
    "inter_node_bytes_sent_per_step", "inter_node_bytes_received_per_step",
    "inter_node_bytes_sent_peak", "full_sync_bytes_per_step", "compression_ratio",
    "replicas_identical", "peak_rss_mb_per_rank", "link", "versions", "git_sha", "provenance",
)
"""Fields every ``summary.json`` has (documented in docs/cli.md); tasks add a few more."""


class MetricsSink(Protocol):
    def write(self, record: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line, flushed at once (a crash loses nothing written)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = path.open("a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._fh.write(json.dumps(record, sort_keys=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class TensorBoardSink:
    """Scalars for TensorBoard, when the ``tensorboard`` package is installed."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


def tensorboard_sink(log_dir: Path) -> TensorBoardSink | None:
    """A TensorBoard sink if ``tensorboard`` is importable, else ``None``."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return None
    try:
        return TensorBoardSink(log_dir)
    except Exception as exc:  # a broken optional install must not stop training
        logger.warning("TensorBoard logging disabled: %s", exc)
        return None


def versions() -> dict[str, str]:
    import deto

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deto": deto.__version__,
    }


def git_sha(where: Path | None = None) -> str | None:
    """The commit of the checkout deto runs from, or ``None`` outside a git checkout."""
    if where is None:
        import deto

        where = Path(deto.__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def plot_losses(
    path: Path,
    records: Sequence[Mapping[str, Any]],
    title: str,
    reference: tuple[str, float] | None = None,
) -> None:
    """Validation loss against step, wall-clock time and cumulative inter-node bytes.

    ``reference``: a ``(label, loss)`` drawn as a dashed line (the unigram entropy, for lm).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = [r for r in records if "val_loss" in r]
    train = [r for r in records if "train_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    ax = axes[0]
    if train:
        ax.plot(
            [r["step"] for r in train], [r["train_loss"] for r in train], color="0.7", label="train"
        )
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("step")
    axes[1].plot([r["wall_time_s"] for r in val], [r["val_loss"] for r in val], "o-")
    axes[1].set_xlabel("wall-clock time (s)")
    axes[2].plot(
        [r["inter_node_bytes_sent_total"] / 1e6 for r in val], [r["val_loss"] for r in val], "o-"
    )
    axes[2].set_xlabel("cumulative inter-node MB sent per node")
    for ax in axes:
        if reference is not None:
            ax.axhline(reference[1], color="0.4", linestyle="--", linewidth=1, label=reference[0])
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


BYTE_UNITS = ("B", "kB", "MB", "GB", "TB")
"""SI units, powers of 1000: the one convention of every byte figure deto shows."""
MIB = 2**20
"""Bytes in a MiB: ``peak_rss_mb_per_rank`` is in MiB (what the kernel reports, in KiB)."""


def format_bytes(n: float | None) -> str:
    """A byte count as a terminal or report shows it, in SI units (:data:`BYTE_UNITS`):
    ``512 B``, ``58.8 kB``, ``1.9 MB``; ``-`` for ``None``."""
    if n is None:
        return "-"
    for unit in BYTE_UNITS[:-1]:
        if abs(n) < (999.5 if unit == "B" else 999.95):  # what would round to 1000: next unit
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} {BYTE_UNITS[-1]}"


def format_table(summary: Mapping[str, Any]) -> str:
    """The human-readable end-of-run table."""
    ratio = summary.get("compression_ratio")
    rows: list[tuple[str, str]] = [
        ("scheme", f"{summary['scheme']} ({summary['model']} on {summary['task']})"),
        ("cluster", f"{summary['nodes']} node(s) x {summary['ranks_per_node']} rank(s)"),
        ("steps", str(summary["steps"])),
        ("parameters", f"{summary['params']:,}"),
        ("final val loss", "-" if (v := summary["final_val_loss"]) is None else f"{v:.4f} nats"),
    ]
    if "unigram_entropy" in summary:
        rows.append(("unigram entropy", f"{summary['unigram_entropy']:.4f} nats"))
    if "final_val_accuracy" in summary:
        rows.append(("final val accuracy", f"{summary['final_val_accuracy']:.3f}"))
    rows += [
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("step time (median)", f"{summary['step_time_s_median'] * 1000:.0f} ms"),
        (
            "inter-node sent/step",
            format_bytes(summary["inter_node_bytes_sent_per_step"]) + " per node",
        ),
        ("inter-node peak/step", format_bytes(summary["inter_node_bytes_sent_peak"]) + " per node"),
        ("full sync/step", format_bytes(summary["full_sync_bytes_per_step"]) + " per node"),
        ("compression", f"{ratio:.1f}x" if ratio is not None else "-"),
        (
            "replicas identical",
            {True: "yes", False: "NO", None: "n/a"}[summary["replicas_identical"]],
        ),
        ("peak RSS/rank", format_bytes(max(summary["peak_rss_mb_per_rank"]) * MIB)),
    ]
    if summary.get("out"):
        rows.append(("output", str(summary["out"])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def close_all(sinks: Iterable[MetricsSink]) -> None:
    for sink in sinks:
        try:
            sink.close()
        except Exception as exc:  # closing must not mask the run's own outcome
            logger.warning("closing %s failed: %s", type(sink).__name__, exc)
