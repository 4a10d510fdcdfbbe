"""Ulysses: all-to-all from sequence shards to head shards around the core attention.

DeepSpeed-Ulysses, Jacobs et al. 2023, https://arxiv.org/abs/2309.14509. Each rank sends
``(2 h_q + 2 h_kv) * N / P`` elements per layer forward (times ``(P - 1) / P`` leaving the rank),
independent of ``P`` when ``N / P`` is fixed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_seqpar.core.comm import all_to_all
from hf_seqpar.core.layout import Layout
from hf_seqpar.core.local_attention import full_sequence_attention
from hf_seqpar.kernels import compute_dtype
from hf_seqpar.strategies.base import CostFacts, Strategy, divisors

__all__ = ["UlyssesStrategy", "kv_replication", "seq_to_heads", "HeadsNotDivisibleError", "heads_advice"]


class HeadsNotDivisibleError(ValueError):
    """The head count does not split over the SP ranks."""


def heads_advice(heads: int, sp_size: int, world_size: int | None = None) -> str:
    """What to do when ``sp_size`` does not divide the ``heads`` query heads: advice that holds for
    these head counts and, when known, this world size (hybrid only where it keeps a Ulysses
    degree > 1, sp sizes only those that divide both the heads and the world)."""
    u = max(d for d in divisors(sp_size) if heads % d == 0)  # the largest Ulysses degree the heads allow
    if u > 1:
        use = (
            f"strategy='hybrid' (ulysses_size={u} x ring_size={sp_size // u} here) or strategy='ring' "
            "(no head-count limit)"
        )
    else:
        use = (
            f"strategy='ring' (no head-count limit; strategy='hybrid' would run as ring here: no Ulysses "
            f"degree > 1 divides both the {heads} query heads and sp_size={sp_size})"
        )
    allowed = divisors(heads)
    if world_size is None:
        return f"Use {use}, or an sp_size that divides {heads}: {allowed}."
    fits = [d for d in allowed if world_size % d == 0]
    return (
        f"Use {use}, or an sp_size that divides both the {heads} query heads and the {world_size} ranks: "
        f"{fits} (the heads alone allow {allowed})."
    )


def kv_replication(num_heads: int, num_kv_heads: int, sp_size: int, world_size: int | None = None) -> int:
    """How many times each kv head must be replicated so that ``sp_size`` ranks each get whole
    kv heads matching their query heads (1 when ``num_kv_heads`` divides evenly).

    The smallest ``r`` with ``r | (num_heads / num_kv_heads)`` and ``sp_size | num_kv_heads * r``;
    after ``repeat_interleave(r)`` expanded kv head ``e`` is original head ``e // r`` and query head
    ``h`` uses expanded head ``h // (G / r)``, which is ``h // G`` as before.

    Raises:
        HeadsNotDivisibleError: ``num_heads`` is not divisible by ``sp_size`` (the advice is for
            ``world_size`` ranks when given).
    """
    if num_heads % sp_size:
        raise HeadsNotDivisibleError(
            f"Ulysses splits attention heads over the SP ranks, but the model has {num_heads} query heads, "
            f"which sp_size={sp_size} does not divide. {heads_advice(num_heads, sp_size, world_size)}"
        )
    groups = num_heads // num_kv_heads
    return next(r for r in divisors(groups) if (num_kv_heads * r) % sp_size == 0)


def seq_to_heads(tensors, group, counter=None, layer=None) -> list[torch.Tensor]:
    """One fused all-to-all for q, k and v: ``(B, h_i, S/P, D_i)`` each -> ``(B, h_i/P, S, D_i)`` each.

    Every rank's chunk holds its share of every tensor's heads, so one exchange replaces three
    (one per run of equal head sizes ``D_i`` when they differ).
    """
    # one dtype on the wire: the attention compute dtype (under autocast RoPE returns fp32 q/k
    # while v is bf16; concatenating would promote all three to fp32 and double the traffic)
    dtype = compute_dtype(*tensors)
    tensors = [t.to(dtype) for t in tensors]
    world = dist.get_world_size(group)
    if world == 1:
        return tensors
    if len({t.shape[-1] for t in tensors}) > 1:  # head sizes differ (MLA: v_head_dim != qk_head_dim)
        split = next(i for i, t in enumerate(tensors) if t.shape[-1] != tensors[0].shape[-1])
        return seq_to_heads(tensors[:split], group, counter, layer) + seq_to_heads(
            tensors[split:], group, counter, layer
        )
    sizes = [t.shape[1] // world for t in tensors]
    # (B, h_i, S/P, D) -> (B, P, h_i/P, S/P, D), concatenated over i along the head dim
    packed = torch.cat([t.unflatten(1, (world, -1)) for t in tensors], dim=2)
    # scatter the rank dim, gather the sequence: (B, 1, sum h_i/P, S, D)
    packed = all_to_all(packed, 1, 3, group, counter, layer).squeeze(1)
    return list(packed.split(sizes, dim=1))


class UlyssesStrategy(Strategy):
    """``strategy="ulysses"``: contiguous shards, heads exchanged by all-to-all."""

    name = "ulysses"
    description = "all-to-all between sequence shards and head shards (DeepSpeed-Ulysses)"
    cost = CostFacts(degrees=lambda sp, options, heads: (sp, 1, 1), heads_over_sp=True)

    @classmethod
    def check_model(cls, model_config, sp_size: int, options, world_size: int | None = None) -> None:
        heads = model_config.num_attention_heads
        kv_replication(heads, getattr(model_config, "num_key_value_heads", None) or heads, sp_size, world_size)

    def make_layout(self, seq_len: int, valid=None, doc_ids=None) -> Layout:
        return Layout("contiguous", seq_len, self.sp_size, self.sp_size)

    def attention(self, module, query, key, value, batch, **kwargs) -> torch.Tensor:
        group, counter, layer = self.sp_group, self.counter, getattr(module, "layer_idx", None)
        rep = kv_replication(query.shape[1], key.shape[1], self.sp_size)
        if rep > 1:  # (B, h_kv, S/P, D) -> (B, h_kv * rep, S/P, D)
            key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
        # (B, h, S/P, D) -> (B, h/P, S, D): scatter heads, gather the sequence in rank order
        q, k, v = seq_to_heads((query, key, value), group, counter, layer)
        if kwargs.get("s_aux") is not None:  # per-head attention sinks (GPT-OSS): those of this rank's heads
            n = q.shape[1]
            kwargs["s_aux"] = kwargs["s_aux"][self.sp_rank * n : (self.sp_rank + 1) * n]
        out = full_sequence_attention(module, q, k, v, batch, self.attn_implementation, backend=self.backend, **kwargs)
        # (B, S, h/P, D) -> (B, S/P, h, D): scatter the sequence, gather heads
        return all_to_all(out, 1, 2, group, counter, layer)
