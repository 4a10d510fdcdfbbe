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
from hf_seqpar.core.shape import ModelShape
from hf_seqpar.strategies.base import ActivationTerms, divisors
from hf_seqpar.strategies.ring import RingOptions, RingStrategy, ring_attention, ring_comm_bytes
from hf_seqpar.strategies.ulysses import HeadsNotDivisibleError, kv_replication, seq_to_heads, ulysses_comm_bytes

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
            f"ulysses_size={size} does not divide the {heads} query heads; use one of {ok} (ring_size = sp_size / it)")
    return size


class HybridStrategy(RingStrategy):
    """``strategy="hybrid"``: all-to-all inside Ulysses groups, ring attention across them."""

    name = "hybrid"
    description = "Ulysses x Ring on a 2D mesh (lifts Ulysses' head-count limit)"
    Options = HybridOptions
    bench_world = 4

    @classmethod
    def check_model(cls, model_config, sp_size: int, options, world_size: int | None = None) -> None:
        _ulysses_size(model_config.num_attention_heads, sp_size, options)

    @classmethod
    def split(cls, sp: int, options, heads: int) -> tuple[int, int]:
        u = _ulysses_size(heads, sp, options)
        return u, sp // u

    @classmethod
    def plan_options(cls, heads: int, sp: int, gpus_per_node: int) -> list:
        return [cls.Options(ulysses_size=u) for u in range(2, sp) if sp % u == 0 and heads % u == 0]

    @classmethod
    def label(cls, sp: int, options) -> str:
        u = options.ulysses_size
        return f"hybrid {u}x{sp // u}" if u else f"hybrid {sp} (largest Ulysses degree)"

    @classmethod
    def comm_bytes(cls, m: ModelShape, seq_len: int, sp: int, batch: int, elem: int, options) -> dict:
        u, r = cls.split(sp, options, m.heads)
        a2a = m.layers * ulysses_comm_bytes(m, seq_len, sp, batch, elem, u)
        kv_eff = m.kv_heads * kv_replication(m.heads, m.kv_heads, u) if u > 1 else m.kv_heads
        fwd, bwd = ring_comm_bytes(m, kv_eff // u, (seq_len // sp) * u, r, batch, elem)
        return {"forward": a2a + m.layers * fwd, "backward": a2a + m.layers * bwd, "all_to_all": 2 * a2a}

    @classmethod
    def activation_terms(cls, m: ModelShape, sp: int, elem: int, options) -> ActivationTerms:
        u, _ = cls.split(sp, options, m.heads)
        kv = m.kv_heads * kv_replication(m.heads, m.kv_heads, u) if u > 1 else m.kv_heads
        return ActivationTerms(kv_heads=kv, extra_per_token=elem * m.heads * m.head_dim if sp > 1 else 0.0)

    @classmethod
    def comm_seconds(cls, comm: dict, sp: int, options, bandwidth) -> float:
        # the all-to-all stays inside a Ulysses group (consecutive ranks), the ring spans the SP group
        u = options.ulysses_size or sp  # unset: bound the all-to-all's links by the whole SP group
        return comm["all_to_all"] / bandwidth(u) + (comm["total"] - comm["all_to_all"]) / bandwidth(sp)

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
        return choose_layout(self.options.layout, seq_len, self.sp_size, self.seq_multiple(self.sp_size, self.options),
                             self.ulysses_size, valid, doc_ids)

    def attention(self, module, query, key, value, batch, **kwargs) -> torch.Tensor:
        ugroup, rgroup = self.mesh3d.get_group("ulysses"), self.mesh3d.get_group("ring")
        counter, layer = self.counter, getattr(module, "layer_idx", None)
        rep = kv_replication(query.shape[1], key.shape[1], self.ulysses_size)
        if rep > 1:  # (B, h_kv, S/P, D) -> (B, h_kv * rep, S/P, D)
            key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        # (B, h, S/P, D) -> (B, h/U, U*S/P, D): the Ulysses group's pieces form this ring shard
        q, k, v = seq_to_heads((query, key, value), ugroup, counter, layer)
        out = ring_attention(module, q, k, v, batch, rgroup, self.mesh3d.get_local_rank("ring"), batch.layout,
                             backend=self.backend, counter=counter, **kwargs)
        # (B, h/U, U*S/P, D) -> (B, U*S/P, h/U, D) -> (B, S/P, h, D)
        return all_to_all(out.transpose(1, 2), 1, 2, ugroup, counter, layer)
