"""Parsing ``deto``'s command line: errors name the subcommand, numeric flags have ranges."""

from __future__ import annotations

import datetime
import functools
import math
import random
import string

import pytest

import deto
from deto import cli
from deto.replicators.options import in_range
from deto.run import provenance
from deto.run.config import FT_ONLY, KEYS, KNOBS, flag, resolve
from deto.run.presets import PRESETS


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse exits by itself
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("argv", "prefix"),
    [
        (["train", "--nosuchflag"], "deto train: error: unrecognized arguments: --nosuchflag"),
        (["bench", "--nosuchflag"], "deto bench: error: unrecognized arguments: --nosuchflag"),
        (["info", "--nosuchflag"], "deto info: error: unrecognized arguments: --nosuchflag"),
        (["info", "extra"], "deto info: error: unrecognized arguments: extra"),
        (["train", "--steps"], "deto train: error: argument --steps: expected one argument"),
        (["--nosuchflag"], "deto: error: unrecognized arguments: --nosuchflag"),
        (["nosuchcommand"], "deto: error: argument COMMAND: invalid choice"),
    ],
)
def test_a_parse_error_names_the_subcommand(capsys, argv, prefix) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith(prefix), err


NUMERIC = [name for name, f in KEYS.items() if f.type in ("int", "float")]


def test_every_numeric_key_declares_its_range() -> None:
    for name in NUMERIC:
        meta = KEYS[name].metadata
        assert meta["low"] is not None or meta["high"] is not None, name
    assert len(NUMERIC) > 20


def test_every_float_key_has_a_finite_upper_bound() -> None:
    """A float past its bound is refused when read: none reaches a conversion that overflows
    (``--timeout 1e20`` did, in ``datetime.timedelta``, on every rank after the launch)."""
    floats = [name for name in NUMERIC if KEYS[name].type == "float"]
    assert {"lr", "timeout", "outer_lr"} <= set(floats)
    for name in floats:
        assert math.isfinite(KEYS[name].metadata["high"]), name
    for bound, ms in (("low", 1), ("high", 604_800_000)):  # torch's whole milliseconds
        timeout = deto.Topology(nodes=1, timeout=KEYS["timeout"].metadata[bound])
        assert timeout.collective_timeout == datetime.timedelta(milliseconds=ms)
    for wrong in (1e-4, 1e20):  # 0 ms would mean no timeout; 1e20 s overflows timedelta
        with pytest.raises(ValueError, match="timeout"):
            deto.Topology(nodes=1, timeout=wrong)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--seq-len", "0"], "--seq-len must be an integer >= 1, got 0"),
        (["train", "--nodes=-3"], "--nodes must be an integer >= 1, got -3"),
        (["train", "--steps", "2.5"], "--steps must be an integer >= 1, got '2.5'"),
        (["train", "--lr", "nan"], "--lr must be a number in (0.0, 1000.0], got nan"),
        (["train", "--lr", "1e400"], "--lr must be a number in (0.0, 1000.0], got 1e400"),
        (["train", "--timeout", "0"], "--timeout must be a number in [0.001, 604800.0], got 0"),
        (["train", "--timeout", "1e20"],
         "--timeout must be a number in [0.001, 604800.0], got 1e20"),
        (["train", "--grad-clip", "1e308"],
         "--grad-clip must be a number in [0.0, 1000000000.0], got 1e308"),
        (["train", "--decay", "1"], "--decay must be a number in [0.0, 1.0), got 1"),
        (["train", "--seed", str(2**64)],
         f"--seed must be an integer in [0, {2**64 - 1}], got {2**64}"),
        (["bench", "--steps-fraction", "0"],
         "--steps-fraction must be a number in (0.0, 1.0], got 0"),
    ],
)  # fmt: skip
def test_a_numeric_flag_out_of_range_says_its_range(capsys, argv, message) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2 and out == ""
    command = f"deto {argv[0]}"
    assert err == f"{command}: error: {message} (see {command} --help)\n"


def test_a_flag_and_a_config_file_share_one_range(capsys) -> None:
    """The parse-time check and TrainConfig's check read the same declaration."""
    with pytest.raises(ValueError, match=r"Invalid seq_len: 0 \(must be an integer >= 1\)"):
        resolve({"seq_len": 0})
    assert resolve({"seq_len": 1}).seq_len == 1
    code, _, err = _run(capsys, "train", "--seq-len", "0")
    assert code == 2 and "--seq-len must be an integer >= 1, got 0" in err
    assert cli.build_parser().parse_args(["train", "--seq-len", "1"]).seq_len == 1


