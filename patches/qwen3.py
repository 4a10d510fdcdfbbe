"""Megatron-SP plan for Qwen3: Llama's plan plus the per-head ``q_norm``/``k_norm``.

The norms act on the head dimension of each head, so they run on this rank's heads (weights
replicated, gradients ``Partial(sum)``); with kv heads replicated over the ranks, ``k_norm``
runs on all kv heads.
"""

from __future__ import annotations

from . import llama

__all__ = ["megatron_plan"]


def megatron_plan(config, sp_size: int):
    """Llama's plan with head norms; see :func:`hf_seqpar.patches.llama.megatron_plan`."""
    return llama.megatron_plan(config, sp_size, head_norms=True)
