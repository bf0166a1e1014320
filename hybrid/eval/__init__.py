"""Evaluation: validation loss and perplexity of a checkpoint on any data source, and synthetic
recall probes (multi-query associative recall, passkey retrieval) at several context lengths.

The example generators live in the data layer (`hybrid.data.synthetic`, numpy only), so that
the `mqar` and `passkey` training sources and the probes here share them.
"""
