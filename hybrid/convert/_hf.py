"""The one place `hybrid.convert` imports Hugging Face `transformers` (lazily, on first use).

The model layers never import transformers; the converter needs it only to build configs, load
models for `--verify` and write tokenizer files.
"""

from __future__ import annotations

import functools
from types import ModuleType

from hybrid.recipe.schema import ConfigError

MIN_MAJOR = 5


@functools.lru_cache(maxsize=1)
def require_transformers() -> ModuleType:
    """The `transformers` module; a ConfigError saying how to install it when missing or old."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "Hugging Face conversion needs the transformers package (>= 5.0); install it with "
            "pip install 'hybrid[hf]'"
        ) from None
    major = int(transformers.__version__.split(".")[0])
    if major < MIN_MAJOR:
        raise ConfigError(
            f"transformers {transformers.__version__} is too old for the converter (the target "
            f"classes were checked against 5.x); pip install 'transformers>={MIN_MAJOR}.0'"
        )
    return transformers
