"""The one configuration of sequence parallelism, checked where it is built, and its dry run.

:class:`SequenceParallelConfig` is what ``enable_sequence_parallel`` builds from its keywords, and
the base of the Accelerate plugin (:class:`hf_seqpar.integrations.accelerate.SequenceParallelPlugin`
adds the memory features). Every field is checked once, when the object is built
(``__post_init__``); the strategy named picks the options it takes into its own typed ``Options``
dataclass (:meth:`hf_seqpar.strategies.base.Strategy.options_from`), and refuses those it does not take.

:func:`resolve` is the one check of a config against a world size and a model, without a
process group: it fills ``sp_size``, picks ``auto``, builds the typed options and runs the
strategy's model checks. ``enable_sequence_parallel``, the Accelerate plugin paths and the recipes
call it; nothing else validates.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from hf_seqpar.core.mesh import check_positive_int, check_sp_size
from hf_seqpar.strategies import AUTO, STRATEGIES, choose_strategy, strategy_class
from hf_seqpar.strategies.base import STRATEGY_OPTION_FIELDS

__all__ = [
    "SequenceParallelConfig",
    "Resolved",
    "resolve",
    "unknown_keys_message",
    "CHECK_BATCH_MODES",
    "LAYOUTS",
    "BACKEND_NAMES",
    "STRATEGY_OPTION_FIELDS",
]

CheckBatch = Literal["first", "always", "never"]
#: Sequence layouts (``hf_seqpar.core.layout.LAYOUT_CHOICES``) the ring-based strategies take.
LayoutName = Literal["auto", "zigzag", "balanced", "contiguous"]
#: Names of ``hf_seqpar.kernels.BACKENDS`` (tests/test_units.py checks that they agree).
BackendName = Literal["reference", "torch_cpu", "cuda_flash", "cuda_efficient", "cuda_cudnn", "flash_attn"]

CHECK_BATCH_MODES = get_args(CheckBatch)
LAYOUTS = get_args(LayoutName)
BACKEND_NAMES = get_args(BackendName)


def unknown_keys_message(source: str, unknown, valid, prefix: str = "") -> str:
    """``"<source> has unknown key(s) [...]"``, with the closest valid key for each typo (difflib)
    and the valid keys."""
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), list(valid), n=1)
        if close:
            hints.append(f"{prefix}{key!s} -> did you mean {prefix}{close[0]}?")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return (
        f"{source} has unknown key(s) {[prefix + str(k) for k in unknown]}{hint}; valid keys are: "
        f"{', '.join(prefix + v for v in valid)}"
    )


@dataclass
class SequenceParallelConfig:
    """How a model is split along the sequence.

    Build one directly, or let :func:`hf_seqpar.enable_sequence_parallel` build it from its keyword
    arguments. Building it checks everything that can be checked without a world or a model;
    :func:`resolve` checks it against both, before the model is changed.
    """

    strategy: str = "ulysses"
    """Name of the strategy (a key of ``hf_seqpar.strategies.STRATEGIES``: ``ulysses``, ``ring``,
    ``hybrid``, ``megatron``), or ``"auto"`` to pick ulysses, hybrid or ring from the model's head
    counts (the choice is logged)."""

    sp_size: int | None = None
    """Ranks that share one sequence. ``None`` means the whole world (or the mesh's ``sp``
    dimension). The world size must be a multiple of it; the quotient is the data-parallel degree."""

    ulysses_size: int | None = None
    """``hybrid`` only: ranks of the Ulysses (all-to-all) dimension inside each SP group; the rest of
    the group is the ring. None: the largest degree the query heads allow."""

    layout: LayoutName | None = None
    """``ring`` and ``hybrid`` only: ``"auto"`` (the default when None: ``zigzag`` for rows of one
    document, ``balanced`` for packed or padded rows that zigzag leaves unbalanced), ``"zigzag"``
    (balances the causal work of one document), ``"balanced"`` (equal chunks given to ranks by
    their causal work, per batch: :mod:`hf_seqpar.core.balance`) or ``"contiguous"``."""

    backend: BackendName | None = None
    """``ring`` and ``hybrid`` only: the block-attention kernel, a name of
    ``hf_seqpar.kernels.BACKENDS``; None picks one for the device and dtype."""

    check_batch: CheckBatch = "first"
    """When ``shard_batch`` verifies (with one tiny all-gather) that every rank of the SP group
    received the same full batch: ``"first"`` (first call only), ``"always"`` (debug mode, every
    call) or ``"never"``."""

    count_comm: bool = False
    """Count the bytes sent by every collective, per operation and per layer, on
    ``state.counter`` (see :class:`hf_seqpar.core.comm.CommCounter`). Off by default."""

    def __post_init__(self) -> None:
        """Check every field (the one place they are checked).

        Raises:
            ValueError: a field is out of range, or the strategy does not take an option that is
                set; the message gives the numbers and the fix.
        """
        if self.strategy != AUTO:
            strategy_class(self.strategy)  # unknown names: the message lists the valid ones
        for name in ("sp_size", "ulysses_size"):
            check_positive_int(name, getattr(self, name))
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(
                f"layout={self.layout!r}; use 'auto' (zigzag, or balanced for packed rows), "
                "'zigzag' (balanced causal work of one document), 'balanced' (chunks by causal work) or "
                "'contiguous' (or None for the strategy's default)"
            )
        if self.backend is not None and self.backend not in BACKEND_NAMES:
            raise ValueError(
                f"backend={self.backend!r}; valid attention backends: {sorted(BACKEND_NAMES)} "
                "(or None to pick one for the device and dtype)"
            )
        if self.check_batch not in CHECK_BATCH_MODES:
            raise ValueError(f"check_batch={self.check_batch!r}; use one of {list(CHECK_BATCH_MODES)}")
        if not isinstance(self.count_comm, bool):
            raise ValueError(f"count_comm must be True or False, got {self.count_comm!r}")
        if self.ulysses_size is not None and self.sp_size is not None and self.sp_size % self.ulysses_size:
            raise ValueError(f"ulysses_size={self.ulysses_size} must divide sp_size={self.sp_size}")
        if self.strategy != AUTO:
            STRATEGIES[self.strategy].options_from(self)  # options the strategy does not take

    def set_options(self) -> dict:
        """The strategy options that are set (not None), by field name."""
        return {k: getattr(self, k) for k in STRATEGY_OPTION_FIELDS if getattr(self, k) is not None}

    def to_dict(self) -> dict:
        """A plain dict of the fields (for logging and YAML)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Resolved:
    """What :func:`resolve` decided for one config, world and model."""

    config: Any
    """A copy of the config (the same class: a plugin stays a plugin) with ``sp_size`` filled in and,
    when a model config was given, ``strategy="auto"`` replaced by the strategy it picked."""
    requested: Any
    """The config as asked for, with ``sp_size`` filled in (``auto`` kept): what a repeated
    ``enable_sequence_parallel`` call is compared with."""
    strategy: Any = None
    """The strategy class; None only for ``auto`` without a model config (nothing to pick from)."""
    options: Any = None
    """The strategy's typed options (None with :attr:`strategy`)."""
    reason: str | None = None
    """Why ``auto`` picked :attr:`strategy` (None when the strategy was named)."""
    features: Any = None
    """The model's :class:`~hf_seqpar.core.features.AttentionFeatures` (when a model was given)."""
    attn_implementation: str | None = None
    """The model's attention implementation, checked to be one SP can wrap (when a model was given)."""

    @property
    def sp_size(self) -> int:
        """Ranks per sequence."""
        return self.config.sp_size


