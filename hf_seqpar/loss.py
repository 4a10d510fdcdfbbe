"""The exact sequence-parallel loss.

Each rank scores its shard's pre-shifted labels with the model's own loss function and
``num_items_in_batch`` = label tokens of the *full* batch, so its loss is ``sum_local / N``; the
differentiable all-reduce then gives every rank ``sum_r sum_r / N``, the unsharded loss. Its
backward sums the ranks' output gradients, so each rank's parameter gradient is ``P`` times its
own share and the average over ranks that DDP/FSDP take is exactly the unsharded gradient.
A rank without label tokens contributes ``0 / N = 0``.
"""

from __future__ import annotations

from .comm import all_reduce_sum

__all__ = ["SequenceParallelLoss"]


class SequenceParallelLoss:
    """Wraps a transformers loss function (``model.loss_function``) for SP.

    Args:
        inner: the loss function the model used before SP.
        combine: ``(loss, group, counter) -> loss`` summing the ranks' losses. The default
            :func:`~hf_seqpar.comm.all_reduce_sum` sums gradients in backward too (every rank is its
            own replica, averaged later by DDP/FSDP); tensor-parallel strategies, whose ranks run one
            shared graph, use :func:`~hf_seqpar.comm.all_reduce_sum_replicated` (backward identity).
    """

    def __init__(self, inner, combine=all_reduce_sum):
        self.inner, self.combine = inner, combine

    def __call__(self, logits, labels, vocab_size: int, **kwargs):
        loss = self.inner(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        batch = kwargs.get("seqpar")
        if batch is None:  # a forward without shard_batch: nothing to combine
            return loss
        return self.combine(loss, batch.state.sp_group, batch.state.counter)
