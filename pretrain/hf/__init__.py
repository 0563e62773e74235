"""Everything that speaks Hugging Face transformers: where our parameters sit in its BERT and MegatronBERT
(layout.py), writing and checking exports (export.py), reading its directories into our models (load.py), and the
PALM class that exports carry (modeling_plug_palm.py, which imports nothing of ours). Needs `pip install -e .[hf]`."""
