"""Apply sequence parallelism to a model (and take it off again): checks, strategy, hooks, state."""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from transformers import PreTrainedModel

from hf_seqpar.config import STRATEGY_OPTION_FIELDS, SequenceParallelConfig, resolve
from hf_seqpar.core import moe
from hf_seqpar.core.hooks import register
from hf_seqpar.core.loss import SequenceParallelLoss
from hf_seqpar.core.comm import CommCounter
from hf_seqpar.core.mesh import (STATE_ATTR, MeshDims, SeqParState, build_mesh, check_mesh, require_distributed,
                                 unwrap_model)
from hf_seqpar.strategies import STRATEGIES

logger = logging.getLogger("hf_seqpar")

__all__ = ["enable_sequence_parallel", "disable_sequence_parallel"]


def enable_sequence_parallel(
    model,
    strategy: str = "ulysses",
    sp_size: int | None = None,
    *,
    mesh: DeviceMesh | None = None,
    check_batch: str = "first",
    count_comm: bool = False,
    config: SequenceParallelConfig | None = None,
    **options,
):
    """Make ``model`` sequence-parallel, in place.

    Call after ``torch.distributed`` is initialised. Afterwards feed the model batches from
    :func:`hf_seqpar.shard_batch`; its loss is the unsharded loss on every rank.

    Args:
        model: a transformers ``PreTrainedModel`` or a wrapper of one (PEFT, DDP, ``torch.compile``).
        strategy: one of ``hf_seqpar.strategies.STRATEGIES`` (``"ulysses"``, ``"ring"``,
            ``"hybrid"``, ``"megatron"``) or ``"auto"`` (picks from the head counts and logs its choice).
        sp_size: ranks per sequence; default the world size (or the mesh's ``"sp"`` dimension). The
            remaining factor is data parallel.
        mesh: an existing ``DeviceMesh`` with an ``"sp"`` dimension (optionally ``"dp"`` and others,
            in any order) to use instead of building ``("dp", "sp")`` over the whole world.
        check_batch: ``"first"``, ``"always"`` or ``"never"``: when ``shard_batch`` verifies that
            the SP group got identical batches.
        count_comm: count bytes of every collective on ``model.hf_seqpar_state.counter``.
        config: a :class:`~hf_seqpar.config.SequenceParallelConfig` (or the Accelerate plugin) to use
            instead of the arguments above.
        **options: strategy options, fields of :class:`~hf_seqpar.config.SequenceParallelConfig`:
            ring and hybrid take ``layout`` (``"zigzag"``, default, or ``"contiguous"``) and
            ``backend`` (an ``hf_seqpar.kernels.BACKENDS`` name); hybrid also ``ulysses_size``
            (default: the largest the heads allow).

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: unknown strategy or option, bad ``sp_size``, a mesh without ``"sp"``, heads not
            divisible, unsupported attention implementation, SP already enabled with a different
            configuration.
        NotImplementedError: an attention feature of the model (sinks, softcapping, ...) the
            strategy cannot compute exactly (the message names a strategy that can), or layers that
            mix tokens outside attention (Mamba, linear attention, convolutions), which no strategy
            can split.
        RuntimeError: ``torch.distributed`` is not initialised.
        TypeError: the model does not route attention through transformers' registry.
    """
    config = _make_config(config, strategy, sp_size, check_batch, count_comm, options)
    require_distributed()
    dims = None
    if mesh is not None:
        dims = check_mesh(mesh, config.sp_size)  # sizes by dimension name
        config.sp_size = dims.sp_size
    base = unwrap_model(model)
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"enable_sequence_parallel needs a transformers PreTrainedModel, got {type(base).__name__}")
    world = dist.get_world_size() if mesh is None else mesh.size()
    existing = getattr(base, STATE_ATTR, None)
    if existing is not None:
        again = copy.copy(config)
        again.sp_size = again.sp_size or world
        if existing.requested == again:
            return model
        raise ValueError(
            f"sequence parallelism is already enabled on this model with {existing.config.to_dict()}; call "
            "hf_seqpar.disable_sequence_parallel(model) first to change it"
        )
    resolved = resolve(config, world, model=base)  # the one check: world, auto, options, model, features
    if resolved.reason is not None and dist.get_rank() == 0:
        logger.warning("hf_seqpar: strategy='auto' chose %r: %s", resolved.config.strategy, resolved.reason)
    config, cls, options, features, impl = (resolved.config, resolved.strategy, resolved.options, resolved.features,
                                            resolved.attn_implementation)
    if dims is None:
        dims = MeshDims(build_mesh(config.sp_size))
    counter = CommCounter(enabled=config.count_comm)
    state = SeqParState(
        config=config,
        dims=dims,
        strategy=cls(base.config, dims, options, counter=counter, attn_implementation=impl),
        original_attn_implementation=impl,
        original_loss_function=base.__dict__.get("_loss_function"),
        counter=counter,
        features=features,
        requested=resolved.requested,
    )
    base.loss_function = SequenceParallelLoss(base.loss_function)
    base.set_attn_implementation(register(impl))
    setattr(base, STATE_ATTR, state)
    try:
        state.strategy.apply(base, state)
        state.hooks = [h for h in (moe.install(base),) if h is not None]
    except BaseException:
        disable_sequence_parallel(base)  # leave the model as it was
        raise
    return model


def _make_config(config, strategy, sp_size, check_batch, count_comm, options) -> SequenceParallelConfig:
    """The config of an ``enable_sequence_parallel`` call: a plain copy of ``config`` (already checked
    when it was built), or one built (and so checked) from the keywords."""
    if config is not None:
        if options:
            raise ValueError(f"pass strategy options in the config, not as keywords next to config= (got {sorted(options)})")
        plain = object.__new__(SequenceParallelConfig)  # the same fields, no second check
        plain.__dict__.update({f.name: getattr(config, f.name) for f in dataclasses.fields(SequenceParallelConfig)})
        return plain
    unknown = sorted(set(options) - set(STRATEGY_OPTION_FIELDS))
    if unknown:
        takes = ([f.name for f in dataclasses.fields(STRATEGIES[strategy].Options)] if strategy in STRATEGIES
                 else list(STRATEGY_OPTION_FIELDS))
        raise ValueError(f"unknown option(s) {unknown} for strategy {strategy!r}; it takes: {takes or 'no options'} "
                         f"(strategy options of any strategy: {list(STRATEGY_OPTION_FIELDS)})")
    return SequenceParallelConfig(strategy=strategy, sp_size=sp_size, check_batch=check_batch, count_comm=count_comm,
                                  **options)


def disable_sequence_parallel(model):
    """Undo :func:`enable_sequence_parallel`: original attention implementation and loss.

    Args:
        model: the model (or wrapper) SP was enabled on. A model without SP is returned as is.

    Returns:
        The same ``model`` object.
    """
    base = unwrap_model(model)
    state = getattr(base, STATE_ATTR, None)
    if state is None:
        return model
    for handle in state.hooks:
        handle.remove()
    state.strategy.remove(base, state)
    base.set_attn_implementation(state.original_attn_implementation)
    if state.original_loss_function is None:
        base.__dict__.pop("_loss_function", None)
    else:
        base.loss_function = state.original_loss_function
    delattr(base, STATE_ATTR)
    return model