SPECIAL = [
    "0", "-0", "1", "-1", "2", "7", "0.5", "1.5", "-1.5", "1e-300", "1e3", "1e20", "1e308",
    "-1e308", "1.7976931348623157e308", "1e400", "-1e400", "nan", "NaN", "-nan", "inf", "-inf",
    "Infinity", "604800", "604800.0001", "1000.0", "1000.0001", "1e9", "1000000001", "1e-4",
    str(2**31), str(2**63), str(2**64 - 1),
    str(2**64), str(10**30), "9" * 5000, "x", "", " ", "\n5", "-5\n", "1,2", "0x10", "1_000",
    "\uff11", "--", "-", "True", "None", "1 2",
]  # fmt: skip


def _fuzz_values(rng: random.Random, n: int) -> list[str]:
    values = list(SPECIAL)
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            values.append(str(rng.randint(-(10 ** rng.randint(0, 30)), 10 ** rng.randint(0, 30))))
        elif kind == 1:
            values.append(repr(rng.uniform(-2.0, 2.0) * 10 ** rng.randint(-10, 30)))
        elif kind == 2:
            values.append(str(rng.randint(0, 300)))
        elif kind == 3:
            values.append(repr(rng.random()))
        else:
            values.append("".join(rng.choice(string.printable) for _ in range(rng.randint(1, 6))))
    return values


def _context(name: str) -> list[str]:
    """Flags under which ``name`` applies: a scheme with that knob, --ft for an --ft key."""
    if name in KNOBS:
        scheme = next(p.name for p in PRESETS.values() if p.options and name in p.options.knobs())
        return ["--scheme", scheme]
    return ["--ft"] if name in FT_ONLY else []


def test_fuzz_every_numeric_flag(capsys, monkeypatch) -> None:
    """Random values for every numeric flag of every subcommand, huge ones (1e20, 1e308, inf)
    and nan among them, parsed and validated (never run): each either parses into a valid,
    finite config or ends with one line naming the flag and its range, exit 2."""
    from deto.launch import dispatch

    parsed: dict[str, object] = {}

    def validate_only(flags, **_: object) -> None:  # dispatch.train's checks, nothing launched
        parsed.clear()
        parsed.update(flags)
        try:
            resolve(flags)
        except ValueError as exc:
            raise dispatch.UsageError(str(exc)) from None

    for var in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(provenance.COMMAND_ENV, "[]")  # main() notes its command there
    monkeypatch.setattr(dispatch, "train", validate_only)
    monkeypatch.setattr(cli, "build_parser", functools.cache(cli.build_parser))  # for speed
    monkeypatch.setattr(cli.extras, "require", lambda *_: None)  # reads package metadata
    rng = random.Random(24)
    cases = [("train", flag(name), name, _context(name)) for name in NUMERIC]
    cases += [("bench", "--steps-fraction", "steps_fraction", []),
              ("bench", "--seeds", "seeds", ["--steps-fraction=0.5"])]  # fmt: skip
    for command, option, name, context in cases:
        for i, text in enumerate(_fuzz_values(rng, 24)):
            given = [f"{option}={text}"] if i % 2 else [option, text]  # both spellings
            parsed.clear()
            code, out, err = _run(capsys, command, *context, *given)
            what = f"{command} {option} {text!r}: {err!r}"
            if code == 0:
                assert command == "train" and err == "" and out == "", what
                f = KEYS[name]
                value = parsed[name]
                assert type(value) is (int if f.type == "int" else float), what
                assert in_range(f, value) and math.isfinite(value), what
                if name == "timeout":  # what every rank turns it into
                    ms = deto.Topology(nodes=1, timeout=value).collective_timeout / 1e-3
                    assert 1 <= ms.total_seconds() < 2**63, what  # torch's milliseconds, not 0
                continue
            assert code == 2 and out == "", what
            lines = err.splitlines()
            assert len(lines) == 1 and err.endswith("\n"), what
            assert lines[0].startswith(f"deto {command}: error: "), what
            if name == "seeds" and option not in lines[0]:  # valid seeds: then this one
                assert "--steps-fraction applies to --reproduce only" in lines[0], what
            else:
                assert option in lines[0] or name in lines[0], what
