"""Train a Hugging Face GPT-2 (built from a config, no download) with ``transformers.Trainer``
and deto's FlexDeMo between 2 simulated nodes of 2 ranks each:

    torchrun --nproc-per-node 4 examples/hf_trainer.py --out runs/hf --steps 20
    torchrun --nproc-per-node 4 examples/hf_trainer.py --out runs/hf --steps 40 --resume

The Trainer runs the loop, the LR schedule, gradient clipping, logging and checkpoints
(``runs/hf/checkpoint-N``); ``--resume`` continues from the latest one, replicator state
included. The logs carry each node's inter-node bytes (``inter_node_bytes_sent``).
"""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import deto
from deto.integrations.hf import DetoTrainer

SEQ_LEN = 32


class ByteWindows(torch.utils.data.Dataset):
    """Overlapping byte windows of a text: a causal LM's inputs are its own labels."""

    def __init__(self, data: bytes, seq_len: int = SEQ_LEN) -> None:
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.data) - self.seq_len) // (self.seq_len // 2)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.data[i * (self.seq_len // 2) :][: self.seq_len]
        return {"input_ids": window, "labels": window}


def build_trainer(
    out: str | Path, steps: int, topology: deto.Topology, replicator: deto.Replicator | None = None
) -> DetoTrainer:
    """A DetoTrainer for a 2-layer GPT-2 on the bytes of a Python standard library module,
    with FlexDeMo's replication (top 8 of each 16-chunk) unless ``replicator`` is given."""
    torch.manual_seed(0)  # the same initial model on every rank
    config = GPT2Config(
        vocab_size=256, n_positions=SEQ_LEN, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0,
    )
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        max_grad_norm=1.0,
        logging_steps=2,
        save_steps=steps // 2,
        report_to=[],  # on CPU, DetoTrainer sets use_cpu=True (else the Trainer runs unsharded)
        seed=0,
    )
    return DetoTrainer(
        model=GPT2LMHeadModel(config),
        args=args,
        train_dataset=ByteWindows(Path(textwrap.__file__).read_bytes()),
        topology=topology,
        replicator=replicator if replicator is not None else deto.DeMo(topk=8, chunk=16),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/hf", help="output and checkpoint folder")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps in all")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    opts = parser.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    nodes = 2 if world % 2 == 0 else 1
    topology = deto.Topology(nodes=nodes, ranks_per_node=world // nodes)
    trainer = build_trainer(opts.out, opts.steps, topology)
    trainer.train(resume_from_checkpoint=True if opts.resume else None)
    if dist.get_rank() == 0:
        print(trainer.state.log_history[-2])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
