"""Two tensor-parallel styles that torch's built-in ones do not cover, for Megatron-SP.

Both keep their parameters replicated (``Replicate()`` DTensors, like torch's
``SequenceParallel``) and hand out *local* tensors whose gradient is declared ``Partial(sum)``,
so each rank's backward contributes only its own part and the parameter gradients come out as
``Partial(sum)`` DTensors (``grad.full_tensor()`` is the exact gradient), with no extra
communication:

- :class:`ReplicatedProjection`: a k/v projection computed for *all* kv heads on every rank,
  used when the kv-head count does not split over the ranks (each rank's attention then picks
  the kv heads its query heads need).
  (Repeating kv heads into separately sharded copies would divide their cost, but the copies
  are then distinct parameters: global gradient norms (``clip_grad_norm_``) count them ``r``
  times and the training diverges from the unsharded model. Replicated DTensors keep every
  parameter exactly the model's.)
- :class:`HeadNorm`: a per-head norm (Qwen3's ``q_norm``/``k_norm``) applied to this rank's
  heads, or to all (replicated) kv heads.

Written against the public ``ParallelStyle`` / ``distribute_module`` API of torch.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ParallelStyle

__all__ = ["ReplicatedProjection", "HeadNorm"]


def _replicate_params(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    """Turn every parameter into a ``Replicate()`` DTensor (same values on every rank)."""
    for p_name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(
            p_name,
            nn.Parameter(
                DTensor.from_local(param.data, mesh, [Replicate()], run_check=False), requires_grad=param.requires_grad
            ),
        )


def _as_replicate(x, mesh: DeviceMesh):
    if isinstance(x, DTensor):
        return x if x.placements == (Replicate(),) else x.redistribute(placements=[Replicate()])
    raise TypeError(
        f"expected a replicated DTensor input (the all-gathered hidden states), got {type(x).__name__}; "
        "the module before this one in the Megatron plan must leave a DTensor"
    )


class ReplicatedProjection(ParallelStyle):
    """A linear layer with replicated weights on a replicated (all-gathered) input.

    Args:
        use_local_output: return a local tensor whose gradient counts as ``Partial(sum)``
            (each rank back-propagates only the heads it used); False returns the replicated
            DTensor, for a following :class:`HeadNorm` with ``local_heads=False``.
    """

    def __init__(self, *, use_local_output: bool = True):
        super().__init__()
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def input_fn(mod, inputs, mesh):
            return (_as_replicate(inputs[0], mesh), *inputs[1:])

        def output_fn(mod, out, mesh):
            return out.to_local(grad_placements=[Partial()]) if self.use_local_output else out

        return distribute_module(module, device_mesh, _replicate_params, input_fn, output_fn)


class HeadNorm(ParallelStyle):
    """A norm over the head dimension ``D`` of ``(B, S, heads, D)`` tensors, weights replicated.

    Args:
        local_heads: True when the input is this rank's query/key heads (a local tensor, heads
            sharded: dim 2); False when it is the replicated DTensor of all kv heads from a
            :class:`ReplicatedProjection`.
    """

    def __init__(self, *, local_heads: bool = True):
        super().__init__()
        self.local_heads = local_heads

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def input_fn(mod, inputs, mesh):
            x = inputs[0]
            if self.local_heads:  # (B, S, h/T, D) local -> DTensor sharded on the head dim
                x = DTensor.from_local(x, mesh, [Shard(2)], run_check=False)
            else:
                x = _as_replicate(x, mesh)
            return (x, *inputs[1:])

        def output_fn(mod, out, mesh):
            return out.to_local() if self.local_heads else out.to_local(grad_placements=[Partial()])

        return distribute_module(module, device_mesh, _replicate_params, input_fn, output_fn)
