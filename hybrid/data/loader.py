"""Deterministic, resumable training batches and a fixed set of validation batches.

The order of training samples depends only on the seed: global sample g is mapped by the blend
(`BlendedIndex`) to the d-th draw of source s, which is sample `perm(seed, s, e)[d mod N_s]` of
that source's packed samples, e = d // N_s its epoch. Each global step takes
`micro_batch_size * world_size` consecutive global samples and rank r takes the r-th slice of
`micro_batch_size`, so ranks are disjoint and together cover every sample. The only state is
the number of global samples consumed.

Shapes: B = micro batch, L = seq_len; every batch is {"input_ids": int64 [B, L],
"labels": int64 [B, L], "seq_idx": int32 [B, L]} (see `hybrid.data.packing`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from hybrid.data.blend import BlendedIndex
from hybrid.data.packing import PackedDataset, check_eod_terminated, make_batch
from hybrid.data.sources import DocSpan, load_sources
from hybrid.data.tokenizer import Tokenizer
from hybrid.recipe.data_config import DataConfig
from hybrid.recipe.schema import ConfigError

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def pack_span(span: DocSpan, seq_len: int, eod_id: int, vocab_size: int) -> PackedDataset:
    """The packed samples of a document span, after checking its documents end with EOD (and,
    for generated examples, that whole examples fill each row)."""
    if span.example_len is not None and seq_len % span.example_len:
        raise ConfigError(
            f"{span.name}: its examples are {span.example_len} tokens long, which must divide "
            f"train.seq_len ({seq_len}) so that no example is cut between rows"
        )
    start, end = span.token_range()
    offsets = span.dataset.document_offsets[span.start : span.end + 1]
    check_eod_terminated(span.dataset.tokens, offsets, eod_id, vocab_size, span.name)
    mask = span.loss_mask.tokens if span.loss_mask is not None else None
    return PackedDataset(
        span.dataset.tokens, seq_len, start=start, end=end, name=span.name, loss_mask=mask
    )


def _to_torch(batch: dict[str, np.ndarray]) -> Batch:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def _gather(
    datasets: Sequence[PackedDataset], source: np.ndarray, index: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows [n, L+1] of samples (source, index), and their loss masks (None when no dataset
    has one)."""
    rows = np.empty((len(source), datasets[0].seq_len + 1), dtype=np.int64)
    masked = any(datasets[s].mask_stream is not None for s in set(source.tolist()))
    masks = np.empty(rows.shape, dtype=np.uint8) if masked else None
    for j, (s, i) in enumerate(zip(source.tolist(), index.tolist())):
        rows[j] = datasets[s].row(i)
        if masks is not None:
            masks[j] = datasets[s].mask_row(i)
    return rows, masks


