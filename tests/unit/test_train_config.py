(
    """``deto train`` configuration: presets, precedence, validation with the bad value """
    """in the message."""
)

from __future__ import annotations

import dataclasses

import pytest

from deto.run.config import FIELDS, TrainConfig, load_toml, resolve
from deto.run.presets import PRESETS, SIGN_LR_PER_DOUBLING, default_lr


def test_defaults_are_flexdemo_on_lm() -> None:
    cfg = resolve({})
    assert (cfg.scheme, cfg.task, cfg.nodes, cfg.ranks_per_node) == ("flexdemo", "lm", 2, 2)
    assert cfg.optimizer == "sgd" and cfg.sign is True
    assert cfg.lr == PRESETS["flexdemo"].lr["lm"]
    assert cfg.steps is not None and cfg.batch_size is not None
    # DeMo()'s own defaults (chosen from the frontier sweep): nothing differs from them
    opts = cfg.replicator
    assert (opts.blocks, opts.chunk, opts.topk, opts.values) == ("1d", 64, 4, "int2")
    assert cfg.replicator_options() == opts.changed() == {}
    lean = resolve({"scheme": "flexdemo-lean"}).replicator
    assert (lean.blocks, lean.chunk, lean.topk, lean.values) == ("2d", 32, 14, "int8")


@pytest.mark.parametrize("scheme", sorted(PRESETS))
def test_every_preset_resolves_for_every_task(scheme: str) -> None:
    for task in ("lm", "vision"):
        cfg = resolve({"scheme": scheme, "task": task})
        assert cfg.lr > 0 and cfg.optimizer in ("sgd", "adamw") and isinstance(cfg.sign, bool)


def test_preset_specific_defaults() -> None:
    assert resolve({"scheme": "hsdp"}).optimizer == "adamw"
    assert resolve({"scheme": "hsdp"}).sign is False
    demo = resolve({"scheme": "demo"})
    assert demo.ranks_per_node == 1 and demo.nodes == 4
    diloco = resolve({"scheme": "diloco"})
    assert diloco.replicator_options()["every"] == PRESETS["diloco"].options.every == 25


def test_overrides_win_and_reach_the_replicator() -> None:
    cfg = resolve({"scheme": "flexdemo", "topk": 8, "chunk": 16, "lr": 0.5, "sign": False})
    assert cfg.lr == 0.5 and cfg.sign is False
    opts = cfg.replicator
    assert (opts.chunk, opts.topk, opts.values) == (16, 8, "int2")
    assert {"chunk": 16, "topk": 8}.items() <= cfg.replicator_options().items()


def test_changing_the_optimizer_changes_the_default_lr() -> None:
    cfg = resolve({"scheme": "flexdemo", "optimizer": "adamw", "sign": False})
    assert cfg.lr == default_lr("flexdemo", "lm", "adamw", False)


