"""The label value shared by the data (which writes it) and the models (whose losses skip it)."""

IGNORE = -100  # label value the losses skip: PyTorch cross_entropy's default ignore_index
