"""Helpers shared by the model tests."""

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the max abs of the reference."""
    return ((a - b).abs().max() / b.abs().max()).item()
