"""Training on DeepSpeed ZeRO-3: checked settings, the stages, the engine, checkpoints, stage-two init,
metrics, stopping and process groups."""
