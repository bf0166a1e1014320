"""Single-device modules of the hybrid LM. Importing this package registers the sublayer kinds
(`M` Mamba-2, `*` attention, `-` MLP, `E` MoE)."""

from hybrid.model import attention, mamba2, mlp, moe  # noqa: F401  (registration)
from hybrid.model.lm import HybridLM, LMOutput, build_model

__all__ = ["HybridLM", "LMOutput", "build_model"]
