"""deto.extras: the extras read from deto's metadata, and the message naming a missing one."""

from __future__ import annotations

from importlib import metadata

import pytest

from deto import extras

REQUIRES = [
    "torch>=2.6",
    'numpy>=1.24; extra == "cli"',
    'tqdm>=4.60; extra == "cli"',
    "transformers<6,>=5.24; extra == 'hf'",
    'pytest>=8; extra == "dev"',
    'deto[hf]; extra == "dev"',
]


@pytest.fixture
def metadata_without(monkeypatch):
    """deto's metadata is REQUIRES; the distributions in the returned set are not installed."""
    absent: set[str] = set()

    def version(name: str) -> str:
        if name in absent:
            raise metadata.PackageNotFoundError(name)
        return "1.0"

    monkeypatch.setattr(metadata, "requires", lambda name: REQUIRES if name == "deto" else [])
    monkeypatch.setattr(metadata, "version", version)
    return absent


def test_declared_extras_include_the_ones_an_extra_names(metadata_without):
    assert extras.declared() == {
        "cli": ["numpy", "tqdm"],
        "hf": ["transformers"],
        "dev": ["pytest", "transformers"],
    }
    assert extras.installed() == {"cli": True, "dev": True, "hf": True}


def test_a_missing_extra_names_the_install_command(metadata_without):
    metadata_without.add("numpy")
    assert extras.installed()["cli"] is False
    with pytest.raises(extras.MissingExtra) as err:
        extras.require("cli", "deto train")
    assert str(err.value) == (
        "deto train needs the 'cli' extra (missing: numpy): pip install 'deto[cli]'"
    )


def test_an_uninstalled_source_tree_declares_nothing(monkeypatch):
    def not_found(name: str) -> list[str]:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "requires", not_found)
    assert extras.declared() == {}
    extras.require("cli", "deto train")  # cannot tell: no error


def test_deto_train_without_the_cli_extra_is_one_usage_line(metadata_without, capsys):
    from deto import cli

    metadata_without.add("tqdm")
    assert cli.main(["train", "--steps", "1"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "deto train: error: deto train needs the 'cli' extra (missing: tqdm): "
        "pip install 'deto[cli]'"
    ]


def test_info_is_plain_text():
    from deto import cli

    assert cli.plain_text("See :class:`~deto.replicators.DeMo` and ``every`` (H).") == (
        "See DeMo and every (H)."
    )
