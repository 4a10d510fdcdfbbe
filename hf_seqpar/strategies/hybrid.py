"""Hybrid Ulysses x Ring on a 2D mesh (USP: Fang & Zhao 2024, https://arxiv.org/abs/2405.07719).

``sp_size = ulysses_size x ring_size``. Consecutive ranks form a Ulysses group (all-to-all over
the fastest links); the Ulysses groups form a ring. The layout (zigzag, work-balanced or
contiguous) is over the ring, each ring shard split contiguously over its Ulysses group, so the all-to-all reassembles a
ring shard with ``h / ulysses_size`` heads, and ring attention runs over the ring. Ulysses needs
only ``ulysses_size`` to divide the heads, so the SP degree is no longer capped by the head count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh

from hf_seqpar.core.balance import choose_layout
from hf_seqpar.core.comm import all_to_all
from hf_seqpar.core.layout import Layout
from hf_seqpar.strategies.base import CostFacts, divisors
from hf_seqpar.strategies.ring import RingOptions, RingStrategy, ring_attention
from hf_seqpar.strategies.ulysses import HeadsNotDivisibleError, kv_replication, seq_to_heads

__all__ = ["HybridStrategy", "HybridOptions", "largest_ulysses_size"]


def largest_ulysses_size(num_heads: int, sp_size: int) -> int:
    """The largest Ulysses degree that divides both ``sp_size`` and the query heads (kv heads
    are replicated as far as needed)."""
    return max(u for u in divisors(sp_size) if num_heads % u == 0)


@dataclass(frozen=True)
class HybridOptions(RingOptions):
    """Options of the hybrid strategy: the ring's (over the ring dimension) and the Ulysses degree."""

    ulysses_size: int | None = None
    """Ranks of the Ulysses dimension; None: the largest degree the query heads allow."""


def _ulysses_size(heads: int, sp_size: int, options: HybridOptions) -> int:
    size = options.ulysses_size or largest_ulysses_size(heads, sp_size)
    if sp_size % size:
        raise ValueError(f"ulysses_size={size} must be a positive divisor of sp_size={sp_size}: {divisors(sp_size)}")
    if heads % size:
        ok = [u for u in divisors(sp_size) if heads % u == 0]
        raise HeadsNotDivisibleError(
            f"ulysses_size={size} does not divide the {heads} query heads; use one of {ok} (ring_size = sp_size / it)"
        )
    return size


def _degrees(sp: int, options: HybridOptions, heads: int) -> tuple[int, int, int]:
    u = _ulysses_size(heads, sp, options)
    return u, sp // u, 1


class HybridStrategy(RingStrategy):
    """``strategy="hybrid"``: all-to-all inside Ulysses groups, ring attention across them."""

    name = "hybrid"
    description = "Ulysses x Ring on a 2D mesh (lifts Ulysses' head-count limit)"
    Options = HybridOptions
    bench_world = 4
    cost = CostFacts(degrees=_degrees, a2a_in_ulysses_group=True, plan_ulysses_sizes=True)

    @classmethod
    def check_model(cls, model_config, sp_size: int, options, world_size: int | None = None) -> None:
        _ulysses_size(model_config.num_attention_heads, sp_size, options)

    def __init__(self, model_config, dims, options, **context):
        super().__init__(model_config, dims, options, **context)
        self.ulysses_size = _ulysses_size(model_config.num_attention_heads, self.sp_size, options)
        self.ring_size = self.sp_size // self.ulysses_size
        self.mesh3d = None

    def apply(self, model, state) -> None:
        """Build the ``(rest, ring, ulysses)`` mesh over the ranks of the ``sp`` dimension (consecutive
        SP ranks share a Ulysses group)."""
        # (rest, sp) -> (rest, ring, ulysses): rest = every other mesh dimension, flattened
        ranks = self.dims.sp_ranks_grid().reshape(-1, self.ring_size, self.ulysses_size)
        self.mesh3d = DeviceMesh(self.mesh.device_type, ranks, mesh_dim_names=("rest", "ring", "ulysses"))

    def remove(self, model, state) -> None:
        self.mesh3d = None

    def make_layout(self, seq_len: int, valid=None, doc_ids=None) -> Layout:
        return choose_layout(
            self.options.layout,
            seq_len,
            self.sp_size,
            self.seq_multiple(self.sp_size, self.options),
            self.ulysses_size,
            valid,
            doc_ids,
        )

    def attention(self, module, query, key, value, batch, **kwargs) -> torch.Tensor:
        ugroup, rgroup = self.mesh3d.get_group("ulysses"), self.mesh3d.get_group("ring")
        counter, layer = self.counter, getattr(module, "layer_idx", None)
        rep = kv_replication(query.shape[1], key.shape[1], self.ulysses_size)
        if rep > 1:  # (B, h_kv, S/P, D) -> (B, h_kv * rep, S/P, D)
            key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        # (B, h, S/P, D) -> (B, h/U, U*S/P, D): the Ulysses group's pieces form this ring shard
        q, k, v = seq_to_heads((query, key, value), ugroup, counter, layer)
        out = ring_attention(
            module,
            q,
            k,
            v,
            batch,
            rgroup,
            self.mesh3d.get_local_rank("ring"),
            batch.layout,
            backend=self.backend,
            counter=counter,
            **kwargs,
        )
        # (B, h/U, U*S/P, D) -> (B, U*S/P, h/U, D) -> (B, S/P, h, D)
        return all_to_all(out.transpose(1, 2), 1, 2, ugroup, counter, layer)
