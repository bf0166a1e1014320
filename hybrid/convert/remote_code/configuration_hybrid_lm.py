"""Configuration of a `hybrid` language model exported as self-contained Hugging Face code.

Written into the model directory by `hybrid convert to-hf` (with modeling_hybrid_lm.py) for
models that no native transformers class represents exactly; load it with
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`. Imports only transformers.

The model is a list of pre-norm residual sublayers, one symbol each in `pattern`: `M` Mamba-2,
`*` attention, `-` MLP, `E` mixture of experts. The per-kind settings are resolved sizes (no
defaults to re-derive); `mamba.dt_limit` uses null for +infinity. `hybrid_model` keeps the
original `hybrid` model config as YAML so `hybrid convert from-hf` restores it exactly.
"""

from transformers import PretrainedConfig


class HybridLMConfig(PretrainedConfig):
    model_type = "hybrid_lm"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        pattern: str = "M-*-",
        norm_eps: float = 1e-5,
        mamba: dict | None = None,
        attention: dict | None = None,
        mlp: dict | None = None,
        moe: dict | None = None,
        hybrid_model: str | None = None,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.pattern = pattern
        self.num_hidden_layers = len(pattern)
        self.norm_eps = norm_eps
        self.mamba = mamba or {}
        self.attention = attention or {}
        self.mlp = mlp or {}
        self.moe = moe or {}
        self.hybrid_model = hybrid_model
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


__all__ = ["HybridLMConfig"]
