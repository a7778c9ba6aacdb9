"""Provenance: what is recorded about the machine and checkout, and the dirty-tree refusal."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from deto.bench import sweep
from deto.run import provenance

X86 = """processor\t: 0
model name\t: Some CPU @ 2.0GHz
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 avx f16c avx2 avx512f avx512_vnni amx_bf16 lm
processor\t: 1
model name\t: Some CPU @ 2.0GHz
flags\t\t: fpu sse
"""
ARM = "processor\t: 0\nFeatures\t: fp asimd asimdhp sve bf16 i8mm crc32\nCPU part\t: 0xd40\n"


def test_parse_cpuinfo_keeps_the_model_and_the_vector_extensions():
    x86 = provenance.parse_cpuinfo(X86)
    assert x86["model"] == "Some CPU @ 2.0GHz"
    assert x86["vector_flags"] == sorted(
        [
            "sse",
            "sse2",
            "ssse3",
            "fma",
            "sse4_1",
            "avx",
            "f16c",
            "avx2",
            "avx512f",
            "avx512_vnni",
            "amx_bf16",
        ]
    )
    arm = provenance.parse_cpuinfo(ARM)
    assert arm["model"] is None and arm["vector_flags"] == [
        "asimd",
        "asimdhp",
        "bf16",
        "i8mm",
        "sve",
    ]


def test_collect_records_threads_torch_build_and_packages(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    provenance.note_command(["deto", "train", "--steps", "5"])
    got = provenance.collect()
    assert got["command"] == ["deto", "train", "--steps", "5"]
    assert (
        got["threads"]["env"]["OMP_NUM_THREADS"] == "3" and got["threads"]["torch_num_threads"] >= 1
    )
    assert len(got["torch"]["config_sha256"]) == 64 and got["torch"]["cpu_capability"]
    assert {"deto", "torch", "numpy"} <= set(got["packages"])
    json.dumps(got)  # it goes into summary.json as is


def test_a_rank_keeps_the_command_of_the_deto_that_launched_it(monkeypatch):
    monkeypatch.setenv(
        provenance.COMMAND_ENV, json.dumps(["deto", "train", "--bandwidth", "1gbit"])
    )
    provenance.note_command(["deto", "train", "--config", "out/train.toml"], inherited=True)
    assert provenance.command() == ["deto", "train", "--bandwidth", "1gbit"]
    provenance.note_command(["deto", "train", "--steps", "2"])  # a new deto: its own
    assert provenance.command() == ["deto", "train", "--steps", "2"]


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A checkout laid out like deto's: src/pkg/ (the code) and benchmarks/results/."""
    root = tmp_path / "repo"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (root / "benchmarks" / "results").mkdir(parents=True)
    (root / "benchmarks" / "results" / "README").write_text("results\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "init")
    return root


def test_git_state_counts_tracked_changes_and_untracked_code_only(repo):
    code = repo / "src" / "pkg"
    clean = provenance.git_state(code)
    assert clean is not None and clean["dirty"] is False and clean["diff_sha256"] is None
    (repo / "benchmarks" / "results" / "new-run").mkdir()
    (repo / "benchmarks" / "results" / "new-run" / "results.json").write_text("{}")
    assert provenance.git_state(code)["dirty"] is False  # an untracked output is not code
    (code / "extra.py").write_text("y = 2\n")
    untracked = provenance.git_state(code)
    assert untracked["dirty"] and untracked["changed"] == ["src/pkg/extra.py"]
    (code / "mod.py").write_text("x = 2\n")
    both = provenance.git_state(code)
    assert both["changed"] == ["src/pkg/extra.py", "src/pkg/mod.py"]
    assert both["diff_sha256"] != untracked["diff_sha256"]
    assert provenance.git_state(repo.parent) is None  # not a checkout


def test_bench_refuses_a_dirty_tree_for_results_meant_for_committing(repo, tmp_path):
    code = repo / "src" / "pkg"
    committed = repo / "benchmarks" / "results" / "2030-01-01"
    assert provenance.meant_for_committing(committed, code)
    assert not provenance.meant_for_committing(repo / "bench" / "x", code)
    assert provenance.check_committable(committed, allow_dirty=False, where=code)["dirty"] is False
    (code / "mod.py").write_text("x = 2\n")
    with pytest.raises(provenance.DirtyTreeError, match=r"uncommitted changes \(src/pkg/mod.py\)"):
        provenance.check_committable(committed, allow_dirty=False, where=code)
    assert provenance.check_committable(committed, allow_dirty=True, where=code)["dirty"] is True
    assert (
        provenance.check_committable(repo / "bench" / "x", allow_dirty=False, where=code)["dirty"]
        is True
    )


def _fake_runner(argv: list[str]) -> int:
    """A `deto train` that writes a tiny run's outputs instead of training."""
    out = Path(argv[argv.index("--out") + 1])
    out.mkdir(parents=True)
    records = [
        {
            "step": s,
            "train_loss": 3.0 - s / 10,
            "val_loss": 3.0 - s / 10,
            "wall_time_s": float(s),
            "inter_node_bytes_sent_total": 100 * s,
        }
        for s in (5, 10)
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "scheme": argv[argv.index("--scheme") + 1],
        "task": "lm",
        "nodes": 2,
        "ranks_per_node": 2,
        "steps": 10,
        "params": 10,
        "final_val_loss": 2.0,
        "val_loss": [[5, 2.5], [10, 2.0]],
        "step_time_s_median": 1.0,
        "inter_node_bytes_sent_per_step": 100.0,
        "full_sync_bytes_per_step": 100,
        "replicas_identical": True,
        "wall_time_s": 10.0,
        "link": None,
        "versions": {},
        "git_sha": None,
    }
    (out / "summary.json").write_text(json.dumps(summary))
    return 0


def test_deto_bench_refuses_then_with_allow_dirty_says_so_at_the_top(repo, monkeypatch, capsys):
    from deto import cli

    monkeypatch.setattr(provenance, "source_dir", lambda: repo / "src" / "pkg")
    monkeypatch.setattr(sweep, "run_child", _fake_runner)
    (repo / "src" / "pkg" / "mod.py").write_text("x = 2\n")
    out = repo / "benchmarks" / "results" / "2030-01-01"
    assert cli.main(["bench", "--schemes", "hsdp", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "uncommitted changes (src/pkg/mod.py)" in err[0]
        and "--allow-dirty" in err[0]
    )
    assert not out.exists()  # refused before running anything

    assert cli.main(["bench", "--schemes", "hsdp", "--out", str(out), "--allow-dirty"]) == 0
    report = (out / "report.md").read_text().splitlines()
    assert report[2].startswith("> **Not from a clean commit**") and "src/pkg/mod.py" in report[2]
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["provenance"]["git"]["dirty"] is True
    assert (
        meta["provenance"]["command"][:2] == ["deto", "bench"]
        and "--allow-dirty" in meta["provenance"]["command"]
    )


def test_differences_name_what_changed():
    a = {
        "cpu": {"model": "A", "vector_flags": ["avx2"]},
        "torch": {"version": "2.13"},
        "packages": {"x": "1"},
    }
    b = {
        "cpu": {"model": "B", "vector_flags": ["avx2"]},
        "torch": {"version": "2.13"},
        "packages": {"x": "2"},
    }
    assert provenance.differences(a, b) == [
        ("cpu.model", "A", "B"),
        ("packages", {"x": "1"}, {"x": "2"}),
    ]
    assert provenance.differences(a, a) == []
