"""The strategy table: a strategy is one module and one line here.

Every strategy has the same shape (see :class:`~hf_seqpar.strategies.base.Strategy`): a name,
the layout ``shard_batch`` uses, the sequence multiple it needs, a model check run by
``enable_sequence_parallel`` before anything is changed, and an ``attention`` function the
registered attention hook calls with the local shard's q/k/v.
"""

from __future__ import annotations

from .base import Strategy
from .hybrid import HybridStrategy
from .megatron import MegatronStrategy
from .ring import RingStrategy
from .ulysses import UlyssesStrategy

__all__ = ["STRATEGIES", "AUTO", "get_strategy", "choose_strategy", "Strategy"]

#: The name that lets hf_seqpar pick ulysses, hybrid or ring from the head counts.
AUTO = "auto"

STRATEGIES: dict[str, Strategy] = {
    "ulysses": UlyssesStrategy(),
    "ring": RingStrategy(),
    "hybrid": HybridStrategy(),
    "megatron": MegatronStrategy(),
}


def choose_strategy(config, sp_size: int) -> tuple[str, str]:
    """What ``strategy="auto"`` picks for a model config on ``sp_size`` ranks, and why.

    Ulysses when the query heads divide ``sp_size`` (one all-to-all per tensor, no ring);
    otherwise hybrid with the largest Ulysses degree the heads allow; ring when no degree > 1 does.

    Returns:
        ``(name, reason)``.
    """
    from .hybrid import largest_ulysses_size

    heads = config.num_attention_heads
    if heads % sp_size == 0:
        return "ulysses", f"{heads} query heads divide sp_size={sp_size}"
    u = largest_ulysses_size(heads, sp_size)
    if u > 1:
        return "hybrid", (f"{heads} query heads do not divide sp_size={sp_size}; ulysses_size={u} x "
                          f"ring_size={sp_size // u} is the largest Ulysses degree they allow")
    return "ring", f"no Ulysses degree > 1 divides both {heads} query heads and sp_size={sp_size}"


def get_strategy(name: str) -> Strategy:
    """The strategy registered under ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
        NotImplementedError: the strategy is in the table but cannot run in this version.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; valid strategies are: {', '.join(sorted(STRATEGIES))} "
                         f"(or {AUTO!r})")
    strategy = STRATEGIES[name]
    if not strategy.available:
        raise NotImplementedError(
            f"strategy {name!r} ({strategy.description}) is not available in this version of hf_seqpar; "
            f"available now: {', '.join(n for n, s in STRATEGIES.items() if s.available)}"
        )
    return strategy
