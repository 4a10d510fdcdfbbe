"""The strategy table: a strategy is one module and one line here.

Every strategy is a class with the same shape (:class:`~hf_seqpar.strategies.base.Strategy`),
built per model from (model config, mesh, typed options) by ``enable_sequence_parallel``. The rest
of hf_seqpar (sharding, loss, integrations, planner, benchmarks) asks the strategy, never its name.
"""

from __future__ import annotations

from hf_seqpar.strategies.base import Strategy
from hf_seqpar.strategies.hybrid import HybridStrategy, largest_ulysses_size
from hf_seqpar.strategies.megatron import MegatronStrategy
from hf_seqpar.strategies.ring import RingStrategy
from hf_seqpar.strategies.ulysses import UlyssesStrategy

__all__ = ["STRATEGIES", "AUTO", "strategy_class", "choose_strategy", "Strategy"]

#: The name that lets hf_seqpar pick ulysses, hybrid or ring from the head counts.
AUTO = "auto"

STRATEGIES: dict[str, type[Strategy]] = {
    "ulysses": UlyssesStrategy,
    "ring": RingStrategy,
    "hybrid": HybridStrategy,
    "megatron": MegatronStrategy,
}


def choose_strategy(config, sp_size: int) -> tuple[str, str]:
    """What ``strategy="auto"`` picks for a model config on ``sp_size`` ranks, and why.

    Ulysses when the query heads divide ``sp_size`` (one all-to-all per tensor, no ring);
    otherwise hybrid with the largest Ulysses degree the heads allow; ring when no degree > 1 does.

    Returns:
        ``(name, reason)``.
    """
    heads = config.num_attention_heads
    if heads % sp_size == 0:
        return "ulysses", f"{heads} query heads divide sp_size={sp_size}"
    u = largest_ulysses_size(heads, sp_size)
    if u > 1:
        return "hybrid", (
            f"{heads} query heads do not divide sp_size={sp_size}; ulysses_size={u} x "
            f"ring_size={sp_size // u} is the largest Ulysses degree they allow"
        )
    return "ring", f"no Ulysses degree > 1 divides both {heads} query heads and sp_size={sp_size}"


def strategy_class(name: str) -> type[Strategy]:
    """The strategy class registered under ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in STRATEGIES:
        raise ValueError(
            f"unknown strategy {name!r}; valid strategies are: {', '.join(sorted(STRATEGIES))} (or {AUTO!r})"
        )
    return STRATEGIES[name]
