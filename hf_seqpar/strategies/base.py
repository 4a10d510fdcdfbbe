"""The shape every strategy has."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from ..layout import Layout

__all__ = ["Strategy", "AttentionOnlyStrategy", "check_no_options"]


class Strategy(Protocol):
    """What the API, ``shard_batch`` and the attention hook need from a strategy."""

    name: str
    """Table key."""
    description: str
    """One line for messages and docs."""
    available: bool
    """False for a strategy that is named in the table but cannot run in this version."""
    def make_layout(self, seq_len: int, state) -> "Layout":
        """The :class:`~hf_seqpar.layout.Layout` ``shard_batch`` applies to a sequence of
        ``seq_len`` tokens (it fixes the padded length and which tokens each rank holds)."""

    def check_model(self, config, sp_size: int, options: dict) -> None:
        """Raise a clear error if this strategy cannot run ``config`` on ``sp_size`` ranks with
        ``options``; called before the model is modified."""

    def check_attention(self, features) -> None:
        """Optional hook: raise ``NotImplementedError`` naming a strategy that works if this one
        cannot compute the model's :class:`~hf_seqpar.features.AttentionFeatures` exactly; called
        by ``enable_sequence_parallel`` after :meth:`check_model`, before the model is modified."""

    def attention(self, module, query, key, value, batch, **kwargs) -> torch.Tensor:
        """Attention for the local shard: q ``(B, h_q, S_local, D)``, k/v ``(B, h_kv, S_local, D)``
        -> ``(B, S_local, h_q, D)``."""

    def apply(self, model, state) -> None:
        """Changes to the model beyond the attention hook (e.g. tensor-parallel plans), made by
        ``enable_sequence_parallel`` after all checks passed. Most strategies change nothing."""

    def remove(self, model, state) -> None:
        """Undo :meth:`apply` (``disable_sequence_parallel``)."""

    def local_position_ids(self, positions: torch.Tensor, layout, rank: int) -> torch.Tensor:
        """The ``position_ids`` ``shard_batch`` hands this rank's model (optional hook).

        Args:
            positions: ``(B, S_pad)`` global position ids of the padded sequence, global order.
            layout: the batch's :class:`~hf_seqpar.layout.Layout`.
            rank: this rank's index in the SP group.

        Returns:
            By default (strategies without the method) ``layout.shard(positions, rank)``: the
            positions of the local tokens. A strategy whose attention sees the full sequence
            while the residual stream is sharded (Megatron-SP: RoPE is applied to q/k after the
            all-gather) returns the full ``positions`` instead.
        """


class AttentionOnlyStrategy:
    """Base for strategies that only replace attention: :meth:`apply`/:meth:`remove` do nothing."""

    def apply(self, model, state) -> None:
        return None

    def remove(self, model, state) -> None:
        return None


def check_no_options(name: str, options: dict, known: tuple[str, ...] = ()) -> None:
    """Reject unknown strategy options with the list of known ones."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"strategy {name!r} does not take option(s) {unknown}; it takes: {list(known) or 'no options'}"
        )
