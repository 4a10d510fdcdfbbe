"""Tensor parallelism for Megatron-SP: applying a family's plan to a model and undoing it, the two
parallel styles torch lacks, whole-tensor export in the checkpoint's layout, gradient averaging
over the data-parallel replicas, and counting DTensor collectives.

Public API::

    from hf_seqpar.tp import full_tensor, average_gradients_over_dp, counting
    full = full_tensor(model, "model.layers.0.self_attn.q_proj.weight", param)   # checkpoint layout
    average_gradients_over_dp(model)                                              # after backward, dp > 1
    with counting(model): loss.backward()                                         # count_comm=True

The per-family plans (which style goes on which module) live in :mod:`hf_seqpar.patches`; the
strategy that uses them is :mod:`hf_seqpar.strategies.megatron`.
"""

from hf_seqpar.tp.apply import TensorParallel, average_gradients_over_dp, counting, full_tensor
from hf_seqpar.tp.styles import HeadNorm, ReplicatedProjection

__all__ = ["TensorParallel", "full_tensor", "average_gradients_over_dp", "counting", "HeadNorm", "ReplicatedProjection"]
