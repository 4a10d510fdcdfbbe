"""Stage 1: the ``dp x sp`` device mesh, and the state object SP keeps on the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .comm import CommCounter
from .config import SequenceParallelConfig

__all__ = ["build_mesh", "SeqParState", "STATE_ATTR", "find_state", "unwrap_model"]

#: Attribute of the underlying ``PreTrainedModel`` that holds its :class:`SeqParState`.
STATE_ATTR = "hf_seqpar_state"


def _device_type() -> str:
    backend = dist.get_backend()
    return "cuda" if backend == "nccl" and torch.cuda.is_available() else "cpu"


def build_mesh(sp_size: int, device_type: str | None = None, timeout: float | None = None) -> DeviceMesh:
    """Build the 2D ``("dp", "sp")`` mesh over all ranks of the default group.

    Consecutive ranks share an SP group (rank ``r`` is in SP group ``r // sp_size``), so on a
    multi-GPU node the SP traffic stays on the fastest links.

    Args:
        sp_size: ranks per sequence; must divide the world size.
        device_type: ``"cpu"`` or ``"cuda"``; by default ``"cuda"`` under NCCL, else ``"cpu"``.
        timeout: seconds a collective of the mesh's process groups may wait for the other ranks
            before it fails; None keeps torch's default (the mesh's groups do not inherit the
            default group's timeout).

    Returns:
        A ``DeviceMesh`` of shape ``(world // sp_size, sp_size)`` named ``("dp", "sp")``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: the world size is not a multiple of ``sp_size``, or ``timeout`` is given for a
            backend other than gloo and NCCL.
    """
    require_distributed()
    world = dist.get_world_size()
    SequenceParallelConfig(sp_size=sp_size).validate(world)
    override = None
    if timeout is not None:
        options = _backend_options(timeout)
        override = {"dp": options, "sp": options}
    return init_device_mesh(device_type or _device_type(), (world // sp_size, sp_size), mesh_dim_names=("dp", "sp"),
                            backend_override=override)


def _backend_options(timeout: float):
    """Process-group options of the default backend with ``timeout`` seconds."""
    from datetime import timedelta

    backend = str(dist.get_backend())
    if "nccl" in backend:
        options = dist.ProcessGroupNCCL.Options()
    elif backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
    else:
        raise ValueError(f"a collective timeout is supported with the gloo and nccl backends, not {backend!r}; "
                         "set collective_timeout_s: null")
    options._timeout = timedelta(seconds=timeout)
    return options


def require_distributed() -> None:
    """Raise a clear error when ``torch.distributed`` has no default process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "hf_seqpar needs torch.distributed to be initialised before enable_sequence_parallel(): "
            "launch with `accelerate launch` or `torchrun --nproc_per_node N` and call "
            "`torch.distributed.init_process_group()` (backend 'nccl' on GPUs, 'gloo' on CPU) first, "
            "or create an `accelerate.Accelerator()`, which does it for you."
        )


@dataclass
class SeqParState:
    """Everything SP needs at run time, attached to the model (``model.hf_seqpar_state``).

    Nothing is global: the attention hook, the loss and ``shard_batch`` all reach this object
    through the model or through the per-batch context that ``shard_batch`` creates.
    """

    config: SequenceParallelConfig
    """The validated configuration (``sp_size`` resolved)."""
    mesh: DeviceMesh
    """The ``("dp", "sp")`` mesh."""
    strategy: Any
    """The strategy object from ``hf_seqpar.strategies.STRATEGIES``."""
    original_attn_implementation: str
    """The attention implementation the model had; restored by ``disable_sequence_parallel``."""
    original_loss_function: Any = None
    """The model's own ``_loss_function`` override (None when it used the class default)."""
    counter: CommCounter = field(default_factory=CommCounter)
    """Byte counter of every collective SP runs for this model."""
    batches_checked: int = 0
    """How many batches ``shard_batch`` verified to be identical across the SP group."""
    last_layout: Any = None
    """The :class:`~hf_seqpar.layout.Layout` of the most recent ``shard_batch`` call, used by
    ``gather_sequence`` when no layout is given."""
    features: Any = None
    """The model's :class:`~hf_seqpar.features.AttentionFeatures`, read at enable time."""
    hooks: list = field(default_factory=list)
    """Handles of the hooks ``enable_sequence_parallel`` put on the model (the MoE auxiliary loss
    of the full sequence, :mod:`hf_seqpar.moe`); removed by ``disable_sequence_parallel``."""
    strategy_state: dict = field(default_factory=dict)
    """What a strategy's ``apply`` builds for itself and its ``remove`` needs (the hybrid
    strategy's 3D mesh; Megatron-SP's hooks and weight re-layouts)."""

    @property
    def sp_group(self):
        """Process group of this rank's SP group."""
        return self.mesh.get_group("sp")

    @property
    def dp_group(self):
        """Process group of this rank's data-parallel replicas (same SP rank)."""
        return self.mesh.get_group("dp")

    @property
    def sp_size(self) -> int:
        """Ranks per sequence."""
        return self.mesh.size(1)

    @property
    def sp_rank(self) -> int:
        """This rank's index inside its SP group."""
        return self.mesh.get_local_rank("sp")


def unwrap_model(model):
    """Find the underlying ``PreTrainedModel`` under DDP/FSDP (``.module``), ``torch.compile``
    (``._orig_mod``) and PEFT (``.get_base_model()``) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module) and not hasattr(model, "config"):
            model = model.module
    return model


def find_state(model) -> SeqParState | None:
    """The :class:`SeqParState` of ``model`` (through any wrapper), or None without SP."""
    return getattr(unwrap_model(model), STATE_ATTR, None)
