"""Megatron-SP: tensor parallelism whose norms, residuals and dropouts stay sequence-sharded.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
https://arxiv.org/abs/2205.05198. Over the ``T`` ranks of the SP group ("sp" dimension of the
``dp x sp`` mesh) every decoder layer all-gathers the sequence-sharded hidden states before the
column-parallel q/k/v and gate/up projections and reduce-scatters after the row-parallel o and
down projections: per layer forward 2 all-gathers + 2 reduce-scatters of the local activations
``(B, S/T, h)``, i.e. ``4 (T - 1) B (S/T) h`` elements sent per rank, about ``4 B S h`` whatever
``T``. Expressed with torch's ``torch.distributed.tensor.parallel`` styles; the per-family plans
live in :mod:`hf_seqpar.patches`.

After the column-parallel projections a rank holds ``h/T`` heads of the *full* sequence, so
:meth:`MegatronStrategy.attention` runs the model's own kernel through
:func:`~hf_seqpar.core.local_attention.full_sequence_attention` with the exact masks of the batch and
no communication. RoPE is applied to q/k before that, so ``shard_batch`` gives the model the
full-sequence ``position_ids`` (:meth:`MegatronStrategy.local_position_ids`).

Gradients: every parameter becomes a DTensor on the SP group (:mod:`hf_seqpar.tp`); on every
rank ``p.grad.full_tensor()`` is the gradient of the unsharded model (no averaging over the SP
group); with ``dp > 1``, average the gradients over ``dp`` only
(:func:`hf_seqpar.tp.average_gradients_over_dp`).
"""

from __future__ import annotations

import torch

from hf_seqpar.core.comm import all_reduce_sum_replicated
from hf_seqpar.core.layout import Layout
from hf_seqpar.core.local_attention import full_sequence_attention
from hf_seqpar.strategies.base import CostFacts, Strategy, divisors
from hf_seqpar.strategies.ulysses import HeadsNotDivisibleError, heads_advice
from hf_seqpar.tp import TensorParallel

__all__ = ["MegatronStrategy"]


class _Metering:
    def __init__(self, meter):
        self.meter = meter

    def __enter__(self):
        self.meter.start()
        return self.meter

    def __exit__(self, *exc):
        self.meter.stop()


