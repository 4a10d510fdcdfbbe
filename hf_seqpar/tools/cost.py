"""The cost model of every strategy, in one place beside the planner.

Each strategy declares small facts (:class:`hf_seqpar.strategies.base.CostFacts` on
:attr:`Strategy.cost <hf_seqpar.strategies.base.Strategy.cost>`: its Ulysses, ring and
tensor-parallel degrees, what it saves and gathers, where its collectives run, what the planner
may try); the formulas here read those facts and never a strategy's name, so a new strategy with
the facts of an existing one costs the same. Used by :mod:`hf_seqpar.tools.theory` (bytes and
activations by strategy name), :mod:`hf_seqpar.tools.memmodel`, :mod:`hf_seqpar.tools.plan`,
:mod:`hf_seqpar.tools.plan_infer` and :mod:`hf_seqpar.tools.scaling`.

Conventions match :mod:`hf_seqpar.core.comm`: bytes a rank *sends*, per step of one micro-batch.
Per layer (elements): the Ulysses all-to-all of degree ``U`` sends ``(2 h_q + 2 h_kv') B N/P d
(U-1)/U`` each way (DeepSpeed-Ulysses, https://arxiv.org/abs/2309.14509); a ring of ``R`` ranks
``(R-1)`` K/V hops forward and the same plus ``R`` fp32 dK/dV hops backward (Liu et al.,
https://arxiv.org/abs/2310.01889); tensor parallel of degree ``T`` 2 all-gathers + 2
reduce-scatters of ``B N/T h`` each way, ``4 (T-1) B N/T h`` (Megatron-SP,
https://arxiv.org/abs/2205.05198).
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_seqpar.core.shape import FP32, ModelShape
from hf_seqpar.strategies.ulysses import kv_replication

__all__ = [
    "ActivationTerms",
    "split",
    "degrees",
    "seq_multiple",
    "plan_options",
    "label",
    "comm_bytes",
    "activation_terms",
    "comm_seconds",
    "loss_allreduce_in_backward",
    "ulysses_comm_bytes",
    "ring_comm_bytes",
]


@dataclass(frozen=True)
class ActivationTerms:
    """What a strategy changes in the activation bytes of one decoder layer, per local token
    (the formulas are in :func:`hf_seqpar.core.shape.layer_activation_bytes`)."""

    kv_heads: int
    """kv heads attention saves per local token (after any replication the strategy needs)."""
    extra_per_token: float = 0.0
    """Further bytes saved per local token and layer: the attention output that the exchange
    makes a new tensor (Ulysses, ring), or the all-gathered linear inputs (Megatron-SP)."""


def degrees(cls, sp: int, options, heads: int) -> tuple[int, int, int]:
    """``(ulysses, ring, tp)`` degrees of strategy class ``cls`` on ``sp`` ranks (its
    :attr:`CostFacts.degrees <hf_seqpar.strategies.base.CostFacts.degrees>`)."""
    return cls.cost.degrees(sp, options, heads)


def split(cls, sp: int, options, heads: int) -> tuple[int, int]:
    """``(ulysses degree, ring degree)`` on ``sp`` ranks: their product is ``sp``, or ``(1, 1)`` for a
    strategy that is neither (tensor parallel)."""
    u, r, _ = degrees(cls, sp, options, heads)
    return u, r


def seq_multiple(cls, sp: int, options) -> int:
    """The sequence length ``shard_batch`` pads to a multiple of (the strategy's run-time fact)."""
    return cls.seq_multiple(sp, options)


def plan_options(cls, heads: int, sp: int, gpus_per_node: int) -> list:
    """The option sets ``hf-seqpar plan`` considers for ``cls`` on ``sp`` ranks (empty: cannot run)."""
    facts = cls.cost
    if sp < facts.min_sp or (facts.within_node and sp > gpus_per_node):
        return []
    if facts.plan_ulysses_sizes:
        return [cls.Options(ulysses_size=u) for u in range(2, sp) if sp % u == 0 and heads % u == 0]
    if facts.heads_over_sp and heads % sp:
        return []
    return [cls.Options()]


def label(cls, sp: int, options) -> str:
    """Short name of a configuration, e.g. ``"ulysses 8"`` or ``"hybrid 2x4"``."""
    if cls.cost.plan_ulysses_sizes:
        u = options.ulysses_size
        return f"{cls.name} {u}x{sp // u}" if u else f"{cls.name} {sp} (largest Ulysses degree)"
    return f"{cls.name} {sp}"


def _kv_after_replication(m: ModelShape, ulysses: int) -> int:
    """kv heads after the replication a Ulysses degree needs (see ``kv_replication``)."""
    return m.kv_heads * kv_replication(m.heads, m.kv_heads, ulysses) if ulysses > 1 else m.kv_heads


def ulysses_comm_bytes(m: ModelShape, seq_len: int, sp: int, batch: int, elem: int, ulysses: int) -> float:
    """Bytes one rank sends per layer and direction in the Ulysses all-to-all of degree ``ulysses``
    over an SP group of ``sp`` ranks: ``(2 h_q + 2 h_kv') B N/P d (U-1)/U`` elements."""
    if ulysses == 1:
        return 0.0
    kv_eff = m.kv_heads * kv_replication(m.heads, m.kv_heads, ulysses)
    return (2 * m.heads + 2 * kv_eff) * batch * (seq_len // sp) * m.head_dim * elem * (ulysses - 1) / ulysses


def ring_comm_bytes(m: ModelShape, kv_heads: int, shard_tokens: int, ring: int, batch: int, elem: int) -> tuple:
    """``(forward, backward)`` bytes one rank sends per layer around a ring of ``ring`` ranks whose
    shards hold ``shard_tokens`` tokens of ``kv_heads`` kv heads: ``(R-1)`` K/V hops forward; the
    same backward plus ``R`` hops of the fp32 dK/dV accumulators."""
    if ring == 1:
        return 0.0, 0.0
    kv = 2 * batch * kv_heads * shard_tokens * m.head_dim  # elements of one shard's K and V
    return (ring - 1) * kv * elem, (ring - 1) * kv * elem + ring * kv * FP32


def comm_bytes(cls, m: ModelShape, seq_len: int, sp: int, batch: int, elem: int, options) -> dict:
    """Bytes one rank sends per step (one micro-batch) for attention/TP traffic, without the loss
    all-reduce: ``{"forward", "backward", "all_to_all"}`` (the last: the Ulysses share of
    forward + backward). The all-to-all of degree ``U`` runs inside the SP group; the ring then
    carries shards of ``U N/P`` tokens with ``h_kv' / U`` kv heads; tensor parallel adds its
    gathers and scatters."""
    u, r, tp = degrees(cls, sp, options, m.heads)
    a2a = m.layers * ulysses_comm_bytes(m, seq_len, sp, batch, elem, u)
    fwd, bwd = a2a, a2a
    if r > 1:
        ring_fwd, ring_bwd = ring_comm_bytes(m, _kv_after_replication(m, u) // u, (seq_len // sp) * u, r, batch, elem)
        fwd, bwd = a2a + m.layers * ring_fwd, a2a + m.layers * ring_bwd
    if tp > 1:  # 2 all-gathers + 2 reduce-scatters per layer, each way
        per = m.layers * 4 * (tp - 1) * batch * (seq_len // sp) * m.hidden * elem
        fwd, bwd = (per, per) if u == r == 1 else (fwd + per, bwd + per)
    return {"forward": fwd, "backward": bwd, "all_to_all": 2 * a2a}


def loss_allreduce_in_backward(cls) -> bool:
    """Whether the exact loss's scalar all-reduce also runs in backward (a declared fact)."""
    return cls.cost.loss_allreduce_in_backward


def activation_terms(cls, m: ModelShape, sp: int, elem: int, options) -> ActivationTerms:
    """How ``cls`` changes the per-layer saved activations on ``sp`` ranks (see :class:`ActivationTerms`):
    kv heads after the Ulysses replication; the exchanged attention output (``e h_q d``) when the
    strategy makes it a new tensor; ``(T - 1) e h`` per all-gathered linear input."""
    facts = cls.cost
    u, _, tp = degrees(cls, sp, options, m.heads)
    terms = [elem * m.heads * m.head_dim] if facts.out_copy else []
    terms += [facts.gathered_inputs * (tp - 1) * elem * m.hidden] if facts.gathered_inputs else []
    extra = sum(terms) if sp > 1 and terms else 0.0
    return ActivationTerms(kv_heads=_kv_after_replication(m, u), extra_per_token=extra)


def comm_seconds(cls, comm: dict, sp: int, options, bandwidth) -> float:
    """Seconds of SP traffic per step; ``bandwidth(ranks)`` is the bytes/s of a group of that many
    consecutive ranks. Traffic spans the SP group, except an all-to-all that stays inside a Ulysses
    group (:attr:`CostFacts.a2a_in_ulysses_group <hf_seqpar.strategies.base.CostFacts.a2a_in_ulysses_group>`)."""
    if cls.cost.a2a_in_ulysses_group:
        u = options.ulysses_size or sp  # unset: bound the all-to-all's links by the whole SP group
        return comm["all_to_all"] / bandwidth(u) + (comm["total"] - comm["all_to_all"]) / bandwidth(sp)
    return comm["total"] / bandwidth(sp)
