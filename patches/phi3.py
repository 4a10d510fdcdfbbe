"""Megatron-SP plan for Phi-3: fused ``qkv_proj`` and ``gate_up_proj``.

A plain column split of a fused weight would give rank 0 only query rows and the last rank only
value rows. The plan therefore lists the fused blocks (``[q, k, v]`` and ``[gate, up]``); the
strategy re-lays their rows out rank-major before the split (rank ``r`` gets its query heads,
the matching kv heads, and its halves of gate and up), and lays them back for checkpoints.

Why a (reversible) attribute change is needed: ``Phi3Attention.forward`` slices the fused
output with ``self.config.num_attention_heads`` and ``self.num_key_value_heads`` at run time, so
each attention module gets a config view and an attribute with this rank's head counts while
Megatron-SP is on; ``disable_sequence_parallel`` restores both.
"""

from __future__ import annotations

from . import llama
from .plan import MegatronPlan

__all__ = ["megatron_plan", "check"]


def check(config, sp_size: int) -> None:
    """Phi-3's fused qkv needs the kv heads to split evenly (no per-rank kv replication).

    Raises:
        ValueError: ``num_key_value_heads`` is not divisible by ``sp_size``.
    """
    kv = config.num_key_value_heads
    if kv % sp_size:
        divisors = [d for d in range(1, kv + 1) if kv % d == 0 and config.num_attention_heads % d == 0]
        raise ValueError(
            f"Megatron-SP on Phi-3 splits the fused qkv_proj by heads, but num_key_value_heads={kv} is not "
            f"divisible by sp_size={sp_size}. Use an sp_size in {divisors}, or strategy='ulysses'."
        )


def megatron_plan(config, sp_size: int) -> MegatronPlan:
    """The Phi-3 plan for ``config`` over ``sp_size`` ranks (see the module docstring)."""
    check(config, sp_size)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return MegatronPlan(
        model_plan=llama.model_plan(),
        layer_plan=llama.block_plan(["qkv_proj"], ["gate_up_proj"]),
        fused={
            "self_attn.qkv_proj.weight": [heads * head_dim, kv * head_dim, kv * head_dim],
            "mlp.gate_up_proj.weight": [config.intermediate_size, config.intermediate_size],
        },
        local_head_attrs={"config.num_attention_heads": heads, "num_key_value_heads": kv},
    )
