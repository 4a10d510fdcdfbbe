"""Hybrid Ulysses x Ring on a 2D mesh (USP: Fang & Zhao 2024, https://arxiv.org/abs/2405.07719).

``sp_size = ulysses_size x ring_size``. Consecutive ranks form a Ulysses group (all-to-all over
the fastest links); the Ulysses groups form a ring. The layout is zigzag (or contiguous) over the
ring, each ring shard split contiguously over its Ulysses group, so the all-to-all reassembles a
ring shard with ``h / ulysses_size`` heads, and ring attention runs over the ring. Ulysses needs
only ``ulysses_size`` to divide the heads, so the SP degree is no longer capped by the head count.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from ..comm import all_to_all
from ..layout import Layout
from .base import check_no_options
from .ring import RING_OPTIONS, check_layout_option, check_ring_features, ring_attention
from .ulysses import HeadsNotDivisibleError, _divisors, kv_replication, seq_to_heads

__all__ = ["HybridStrategy", "largest_ulysses_size"]


def largest_ulysses_size(num_heads: int, sp_size: int) -> int:
    """The largest Ulysses degree that divides both ``sp_size`` and the query heads (kv heads
    are replicated as far as needed)."""
    return max(u for u in _divisors(sp_size) if num_heads % u == 0)


def _ulysses_size(config, sp_size: int, options: dict) -> int:
    heads = config.num_attention_heads
    size = options.get("ulysses_size") or largest_ulysses_size(heads, sp_size)
    if not isinstance(size, int) or size < 1 or sp_size % size:
        raise ValueError(f"ulysses_size={size!r} must be a positive divisor of sp_size={sp_size}: {_divisors(sp_size)}")
    if heads % size:
        ok = [u for u in _divisors(sp_size) if heads % u == 0]
        raise HeadsNotDivisibleError(
            f"ulysses_size={size} does not divide the {heads} query heads; use one of {ok} (ring_size = sp_size / it)")
    return size


class HybridStrategy:
    """``strategy="hybrid"``: all-to-all inside Ulysses groups, ring attention across them."""

    name = "hybrid"
    description = "Ulysses x Ring on a 2D mesh (lifts Ulysses' head-count limit)"
    available = True

    def check_model(self, config, sp_size: int, options: dict) -> None:
        check_no_options(self.name, options, RING_OPTIONS + ("ulysses_size",))
        check_layout_option(options)
        _ulysses_size(config, sp_size, options)

    def check_attention(self, features) -> None:
        check_ring_features(self.name, features)

    def apply(self, model, state) -> None:
        """Build the ``(dp, ring, ulysses)`` mesh over the same ranks as ``(dp, sp)``."""
        u = _ulysses_size(model.config, state.sp_size, state.config.options)
        ranks = state.mesh.mesh.reshape(state.mesh.size(0), state.sp_size // u, u)
        mesh = DeviceMesh(state.mesh.device_type, ranks, mesh_dim_names=("dp", "ring", "ulysses"))
        state.strategy_state.update(ulysses_size=u, ring_size=state.sp_size // u, mesh3d=mesh)

    def remove(self, model, state) -> None:
        state.strategy_state.clear()

    def make_layout(self, seq_len: int, state) -> Layout:
        kind = state.config.options.get("layout", "zigzag")
        u = state.strategy_state["ulysses_size"]
        return Layout(kind, seq_len, state.sp_size, state.sp_size * (2 if kind == "zigzag" else 1), inner=u)

    def attention(self, module, query, key, value, batch, **kwargs) -> torch.Tensor:
        state = batch.state
        mesh = state.strategy_state["mesh3d"]
        ugroup, rgroup = mesh.get_group("ulysses"), mesh.get_group("ring")
        counter, layer = state.counter, getattr(module, "layer_idx", None)
        rep = kv_replication(query.shape[1], key.shape[1], state.strategy_state["ulysses_size"])
        if rep > 1:  # (B, h_kv, S/P, D) -> (B, h_kv * rep, S/P, D)
            key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        # (B, h, S/P, D) -> (B, h/U, U*S/P, D): the Ulysses group's pieces form this ring shard
        q, k, v = seq_to_heads((query, key, value), ugroup, counter, layer)
        out = ring_attention(module, q, k, v, batch, rgroup, mesh.get_local_rank("ring"), batch.layout, **kwargs)
        # (B, h/U, U*S/P, D) -> (B, U*S/P, h/U, D) -> (B, S/P, h, D)
        return all_to_all(out.transpose(1, 2), 1, 2, ugroup, counter, layer)
