"""A model zoo through ``deto.prepare``: tiny configs of real architectures, no downloads.

Hugging Face GPT-2 (tied head), Llama, T5 (seq2seq, ``ModuleList``s inside ``ModuleList``
members, a shared embedding), BERT (masked LM) and ViT; a ResNet-18 with BatchNorm and
``nn.Sequential`` stages; a timm ViT. torchvision's ResNet-18 is not used: the only torchvision
on the package registry here is built against another torch and fails to import with this CPU
torch, so :class:`deto.run.models.ResNet18` builds the same shape from plain torch modules.
timm imports torchvision, so the timm case is skipped where torchvision is missing.

Every model trains a few steps on a fixed batch per rank (so its loss must fall) on 2 nodes x
2 ranks, in three modes: DeMo + sign-SGD, Full + AdamW, and DeMo + sign-SGD in bf16. Each run
checks that the loss falls, that parameters and buffers are bitwise identical across nodes,
and that a DCP checkpoint of model and optimizer round-trips.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import common
import pytest
import torch
import torch.distributed as dist
from torch import nn

import deto
from deto.replicators.base import local_tensor
from deto.run.models import ResNet18

pytestmark = pytest.mark.dist

VOCAB, SEQ, BATCH, WIDTH = 32, 8, 4, 32
STEPS = 4
CASE_TIMEOUT_S = 300  # the first case also imports torch and transformers on every rank
DEMO = {"replicator": "demo", "blocks": "2d", "topk": 4, "chunk": 8, "values": "fp32", "lr": 3e-3}
MODES = {
    "demo": DEMO,
    "full": {"replicator": "full", "optimizer": torch.optim.AdamW, "lr": 3e-3, "sign": False},
    "bf16": {**DEMO, "mixed_precision": "bf16"},
}


def _tokens(shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(dist.get_rank())
    return torch.randint(1, VOCAB, shape, generator=g)


def _images(channels: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(dist.get_rank())
    return torch.randn(BATCH, channels, 8, 8, generator=g), torch.arange(BATCH) % classes


def _hf(name: str, **config: int) -> nn.Module:
    import transformers

    kind, config_cls = name.split(":")
    return getattr(transformers, kind)(getattr(transformers, config_cls)(**config))


def gpt2() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    model = _hf("GPT2LMHeadModel:GPT2Config", vocab_size=VOCAB, n_positions=SEQ, n_embd=WIDTH,
                n_layer=2, n_head=2)
    ids = _tokens((BATCH, SEQ))
    return model, lambda m: m(input_ids=ids, labels=ids).loss


def llama() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    model = _hf("LlamaForCausalLM:LlamaConfig", vocab_size=VOCAB, hidden_size=WIDTH,
                intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=SEQ)
    ids = _tokens((BATCH, SEQ))
    return model, lambda m: m(input_ids=ids, labels=ids).loss


def t5() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    model = _hf("T5ForConditionalGeneration:T5Config", vocab_size=VOCAB, d_model=WIDTH, d_kv=8,
                d_ff=2 * WIDTH, num_layers=2, num_decoder_layers=2, num_heads=2,
                decoder_start_token_id=0, pad_token_id=0)
    ids = _tokens((BATCH, SEQ))
    return model, lambda m: m(input_ids=ids, labels=ids.flip(1)).loss


def bert() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    model = _hf("BertForMaskedLM:BertConfig", vocab_size=VOCAB, hidden_size=WIDTH,
                num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * WIDTH,
                max_position_embeddings=SEQ)
    labels = _tokens((BATCH, SEQ))
    inputs = labels.clone()
    inputs[:, ::3] = 0  # the "mask" token: predict what was there
    return model, lambda m: m(input_ids=inputs, labels=labels).loss


def vit() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    model = _hf("ViTForImageClassification:ViTConfig", image_size=8, patch_size=2,
                num_channels=1, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=2 * WIDTH, num_labels=4)
    x, y = _images(1, 4)
    return model, lambda m: m(pixel_values=x, labels=y).loss


def resnet18() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    model = ResNet18(channels=3, classes=4, width=4)
    x, y = _images(3, 4)
    return model, lambda m: nn.functional.cross_entropy(m(x).float(), y)


def timm_vit() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
        embed_dim=WIDTH, depth=2, num_heads=2, num_classes=4,
    )
    x, y = _images(1, 4)
    return model, lambda m: nn.functional.cross_entropy(m(x).float(), y)


MODELS = {f.__name__: f for f in (gpt2, llama, t5, bert, vit, resnet18, timm_vit)}
NEEDS = {"resnet18": None, "timm_vit": "timm"}  # the others need transformers


def state_digest(model: nn.Module, opt: torch.optim.Optimizer) -> str:
    """Hash of this rank's parameter shards, buffers and base optimizer state."""
    h = hashlib.sha256()
    tensors = [p for _, p in sorted(model.named_parameters())]
    tensors += [b for _, b in sorted(model.named_buffers())]
    for st in opt.state.values():
        tensors += [v for _, v in sorted(st.items()) if isinstance(v, torch.Tensor)]
    for t in tensors:
        h.update(local_tensor(t).detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for _, t in sorted([*model.named_parameters(), *model.named_buffers()]):
        h.update(local_tensor(t).detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_zoo_model(name: str, mode: str, ckpt_dir: str) -> dict:
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    torch.manual_seed(0)
    model, loss_fn = MODELS[name]()
    model, opt = deto.prepare(model, common.topo(), **MODES[mode])
    losses = []
    for _ in range(STEPS):
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    replica = model_digest(model)

    path = os.path.join(ckpt_dir, f"{name}-{mode}")
    model_sd, optim_sd = get_state_dict(model, opt.base)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    saved = state_digest(model, opt.base)
    loss_fn(model).backward()  # one more step changes parameters, buffers and optimizer state
    opt.step()
    opt.zero_grad()
    moved = state_digest(model, opt.base) != saved
    model_sd, optim_sd = get_state_dict(model, opt.base)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(
        model, opt.base, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    return {
        "losses": losses,
        "replica": replica,
        "restored": state_digest(model, opt.base) == saved and moved,
    }


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_model_trains_with_identical_replicas(pool, tmp_path, name, mode):
    package = NEEDS.get(name, "transformers")
    if package is not None:
        pytest.importorskip(package, reason=f"{package} is not installed (timm needs torchvision)")
    out = pool.run(train_zoo_model, name, mode, str(tmp_path), timeout=CASE_TIMEOUT_S)
    for o in out:
        assert o["losses"][-1] < o["losses"][0], o["losses"]
        assert o["restored"]
    digests = [o["replica"] for o in out]
    assert digests[0] == digests[2] and digests[1] == digests[3], digests
    assert digests[0] != digests[1]  # the two shards differ, so the check has teeth

