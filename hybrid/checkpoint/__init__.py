"""Checkpoint files, below every layer that reads or writes them (train, convert, infer, eval,
launch): `store` saves and loads run directories atomically (canonical weights in safetensors,
the train state, recipe and meta), `rng` captures and restores the random generators."""
