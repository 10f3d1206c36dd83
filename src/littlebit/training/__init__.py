"""Recovery by distillation: the trainer, the block stage, the loss, the optimizer, data streams,
checkpoints and logs."""
