"""The device mesh SP runs on (sizes and groups taken by dimension name), and the state object SP
keeps on the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.utils.weak import WeakTensorKeyDictionary

from hf_seqpar.core.comm import CommCounter
from hf_seqpar.core.features import AttentionFeatures
from hf_seqpar.core.layout import Layout

if TYPE_CHECKING:  # annotations only (the config and the strategies sit above core: named through the package)
    import transformers

    import hf_seqpar

__all__ = [
    "build_mesh",
    "MeshDims",
    "from_dims",
    "check_mesh",
    "check_positive_int",
    "check_sp_size",
    "SeqParState",
    "STATE_ATTR",
    "find_state",
    "unwrap_model",
]

#: Attribute of the underlying ``PreTrainedModel`` that holds its :class:`SeqParState`.
STATE_ATTR = "hf_seqpar_state"


def _device_type() -> str:
    backend = dist.get_backend()
    return "cuda" if backend == "nccl" and torch.cuda.is_available() else "cpu"


def check_positive_int(name: str, value, allow_none: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive int (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}")


def check_sp_size(world_size: int, sp_size: int) -> None:
    """Raise ``ValueError`` (giving the valid degrees) unless ``sp_size`` divides ``world_size``."""
    if world_size % sp_size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"world size {world_size} is not a multiple of sp_size={sp_size}: the ranks must split evenly into "
            f"data-parallel replicas of sp_size ranks each. Use an sp_size in {divisors}, or launch a multiple "
            f"of {sp_size} processes."
        )


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
    check_positive_int("sp_size", sp_size, allow_none=False)
    check_sp_size(world, sp_size)
    override = None
    if timeout is not None:
        options = _backend_options(timeout)
        override = {"dp": options, "sp": options}
    return init_device_mesh(
        device_type or _device_type(),
        (world // sp_size, sp_size),
        mesh_dim_names=("dp", "sp"),
        backend_override=override,
    )


def _backend_options(timeout: float):
    """Process-group options of the default backend with ``timeout`` seconds."""
    from datetime import timedelta

    backend = str(dist.get_backend())
    if "nccl" in backend:
        options = dist.ProcessGroupNCCL.Options()
    elif backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
    else:
        raise ValueError(
            f"a collective timeout is supported with the gloo and nccl backends, not {backend!r}; "
            "set collective_timeout_s: null"
        )
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


class MeshDims:
    """Sizes, ranks and groups of a mesh, read by dimension name.

    The mesh needs an ``"sp"`` dimension (the ranks that share one sequence). A ``"dp"`` dimension,
    when present, is the data-parallel replicas: batches are split over it and gradients averaged
    over it. Other dimensions (``"pp"``, ...) are left to the user: hf_seqpar neither splits data
    nor reduces gradients over them.

    Args:
        mesh: a ``DeviceMesh``.

    Raises:
        ValueError: the mesh has no dimension named ``"sp"``.
    """

    def __init__(self, mesh: DeviceMesh):
        names = tuple(mesh.mesh_dim_names or ())
        if "sp" not in names:
            raise ValueError(
                "the mesh needs a dimension named 'sp' (the ranks that share one sequence); it has "
                f"{names or 'no names'}. "
                "Build it with init_device_mesh(..., mesh_dim_names=(..., 'sp')) or let hf_seqpar build ('dp', 'sp')"
            )
        self.mesh, self.names = mesh, names
        self.sp_mesh = mesh["sp"]
        self.sp_size = self.sp_mesh.size()
        self.sp_rank = mesh.get_local_rank("sp")
        self.sp_group = mesh.get_group("sp")
        self.has_dp = "dp" in names
        self.dp_size = mesh["dp"].size() if self.has_dp else 1
        self.dp_rank = mesh.get_local_rank("dp") if self.has_dp else 0
        self.dp_group = mesh.get_group("dp") if self.has_dp else None

    def sp_ranks_grid(self) -> torch.Tensor:
        """Global ranks as ``(rest, sp)``: the ``"sp"`` dimension last, all others flattened (one row
        per SP group), for strategies that build a finer mesh over the same ranks."""
        return self.mesh.mesh.movedim(self.names.index("sp"), -1).reshape(-1, self.sp_size)


def from_dims(name: str, doc: str) -> property:
    """A read-only property that answers ``self.dims.<name>``: the objects that need the mesh's
    sizes and groups (the state, the strategy) read the one :class:`MeshDims`, never a copy."""
    return property(lambda self: getattr(self.dims, name), doc=doc)


def check_mesh(mesh: DeviceMesh, sp_size: int | None) -> MeshDims:
    """Check a user's mesh against the configured ``sp_size`` (None: take the mesh's).

    Returns:
        The mesh's :class:`MeshDims`.

    Raises:
        ValueError: no ``"sp"`` dimension, or its size is not ``sp_size``.
    """
    dims = MeshDims(mesh)
    if sp_size is not None and dims.sp_size != sp_size:
        raise ValueError(
            f"the mesh's 'sp' dimension has size {dims.sp_size} but sp_size={sp_size}; pass "
            f"sp_size={dims.sp_size} (or None) with this mesh"
        )
    return dims


@dataclass
class SeqParState:
    """Everything SP needs at run time, attached to the model (``model.hf_seqpar_state``).

    Nothing is global: the attention hook, the loss and ``shard_batch`` all reach this object
    through the model or through the per-batch context that ``shard_batch`` creates.
    """

    config: hf_seqpar.config.SequenceParallelConfig
    """The resolved :class:`~hf_seqpar.config.SequenceParallelConfig` (``sp_size`` and, for
    ``auto``, the strategy filled in by :func:`hf_seqpar.resolve`)."""
    dims: MeshDims
    """The mesh and its sizes, ranks and groups by dimension name: the one copy, which the
    strategy reads too."""
    strategy: hf_seqpar.strategies.base.Strategy
    """The :class:`~hf_seqpar.strategies.base.Strategy` built for this model (given the same
    :attr:`dims`, the :attr:`counter` and the attention implementation), and whatever it built in
    ``apply``."""
    original_attn_implementation: str
    """The attention implementation the model had; restored by ``disable_sequence_parallel``."""
    original_loss_function: Callable | None = None
    """The model's own ``_loss_function`` override (None when it used the class default)."""
    original_config: transformers.PretrainedConfig | None = None
    """The model's own config object: SP works on a private copy (so that another model built from
    the same config object is unaffected); ``disable_sequence_parallel`` puts it back."""
    counter: CommCounter = field(default_factory=CommCounter)
    """Byte counter of every collective SP runs for this model."""
    batches_checked: int = 0
    """How many batches ``shard_batch`` verified to be identical across the SP group."""
    last_layout: Layout | None = None
    """The :class:`~hf_seqpar.core.layout.Layout` of the most recent ``shard_batch`` call, used by
    ``gather_sequence`` when no layout is given."""
    layouts_by_local_len: dict[int, Layout | None] = field(default_factory=dict)
    """``{local_len: Layout}`` of every batch ``shard_batch`` sharded; None where two different
    layouts had the same local length (``gather_sequence`` then needs the batch named)."""
    sharded_outputs: WeakTensorKeyDictionary = field(default_factory=WeakTensorKeyDictionary)
    """Output tensors of the model's forwards -> the layout of their batch (weak keys), so that
    ``gather_sequence`` of an earlier batch's logits uses that batch's layout."""
    features: AttentionFeatures | None = None
    """The model's :class:`~hf_seqpar.core.features.AttentionFeatures`, read at enable time."""
    requested: hf_seqpar.config.SequenceParallelConfig | None = None
    """The configuration as requested (before ``auto`` was resolved), to recognise a repeated call."""
    hooks: list = field(default_factory=list)
    """Handles of the hooks ``enable_sequence_parallel`` put on the model (the MoE auxiliary loss
    of the full sequence, :mod:`hf_seqpar.core.moe`); removed by ``disable_sequence_parallel``."""

    mesh = from_dims("mesh", 'The mesh (``"sp"`` dimension, usually ``"dp"``).')
    sp_group = from_dims("sp_group", "Process group of this rank's SP group.")
    dp_group = from_dims(
        "dp_group", 'Process group of this rank\'s data-parallel replicas (same SP rank); None without ``"dp"``.'
    )
    sp_size = from_dims("sp_size", "Ranks per sequence.")
    sp_rank = from_dims("sp_rank", "This rank's index inside its SP group.")
    dp_size = from_dims("dp_size", 'Data-parallel replicas (the ``"dp"`` dimension; 1 without one).')
    dp_rank = from_dims("dp_rank", 'This rank\'s index along ``"dp"`` (0 without one).')


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
