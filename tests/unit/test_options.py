"""Replicator knobs declared once: options classes, and the flags, keys and presets made of them."""

from __future__ import annotations

import argparse
import dataclasses
from typing import get_args

import pytest

from deto.compress.chunking import BlockMode
from deto.compress.wire import VALUE_CODECS
from deto.replicators import (
    REGISTRY,
    DeMoOptions,
    DiLoCoOptions,
    KnobTypeError,
    SubsetOptions,
    make_replicator,
)
from deto.run.config import FIELDS, KEYS, KNOBS, TrainConfig, key_help, resolve
from deto.run.presets import PRESETS


def test_every_registered_replicator_is_built_from_its_options():
    for name, cls in REGISTRY.items():
        options = cls.Options()
        rep = make_replicator(name, **dataclasses.asdict(options))
        assert getattr(rep, "options", cls.Options()) == options, name


def test_constructor_knobs_are_the_options():
    rep = make_replicator("demo", topk=8, chunk=16, values="int8", every=2, skip_every=3)
    assert rep.options == DeMoOptions(topk=8, chunk=16, values="int8", every=2)
    assert (rep.topk, rep.chunk, rep.values, rep.schedule.every) == (8, 16, "int8", 2)
    assert rep.schedule.skip_every == 3  # schedule arguments pass through
    with pytest.raises(TypeError, match="unexpected keyword argument 'rate'"):
        make_replicator("demo", rate=0.5)


@pytest.mark.parametrize(
    ("make", "kind", "match"),
    [
        (lambda: DeMoOptions(topk=0), ValueError, r"Invalid topk: 0 \(must be an integer >= 1\)"),
        (lambda: DeMoOptions(topk=2.5), TypeError, "topk must be an int, got float"),
        (lambda: DeMoOptions(blocks="2d", chunk=4, topk=17), ValueError,
         "Invalid topk: 17 .*has 16"),
        (lambda: DeMoOptions(blocks="3d"), ValueError, "expected one of 1d, 2d"),
        (lambda: DeMoOptions(dense_fallback=1), TypeError, "dense_fallback must be a bool"),
        (lambda: SubsetOptions(rate=0.0), ValueError, r"must be a number in \(0.0, 1.0\]"),
        (lambda: DiLoCoOptions(outer_momentum=1.0), ValueError, r"in \[0.0, 1.0\)"),
    ],
)
def test_bad_knobs_name_the_value(make, kind, match):
    with pytest.raises(kind, match=match):
        make()


def test_a_wrong_type_is_bad_input_either_way():
    with pytest.raises(ValueError) as exc:
        SubsetOptions(rate="0.1")
    assert isinstance(exc.value, KnobTypeError) and isinstance(exc.value, TypeError)


def test_float_knobs_hold_floats_and_changed_lists_what_differs():
    options = DeMoOptions(decay=0, topk=4, chunk=16)
    assert options.decay == 0.0 and isinstance(options.decay, float)
    assert options.changed() == {"decay": 0.0, "chunk": 16}  # topk=4 is the default


def test_choices_derive_from_the_block_modes_and_the_wire_codecs():
    assert set(KNOBS["blocks"].metadata["choices"]) == set(get_args(BlockMode))
    assert KNOBS["values"].metadata["choices"] == VALUE_CODECS


def test_every_preset_names_its_replicators_options():
    for preset in PRESETS.values():
        if preset.replicator is None:
            assert preset.options is None
        else:
            assert type(preset.options) is REGISTRY[preset.replicator].Options


def test_knobs_are_the_presets_options_and_keys_are_fields_plus_knobs():
    declared = {
        name for p in PRESETS.values() if p.options is not None for name in p.options.knobs()
    }
    assert set(KNOBS) == declared
    assert set(KEYS) == set(FIELDS) | set(KNOBS) and not set(FIELDS) & set(KNOBS)
    assert {"topk", "chunk", "blocks", "values", "decay", "rate", "every", "outer_lr",
            "outer_momentum", "aggregation", "dense_fallback"} <= set(KNOBS)  # fmt: skip


def test_knob_help_gives_each_schemes_value():
    text = key_help("topk")
    assert "flexdemo, flexdemo-adamw: 4" in text and "flexdemo-lean: 14" in text
    assert "demo: 32" in text
    assert "diloco, sparseloco, streaming-diloco: 25" in key_help("every")


def test_a_knob_the_schemes_describe_differently_is_described_for_each():
    """DeMo's top-k counts DCT coefficients, DiLoCo's the pseudo-gradient's values: --help
    gives each description with its own schemes."""
    text = key_help("topk")
    assert text.startswith("DCT coefficients kept per chunk (flexdemo, flexdemo-adamw: 4;")
    assert text.endswith("; values kept per block when compressing (diloco, sparseloco: 64)")
    assert key_help("outer_lr").count("outer learning rate") == 1  # one description, once


def test_every_key_is_a_flag_of_deto_train():
    from deto.cli import build_parser

    parser = build_parser()
    train = next(
        a for a in parser._subparsers._group_actions  # type: ignore[union-attr]
        if isinstance(a, argparse._SubParsersAction)
    ).choices["train"]
    dests = {a.dest for a in train._actions}
    assert set(KEYS) <= dests
    ns = train.parse_args(["--topk", "8", "--no-dense-fallback", "--values", "bf16"])
    assert (ns.topk, ns.dense_fallback, ns.values) == (8, False, "bf16")


@pytest.mark.parametrize("scheme", sorted(PRESETS))
def test_to_dict_is_flat_and_round_trips(scheme):
    cfg = resolve({"scheme": scheme})
    flat = cfg.to_dict()
    assert list(flat) == list(KEYS)
    assert TrainConfig.from_dict(flat) == cfg
    for name in KNOBS:
        has = cfg.replicator is not None and name in cfg.replicator.knobs()
        assert (flat[name] is None) == (not has), name


def test_resolve_nests_the_knobs_of_the_scheme():
    cfg = resolve({"scheme": "flexdemo-lean", "topk": 8, "aggregation": "all"})
    assert cfg.replicator == DeMoOptions(blocks="2d", chunk=32, topk=8, values="int8",
                                         aggregation="all")  # fmt: skip
    rep = make_replicator("demo", **cfg.replicator_options())
    assert rep.options == cfg.replicator
    with pytest.raises(ValueError, match="--nesterov does not apply to scheme 'flexdemo'"):
        resolve({"nesterov": False})
    with pytest.raises(ValueError, match="Invalid replicator"):
        TrainConfig(scheme="diloco", replicator=DeMoOptions())