def resolve(config: SequenceParallelConfig, world_size: int, model_config=None, *, model=None) -> Resolved:
    """The dry run: check ``config`` against ``world_size`` ranks and a model, with no process group.

    Fills ``sp_size`` (None: the whole world), checks that it divides the world, picks the strategy
    for ``"auto"``, builds the strategy's typed options and runs its model checks (head counts,
    intermediate size, the family's plan). With ``model`` (a ``PreTrainedModel``) it also checks
    the attention implementation and the attention features the strategy must compute exactly,
    everything ``enable_sequence_parallel`` checks before it changes the model.

    Args:
        config: a :class:`SequenceParallelConfig` (or the Accelerate plugin); not modified.
        world_size: ranks the SP mesh spans (the world, or the given mesh's size).
        model_config: the model's transformers config (``AutoConfig.from_pretrained(...)``); None
            checks only what does not depend on the model (``auto`` then stays unresolved).
        model: the model itself (its config is used when ``model_config`` is None).

    Returns:
        A :class:`Resolved`.

    Raises:
        ValueError: ``sp_size`` does not divide the world, heads not divisible, an option ``auto``'s
            choice does not take, an unsupported attention implementation.
        NotImplementedError: an attention feature or a token mixer the strategy cannot split exactly.
        TypeError: the model does not route attention through transformers' registry.
    """
    check_positive_int("world_size", world_size, allow_none=False)
    requested = copy.copy(config)
    if requested.sp_size is None:
        requested.sp_size = world_size
    check_sp_size(world_size, requested.sp_size)
    resolved = copy.copy(requested)
    if model is not None and model_config is None:
        model_config = model.config
    impl = _check_attention(model) if model is not None else None
    name, reason = config.strategy, None
    if name == AUTO:
        if model_config is None:
            return Resolved(config=resolved, requested=requested)
        name, reason = choose_strategy(model_config, resolved.sp_size)
        resolved.strategy = name
        try:
            STRATEGIES[name].options_from(resolved)
        except ValueError as e:
            raise ValueError(
                f"strategy='auto' chose {name!r} ({reason}), but {e}; name the strategy instead of "
                "'auto' or drop the option"
            ) from None
    cls = STRATEGIES[name]
    options = cls.options_from(resolved)
    features = None
    if model_config is not None:
        cls.check_model(model_config, resolved.sp_size, options, world_size)
    if model is not None:
        from hf_seqpar.core.features import attention_features, check_sequence_mixing

        features = attention_features(model)
        check_sequence_mixing(features)
        cls.check_features(features)
    return Resolved(
        config=resolved,
        requested=requested,
        strategy=cls,
        options=options,
        reason=reason,
        features=features,
        attn_implementation=impl,
    )


def _check_attention(model) -> str:
    """The model's attention implementation, if SP can hook it."""
    from hf_seqpar.core.local_attention import SUPPORTED_INNER

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
