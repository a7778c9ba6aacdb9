"""Train torchtitan's Llama 3 debug model with deto's DeMo between 2 simulated nodes of 2 ranks
each, on CPU, and resume it from torchtitan's checkpoint:

    torchrun --nproc-per-node 4 examples/torchtitan_llama.py --out runs/titan --steps 8
    torchrun --nproc-per-node 4 examples/torchtitan_llama.py --out runs/titan --steps 16 --resume

torchtitan's own components train it (its model, LR schedulers, loss, gradient clipping and DCP
checkpointer under ``--out``), with deto's model spec and optimizer container; see
docs/integrations.md for why the loop is not torchtitan's ``Trainer`` on CPU.
"""

from __future__ import annotations

import argparse
import logging

import deto
from deto.integrations.torchtitan import train_debug_model

logger = logging.getLogger("torchtitan_llama")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of torchtitan's checkpoints")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--checkpoint-every", type=int, default=4)
    parser.add_argument("--resume", action="store_true", help="load the latest checkpoint")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    topology = deto.Topology(nodes=2, ranks_per_node=2, device="cpu")  # 2 simulated nodes
    result = train_debug_model(
        args.out, args.steps, topology, checkpoint_every=args.checkpoint_every, resume=args.resume
    )
    if topology.rank == 0:
        for step, (loss, sent) in enumerate(
            zip(result["losses"], result["node_bytes"], strict=True),
            start=result["step"] - len(result["losses"]) + 1,
        ):
            logger.info("step %d  loss %.4f  node 0 sent %.1f kB", step, loss, sent / 1e3)


if __name__ == "__main__":
    main()
