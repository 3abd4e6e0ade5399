"""Training: the step, the warm-start schedule, checkpoints, logs and the distributed engine."""
