"""Where each token of a sequence lives: the sharding layouts.

A layout maps the padded global sequence ``[0, padded_len)`` onto ``P`` ranks, each holding
``padded_len / P`` positions. Knows nothing of models or process groups.

- ``contiguous``: rank ``r`` holds ``[r * L, (r + 1) * L)`` with ``L = padded_len / P``.
- ``zigzag``: the sequence is cut into ``2P`` chunks; rank ``r`` holds chunks ``r`` and
  ``2P - 1 - r``, which balances causal attention work (the zigzag layout of
  ring-flash-attention; cf. Brandon et al. 2023, "Striped attention", arXiv:2311.09431).
- ``balanced``: explicit ``spans`` per rank (equal chunks given out by their causal work, for
  packed rows: :mod:`hf_seqpar.core.balance` builds them once per batch).

With ``inner > 1`` (the hybrid strategy) the layout applies to ``P / inner`` *outer* groups of
ranks (the ring), and each outer shard is split contiguously over the ``inner`` ranks of its
group (the Ulysses group), so that an all-to-all inside the group reassembles the outer shard.
Rank ``r`` is outer rank ``r // inner``, inner rank ``r % inner``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

__all__ = ["Layout", "LAYOUT_MULTIPLE", "LAYOUT_CHOICES"]

#: How many equal chunks per rank each layout cuts the sequence into (``balanced``: at least).
LAYOUT_MULTIPLE = {"contiguous": 1, "zigzag": 2, "balanced": 2}
#: What the ring-based strategies' ``layout`` option takes: a layout, or ``auto`` (zigzag, or
#: ``balanced`` for packed rows that zigzag leaves unbalanced: :func:`hf_seqpar.core.balance.choose_layout`).
LAYOUT_CHOICES = ("auto", *LAYOUT_MULTIPLE)


@dataclass(frozen=True)
class Layout:
    """A sequence layout over ``sp_size`` ranks.

    Args:
        kind: ``"contiguous"``, ``"zigzag"`` or ``"balanced"``.
        seq_len: original (unpadded) sequence length ``S``.
        sp_size: number of ranks ``P``.
        multiple: the padded length is a multiple of this (the strategy's requirement, which
            must itself be a multiple of ``P * LAYOUT_MULTIPLE[kind]``).
        inner: ranks per outer group (1 except for hybrid).
        spans: ``balanced`` only: per outer rank, its global ranges ``((g0, g1), ...)`` of the
            padded sequence in storage order; together they cover ``[0, padded_len)`` once, each
            rank ``padded_len / outer`` positions.
    """

    kind: str
    seq_len: int
    sp_size: int
    multiple: int
    inner: int = 1
    spans: tuple = ()

    def __post_init__(self):
        if self.kind not in LAYOUT_MULTIPLE:
            raise ValueError(f"unknown layout {self.kind!r}; valid layouts: {sorted(LAYOUT_MULTIPLE)}")
        need = self.sp_size * LAYOUT_MULTIPLE[self.kind]
        if self.multiple % need:
            raise ValueError(
                f"layout {self.kind!r} over {self.sp_size} ranks needs a multiple of {need}, got {self.multiple}"
            )
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.sp_size % self.inner:
            raise ValueError(f"inner={self.inner} must divide sp_size={self.sp_size}")
        if (self.kind == "balanced") != bool(self.spans):
            raise ValueError(f"layout {self.kind!r}: spans are given exactly for 'balanced' layouts")
        if self.spans:
            self._check_spans()

    def _check_spans(self) -> None:
        size = self.padded_len // self.outer
        totals = [sum(b - a for a, b in s) for s in self.spans]
        flat = sorted(r for s in self.spans for r in s)
        covers = (
            all(a < b for a, b in flat)
            and flat[0][0] == 0
            and flat[-1][1] == self.padded_len
            and all(x[1] == y[0] for x, y in zip(flat, flat[1:]))
        )
        if len(self.spans) != self.outer or any(t != size for t in totals) or not covers:
            raise ValueError(
                f"balanced layout spans must give each of the {self.outer} outer ranks {size} "
                f"positions and cover [0, {self.padded_len}) once; got totals {totals}"
            )

    @property
    def padded_len(self) -> int:
        """``S`` rounded up to ``multiple``."""
        return -(-self.seq_len // self.multiple) * self.multiple

    @property
    def pad(self) -> int:
        """Number of padding positions appended at the end of the sequence."""
        return self.padded_len - self.seq_len

    @property
    def local_len(self) -> int:
        """Positions held by each rank."""
        return self.padded_len // self.sp_size

    @property
    def outer(self) -> int:
        """Number of outer groups (ring ranks)."""
        return self.sp_size // self.inner

    def outer_chunks(self, outer_rank: int) -> list[tuple[int, int]]:
        """The global ranges ``[(g0, g1), ...]`` of outer group ``outer_rank``'s shard, in storage
        order (what :meth:`outer_indices` enumerates, without materialising the indices)."""
        n = self.outer
        if self.kind == "balanced":
            return list(self.spans[outer_rank])
        if self.kind == "contiguous":
            size = self.padded_len // n
            return [(outer_rank * size, (outer_rank + 1) * size)]
        c = self.padded_len // (2 * n)  # zigzag chunk length
        j = 2 * n - 1 - outer_rank
        return [(outer_rank * c, (outer_rank + 1) * c), (j * c, (j + 1) * c)]

    def outer_indices(self, outer_rank: int) -> torch.Tensor:
        """Global indices of the shard of outer group ``outer_rank``, in storage order."""
        return torch.cat([torch.arange(g0, g1) for g0, g1 in self.outer_chunks(outer_rank)])

    def local_indices(self, rank: int) -> torch.Tensor:
        """Global (padded) indices held by ``rank``, in the order the rank stores them."""
        outer_rank, inner_rank = divmod(rank, self.inner)
        idx = self.outer_indices(outer_rank)
        return idx[inner_rank * self.local_len : (inner_rank + 1) * self.local_len]

    @cached_property
    def rank_order(self) -> torch.Tensor:
        """``(padded_len,)``: global index of each position when the shards of ranks
        ``0..P-1`` are concatenated (what an all-gather or an all-to-all produces)."""
        return torch.cat([self.local_indices(r) for r in range(self.sp_size)])

    @cached_property
    def inverse_order(self) -> torch.Tensor:
        """Inverse permutation of :attr:`rank_order`."""
        return torch.argsort(self.rank_order)

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """This rank's slice of a padded full-length tensor (``x.shape[dim] == padded_len``)."""
        if self.kind == "contiguous":
            return x.narrow(dim, rank * self.local_len, self.local_len)  # same for any `inner`
        return x.index_select(dim, self.local_indices(rank).to(x.device))

    def unshard(self, gathered: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Turn shards concatenated in rank order into the original order, padding removed."""
        if gathered.shape[dim] != self.padded_len:
            raise ValueError(
                f"expected {self.padded_len} positions along dim {dim} (all ranks' shards), got {gathered.shape[dim]}"
            )
        if self.kind != "contiguous":
            gathered = gathered.index_select(dim, self.inverse_order.to(gathered.device))
        return gathered.narrow(dim, 0, self.seq_len)
