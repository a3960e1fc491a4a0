"""Training: the loop (`trainer.train`), its pure step, checkpoints, validation, events and optimizer."""
