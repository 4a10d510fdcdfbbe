"""Apply sequence parallelism to a model (and take it off again): checks, strategy, hooks, state."""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from transformers import PreTrainedModel

from hf_seqpar.config import STRATEGY_OPTION_FIELDS, SequenceParallelConfig
from hf_seqpar.core import moe
from hf_seqpar.core.features import attention_features, check_sequence_mixing
from hf_seqpar.core.hooks import register
from hf_seqpar.core.local_attention import SUPPORTED_INNER
from hf_seqpar.core.loss import SequenceParallelLoss
from hf_seqpar.core.mesh import STATE_ATTR, SeqParState, build_mesh, check_mesh, require_distributed, unwrap_model
from hf_seqpar.strategies import AUTO, STRATEGIES, choose_strategy

logger = logging.getLogger("hf_seqpar")

__all__ = ["enable_sequence_parallel", "disable_sequence_parallel"]


def _check_attention(model: PreTrainedModel) -> str:
    if not getattr(model, "_supports_attention_backend", False):
        raise TypeError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, "
            "so hf_seqpar cannot hook its attention. Use a model family that does (Llama, Mistral, Qwen2/3, "
            "Phi-3, Gemma, ...), or file an issue to add a patch for this one in hf_seqpar.patches."
        )
    impl = model.config._attn_implementation
    if impl not in SUPPORTED_INNER:
        raise ValueError(
            f"attention implementation {impl!r} cannot be wrapped for sequence parallelism; load the model "
            f"with attn_implementation set to one of {list(SUPPORTED_INNER)} (e.g. "
            f"`model.set_attn_implementation('sdpa')`) before enable_sequence_parallel()."
        )
    return impl


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
    if mesh is not None:
        config.sp_size = check_mesh(mesh, config.sp_size).sp_size  # sizes by dimension name
    config.validate(dist.get_world_size() if mesh is None else mesh.size())
    base = unwrap_model(model)
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"enable_sequence_parallel needs a transformers PreTrainedModel, got {type(base).__name__}")
    existing = getattr(base, STATE_ATTR, None)
    if existing is not None:
        if existing.requested == config:
            return model
        raise ValueError(
            f"sequence parallelism is already enabled on this model with {existing.config.to_dict()}; call "
            "hf_seqpar.disable_sequence_parallel(model) first to change it"
        )
    requested = copy.copy(config)
    impl = _check_attention(base)
    if config.strategy == AUTO:
        name, reason = choose_strategy(base.config, config.sp_size)
        if dist.get_rank() == 0:
            logger.warning("hf_seqpar: strategy='auto' chose %r: %s", name, reason)
        config = dataclasses.replace(config, strategy=name)
        try:
            STRATEGIES[name].options_from(config)
        except ValueError as e:
            raise ValueError(f"strategy='auto' chose {name!r} ({reason}), but {e}; name the strategy instead of "
                             "'auto' or drop the option") from None
    cls = STRATEGIES[config.strategy]
    options = cls.options_from(config)
    cls.check_model(base.config, config.sp_size, options)
    features = attention_features(base)
    check_sequence_mixing(features)
    cls.check_features(features)
    if mesh is None:
        mesh = build_mesh(config.sp_size)

    state = SeqParState(
        config=config,
        mesh=mesh,
        strategy=cls(base.config, mesh, options),
        original_attn_implementation=impl,
        original_loss_function=base.__dict__.get("_loss_function"),
        features=features,
        requested=requested,
    )
    state.counter.enabled = config.count_comm
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
    """The validated (world-independent) config of an ``enable_sequence_parallel`` call."""
    if config is not None:
        if options:
            raise ValueError(f"pass strategy options in the config, not as keywords next to config= (got {sorted(options)})")
        base = {f.name: getattr(config, f.name) for f in dataclasses.fields(SequenceParallelConfig)}
        return SequenceParallelConfig(**base).validate()
    unknown = sorted(set(options) - set(STRATEGY_OPTION_FIELDS))
    if unknown:
        takes = ([f.name for f in dataclasses.fields(STRATEGIES[strategy].Options)] if strategy in STRATEGIES
                 else list(STRATEGY_OPTION_FIELDS))
        raise ValueError(f"unknown option(s) {unknown} for strategy {strategy!r}; it takes: {takes or 'no options'} "
                         f"(strategy options of any strategy: {list(STRATEGY_OPTION_FIELDS)})")
    return SequenceParallelConfig(strategy=strategy, sp_size=sp_size, check_batch=check_batch, count_comm=count_comm,
                                  **options).validate()


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
