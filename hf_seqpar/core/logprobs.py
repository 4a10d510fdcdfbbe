"""Sequence-parallel log-probs of the next-token labels: the primitive of preference and RL training.

DPO, GRPO and their relatives need, per sequence, the log-probability the model gives to each
completion token (and its entropy). Under sequence parallelism each rank holds a shard of every
row, with labels already shifted on the full sequence by :func:`hf_seqpar.shard_batch` (so no
label is lost at a shard boundary), and the full ``S x vocab`` logits must never exist on a rank.

* :func:`token_logprobs` scores the local shard: ``log softmax(f(h @ W.T + b) / T)[label]`` and the
  entropy of that distribution, computed ``chunk`` tokens at a time and recomputed in backward
  (``torch.utils.checkpoint``), so at most ``chunk x vocab`` fp32 logits live at once. ``f`` is the
  model's own logit transformation (:func:`hf_seqpar.core.logits.logit_transform`), ``T`` the
  sampling temperature. Ignored labels (``-100``: prompt, padding, shard padding) give 0.
* :func:`sequence_sums` turns per-token values into exact per-row sums over the SP group.
* :func:`gather_tokens` gathers per-token values into ``(B, S)`` in the original token order.

Gradient convention (the one of :func:`hf_seqpar.core.comm.all_reduce_sum` and of the SP loss):
both combinations are sums whose backward also sums over the group, so when every rank of the
group computes the same loss from the combined values, each rank's local values receive ``P``
times their share of the gradient, and the mean over ``dp x sp`` ranks that DDP/FSDP take is the
unsharded gradient (of the data-parallel mean loss).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hf_seqpar.core.comm import CommCounter, all_gather_concat, all_reduce_sum
from hf_seqpar.core.layout import Layout
from hf_seqpar.core.logits import LogitTransform
from hf_seqpar.core.sharding import IGNORE_INDEX

__all__ = ["token_logprobs", "sequence_sums", "gather_tokens"]


def _chunk_logprobs(h, weight, bias, labels, scale: float, softcap, temperature: float, want_entropy: bool):
    """``(logp (n,), entropy (n,) or empty)`` of one chunk of ``n`` tokens, in fp32 at least."""
    acc = torch.promote_types(h.dtype, torch.float32)
    z = F.linear(h, weight, bias).to(acc)  # (n, V)
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    logsm = torch.log_softmax(z, dim=-1)  # (n, V)
    valid = labels != IGNORE_INDEX
    logp = logsm.gather(-1, labels.clamp_min(0)[:, None])[:, 0].masked_fill(~valid, 0.0)
    if not want_entropy:
        return logp, logp.new_zeros(0)
    ent = -(logsm.exp() * logsm).sum(-1).masked_fill(~valid, 0.0)
    return logp, ent


def token_logprobs(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    shift_labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    transform: LogitTransform | None = None,
    chunk: int = 4096,
    entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropy) of pre-shifted labels on this rank's shard.

    Args:
        hidden: ``(B, S_local, H)`` final hidden states of the local shard (after the final norm).
        lm_head: the output projection (an ``nn.Linear``).
        shift_labels: ``(B, S_local)`` labels already shifted on the full sequence (``shard_batch``'s
            ``shift_labels``); ``-100`` = not scored (prompt, padding, shard padding).
        temperature: the logits are divided by it after the model's transformation (as samplers do).
        transform: the model's logit transformation (:func:`hf_seqpar.core.logits.logit_transform`);
            default identity.
        chunk: tokens per chunk; at most ``chunk x vocab`` fp32 logits exist at a time, forward and backward.
        entropy: also return the entropy of each position's distribution.

    Returns:
        ``(logps, entropy)``: ``(B, S_local)`` fp32 tensors, 0 at ignored labels (``entropy`` None
        unless asked for). Differentiable with respect to ``hidden`` and the head's parameters.

    Raises:
        TypeError: ``lm_head`` is not an ``nn.Linear``.
        ValueError: non-positive ``temperature`` or ``chunk``, or shapes that disagree.
    """
    if not isinstance(lm_head, torch.nn.Linear):
        raise TypeError(f"token_logprobs needs the lm_head to be a torch.nn.Linear, got {type(lm_head).__name__}")
    if temperature <= 0 or chunk < 1:
        raise ValueError(f"temperature must be > 0 and chunk >= 1, got temperature={temperature}, chunk={chunk}")
    if tuple(hidden.shape[:2]) != tuple(shift_labels.shape):
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and shift_labels {tuple(shift_labels.shape)} disagree on (B, S)"
        )
    transform = transform or LogitTransform()
    bsz, seq = shift_labels.shape
    flat = hidden.reshape(bsz * seq, hidden.shape[-1])  # (B*S, H)
    labels = shift_labels.reshape(-1).to(hidden.device)  # (B*S,)
    logps, ents = [], []
    for start in range(0, flat.shape[0], chunk):
        args = (
            flat[start : start + chunk],
            lm_head.weight,
            lm_head.bias,
            labels[start : start + chunk],
            float(transform.scale),
            transform.softcap,
            float(temperature),
            entropy,
        )
        lp, ent = (
            checkpoint(_chunk_logprobs, *args, use_reentrant=False)
            if torch.is_grad_enabled()
            else _chunk_logprobs(*args)
        )
        logps.append(lp)
        ents.append(ent)
    logp = torch.cat(logps).view(bsz, seq)
    return logp, (torch.cat(ents).view(bsz, seq) if entropy else None)


