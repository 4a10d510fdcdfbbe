"""The strategy table: a strategy is one module and one line here.

Every strategy has the same shape (see :class:`~hf_seqpar.strategies.base.Strategy`): a name,
the layout ``shard_batch`` uses, the sequence multiple it needs, a model check run by
``enable_sequence_parallel`` before anything is changed, and an ``attention`` function the
registered attention hook calls with the local shard's q/k/v.
"""

from __future__ import annotations

from .base import PlannedStrategy, Strategy
from .megatron import MegatronStrategy
from .ulysses import UlyssesStrategy

__all__ = ["STRATEGIES", "get_strategy", "Strategy"]

STRATEGIES: dict[str, Strategy] = {
    "ulysses": UlyssesStrategy(),
    "ring": PlannedStrategy("ring", "ring attention with a zigzag layout"),
    "hybrid": PlannedStrategy("hybrid", "Ulysses x Ring on a 2D mesh"),
    "megatron": MegatronStrategy(),
}


def get_strategy(name: str) -> Strategy:
    """The strategy registered under ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
        NotImplementedError: the strategy is planned but not available in this version.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid strategies are: {', '.join(sorted(STRATEGIES))}")
    strategy = STRATEGIES[name]
    if not strategy.available:
        raise NotImplementedError(
            f"strategy {name!r} ({strategy.description}) is not available in this version of hf_seqpar; "
            f"available now: {', '.join(n for n, s in STRATEGIES.items() if s.available)}"
        )
    return strategy
