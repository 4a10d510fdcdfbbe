"""The one configuration of sequence parallelism: strategy, degrees and typed strategy options.

:class:`SequenceParallelConfig` is what ``enable_sequence_parallel`` builds from its keywords, and
the base of the Accelerate plugin (:class:`hf_seqpar.integrations.accelerate.SequenceParallelPlugin`
adds the memory features). It is validated once, by :meth:`SequenceParallelConfig.validate`; the
strategy named picks the options it takes into its own typed ``Options`` dataclass
(:meth:`hf_seqpar.strategies.base.Strategy.options_from`), and refuses those it does not take.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from hf_seqpar.core.layout import LAYOUT_CHOICES
from hf_seqpar.core.mesh import check_positive_int, check_sp_size
from hf_seqpar.strategies import AUTO, STRATEGIES, strategy_class
from hf_seqpar.strategies.base import STRATEGY_OPTION_FIELDS

__all__ = ["SequenceParallelConfig", "CHECK_BATCH_MODES", "LAYOUTS", "STRATEGY_OPTION_FIELDS"]

CHECK_BATCH_MODES = ("first", "always", "never")
#: Sequence layouts (``hf_seqpar.core.layout``) the ring-based strategies take.
LAYOUTS = LAYOUT_CHOICES


@dataclass
class SequenceParallelConfig:
    """How a model is split along the sequence.

    Build one directly, or let :func:`hf_seqpar.enable_sequence_parallel` build it from its keyword
    arguments. :meth:`validate` checks everything that can be checked without a model; the
    strategy checks what depends on the model (head counts) before the model is changed.
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

    layout: str | None = None
    """``ring`` and ``hybrid`` only: ``"auto"`` (the default when None: ``zigzag`` for rows of one
    document, ``balanced`` for packed or padded rows that zigzag leaves unbalanced), ``"zigzag"``
    (balances the causal work of one document), ``"balanced"`` (equal chunks given to ranks by
    their causal work, per batch: :mod:`hf_seqpar.core.balance`) or ``"contiguous"``."""

    backend: str | None = None
    """``ring`` and ``hybrid`` only: the block-attention kernel, a name of
    ``hf_seqpar.kernels.BACKENDS``; None picks one for the device and dtype."""

    check_batch: str = "first"
    """When ``shard_batch`` verifies (with one tiny all-gather) that every rank of the SP group
    received the same full batch: ``"first"`` (first call only), ``"always"`` (debug mode, every
    call) or ``"never"``."""

    count_comm: bool = False
    """Count the bytes sent by every collective, per operation and per layer, on
    ``state.counter`` (see :class:`hf_seqpar.core.comm.CommCounter`). Off by default."""

    def validate(self, world_size: int | None = None) -> "SequenceParallelConfig":
        """Check every field and, when ``world_size`` is given, resolve ``sp_size``.

        Args:
            world_size: ranks the SP mesh spans (the world, or the given mesh's size).

        Returns:
            ``self`` (``sp_size`` filled in when it was None and ``world_size`` is given).

        Raises:
            ValueError: a field is out of range, or the strategy does not take an option that is
                set; the message gives the numbers and the fix.
        """
        if self.strategy != AUTO:
            strategy_class(self.strategy)  # unknown names: the message lists the valid ones
        for name in ("sp_size", "ulysses_size"):
            check_positive_int(name, getattr(self, name))
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r}; use 'auto' (zigzag, or balanced for packed rows), "
                             "'zigzag' (balanced causal work of one document), 'balanced' (chunks by causal work) or "
                             "'contiguous' (or None for the strategy's default)")
        if self.backend is not None:
            from hf_seqpar.kernels import BACKENDS

            if self.backend not in BACKENDS:
                raise ValueError(f"backend={self.backend!r}; valid attention backends: {sorted(BACKENDS)} "
                                 "(or None to pick one for the device and dtype)")
        if self.check_batch not in CHECK_BATCH_MODES:
            raise ValueError(f"check_batch={self.check_batch!r}; use one of {list(CHECK_BATCH_MODES)}")
        if not isinstance(self.count_comm, bool):
            raise ValueError(f"count_comm must be True or False, got {self.count_comm!r}")
        if self.ulysses_size is not None and self.sp_size is not None and self.sp_size % self.ulysses_size:
            raise ValueError(f"ulysses_size={self.ulysses_size} must divide sp_size={self.sp_size}")
        if self.strategy != AUTO:
            STRATEGIES[self.strategy].options_from(self)  # options the strategy does not take
        if world_size is not None:
            if self.sp_size is None:
                self.sp_size = world_size
            check_sp_size(world_size, self.sp_size)
        return self

    def set_options(self) -> dict:
        """The strategy options that are set (not None), by field name."""
        return {k: getattr(self, k) for k in STRATEGY_OPTION_FIELDS if getattr(self, k) is not None}

    def to_dict(self) -> dict:
        """A plain dict of the fields (for logging and YAML)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
