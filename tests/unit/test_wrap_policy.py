"""Which modules become FSDP2 units: the default policy and user wrap policies (no ranks)."""

from __future__ import annotations

import pytest
from torch import nn

from deto.run.models import ByteGPT, ResNet18, TransformerShape
from deto.sharding import default_units, policy_predicate, select_units

transformers = pytest.importorskip("transformers")


def tiny_t5() -> nn.Module:
    cfg = transformers.T5Config(
        vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0,
    )
    return transformers.T5ForConditionalGeneration(cfg)


def tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg)


def names(model: nn.Module) -> list[str]:
    return [n for n, _ in default_units(model)]


def test_t5_blocks_once_not_the_module_lists_inside_them():
    # T5Block keeps its layers in a ModuleList: sharding those after the blocks fails in FSDP2
    assert names(tiny_t5()) == [f"{s}.block.{i}" for s in ("encoder", "decoder") for i in (0, 1)]


def test_sequential_stages_give_one_unit_per_residual_block():
    units = names(ResNet18(channels=3, classes=4, width=4))
    assert units == [f"layer{s}.{i}" for s in (1, 2, 3, 4) for i in (0, 1)]


def test_module_list_members_and_a_plain_sequential():
    assert names(ByteGPT(8, TransformerShape(d_model=16, layers=3, heads=2))) == [
        "blocks.0", "blocks.1", "blocks.2",
    ]
    # an MLP's Sequential of layers is not a stack of blocks: nothing but the root
    assert names(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))) == []


def test_a_block_tied_to_the_outside_is_left_to_the_root():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.head = nn.Linear(4, 4)
            self.head.weight = self.layers[1].weight

    assert names(Tied()) == ["layers.0"]


def test_wrap_policy_classes_callable_and_nesting():
    model = tiny_t5()
    blocks = transformers.models.t5.modeling_t5.T5Block
    assert list(select_units(model, {blocks})) == names(model)
    assert list(select_units(model, blocks)) == names(model)
    layer = transformers.models.t5.modeling_t5.T5LayerFF
    nested = select_units(model, lambda m: isinstance(m, (blocks, layer)))
    assert "encoder.block.0" in nested and "encoder.block.0.layer.1" in nested


def test_wrap_policy_on_a_tied_weight_names_the_module():
    with pytest.raises(ValueError, match=r"'transformer.wte' \(Embedding\).*tied"):
        select_units(tiny_gpt2(), {nn.Embedding})
    with pytest.raises(ValueError, match=r"'lm_head' \(Linear\)"):
        select_units(tiny_gpt2(), lambda m: m.__class__ is nn.Linear)


@pytest.mark.parametrize(
    ("policy", "error", "match"),
    [
        ("Block", TypeError, "module classes or a callable"),
        ({int}, TypeError, "int.*not an nn.Module class"),
        (3, TypeError, "got 3"),
        ({nn.ModuleList}, ValueError, "ModuleList, a container without forward"),
    ],
)
def test_invalid_wrap_policy(policy, error, match):
    with pytest.raises(error, match=match):
        policy_predicate(policy)
