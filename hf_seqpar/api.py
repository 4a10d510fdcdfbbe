"""Stage 2: apply sequence parallelism to a model (and take it off again)."""

from __future__ import annotations

import logging

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from transformers import PreTrainedModel

from . import moe
from .config import SequenceParallelConfig
from .features import attention_features, check_sequence_mixing
from .hooks import register
from .local_attention import SUPPORTED_INNER
from .loss import SequenceParallelLoss
from .mesh import STATE_ATTR, SeqParState, build_mesh, require_distributed, unwrap_model
from .strategies import AUTO, choose_strategy, get_strategy

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


def _check_mesh(mesh: DeviceMesh, sp_size: int) -> None:
    names = mesh.mesh_dim_names or ()
    if "sp" not in names:
        raise ValueError(f"the mesh passed to enable_sequence_parallel needs an 'sp' dimension; it has {names}")
    if mesh.size(names.index("sp")) != sp_size:
        raise ValueError(f"mesh 'sp' dimension has size {mesh.size(names.index('sp'))} but sp_size={sp_size}")


def enable_sequence_parallel(
    model,
    strategy: str = "ulysses",
    sp_size: int | None = None,
    *,
    mesh: DeviceMesh | None = None,
    check_batch: str = "first",
    count_comm: bool = False,
    **options,
):
    """Make ``model`` sequence-parallel, in place.

    Call after ``torch.distributed`` is initialised. Afterwards feed the model batches from
    :func:`hf_seqpar.shard_batch`; its loss is the unsharded loss on every rank.

    Args:
        model: a transformers ``PreTrainedModel`` or a wrapper of one (PEFT, DDP, ``torch.compile``).
        strategy: one of ``hf_seqpar.strategies.STRATEGIES`` (``"ulysses"``, ``"ring"``,
            ``"hybrid"``, ...) or ``"auto"`` (picks from the head counts and logs its choice).
        sp_size: ranks per sequence; default the world size. The remaining factor is data parallel.
        mesh: an existing mesh with an ``"sp"`` dimension (and usually ``"dp"``) to use instead
            of building ``dp x sp`` over the whole world.
        check_batch: ``"first"``, ``"always"`` or ``"never"``: when ``shard_batch`` verifies that
            the SP group got identical batches.
        count_comm: count bytes of every collective on ``model.hf_seqpar_state.counter``.
        **options: strategy-specific options: ring and hybrid take ``layout`` (``"zigzag"``,
            default, or ``"contiguous"``) and ``backend`` (an ``hf_seqpar.kernels.BACKENDS`` name);
            hybrid also ``ulysses_size`` (default: the largest the heads allow).

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: unknown strategy, bad ``sp_size``, heads not divisible, unsupported attention
            implementation, SP already enabled with a different configuration.
        NotImplementedError: a strategy that is named but not available in this version, or an
            attention feature of the model (sinks, softcapping, ...) the strategy cannot compute
            exactly (the message names a strategy that can), or layers that mix tokens outside
            attention (Mamba, linear attention, convolutions), which no strategy can split.
        RuntimeError: ``torch.distributed`` is not initialised.
        TypeError: the model does not route attention through transformers' registry.
    """
    config = SequenceParallelConfig(strategy, sp_size, check_batch, count_comm, dict(options)).validate()
    if strategy != AUTO:
        get_strategy(strategy)  # unavailable names fail here, before anything else
    require_distributed()
    config.validate(dist.get_world_size() if mesh is None else mesh.size())
    base = unwrap_model(model)
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"enable_sequence_parallel needs a transformers PreTrainedModel, got {type(base).__name__}")
    existing = getattr(base, STATE_ATTR, None)
    if existing is not None:
        if existing.config == config:
            return model
        raise ValueError(
            f"sequence parallelism is already enabled on this model with {existing.config.to_dict()}; call "
            "hf_seqpar.disable_sequence_parallel(model) first to change it"
        )
    impl = _check_attention(base)
    if strategy == AUTO:
        strategy, reason = choose_strategy(base.config, config.sp_size)
        if dist.get_rank() == 0:
            logger.warning("hf_seqpar: strategy='auto' chose %r: %s", strategy, reason)
    strat = get_strategy(strategy)
    strat.check_model(base.config, config.sp_size, config.options)
    features = attention_features(base)
    check_sequence_mixing(features)
    check_features = getattr(strat, "check_attention", None)  # optional: refuse what it cannot compute
    if check_features is not None:
        check_features(features)
    if mesh is None:
        mesh = build_mesh(config.sp_size)
    else:
        _check_mesh(mesh, config.sp_size)

    state = SeqParState(
        config=config,
        mesh=mesh,
        strategy=strat,
        original_attn_implementation=impl,
        original_loss_function=base.__dict__.get("_loss_function"),
        features=features,
    )
    state.counter.enabled = count_comm
    base.loss_function = SequenceParallelLoss(base.loss_function)
    base.set_attn_implementation(register(impl))
    setattr(base, STATE_ATTR, state)
    try:
        strat.apply(base, state)
        state.hooks = [h for h in (moe.install(base),) if h is not None]
    except BaseException:
        disable_sequence_parallel(base)  # leave the model as it was
        raise
    return model


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
