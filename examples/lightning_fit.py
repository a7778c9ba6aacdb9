"""Train a small byte-level transformer with PyTorch Lightning and deto's FlexDeMo between 2
simulated nodes of 2 ranks each:

    torchrun --nproc-per-node 4 examples/lightning_fit.py --out runs/lightning --steps 20
    torchrun --nproc-per-node 4 examples/lightning_fit.py --out runs/lightning --steps 40 \\
        --resume runs/lightning/step=20.ckpt

``configure_model`` shards the network inside each node; ``DetoStrategy`` wraps the AdamW that
``configure_optimizers`` returns (its cosine schedule keeps working) and checkpoints every rank's
shards with the replicator state.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

import deto
from deto.integrations.lightning import DetoStrategy

SEQ_LEN = 32
BATCH = 4


class ByteTransformer(nn.Module):
    """Next-byte prediction with a causal transformer (its layers in an ``nn.ModuleList``)."""

    def __init__(self, width: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.pos = nn.Parameter(torch.zeros(SEQ_LEN, width))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 2, 2 * width, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        self.head = nn.Linear(width, 256)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(SEQ_LEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every position's next byte, ``(batch * length, 256)``."""
        h = self.embed(x) + self.pos[: x.shape[1]]
        for layer in self.layers:
            h = layer(h, src_mask=self.causal, is_causal=True)
        return self.head(h.flatten(0, 1))


class ByteLM(pl.LightningModule):
    def __init__(self, lr: float = 3e-3, steps: int = 20) -> None:
        super().__init__()
        self.lr, self.steps = lr, steps
        self.net = ByteTransformer()

    def configure_model(self) -> None:
        deto.shard(self.net, self.trainer.strategy.topology)  # FSDP2 over each node's ranks

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y.flatten())
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.steps)
        return [opt], [{"scheduler": schedule, "interval": "step"}]


def byte_pairs(data: bytes, count: int) -> torch.utils.data.TensorDataset:
    """``count`` (input, next bytes) windows of ``data``, spread evenly over it."""
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    starts = torch.linspace(0, len(t) - SEQ_LEN - 1, count).long()
    windows = torch.stack([t[s : s + SEQ_LEN + 1] for s in starts.tolist()])
    return torch.utils.data.TensorDataset(windows[:, :-1], windows[:, 1:])


def build(
    out: str | Path, steps: int, topology: deto.Topology, *, epoch_steps: int = 5,
    replicator: deto.Replicator | None = None,
) -> tuple[pl.Trainer, ByteLM, torch.utils.data.DataLoader]:
    """The trainer, the module and the data: ``epoch_steps`` optimizer steps per epoch, and a
    checkpoint (``out/step=N.ckpt``) after each epoch's last step; FlexDeMo's replication (top
    8 of each 16-chunk) unless ``replicator`` is given. Lightning restarts a plain
    ``DataLoader`` at the start of its epoch on resume, so a checkpoint at an epoch boundary
    resumes with exactly the batches a straight run would see."""
    torch.manual_seed(0)  # the same initial model on every rank
    text = Path(textwrap.__file__).read_bytes()
    data = byte_pairs(text, epoch_steps * BATCH * topology.world_size)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True)
    checkpoints = ModelCheckpoint(
        dirpath=out, filename="{step}", every_n_train_steps=epoch_steps, save_top_k=-1
    )
    trainer = pl.Trainer(
        accelerator=topology.device_type,
        devices=topology.world_size,  # one machine; a real cluster: devices, num_nodes
        strategy=DetoStrategy(
            topology, replicator=replicator or deto.DeMo(topk=8, chunk=16), sign=False
        ),
        max_steps=steps,
        gradient_clip_val=1.0,
        callbacks=[checkpoints],
        default_root_dir=out,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return trainer, ByteLM(steps=steps), loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/lightning", help="checkpoint folder")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps in all")
    parser.add_argument("--resume", default=None, help="a checkpoint to continue from")
    opts = parser.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    nodes = 2 if world % 2 == 0 else 1
    topology = deto.Topology(nodes=nodes, ranks_per_node=world // nodes)
    trainer, module, loader = build(opts.out, opts.steps, topology)
    trainer.fit(module, loader, ckpt_path=opts.resume)
    if trainer.global_rank == 0:
        print(f"step {trainer.global_step}: loss {float(trainer.callback_metrics['loss']):.3f}")


if __name__ == "__main__":
    main()
