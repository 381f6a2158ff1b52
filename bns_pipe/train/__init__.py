"""Training: config, distributed set-up, the trainer loop, evaluation, checkpoints, metrics."""
