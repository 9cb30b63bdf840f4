"""Training: state, pure steps, the loop, optimizer, checkpoints, telemetry, preemption."""
