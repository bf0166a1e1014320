"""Inference: the hybrid cache (fixed-size Mamba state, pre-allocated KV cache), prefill and
recurrent decoding, sampling, and batched generation."""

from hybrid.infer.cache import HybridCache
from hybrid.infer.generate import Generation, decode_step, generate, left_pad, prefill
from hybrid.infer.kv import KVCache
from hybrid.infer.sampling import SamplingConfig, filter_logits, sample

__all__ = [
    "Generation",
    "HybridCache",
    "KVCache",
    "SamplingConfig",
    "decode_step",
    "filter_logits",
    "generate",
    "left_pad",
    "prefill",
    "sample",
]
