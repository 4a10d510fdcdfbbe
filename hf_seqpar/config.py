"""Typed, validated configuration of sequence parallelism."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

__all__ = ["SequenceParallelConfig", "CHECK_BATCH_MODES"]

CHECK_BATCH_MODES = ("first", "always", "never")


@dataclass
class SequenceParallelConfig:
    """How a model is split along the sequence.

    Build one directly or let :func:`hf_seqpar.enable_sequence_parallel` build it from its
    keyword arguments. :meth:`validate` checks everything that can be checked without a
    model; :mod:`hf_seqpar.strategies` checks what depends on the model (head counts).
    """

    strategy: str = "ulysses"
    """Name of the strategy (see ``hf_seqpar.strategies.STRATEGIES``), or ``"auto"`` to pick
    ulysses, hybrid or ring from the model's head counts."""

    sp_size: int | None = None
    """Ranks that share one sequence. ``None`` means the whole world. The world size must be a
    multiple of it; the quotient is the data-parallel degree (mesh ``dp x sp``)."""

    check_batch: str = "first"
    """When ``shard_batch`` verifies (with one tiny all-gather) that every rank of the SP group
    received the same full batch: ``"first"`` (first call only), ``"always"`` (debug mode, every
    call) or ``"never"``."""

    count_comm: bool = False
    """Count the bytes sent by every collective, per operation and per layer, on
    ``state.counter`` (see :class:`hf_seqpar.comm.CommCounter`). Off by default."""

    options: dict = field(default_factory=dict)
    """Strategy-specific options, passed through ``**options`` of ``enable_sequence_parallel``;
    each strategy rejects the options it does not know."""

    def validate(self, world_size: int | None = None) -> "SequenceParallelConfig":
        """Check the fields and, when ``world_size`` is given, resolve ``sp_size``.

        Args:
            world_size: number of ranks in the default process group.

        Returns:
            ``self`` (with ``sp_size`` filled in when it was None and ``world_size`` is given).

        Raises:
            ValueError: a field is out of range; the message gives the numbers and the fix.
        """
        from .strategies import AUTO, STRATEGIES  # late import: strategies import config

        if self.strategy not in STRATEGIES and self.strategy != AUTO:
            raise ValueError(
                f"unknown strategy {self.strategy!r}; valid strategies are: {', '.join(sorted(STRATEGIES))} "
                f"(or {AUTO!r})"
            )
        if self.check_batch not in CHECK_BATCH_MODES:
            raise ValueError(f"check_batch={self.check_batch!r}; use one of {CHECK_BATCH_MODES}")
        if self.sp_size is not None and (not isinstance(self.sp_size, int) or self.sp_size < 1):
            raise ValueError(f"sp_size must be a positive integer or None, got {self.sp_size!r}")
        if world_size is not None:
            if self.sp_size is None:
                self.sp_size = world_size
            if world_size % self.sp_size:
                divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
                raise ValueError(
                    f"world size {world_size} is not a multiple of sp_size={self.sp_size}: the ranks "
                    f"must split evenly into data-parallel replicas of sp_size ranks each. Use an "
                    f"sp_size in {divisors}, or launch a multiple of {self.sp_size} processes."
                )
        return self

    def to_dict(self) -> dict:
        """A plain dict of the fields (for logging and YAML)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
