"""Training infrastructure shared by every stage: train state, optimizers, accumulation, checkpoints, logs."""
