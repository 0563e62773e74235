from setuptools import find_packages, setup

setup(
    name="plug-pretrain",
    version="0.1.0",
    description="Two-stage PLUG pre-training (StructBERT, then PALM) on DeepSpeed ZeRO-3 with Hydra configs",
    packages=find_packages(include=["pretrain", "pretrain.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1,<2.15",
        "deepspeed>=0.16,<0.20",
        "numpy>=1.24",
        "jieba>=0.42",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3",
        "tokenizers>=0.15",
        "tqdm",
        "wandb",
        "xxhash>=3",  # checkpoint records' checksums (pretrain/training/integrity.py; wandb depends on it too)
        "sacrebleu>=2.3,<3",  # BLEU-4 of the generation tasks (pretrain.finetune; tested with 2.6.0)
        "matplotlib>=3.7",  # pretrain.summary's loss and accuracy curves (pretrain.plots; tested with 3.11.2)
        "zstandard>=0.22",  # .zst inputs of prepare (pretrain/data/input_files.py; tested with 0.25.0)
        "pyarrow>=14",  # .parquet inputs of prepare (tested with 26.0.1)
        "opencc>=1.1",  # prepare's to_simplified=true (Traditional to Simplified; tested with 1.4.2)
    ],
    extras_require={
        "hf": ["transformers>=5.24,<6", "safetensors>=0.4"],  # pretrain.export (tested with 5.24.0)
        "fast": ["rjieba>=0.1"],  # prepare's segmenter=rjieba (tested with 0.2.2)
        "test": ["pytest>=7", "pytest-xdist>=3.5", "transformers>=5.24,<6", "safetensors>=0.4", "rjieba>=0.1",
                 "import-linter>=2.1"],  # make lint-imports: the package's layers (pyproject.toml)
    },
)
