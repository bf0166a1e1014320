"""hybrid: build, inspect and pretrain hybrid Mamba-2 / attention / MoE language models."""

__version__ = "0.1.0"
