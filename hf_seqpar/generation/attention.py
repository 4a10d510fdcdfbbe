"""Decode attention over the sequence-sharded cache: every rank attends the same query over its
own keys, and the partial results merge by their log-sum-exp over the SP group.

For a query ``q`` and disjoint key sets ``K_r`` (one per rank), the partial softmax attentions
``(o_r, lse_r)`` combine exactly into the attention over all keys (the merge of
:func:`hf_seqpar.kernels.merge_into`, Milakov & Gimelshein 2018, arXiv:1805.02867). Each rank sends
``B h (D + 1)`` fp32 numbers per layer and step (one all-gather), whatever the context length.
Every rank merges the same gathered pieces in the same rank order, so every rank gets bitwise the
same output, hence the same logits and the same tokens.
"""

from __future__ import annotations

import torch

from hf_seqpar.core.comm import all_gather_concat
from hf_seqpar.kernels import block_forward, merge_into

__all__ = ["DecodeStep", "merge_over_group", "partial_attention"]


def partial_attention(query, key, value, valid, scale: float, backend: str | None = None):
    """Attention of ``query`` over this rank's keys, with its log-sum-exp.

    Args:
        query: ``(B, h_q, 1, D)``.
        key: ``(B, h_kv, L, D)`` (GQA heads not repeated); ``value`` likewise.
        valid: ``(B, L)`` bool, the keys the query may see.
        scale: softmax scale.
        backend: a kernel name of ``hf_seqpar.kernels.BACKENDS`` (None: per device and dtype).

    Returns:
        ``(out, lse)``: fp32 ``(B, h_q, 1, D)`` and ``(B, h_q, 1)``; rows with no key here have
        ``out = 0`` and ``lse = -inf``.
    """
    bsz, heads, q_len, dim = query.shape
    if key.shape[2] == 0:
        return (
            query.new_zeros((bsz, heads, q_len, value.shape[-1]), dtype=torch.float32),
            query.new_full((bsz, heads, q_len), float("-inf"), dtype=torch.float32),
        )
    mask = valid[:, None, None, :].expand(bsz, 1, q_len, key.shape[2])  # (B, 1, 1, L)
    out, lse = block_forward(query, key, value, scale=scale, mask=mask, backend=backend)
    return out.float(), lse.float()


def merge_over_group(out: torch.Tensor, lse: torch.Tensor, group, counter=None) -> torch.Tensor:
    """The attention over the union of every rank's keys from the ranks' partial results.

    Args:
        out: fp32 ``(B, h, S_q, D)`` this rank's partial output.
        lse: fp32 ``(B, h, S_q)`` its log-sum-exp.
        group: the SP process group.
        counter: optional byte counter.

    Returns:
        fp32 ``(B, h, S_q, D)``, the same on every rank.
    """
    dim = out.shape[-1]
    # (B, h, S_q, D + 1): output and lse travel in one all-gather; gathered along a new leading dim
    packed = torch.cat([out, lse.unsqueeze(-1)], dim=-1).unsqueeze(0)
    gathered = all_gather_concat(packed, 0, group, counter)  # (P, B, h, S_q, D + 1)
    acc = torch.zeros_like(out)
    acc_lse = torch.full_like(lse, float("-inf"))
    for piece in gathered.unbind(0):  # rank order on every rank: identical results everywhere
        merge_into(acc, acc_lse, piece[..., :dim], piece[..., dim])
    return acc


class DecodeStep:
    """What a decode forward passes to the attention hook as ``seqpar=``: the sharded cache and
    the SP group. :func:`hf_seqpar.core.hooks.sp_attention_forward` calls :meth:`decode_attention`.

    Args:
        state: the model's :class:`~hf_seqpar.core.mesh.SeqParState`.
        cache: the :class:`~hf_seqpar.generation.cache.ShardedCache` being decoded from.
    """

    def __init__(self, state, cache):
        self.state, self.cache = state, cache

    def decode_attention(self, module, query, key, value, **kwargs) -> torch.Tensor:
        """``query`` ``(B, h_q, 1, D)`` over every rank's keys; ``key``/``value`` are this rank's
        (what the cache's update returned). Returns ``(B, 1, h_q, D)`` in the query's dtype."""
        if query.shape[2] != 1:
            raise ValueError(f"decode attention takes one query token per row, got {query.shape[2]}")
        valid = self.cache.layers[module.layer_idx].valid
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        out, lse = partial_attention(query, key, value, valid, scale, self.state.strategy.backend)
        merged = merge_over_group(out, lse, self.state.sp_group, self.state.counter)
        return merged.to(query.dtype).transpose(1, 2)  # (B, h, 1, D) -> (B, 1, h, D)

    def to(self, device) -> "DecodeStep":
        """Nothing to move (the cache lives on the model's device)."""
        return self
