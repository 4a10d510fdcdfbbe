"""The exact sequence-parallel loss.

Each rank scores its shard's pre-shifted labels with the model's own loss function and
``num_items_in_batch`` = label tokens of the *full* batch, so its loss is ``sum_local / N``; the
differentiable all-reduce then gives every rank ``sum_r sum_r / N``, the unsharded loss. Its
backward sums the ranks' output gradients, so each rank's parameter gradient is ``P`` times its
own share and the average over ranks that DDP/FSDP take is exactly the unsharded gradient.
A rank without label tokens contributes ``0 / N = 0``.
"""

from __future__ import annotations

__all__ = ["SequenceParallelLoss", "combines", "combine_over_sp"]


def combines(seqpar) -> bool:
    """Whether the model's loss is summed over the SP group in its forward: yes for every
    ``shard_batch`` batch, unless the caller marked it ``seqpar.local_loss = True`` (the Trainer
    integration, which hands the local loss to the host trainer and combines it itself)."""
    return seqpar is not None and not getattr(seqpar, "local_loss", False)


def combine_over_sp(loss, seqpar):
    """``loss`` (this rank's ``sum_local / N``) summed over the SP group by the strategy (the one
    place the ranks' losses are combined), or as it is when :func:`combines` says no."""
    if not combines(seqpar):  # no shard_batch, or the caller sums the local losses itself
        return loss
    state = seqpar.state
    return state.strategy.combine_loss(loss, state.sp_group, state.counter)


class SequenceParallelLoss:
    """Wraps a transformers loss function (``model.loss_function``) for SP.

    The ranks' losses are summed by the strategy (``Strategy.combine_loss``): a sum whose backward
    sums too (every rank is its own replica, averaged later by DDP/FSDP), or, for tensor-parallel
    strategies whose ranks run one shared graph, a sum whose backward is the identity.

    Args:
        inner: the loss function the model used before SP.
    """

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, logits, labels, vocab_size: int, **kwargs):
        loss = self.inner(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        return combine_over_sp(loss, kwargs.get("seqpar"))
