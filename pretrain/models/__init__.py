"""The models: shared layers and losses, stage one's StructBERT, stage two's PALM, and decoding."""