class SampleOrder:
    """Global sample numbers -> (source, packed sample index), by blend and epoch shuffles."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int):
        if seed < 0:
            raise ConfigError(f"the data seed must be non-negative, got {seed}", key="seed")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.seed = seed
        self.blend = BlendedIndex(weights)
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def permutation(self, source: int, epoch: int) -> np.ndarray:
        """The order of source `source`'s samples in epoch `epoch` (cached, a few kept)."""
        key = (source, epoch)
        if key not in self._perms:
            rng = np.random.default_rng([self.seed, source, epoch])
            n = int(self.sizes[source])
            dtype = np.int32 if n < 2**31 else np.int64
            self._perms[key] = rng.permutation(n).astype(dtype)
            while len(self._perms) > 2 * len(self.sizes) + 2:
                self._perms.popitem(last=False)
        self._perms.move_to_end(key)
        return self._perms[key]

    def __call__(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        source, draw = self.blend(samples)
        epoch, pos = np.divmod(draw, self.sizes[source])
        index = np.empty(len(source), dtype=np.int64)
        for s, e in sorted(set(zip(source.tolist(), epoch.tolist()))):
            hit = (source == s) & (epoch == e)
            index[hit] = self.permutation(s, e)[pos[hit]]
        return source, index


class TrainDataLoader:
    """Infinite iterator of this rank's micro batches (see the module docstring).

    Builds (or reuses) the tokenised caches of `data_cfg`'s sources on construction.
    """

    def __init__(
        self,
        data_cfg: DataConfig,
        seq_len: int,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        *,
        tokenizer: Tokenizer | None = None,
        progress: bool | None = None,
    ):
        if seq_len < 1 or micro_batch_size < 1:
            raise ConfigError("seq_len and micro_batch_size must be positive")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, {world_size})")
        self.cfg = data_cfg
        self.seq_len, self.micro_batch_size = seq_len, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        show = rank == 0 if progress is None else progress
        self.tokenizer, sources, _ = load_sources(data_cfg, tokenizer=tokenizer, progress=show)
        self.vocab_size, self.eod_id = self.tokenizer.vocab_size, self.tokenizer.eod_id
        self.datasets = [pack_span(s.train, seq_len, self.eod_id, self.vocab_size) for s in sources]
        for ds in self.datasets:
            if len(ds) == 0:
                raise ConfigError(
                    f"source {ds.name} has {len(ds.stream)} tokens, too few for one sample "
                    f"of seq_len {seq_len}"
                )
        self.weights = [s.weight for s in sources]
        self.order = SampleOrder([len(d) for d in self.datasets], self.weights, seed)
        self.consumed_samples = 0
        log.info(
            "training data: %s",
            ", ".join(
                f"{d.name} ({len(d):,} samples, weight {w:g})"
                for d, w in zip(self.datasets, self.weights)
            ),
        )

    @property
    def global_batch_samples(self) -> int:
        """Samples consumed by one step of all ranks."""
        return self.micro_batch_size * self.world_size

    def rank_samples(self, consumed_samples: int) -> np.ndarray:
        """Global sample numbers of this rank's batch in the step starting at `consumed_samples`."""
        first = consumed_samples + self.rank * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)

    def batch_at(self, consumed_samples: int) -> Batch:
        """This rank's batch of the global step that starts at `consumed_samples`."""
        source, index = self.order(self.rank_samples(consumed_samples))
        rows, masks = _gather(self.datasets, source, index)
        return _to_torch(make_batch(rows, self.eod_id, self.cfg.eod_mask_loss, masks))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = self.batch_at(self.consumed_samples)
        self.consumed_samples += self.global_batch_samples
        return batch

    def state_dict(self) -> dict[str, int | list[int]]:
        return {
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "samples_per_source": [len(d) for d in self.datasets],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after `state["consumed_samples"]` global samples."""
        if state.get("seed", self.seed) != self.seed:
            log.warning("data seed changed (%s -> %s): the order differs", state["seed"], self.seed)
        sizes = state.get("samples_per_source")
        if sizes is not None and list(sizes) != [len(d) for d in self.datasets]:
            log.warning("the training data changed since the checkpoint: the order differs")
        self.consumed_samples = int(state["consumed_samples"])


class ValidationBatches(Sequence):
    """A fixed sequence of this rank's validation batches (built lazily, same every pass)."""

    def __init__(
        self,
        datasets: Sequence[PackedDataset],
        samples: np.ndarray,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        eod_id: int,
        eod_mask_loss: bool,
    ):
        self.datasets, self.eod_id, self.eod_mask_loss = datasets, eod_id, eod_mask_loss
        self.micro_batch_size, self.rank = micro_batch_size, rank
        step = micro_batch_size * world_size
        self.num_batches = len(samples) // step
        self.samples = samples[: self.num_batches * step].reshape(self.num_batches, step)
        self._offsets = np.cumsum([0] + [len(d) for d in datasets])

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, b: int) -> Batch:  # type: ignore[override]
        if not -self.num_batches <= b < self.num_batches:
            raise IndexError(b)
        lo = self.rank * self.micro_batch_size
        flat = self.samples[b, lo : lo + self.micro_batch_size]
        source = np.searchsorted(self._offsets, flat, side="right") - 1
        rows, masks = _gather(self.datasets, source, flat - self._offsets[source])
        return _to_torch(make_batch(rows, self.eod_id, self.eod_mask_loss, masks))


def build_validation_batches(
    data_cfg: DataConfig,
    seq_len: int,
    micro_batch_size: int,
    *,
    num_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    tokenizer: Tokenizer | None = None,
    progress: bool | None = None,
) -> ValidationBatches:
    """Validation batches: the held-out (or `valid_sources`) samples of all sources in order,
    evenly thinned to `num_batches` global steps if there are more. Every rank gets the same
    number of batches (its slice of each global step). Empty if there is no validation data."""
    show = rank == 0 if progress is None else progress
    tokenizer, _, spans = load_sources(data_cfg, tokenizer=tokenizer, progress=show)
    datasets = [pack_span(s, seq_len, tokenizer.eod_id, tokenizer.vocab_size) for s in spans]
    for ds in datasets:
        if len(ds) == 0:
            log.warning("validation data of %s is too short for one sample", ds.name)
    total = sum(len(d) for d in datasets)
    if total == 0 and show:
        log.warning("no validation data (set data.valid_fraction or data.valid_sources)")
    step = micro_batch_size * world_size
    samples = np.arange(total, dtype=np.int64)
    if num_batches is not None and total > num_batches * step:
        count = num_batches * step
        samples = np.floor(np.arange(count) * (total / count)).astype(np.int64)
    return ValidationBatches(
        datasets,
        samples,
        micro_batch_size,
        rank,
        world_size,
        tokenizer.eod_id,
        data_cfg.eod_mask_loss,
    )


__all__ = [
    "Batch",
    "SampleOrder",
    "TrainDataLoader",
    "ValidationBatches",
    "build_validation_batches",
    "pack_span",
]