def sequence_sums(
    values: torch.Tensor, group, counter: CommCounter | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact per-row sums of per-token values over the SP group.

    Args:
        values: ``(B, S_local)`` this rank's per-token values (e.g. :func:`token_logprobs`).
        group: the SP process group.
        counter: optional byte counter.
        mask: optional ``(B, S_local)`` weights/mask multiplied in first (e.g. a completion mask).

    Returns:
        ``(B,)`` sums over the whole sequence, identical on every rank; the backward sums the ranks'
        gradients (see the module's gradient convention).
    """
    local = (values * mask if mask is not None else values).sum(dim=1)  # (B,)
    return all_reduce_sum(local, group, counter)


class _GatherTokens(torch.autograd.Function):
    """All-gather along the sequence into the original order; backward: the sum of every rank's
    gradient, restricted to this rank's positions."""

    @staticmethod
    def forward(ctx, local, layout: Layout, rank: int, group, counter):
        ctx.layout, ctx.rank, ctx.group, ctx.counter = layout, rank, group, counter
        full = all_gather_concat(local, 1, group, counter)  # (B, P * S_local, ...) in rank order
        return layout.unshard(full, 1)  # (B, S, ...) original order

    @staticmethod
    def backward(ctx, grad):
        layout = ctx.layout
        grad = grad.contiguous()
        if dist.get_world_size(ctx.group) > 1:
            grad = grad.clone()
            dist.all_reduce(grad, group=ctx.group)
        padded = F.pad(grad, (0, 0) * (grad.dim() - 2) + (0, layout.pad))  # (B, S_pad, ...)
        return layout.shard(padded, ctx.rank, 1).contiguous(), None, None, None, None


def gather_tokens(
    local: torch.Tensor, layout: Layout, rank: int, group, counter: CommCounter | None = None
) -> torch.Tensor:
    """Per-token values of every rank, in original token order, shard padding removed.

    Args:
        local: ``(B, S_local, ...)`` this rank's values in the order of ``layout.shard``.
        layout: the batch's :class:`~hf_seqpar.core.layout.Layout` (``SeqParBatch.layout``).
        rank: this rank's index in the SP group.
        group: the SP process group.
        counter: optional byte counter.

    Returns:
        ``(B, S, ...)``, identical on every rank. Floating tensors stay differentiable (the backward
        sums the ranks' gradients, see the module's gradient convention); others are plain.
    """
    if local.shape[1] != layout.local_len:
        raise ValueError(
            f"gather_tokens: {local.shape[1]} local positions, the layout holds {layout.local_len} "
            f"per rank (sequence {layout.seq_len} padded to {layout.padded_len} over {layout.sp_size})"
        )
    if not local.is_floating_point():
        return layout.unshard(all_gather_concat(local, 1, group, counter), 1)
    return _GatherTokens.apply(local, layout, rank, group, counter)
