"""Embedded data: a deterministic split, per-rank batches, the unigram entropy baseline."""

from __future__ import annotations

import math

import pytest
import torch

from deto.run import data


@pytest.fixture
def fake_stdlib(tmp_path):
    files = {
        "os.py": b"import sys\n" * 50,
        "json/__init__.py": b"def loads(s):\n    pass\n" * 30,
        "json/decoder.py": b"class Decoder:\n    pass\n" * 30,
        "email/parser.py": b"# parser\n" * 80,
        "test/test_os.py": b"SKIPPED" * 100,
        "site-packages/pkg.py": b"SKIPPED" * 100,
        "idlelib/run.py": b"SKIPPED" * 100,
        "notes.txt": b"not python",
    }
    for rel, content in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    for i in range(40):
        (tmp_path / f"mod{i:02d}.py").write_bytes(f"x = {i}\n".encode() * 20)
    return tmp_path


def test_file_list_is_sorted_and_skips_tests_and_packages(fake_stdlib) -> None:
    names = [rel for rel, _ in data.stdlib_files(fake_stdlib)]
    assert names == sorted(names)
    assert "json/decoder.py" in names and "os.py" in names
    assert not any(n.startswith(("test/", "site-packages/", "idlelib/")) for n in names)
    assert "notes.txt" not in names


def test_split_depends_only_on_the_file_name(fake_stdlib) -> None:
    a = data.load_stdlib_corpus(fake_stdlib)
    b = data.load_stdlib_corpus(fake_stdlib)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.digest == b.digest
    assert a.val_files > 0 and a.train_files > a.val_files
    # the decision for a file never changes (it is part of the data's contract)
    assert data.in_validation("os.py") == data.in_validation("os.py")
    fraction = sum(data.in_validation(f"m{i}.py") for i in range(4000)) / 4000
    assert abs(fraction - data.VAL_FRACTION) < 0.02


def test_real_stdlib_is_found() -> None:
    files = data.stdlib_files()
    assert len(files) > 100
    assert any(rel == "json/decoder.py" for rel, _ in files)


def test_unigram_entropy_in_nats() -> None:
    assert data.unigram_entropy(torch.arange(256, dtype=torch.uint8)) == pytest.approx(
        math.log(256)
    )
    assert data.unigram_entropy(torch.full((10,), 7, dtype=torch.uint8)) == pytest.approx(0.0)
    two = torch.tensor([1, 2] * 50, dtype=torch.uint8)
    assert data.unigram_entropy(two) == pytest.approx(math.log(2))
    skew = torch.tensor([0] * 3 + [1], dtype=torch.uint8)
    assert data.unigram_entropy(skew) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    )


def test_batches_are_a_function_of_seed_step_and_rank() -> None:
    text = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    x, y = data.lm_batch(text, 16, 4, seed=0, step=3, rank=1)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next bytes
    again = data.lm_batch(text, 16, 4, seed=0, step=3, rank=1)
    assert torch.equal(x, again[0])
    other_rank = data.lm_batch(text, 16, 4, seed=0, step=3, rank=2)[0]
    other_step = data.lm_batch(text, 16, 4, seed=0, step=4, rank=1)[0]
    other_seed = data.lm_batch(text, 16, 4, seed=1, step=3, rank=1)[0]
    assert not torch.equal(x, other_rank) and not torch.equal(x, other_step)
    assert not torch.equal(x, other_seed)
    with pytest.raises(ValueError, match="too short"):
        data.lm_batch(text[:10], 16, 4, seed=0, step=1, rank=0)


def test_eval_windows_and_even_shards() -> None:
    starts = data.eval_windows(torch.zeros(1000, dtype=torch.uint8), 10, 5)
    assert starts.tolist() == [0, 247, 494, 742, 989]
    shares = [data.shard_evenly(7, 3, i) for i in range(3)]
    assert [s for s, _ in shares] == [[0, 3, 6], [1, 4], [2, 5]]
    assert {length for _, length in shares} == {3}  # every rank pads to the same length


def test_digits_split_is_fixed() -> None:
    a = data.load_digits_split()
    b = data.load_digits_split()
    assert torch.equal(a.val_y, b.val_y) and torch.equal(a.train_x, b.train_x)
    assert a.train_x.shape[1:] == (1, 8, 8) and float(a.train_x.max()) <= 1.0
    assert len(a.val_y) + len(a.train_y) == 1797
    x, y = data.vision_batch(a, 8, seed=0, step=1, rank=0)
    assert x.shape == (8, 1, 8, 8) and y.shape == (8,)
