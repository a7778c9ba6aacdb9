"""Training: the loop, launching ranks, and emulating the network between nodes."""