class MegatronStrategy(Strategy):
    """``strategy="megatron"``: tensor parallel over the SP group with sequence-sharded
    norms and residuals (see the module docstring)."""

    name = "megatron"
    description = "tensor parallel + sequence-sharded norms/residuals (Megatron-SP)"
    shards_parameters = True
    # heads and MLP columns split over T ranks on the full sequence (same bytes per local token), but
    # the two all-gathered linear inputs are full-sequence; the ranks share one graph (no loss
    # all-reduce in backward); tensor parallel stays inside a node: its collectives are on the
    # critical path of every layer
    cost = CostFacts(
        degrees=lambda sp, options, heads: (1, 1, sp),
        out_copy=False,
        gathered_inputs=2,
        loss_allreduce_in_backward=False,
        min_sp=2,
        heads_over_sp=True,
        within_node=True,
    )

    @classmethod
    def check_model(cls, model_config, sp_size: int, options, world_size: int | None = None) -> None:
        from hf_seqpar import patches  # patches import hf_seqpar.tp; imported when needed

        fam = patches.family(getattr(model_config, "model_type", None))
        heads = model_config.num_attention_heads
        if heads % sp_size:
            raise HeadsNotDivisibleError(
                f"Megatron-SP splits attention heads over the SP ranks, but the model has {heads} query heads, "
                f"which sp_size={sp_size} does not divide. {heads_advice(heads, sp_size, world_size)}"
            )
        inter = model_config.intermediate_size
        if inter % sp_size:
            raise ValueError(
                f"Megatron-SP splits the MLP's intermediate size {inter} over sp_size={sp_size} ranks, which "
                f"does not divide it. Use an sp_size in {divisors(inter)}, or strategy='ulysses'."
            )
        if hasattr(fam, "check"):
            fam.check(model_config, sp_size)

    @classmethod
    def check_trainer(cls) -> None:
        raise NotImplementedError(
            "SequenceParallelTrainer does not support strategy='megatron' yet: the Trainer wraps the model in "
            "DDP, which cannot wrap Megatron-SP's DTensor parameters. Use hf_seqpar.prepare_sequence_parallel "
            "with an accelerate loop (recipes/finetune_long_context.py), or strategy='ulysses'/'ring'/'hybrid'."
        )

    def __init__(self, model_config, dims, options, **context):
        super().__init__(model_config, dims, options, **context)
        self.tensor_parallel = None
        self.kv_replicated = False

    def make_layout(self, seq_len: int, valid=None, doc_ids=None) -> Layout:
        return Layout("contiguous", seq_len, self.sp_size, self.sp_size)

    def local_position_ids(self, positions: torch.Tensor, layout) -> torch.Tensor:
        # q/k are full-sequence when RoPE is applied: every rank needs all (B, S_pad) positions
        return positions

    def attention(self, module, query, key, value, batch, **kwargs) -> torch.Tensor:
        if self.kv_replicated:
            key, value = _select_kv(query, key, value, module.config, self.sp_rank)
        # query (B, h/T, S, D), key/value (B, h_kv', S, D): this rank's heads, the full sequence
        return full_sequence_attention(
            module, query, key, value, batch, self.attn_implementation, backend=self.backend, **kwargs
        )

    def apply(self, model, state) -> None:
        from hf_seqpar import patches

        if self.sp_size == 1:  # tensor parallel of degree 1: nothing to split; skip DTensor's per-op dispatch
            return
        plan = patches.family(model.config.model_type).megatron_plan(model.config, self.sp_size)
        self.tensor_parallel = TensorParallel(self.dims.sp_mesh, self.counter)
        self.tensor_parallel.apply(model, plan, groups=[self.dp_group])
        self.kv_replicated = plan.kv_replicated

    def remove(self, model, state) -> None:
        if self.tensor_parallel is not None:
            self.tensor_parallel.undo(model)
        self.tensor_parallel, self.kv_replicated = None, False

    def combine_loss(self, tensor: torch.Tensor, group, counter=None) -> torch.Tensor:
        # the ranks share one graph: sum forward, identity backward (Megatron's "g" operator)
        return all_reduce_sum_replicated(tensor, group, counter)

    def metering(self):
        if self.tensor_parallel is None:
            return super().metering()  # degree 1: no tensor-parallel collectives to count
        if self.tensor_parallel.meter is None:
            raise RuntimeError("enable_sequence_parallel(..., count_comm=True) is needed to count collectives")
        return _Metering(self.tensor_parallel.meter)


def _select_kv(query, key, value, config, rank: int):
    """The kv heads this rank's query heads use, from all kv heads (when they do not split).

    Query head ``j`` of rank ``r`` is global head ``r * h_local + j`` and uses kv head
    ``(r * h_local + j) // G`` with ``G = h / h_kv``.
    """
    h_local, groups = query.shape[1], config.num_attention_heads // key.shape[1]
    first = rank * h_local
    needed = torch.arange(first, first + h_local) // groups  # (h_local,) kv head of each query head
    lo, hi = int(needed[0]), int(needed[-1]) + 1
    if h_local % (hi - lo) == 0 and torch.equal(needed, torch.arange(lo, hi).repeat_interleave(h_local // (hi - lo))):
        return key[:, lo:hi], value[:, lo:hi]  # (B, h_kv, S, D) -> (B, hi - lo, S, D): whole groups
    idx = needed.to(key.device)
    return key.index_select(1, idx), value.index_select(1, idx)  # (B, h_local, S, D): one kv per query
