"""The adapters. Registration (import) order is the preference order when no `--target` is
given: the first that represents a model exactly wins. Their domains barely overlap (only a
dense SwiGLU model with full RoPE fits both Bamba and GraniteMoeHybrid; Bamba is chosen); the
self-contained remote code `hybrid_lm` comes last and represents any model."""

from hybrid.convert.targets import bamba, granitemoehybrid, mamba2, nemotron_h, remote  # noqa: F401
