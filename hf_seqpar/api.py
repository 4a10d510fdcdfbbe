"""Apply sequence parallelism to a model (and take it off again): checks, strategy, hooks, state."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.nn import Module
from transformers import PretrainedConfig, PreTrainedModel

from hf_seqpar.config import STRATEGY_OPTION_FIELDS, SequenceParallelConfig, resolve
from hf_seqpar.core import moe
from hf_seqpar.core.comm import CommCounter
from hf_seqpar.core.hooks import PREFIX, register, require_batch
from hf_seqpar.core.loss import SequenceParallelLoss
from hf_seqpar.core.mesh import (
    STATE_ATTR,
    MeshDims,
    SeqParState,
    build_mesh,
    check_mesh,
    require_distributed,
    unwrap_model,
)
from hf_seqpar.core.sharding import record_outputs
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
            ring and hybrid take ``layout`` (``"auto"``, default, ``"zigzag"``, ``"balanced"`` or ``"contiguous"``) and
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
    config, cls, options, features, impl = (
        resolved.config,
        resolved.strategy,
        resolved.options,
        resolved.features,
        resolved.attn_implementation,
    )
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
    state.original_config = _own_config(model if isinstance(model, Module) else base, base)
    base.loss_function = SequenceParallelLoss(base.loss_function)
    base.set_attn_implementation(register(impl))
    setattr(base, STATE_ATTR, state)
    try:
        state.strategy.apply(base, state)
        state.hooks = [h for h in (moe.install(base),) if h is not None]
        state.hooks.append(base.register_forward_pre_hook(require_batch, with_kwargs=True))
        state.hooks.append(base.register_forward_hook(record_outputs, with_kwargs=True))
    except BaseException:
        disable_sequence_parallel(base)  # leave the model as it was
        raise
    return model


def _config_pairs(old, new, pairs=None) -> dict:
    """``{id(config): its copy}`` for a config and every sub-config it holds (text/vision configs)."""
    pairs = {} if pairs is None else pairs
    pairs[id(old)] = new
    for name, value in vars(old).items():
        if isinstance(value, PretrainedConfig) and id(value) not in pairs:
            _config_pairs(value, getattr(new, name), pairs)
    return pairs


def _repoint_configs(model, pairs: dict) -> None:
    """Point every submodule's ``config`` that ``pairs`` maps at its replacement."""
    for module in model.modules():
        cfg = module.__dict__.get("config")
        if cfg is not None and id(cfg) in pairs:
            module.__dict__["config"] = pairs[id(cfg)]


def _own_config(root, base) -> PretrainedConfig:
    """Give ``base`` (and every module under ``root``, its wrappers included: PEFT keeps a
    reference too) a private copy of its config, so that what SP writes on it (the attention
    implementation) leaves other models built from the same config object alone; returns the
    original, which ``disable_sequence_parallel`` puts back."""
    original = base.config
    _repoint_configs(root, _config_pairs(original, copy.deepcopy(original)))
    return original


def _make_config(config, strategy, sp_size, check_batch, count_comm, options) -> SequenceParallelConfig:
    """The config of an ``enable_sequence_parallel`` call: a plain copy of ``config`` (already checked
    when it was built), or one built (and so checked) from the keywords."""
    if config is not None:
        if options:
            raise ValueError(
                f"pass strategy options in the config, not as keywords next to config= (got {sorted(options)})"
            )
        plain = object.__new__(SequenceParallelConfig)  # the same fields, no second check
        plain.__dict__.update({f.name: getattr(config, f.name) for f in dataclasses.fields(SequenceParallelConfig)})
        return plain
    unknown = sorted(set(options) - set(STRATEGY_OPTION_FIELDS))
    if unknown:
        takes = (
            [f.name for f in dataclasses.fields(STRATEGIES[strategy].Options)]
            if strategy in STRATEGIES
            else list(STRATEGY_OPTION_FIELDS)
        )
        raise ValueError(
            f"unknown option(s) {unknown} for strategy {strategy!r}; it takes: {takes or 'no options'} "
            f"(strategy options of any strategy: {list(STRATEGY_OPTION_FIELDS)})"
        )
    return SequenceParallelConfig(
        strategy=strategy, sp_size=sp_size, check_batch=check_batch, count_comm=count_comm, **options
    )


def disable_sequence_parallel(model):
    """Undo :func:`enable_sequence_parallel`: the model's own config object (SP worked on a copy),
    attention implementation, loss and parameters.

    Args:
        model: the model (or wrapper) SP was enabled on. A model without SP is returned as is,
            except that a config naming an ``hf_seqpar_*`` attention implementation (a model built
            from an SP model's config) gets the wrapped implementation back.

    Returns:
        The same ``model`` object.
    """
    base = unwrap_model(model)
    state = getattr(base, STATE_ATTR, None)
    if state is None:
        impl = getattr(getattr(base, "config", None), "_attn_implementation", None) or ""
        if impl.startswith(PREFIX):  # built from an SP model's config: SP's name without SP's state
            base.set_attn_implementation(impl[len(PREFIX) :])
        return model
    for handle in state.hooks:
        handle.remove()
    state.strategy.remove(base, state)
    if state.original_config is not None:  # the model's own config object again (SP wrote on a copy)
        root = model if isinstance(model, Module) else base
        _repoint_configs(root, _config_pairs(base.config, state.original_config))
    _restore_plain(base, state)
    return model


def _restore_plain(base, state) -> None:
    """The original attention implementation and loss back on ``base``; its SP state removed."""
    base.set_attn_implementation(state.original_attn_implementation)
    if state.original_loss_function is None:
        base.__dict__.pop("_loss_function", None)
    else:
        base.loss_function = state.original_loss_function
    delattr(base, STATE_ATTR)


@contextlib.contextmanager
def unsharded(model):
    """Run ``model`` as the plain model inside the block, e.g. to generate samples during training::

        with hf_seqpar.unsharded(model) as plain:
            plain.eval()
            ids = plain.generate(prompt, max_new_tokens=32)   # full prompts, no shard_batch
            plain.train()

    Inside, the model has its original attention implementation and loss and no SP state
    (``shard_batch`` refuses it), so it computes exactly what the unsharded model computes, on
    whichever ranks call it, with no collective. On exit the very same state (strategy, mesh,
    counters, hooks) is put back: training continues as if the block had not run. The block
    yields the unwrapped model (``generate`` is not DDP's).

    Raises:
        ValueError: SP is not enabled on ``model``.
        NotImplementedError: the strategy changes the parameters (Megatron-SP's sharded weights),
            so there is no plain model to run in place.
    """
    base = unwrap_model(model)
    state = getattr(base, STATE_ATTR, None)
    if state is None:
        raise ValueError(
            "hf_seqpar.unsharded(model): sequence parallelism is not enabled on this model; use the model as it is"
        )
    if state.strategy.shards_parameters:
        raise NotImplementedError(
            f"hf_seqpar.unsharded(model) cannot run strategy {state.config.strategy!r} unsharded: its parameters are "
            "sharded over the SP group; call the model on sharded batches, or hf_seqpar.disable_sequence_parallel("
            "model) to gather them (then enable again and re-create the optimizer)"
        )
    sp_impl, sp_loss = base.config._attn_implementation, base.__dict__.get("_loss_function")
    _restore_plain(base, state)
    try:
        yield base
    finally:
        base.set_attn_implementation(sp_impl)
        base.loss_function = sp_loss
        setattr(base, STATE_ATTR, state)
