"""What SP costs, in closed form: communication bytes and activation memory per rank.

Shared by ``hf-seqpar bench`` (theory column next to the measured one) and ``hf-seqpar plan``
(predictions for clusters we cannot run here). Conventions match :mod:`hf_seqpar.core.comm`: bytes a
rank *sends*, per optimizer step of one micro-batch (forward + backward). Each strategy's own
terms come from :mod:`hf_seqpar.tools.cost` (the cost model, reading the facts the strategy
declares); the shared per-layer formulas are in :mod:`hf_seqpar.core.shape`.
"""

from __future__ import annotations

from hf_seqpar.config import SequenceParallelConfig
from hf_seqpar.core.shape import FP32, ModelShape, layer_activation_bytes, norm_bytes, outside_activation_bytes  # noqa: F401 (re-exported)
from hf_seqpar.strategies import strategy_class
from hf_seqpar.strategies.ulysses import kv_replication
from hf_seqpar.tools import cost

__all__ = ["ModelShape", "comm_bytes", "activation_bytes", "kv_heads_after_replication", "strategy_options"]


def kv_heads_after_replication(heads: int, kv_heads: int, ulysses: int) -> int:
    """kv heads after the replication a Ulysses degree needs (see ``kv_replication``)."""
    return kv_heads if ulysses == 1 else kv_heads * kv_replication(heads, kv_heads, ulysses)


def strategy_options(strategy: str, **options):
    """The typed options of ``strategy`` from option keywords (None values are left unset).

    Raises:
        ValueError: unknown strategy, or an option it does not take.
    """
    cls = strategy_class(strategy)
    return cls.options_from(
        SequenceParallelConfig(strategy=strategy, **{k: v for k, v in options.items() if v is not None})
    )


def comm_bytes(
    strategy: str,
    m: ModelShape,
    seq_len: int,
    sp: int,
    batch: int = 1,
    elem: int = 4,
    ulysses_size: int | None = None,
    backward: bool = True,
    loss_allreduce: bool = True,
) -> dict:
    """Bytes one rank sends per step (forward, and backward when ``backward``).

    Args:
        strategy: a strategy name (``ulysses``, ``ring``, ``hybrid``, ``megatron``).
        m: the model shape.
        seq_len: padded sequence length ``N`` (a multiple of what the layout needs).
        sp: SP (or TP) degree ``P``.
        batch: micro-batch rows ``B``.
        elem: bytes per activation element.
        ulysses_size: hybrid's Ulysses degree (default: the largest the heads allow).
        backward: include the backward pass.
        loss_allreduce: include the fp32 scalar all-reduce of the exact loss.

    Returns:
        ``{"forward": bytes, "backward": bytes, "total": bytes, "all_to_all": bytes}``; the last is
        the Ulysses all-to-all share of the total (the rest is ring, TP or loss traffic).

    Formulas (per layer, elements; see :func:`hf_seqpar.tools.cost.comm_bytes`): Ulysses
    ``(2 h_q + 2 h_kv') B N/P d (P-1)/P`` each way; ring ``(R-1) 2 B h_kv N/R d`` forward, the same
    plus ``R`` fp32 dK/dV hops backward; Megatron-SP ``4 (T-1) B N/T h`` forward (2 all-gathers +
    2 reduce-scatters), the same backward.
    """
    cls = strategy_class(strategy)
    options = strategy_options(strategy, ulysses_size=ulysses_size)
    parts = cost.comm_bytes(cls, m, seq_len, sp, batch, elem, options)
    fwd, bwd, a2a = parts["forward"], parts["backward"], parts["all_to_all"]
    if loss_allreduce and sp > 1:
        ar = 2 * FP32 * (sp - 1) / sp
        fwd += ar
        if cost.loss_allreduce_in_backward(cls):
            bwd += ar
    if not backward:
        bwd, a2a = 0.0, a2a / 2
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "all_to_all": a2a}


def activation_bytes(
    strategy: str | None,
    m: ModelShape,
    seq_len: int,
    sp: int = 1,
    batch: int = 1,
    elem: int = 4,
    ulysses_size: int | None = None,
    checkpointing: bool = False,
    chunked_loss: bool = False,
) -> float:
    """Bytes autograd saves for the backward on one rank (one micro-batch).

    Args:
        strategy: None for the plain model, else a strategy name.
        m: the model shape.
        seq_len: padded sequence length ``N``.
        sp: SP degree ``P`` (local tokens ``n = N / P``).
        batch: micro-batch rows.
        elem: bytes per activation element (4 fp32, 2 bf16).
        ulysses_size: hybrid's Ulysses degree.
        checkpointing: per-layer activation checkpointing (only each layer's input is kept, plus
            one layer's activations while it is recomputed).
        chunked_loss: lm_head + cross-entropy in chunks (no fp32 ``n x V`` log-softmax kept).

    Returns:
        Bytes (a float: exact for the structure described in :mod:`hf_seqpar.core.shape`).
    """
    n = batch * seq_len / sp
    if strategy is None:
        kv, extra = m.kv_heads, 0.0
    else:
        cls = strategy_class(strategy)
        options = strategy_options(strategy, ulysses_size=ulysses_size)
        terms = cost.activation_terms(cls, m, sp, elem, options)
        kv, extra = terms.kv_heads, terms.extra_per_token
    layer = layer_activation_bytes(m, elem, kv, extra)
    outside = outside_activation_bytes(m, elem, chunked_loss)
    if checkpointing:
        return n * (m.layers * elem * m.hidden + layer + outside)
    return n * (m.layers * layer + outside)
