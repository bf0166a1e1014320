"""Split a hybrid model's sublayers over pipeline stages by cost, not only by count.

A Mamba-2 layer, an attention layer, an MLP and an MoE layer cost very different amounts per
token, so `n_layers / pp` layers per stage leaves some stages idle. `split_by_cost` finds the
contiguous split that minimises the most expensive stage (the pipeline's step time is set by
its slowest stage); among equally good splits it takes the most even one. Costs are training
FLOPs per token (forward + backward) from the recipe's own counters (`hybrid.recipe.analysis`),
with the LM head's matmul charged to the last stage. A layout that marks its stages with `|`
is used as written.
"""

from __future__ import annotations

from collections.abc import Sequence

from hybrid.recipe.analysis import model_figures
from hybrid.recipe.model_config import ModelConfig
from hybrid.recipe.schema import ConfigError


def split_by_cost(
    costs: Sequence[float], stages: int, *, first: float = 0.0, last: float = 0.0
) -> list[range]:
    """Contiguous ranges of layer indices, one non-empty range per stage, minimising the
    largest stage cost (ties: the smallest sum of squared stage costs). `first` / `last` are
    extra costs of the first / last stage (embedding, final norm and head).

    Raises ValueError when there are fewer layers than stages or a cost is negative."""
    n = len(costs)
    if stages < 1:
        raise ValueError(f"need at least one pipeline stage, got {stages}")
    if stages > n:
        raise ValueError(f"{stages} pipeline stages need at least {stages} layers, got {n}")
    if any(c < 0 for c in costs) or first < 0 or last < 0:
        raise ValueError("layer costs must be non-negative")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))

    def stage_cost(i: int, j: int, s: int) -> float:  # layers i..j-1 as stage s
        extra = (first if s == 0 else 0.0) + (last if s == stages - 1 else 0.0)
        return prefix[j] - prefix[i] + extra

    # best[s][j]: (max stage cost, sum of squares) of the first j layers in stages 0..s
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(stages)]
    cut = [[0] * (n + 1) for _ in range(stages)]
    for j in range(1, n - stages + 2):
        c = stage_cost(0, j, 0)
        best[0][j] = (c, c * c)
    for s in range(1, stages):
        for j in range(s + 1, n - (stages - s - 1) + 1):
            for i in range(j - 1, s - 1, -1):  # ties: earlier stages take more
                head, sq = best[s - 1][i]
                c = stage_cost(i, j, s)
                cand = (max(head, c), sq + c * c)
                if cand < best[s][j]:
                    best[s][j], cut[s][j] = cand, i
    bounds, j = [n], n
    for s in range(stages - 1, 0, -1):
        j = cut[s][j]
        bounds.append(j)
    bounds.append(0)
    bounds.reverse()
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


def split_by_count(n_layers: int, stages: int) -> list[range]:
    """The count-only split (earlier stages take the remainder), for comparison."""
    if stages < 1 or stages > n_layers:
        raise ValueError(f"{stages} pipeline stages need at least {stages} layers, got {n_layers}")
    size, extra = divmod(n_layers, stages)
    out, start = [], 0
    for s in range(stages):
        stop = start + size + (1 if s < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def layer_costs(cfg: ModelConfig, seq_len: int) -> tuple[list[float], float]:
    """(training FLOPs per token of each sublayer, of the LM head) at training length
    `seq_len`, as `hybrid inspect` counts them (forward + backward = 3x forward)."""
    figures = model_figures(cfg, seq_len=seq_len, context=seq_len)
    head = 3.0 * 2 * cfg.d_model * cfg.padded_vocab_size
    return [r.flops_per_token for r in figures.sublayers], head


def stage_ranges(cfg: ModelConfig, stages: int, seq_len: int) -> list[range]:
    """Each pipeline stage's sublayers for `cfg`: the layout's own `|` boundaries when it has
    any (their count must match), otherwise the cost-balanced split. ConfigError naming
    `parallel.pp` or `model.layout` when they do not fit."""
    specs = cfg.layers()
    marked = specs[-1].stage + 1
    if marked > 1:
        if marked != stages:
            raise ConfigError(
                f"the layout marks {marked} pipeline stages with '|' but pp is {stages}",
                key="parallel.pp",
            )
        return [
            range(
                min(s.index for s in specs if s.stage == k),
                max(s.index for s in specs if s.stage == k) + 1,
            )
            for k in range(marked)
        ]
    costs, head = layer_costs(cfg, seq_len)
    try:
        return split_by_cost(costs, stages, last=head)
    except ValueError as err:
        raise ConfigError(str(err), key="parallel.pp") from None


def describe_split(cfg: ModelConfig, ranges: list[range]) -> str:
    """The layout pattern with `|` between the stages of `ranges` (for logs)."""
    symbols = [s.symbol for s in cfg.layers()]
    return "|".join("".join(symbols[i] for i in r) for r in ranges)