def test_sign_sgd_rates_scale_with_the_width_and_nothing_else_does() -> None:
    tuned = PRESETS["flexdemo"].lr["lm"]
    assert resolve({}).lr == tuned  # the task's default width: the tuned rate itself
    assert resolve({"d_model": 32}).lr == tuned  # narrower: not measured, not scaled
    assert resolve({"d_model": 256}).lr == pytest.approx(tuned / SIGN_LR_PER_DOUBLING)
    assert resolve({"d_model": 512}).lr == pytest.approx(tuned / SIGN_LR_PER_DOUBLING**2)
    assert resolve({"d_model": 512, "lr": 0.01}).lr == 0.01  # a given rate is kept
    assert resolve({"scheme": "hsdp", "d_model": 512}).lr == PRESETS["hsdp"].lr["lm"]
    vit = PRESETS["flexdemo"].lr["vision"]
    assert resolve({"task": "vision", "d_model": 256}).lr == pytest.approx(
        vit / SIGN_LR_PER_DOUBLING**2
    )


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"nodes": 0}, "Invalid nodes: 0"),
        ({"ranks_per_node": -1}, "Invalid ranks_per_node: -1"),
        ({"steps": "ten"}, "Invalid steps: 'ten'"),
        ({"steps": True}, "Invalid steps: True"),
        ({"lr": -1.0}, "Invalid lr: -1.0"),
        ({"lr": float("nan")}, "Invalid lr: nan"),
        ({"scheme": "dmeo"}, "Invalid scheme: 'dmeo'"),
        ({"task": "audio"}, "Invalid task: 'audio'"),
        ({"optimizer": "lion"}, "Invalid optimizer: 'lion'"),
        ({"rate": 0.0, "scheme": "random"}, "Invalid rate: 0.0"),
        ({"decay": 1.0}, "Invalid decay: 1.0"),
        ({"sign": "yes"}, "Invalid sign: 'yes'"),
        ({"d_model": 30, "heads": 4}, "Invalid heads: 4"),
        ({"topk": 100, "chunk": 8}, "Invalid topk: 100"),
        (
            {"scheme": "demo", "ranks_per_node": 2},
            "Invalid topology: scheme 'demo' needs ranks_per_node=1",
        ),
        ({"scheme": "hsdp", "topk": 8}, "--topk does not apply to scheme 'hsdp'"),
        ({"scheme": "flexdemo", "outer_lr": 0.5}, "--outer-lr does not apply to scheme 'flexdemo'"),
        ({"scheme": "hsdp", "sign": True}, "--sign does not apply to scheme 'hsdp'"),
        ({"task": "vision", "seq_len": 32}, "--seq-len applies to --task lm only"),
        ({"bogus": 1}, "Unknown option"),
        ({"steps": 10, "stop_at": 11}, "Invalid stop_at: 11 .after the last step, 10"),
        ({"stop_at": 0}, "Invalid stop_at: 0"),
        ({"perturb_init_ulp": -1}, "Invalid perturb_init_ulp: -1"),
        ({"snapshot_every": -2}, "Invalid snapshot_every: -2"),
        ({"lighthouse": "http://h:1"}, "--lighthouse applies with --ft only"),
        ({"node_index": 0}, "--node-index applies with --ft only"),
        ({"ft": True, "lighthouse": "h:29510"}, "Invalid lighthouse: 'h:29510'"),
        ({"ft": True, "node_index": 2}, "Invalid node_index: 2 .the nodes are 0 to 1"),
        ({"ft": True, "node_index": -1}, "Invalid node_index: -1"),
        ({"ft": True, "scheme": "hsdp"}, "--ft needs a deto replicator"),
        ({"ft": True, "check_replicas_every": 5}, "--check-replicas-every does not apply"),
        ({"ft": True, "overlap": True}, "--overlap does not apply with --ft"),
        ({"ft": True, "scheme": "streaming-diloco"}, "--overlap-steps 1 does not apply with --ft"),
        ({"ft": True, "model": "resnet"}, "--model resnet does not apply with --ft"),
    ],
)
def test_invalid_values_are_named_in_the_error(values: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        resolve(values)


def test_a_run_on_torchft_takes_its_seat() -> None:
    cfg = resolve({"ft": True, "nodes": 3, "node_index": 2, "lighthouse": "http://lh:29510"})
    assert (cfg.ft, cfg.node_index, cfg.lighthouse) == (True, 2, "http://lh:29510")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "values",
    [
        {"scheme": "diloco"},
        {"scheme": "sparseloco"},
        {"scheme": "streaming-diloco", "overlap_steps": 0},
    ],
)
def test_the_diloco_family_runs_on_torchft(values: dict) -> None:
    assert resolve({"ft": True, **values}).ft


def test_config_is_frozen() -> None:
    cfg = resolve({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_toml_file_then_flags(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('scheme = "diloco"\nranks-per-node = 1\nsteps = 12\nevery = 4\nlr = 0.01\n')
    values = load_toml(path)
    assert values == {"scheme": "diloco", "ranks_per_node": 1, "steps": 12, "every": 4, "lr": 0.01}
    cfg = resolve({**values, "steps": 20})  # a flag overrides the file
    assert (cfg.scheme, cfg.ranks_per_node, cfg.steps, cfg.lr) == ("diloco", 1, 20, 0.01)
    assert cfg.replicator_options()["every"] == 4


def test_toml_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="Config file not found"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = \n")
    with pytest.raises(ValueError, match="Invalid TOML"):
        load_toml(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("stpes = 3\n")
    with pytest.raises(ValueError, match="Unknown key.*'stpes'"):
        load_toml(unknown)
    table = tmp_path / "table.toml"
    table.write_text("[train]\nsteps = 3\n")
    with pytest.raises(ValueError, match="tables are not allowed"):
        load_toml(table)


def test_every_field_has_help() -> None:
    for name, f in FIELDS.items():
        assert f.metadata["help"], name
    assert TrainConfig().scheme == "flexdemo"
