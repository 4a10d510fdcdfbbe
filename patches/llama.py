"""Megatron-SP plan for Llama-style decoders: Llama, Mistral, Qwen2 (and Qwen3 via ``qwen3``).

Layer names: ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm``; top level ``model.embed_tokens``, ``model.norm``, ``lm_head``
(the same map as transformers' ``base_model_tp_plan`` for these families).

The residual stream is sharded on the sequence (dim 1) everywhere outside attention and MLP:
norms run on the local tokens (``SequenceParallel``), the attention/MLP input is all-gathered
(``PrepareModuleInput`` to ``Replicate``), q/k/v and gate/up are column-parallel (each rank: its
heads / its slice of the intermediate size, for the whole sequence), o and down are row-parallel
with a reduce-scatter back to sequence shards. The embedding and lm_head are replicated and run
on the local tokens, so logits stay ``(B, S/T, V)`` per rank.
"""

from __future__ import annotations

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from hf_seqpar.tp.styles import HeadNorm, ReplicatedProjection

from .plan import MegatronPlan

__all__ = ["megatron_plan", "model_plan", "block_plan"]


def model_plan() -> dict:
    """Embedding, final norm and lm_head: replicated weights on sequence-sharded tokens."""
    return {
        "model.embed_tokens": SequenceParallel(use_local_output=True),
        "model.norm": SequenceParallel(use_local_output=True),
        "lm_head": SequenceParallel(use_local_output=True),
    }


def block_plan(attn_in: list[str], mlp_in: list[str], attn_out: str = "o_proj", mlp_out: str = "down_proj") -> dict:
    """The common decoder-layer plan; ``attn_in``/``mlp_in`` are the column-parallel inputs."""
    plan = {
        "input_layernorm": SequenceParallel(),
        "post_attention_layernorm": SequenceParallel(),
        # HF calls self_attn(hidden_states=...) by keyword and mlp(hidden_states) by position
        "self_attn": PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Shard(1)}, desired_input_kwarg_layouts={"hidden_states": Replicate()}
        ),
        f"self_attn.{attn_out}": RowwiseParallel(output_layouts=Shard(1)),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        f"mlp.{mlp_out}": RowwiseParallel(output_layouts=Shard(1)),
    }
    plan.update({f"self_attn.{n}": ColwiseParallel() for n in attn_in})
    plan.update({f"mlp.{n}": ColwiseParallel() for n in mlp_in})
    return plan


def megatron_plan(config, sp_size: int, head_norms: bool = False) -> MegatronPlan:
    """The plan for ``config`` over ``sp_size`` ranks.

    Args:
        config: the model config (head counts).
        sp_size: tensor-parallel degree ``T``.
        head_norms: the attention has per-head ``q_norm``/``k_norm`` (Qwen3).

    Returns:
        A :class:`~hf_seqpar.patches.plan.MegatronPlan`.
    """
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    kv_replicated = kv % sp_size != 0
    layer = block_plan(["q_proj"] + ([] if kv_replicated else ["k_proj", "v_proj"]), ["gate_proj", "up_proj"])
    if kv_replicated:
        # k feeds k_norm (Qwen3) as a replicated DTensor; v (and k without norms) go local
        layer["self_attn.k_proj"] = ReplicatedProjection(use_local_output=not head_norms)
        layer["self_attn.v_proj"] = ReplicatedProjection()
    if head_norms:
        layer["self_attn.q_norm"] = HeadNorm(local_heads=True)
        layer["self_attn.k_norm"] = HeadNorm(local_heads=not kv_replicated)
    return MegatronPlan(model_plan=model_plan(), layer_plan=layer, kv_replicated=kv_replicated)
