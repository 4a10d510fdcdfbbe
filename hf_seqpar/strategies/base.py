"""The shape every strategy has: a class built per model from (model config, mesh, typed options).

A strategy declares everything the rest of hf_seqpar needs to know about it, so that nothing
outside :mod:`hf_seqpar.strategies` asks for a strategy by name:

- before the model is touched (class methods, no mesh): :meth:`Strategy.options_from` (its typed
  options from the one config), :meth:`Strategy.check_model` (head counts),
  :meth:`Strategy.check_features` (attention features it cannot compute),
  :meth:`Strategy.check_trainer` (whether the HF Trainer can drive it);
- the facts the cost model reads (:attr:`Strategy.cost`, a :class:`CostFacts`: its Ulysses, ring
  and tensor-parallel degrees, what it saves and gathers, where its collectives run, which option
  sets a cluster allows); the formulas themselves (communication bytes, activation terms, planner
  options, labels, link seconds) live in one place beside the planner, :mod:`hf_seqpar.tools.cost`;
- at run time (an instance attached to the model's state): its groups and sizes (taken from the
  mesh by dimension name), the layout ``shard_batch`` applies, the position ids it wants, the
  attention it computes, how the loss is combined and gradients are reduced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch

from hf_seqpar.core.comm import all_reduce_mean_, all_reduce_sum
from hf_seqpar.core.mesh import MeshDims, from_dims
from hf_seqpar.kernels import backend_named

if TYPE_CHECKING:
    from hf_seqpar.core.layout import Layout

__all__ = ["Strategy", "NoOptions", "CostFacts", "divisors", "STRATEGY_OPTION_FIELDS"]

#: Fields of :class:`hf_seqpar.config.SequenceParallelConfig` that are strategy options; each
#: strategy's ``Options`` dataclass takes a subset of them.
STRATEGY_OPTION_FIELDS = ("ulysses_size", "layout", "backend")


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n``, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class NoOptions:
    """A strategy that takes no options."""


def no_split(sp: int, options, heads: int) -> tuple[int, int, int]:
    """Degrees of a strategy that is neither Ulysses, ring nor tensor parallel: ``(1, 1, 1)``."""
    return 1, 1, 1


@dataclass(frozen=True)
class CostFacts:
    """What the cost model (:mod:`hf_seqpar.tools.cost`) needs to know about a strategy; declared,
    not computed: the formulas read these and never the strategy's name."""

    degrees: Callable[[int, object, int], tuple[int, int, int]] = no_split
    """``degrees(sp, options, heads) -> (ulysses, ring, tp)``: the all-to-all degree ``U``, the ring
    degree ``R`` (``U x R = sp`` for attention-parallel strategies) and the tensor-parallel degree
    ``T`` (``sp`` for a strategy that splits the parameters, else 1). May raise the strategy's own
    error for options the heads do not allow."""
    out_copy: bool = True
    """The attention output is a new tensor after the exchange (saved as the output projection's
    input in addition to attention's own output): true for Ulysses and ring, not for tensor parallel."""
    gathered_inputs: int = 0
    """Linear inputs per layer that are all-gathered to the full sequence and saved (Megatron-SP: 2,
    before q/k/v and before gate/up); each costs ``(T - 1) e h`` extra bytes per local token."""
    loss_allreduce_in_backward: bool = True
    """Whether the exact loss's scalar all-reduce also runs in backward (it does unless the SP ranks
    share one autograd graph, as tensor-parallel ranks do)."""
    a2a_in_ulysses_group: bool = False
    """The all-to-all stays inside a Ulysses group of ``options.ulysses_size`` consecutive ranks
    (hybrid) rather than spanning the SP group: its seconds are counted on that group's links."""
    min_sp: int = 1
    """Smallest SP degree the planner considers (2 where degree 1 is another strategy's run)."""
    heads_over_sp: bool = False
    """The planner needs ``sp`` to divide the query heads (heads split over all SP ranks)."""
    within_node: bool = False
    """The planner keeps the group inside one node (collectives on every layer's critical path)."""
    plan_ulysses_sizes: bool = False
    """The planner tries every ``ulysses_size`` strictly between 1 and ``sp`` that divides both ``sp``
    and the heads (one option set each; the ends are plain ring and plain Ulysses)."""


