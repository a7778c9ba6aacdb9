"""A Hugging Face ``transformers`` model (built from a config, no download) trained with deto.

    torchrun --nproc-per-node 4 examples/hf_transformers.py

GPT-2's layers live in an ``nn.ModuleList`` (``model.transformer.h``), so deto shards them per
layer inside a node; DeMo replicates across the 2 simulated nodes.
"""

import os

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

import deto
from deto.run.data import lm_batch, load_stdlib_corpus

torch.manual_seed(0)
world = int(os.environ["WORLD_SIZE"])
nodes = 2 if world % 2 == 0 else 1
topo = deto.Topology(nodes=nodes, ranks_per_node=world // nodes, device="cpu")

config = GPT2Config(
    vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
)
model = GPT2LMHeadModel(config)
model, opt = deto.prepare(
    model, topo, replicator="demo", optimizer=torch.optim.SGD, lr=1e-3, sign=True
)

text = load_stdlib_corpus().train
rank = dist.get_rank()
for step in range(1, 31):
    x, _ = lm_batch(text, 64, 8, seed=0, step=step, rank=rank)
    loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels itself
    loss.backward()
    opt.step()
    opt.zero_grad()
    if rank == 0 and step % 10 == 0:
        print(f"step {step}: loss {loss.item():.3f}, node 0 sent {opt.stats().node_bytes_sent} B")
dist.destroy_process_group()
