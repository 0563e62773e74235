"""Two-stage PLUG pre-training. The commands sit here (`python -m pretrain.<command>`): prepare, train, generate,
plan, summary. The library they use follows the data flow: data/ (raw text to batches), models/ (the networks and
their losses), training/ (settings, stages, the ZeRO-3 engine, checkpoints, metrics)."""
