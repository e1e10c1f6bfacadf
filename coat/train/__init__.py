"""Training on Ray Train: the per-worker loop, the driver and checkpoints."""