class Strategy:
    """Base of every strategy; subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    """Table key (``hf_seqpar.strategies.STRATEGIES``)."""
    description: ClassVar[str]
    """One line for messages and docs."""
    Options: ClassVar[type] = NoOptions
    """The typed options dataclass; its field names are fields of the config it reads them from."""
    shards_parameters: ClassVar[bool] = False
    """True when the strategy turns the parameters into DTensors sharded over the SP group (tensor
    parallel): model states divide by the SP degree, DDP cannot wrap the model, and gradients are
    averaged over the ``dp`` dimension only (:meth:`average_gradients_over_dp`)."""
    bench_world: ClassVar[int] = 1
    """The smallest world that exercises everything the strategy does (``hf-seqpar bench --rows``)."""

    # ---- before the model is changed (no mesh) --------------------------------------------------
    @classmethod
    def options_from(cls, config) -> "NoOptions":
        """This strategy's typed options from ``config`` (a :class:`~hf_seqpar.config.SequenceParallelConfig`).

        Raises:
            ValueError: ``config`` sets an option this strategy does not take (the message lists
                those it takes).
        """
        takes = [f.name for f in fields(cls.Options)]
        unknown = [k for k in STRATEGY_OPTION_FIELDS if k not in takes and getattr(config, k, None) is not None]
        if unknown:
            raise ValueError(
                f"strategy {cls.name!r} does not take option(s) {unknown}; it takes: {takes or 'no options'}"
            )
        values = {k: getattr(config, k) for k in takes if getattr(config, k, None) is not None}
        return cls.Options(**values)

    @classmethod
    def check_model(cls, model_config, sp_size: int, options, world_size: int | None = None) -> None:
        """Raise a clear error if this strategy cannot run ``model_config`` on ``sp_size`` ranks
        with ``options``; called before the model is modified. ``world_size`` (when known) makes
        the advice one the launched world can follow."""

    @classmethod
    def check_features(cls, features) -> None:
        """Raise ``NotImplementedError`` naming a strategy that works if this one cannot compute the
        model's :class:`~hf_seqpar.core.features.AttentionFeatures` exactly."""

    @classmethod
    def check_trainer(cls) -> None:
        """Raise ``NotImplementedError`` if the HF Trainer (``SequenceParallelMixin``) cannot drive
        this strategy."""

    # ---- facts the cost model reads (no mesh) -----------------------------------------------------
    #: What :mod:`hf_seqpar.tools.cost` needs to know about this strategy (see :class:`CostFacts`).
    cost: ClassVar[CostFacts] = CostFacts()

    @classmethod
    def seq_multiple(cls, sp: int, options) -> int:
        """The sequence length ``shard_batch`` pads to a multiple of, on ``sp`` ranks (a run-time fact
        of the layout, which the cost model reads too)."""
        return sp

    # ---- at run time -----------------------------------------------------------------------------
    def __init__(self, model_config, dims: MeshDims, options, *, counter=None, attn_implementation: str | None = None):
        """Bind the strategy to one model and one mesh.

        Args:
            model_config: the model's transformers config.
            dims: the sizes and groups of the mesh (``"sp"``, optionally ``"dp"`` and others), the
                object the model's :class:`~hf_seqpar.core.mesh.SeqParState` owns; read, not copied.
            options: this strategy's :attr:`Options`.
            counter: the :class:`~hf_seqpar.core.comm.CommCounter` every collective reports to.
            attn_implementation: the model's own attention implementation (what the full-sequence
                attention calls).
        """
        self.model_config, self.dims, self.options = model_config, dims, options
        self.mesh = dims.mesh
        self.counter, self.attn_implementation = counter, attn_implementation
        #: The attention kernel backend the options name, looked up once (a ``hf_seqpar.kernels``
        #: ``Backend``; None: chosen per block for the device and dtype).
        self.backend = backend_named(getattr(options, "backend", None))

    # the sizes and groups, read from the state's one MeshDims
    sp_size = from_dims("sp_size", "Ranks per sequence.")
    sp_rank = from_dims("sp_rank", "This rank's index in its SP group.")
    sp_group = from_dims("sp_group", "This rank's SP process group.")
    dp_size = from_dims("dp_size", 'Data-parallel replicas (1 without a ``"dp"`` dimension).')
    dp_group = from_dims("dp_group", 'This rank\'s data-parallel process group (None without ``"dp"``).')

    #: The tensor-parallel machinery (:class:`hf_seqpar.tp.TensorParallel`) when :attr:`shards_parameters`.
    tensor_parallel = None

    def make_layout(self, seq_len: int, valid=None, doc_ids=None) -> "Layout":
        """The layout ``shard_batch`` applies to a batch of ``seq_len`` tokens per row; ``valid``
        (bool ``(B, S)``) and ``doc_ids`` (``(B, S)`` or None) describe its rows, for layouts that
        balance the work of packed rows (:func:`hf_seqpar.core.balance.choose_layout`)."""
        raise NotImplementedError

    def local_position_ids(self, positions: torch.Tensor, layout) -> torch.Tensor:
        """The ``position_ids`` ``shard_batch`` hands this rank's model.

        Args:
            positions: ``(B, S_pad)`` global position ids of the padded sequence, global order.
            layout: the batch's :class:`~hf_seqpar.core.layout.Layout`.

        Returns:
            By default the positions of the local tokens. A strategy whose attention sees the full
            sequence while the residual stream is sharded returns the full ``positions``.
        """
        return layout.shard(positions, self.sp_rank)

    def attention(self, module, query, key, value, batch, **kwargs) -> torch.Tensor:
        """Attention for the local shard: q ``(B, h_q, S_local, D)``, k/v ``(B, h_kv, S_local, D)``
        -> ``(B, S_local, h_q, D)``."""
        raise NotImplementedError

    def apply(self, model, state) -> None:
        """Changes to the model beyond the attention hook (e.g. tensor-parallel plans), made by
        ``enable_sequence_parallel`` after every check passed. Most strategies change nothing."""

    def remove(self, model, state) -> None:
        """Undo :meth:`apply` (``disable_sequence_parallel``)."""

    def combine_loss(self, tensor: torch.Tensor, group, counter=None) -> torch.Tensor:
        """Sum the per-rank loss pieces over the SP group (differentiable, backward sums too): every
        rank is its own replica; frameworks then average gradients over all ranks."""
        return all_reduce_sum(tensor, group, counter)

    def average_gradients_over_dp(self, model, counter=None) -> None:
        """Average every gradient over the ``dp`` dimension only, in place (what DDP does over the
        whole world for strategies that do not shard parameters). No-op with one replica."""
        if self.dp_size == 1:
            return
        for p in model.parameters():
            if p.grad is not None:
                self.average_gradient_over_dp(p, counter)

    def average_gradient_over_dp(self, param, counter=None) -> None:
        """Average one parameter's gradient (its local shard for DTensors) over the ``dp`` group."""
        grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
        all_reduce_mean_(grad, self.dp_group, counter)

    def metering(self):
        """A context manager that counts collectives the hooks cannot see (Megatron-SP's DTensor
        collectives in backward); a no-op for strategies whose collectives are all counted."""
        return contextlib.nullcontext()
