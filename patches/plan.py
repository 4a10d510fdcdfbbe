"""The shape of a Megatron-SP plan for one model family."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["MegatronPlan"]


@dataclass
class MegatronPlan:
    """Which torch ``ParallelStyle`` goes on which module of a causal LM.

    The styles come from ``torch.distributed.tensor.parallel`` (plus the two in
    :mod:`hf_seqpar.tp.styles`); ``parallelize_module`` applies them.
    """

    model_plan: dict
    """Styles keyed by module path relative to the ``*ForCausalLM`` (embedding, final norm, lm_head)."""
    layer_plan: dict
    """Styles keyed by module path relative to each decoder layer."""
    layers: str = "model.layers"
    """Path of the ``ModuleList`` of decoder layers."""
    kv_replicated: bool = False
    """k/v projections computed for all kv heads on every rank (kv heads do not split over the
    ranks); the strategy's attention then selects the kv heads this rank's query heads use."""
    fused: dict = field(default_factory=dict)
    """Fused projections: layer-relative parameter name -> sizes of the blocks stacked along the
    output rows (e.g. ``[q, k, v]``). Before the column split the rows are re-laid out rank-major
    (rank ``r`` gets the ``r``-th slice of every block) and laid back out for checkpoints."""
    local_head_attrs: dict = field(default_factory=dict)
    """Attention-module attributes (``config.x`` reads the module's config) read at run time that
    must hold this rank's head counts: name -> global value (divided by ``sp_size`` when applied)."""
