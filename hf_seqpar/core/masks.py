"""Attention structure of a full (gathered) sequence: padding, documents, causality, windows.

``shard_batch`` records the structure of the whole batch once (it sees the full batch, so this
costs no communication). The main path turns it into segments and variable-length pieces
(:mod:`hf_seqpar.core.segments`, O(S)); this module holds the two other forms:

- a 4D mask in the format of the model's own attention implementation, built by that
  implementation's function from transformers' ``AttentionMaskInterface`` (so ``sdpa`` and
  ``eager`` get exactly the mask they would get without SP): O(S^2), used only for attention
  features the variable-length kernels lack (soft-capping, sinks, dropout), or
- ``cu_seqlens`` segments for transformers' variable-length flash attention.

Semantics follow transformers: causality and sliding windows act on sequence indices (one rule,
:func:`window_visible`, for every strategy), padding masks keys, and documents are runs of
``position_ids`` that increase by one (a new document starts wherever the position does not).
"""

from __future__ import annotations

import torch
from transformers.masking_utils import and_masks, packed_sequence_mask_function

from hf_seqpar.kernels.reference import window_visible  # the one rule, kept in the kernels (a leaf)

__all__ = [
    "document_ids",
    "window_visible",
    "structure_mask_function",
    "dense_mask",
    "flash_segments",
    "check_cu_seqlens",
]


def document_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document index of every token of ``(B, S)`` position ids, or None if every row holds a
    single document. A document starts wherever a position is not the previous one plus one."""
    first = position_ids[:, :1] - 1
    starts = torch.diff(position_ids, prepend=first, dim=-1) != 1
    ids = starts.cumsum(-1)
    if (ids[:, -1] == 0).all():
        return None
    return ids


def structure_mask_function(is_causal: bool, sliding_window: int | None, doc_ids: torch.Tensor | None):
    """An index-based transformers mask function for causality, window and documents
    (padding is passed separately as the 2D ``attention_mask``)."""

    def positional(batch_idx, head_idx, q_idx, kv_idx):
        return window_visible(q_idx, kv_idx, is_causal, sliding_window)

    return positional if doc_ids is None else and_masks(positional, packed_sequence_mask_function(doc_ids))


def dense_mask(
    mask_interface,
    *,
    valid: torch.Tensor,
    doc_ids: torch.Tensor | None,
    is_causal: bool,
    sliding_window: int | None,
    dtype: torch.dtype,
):
    """Build the full-sequence mask with one of transformers' mask functions.

    Args:
        mask_interface: e.g. ``transformers.masking_utils.sdpa_mask`` or ``eager_mask``.
        valid: ``(B, S)`` bool, False at padding (user padding and shard padding).
        doc_ids: ``(B, S)`` document index per token, or None.
        is_causal: causal attention.
        sliding_window: window size, or None.
        dtype: activation dtype (additive masks use its minimum).

    Returns:
        Whatever the mask function returns for an ``S x S`` attention (None when the pattern is
        plain causal and the implementation can use ``is_causal`` instead).
    """
    batch, seq = valid.shape
    if sliding_window is not None and sliding_window >= seq:
        sliding_window = None  # the window covers the whole sequence
    padding = None if bool(valid.all()) else valid
    plain = is_causal and padding is None and doc_ids is None and sliding_window is None
    return mask_interface(
        batch_size=batch,
        q_length=seq,
        kv_length=seq,
        q_offset=0,
        kv_offset=0,
        mask_function=structure_mask_function(is_causal, sliding_window, doc_ids),
        attention_mask=padding,
        allow_is_causal_skip=plain,
        dtype=dtype,
        config=None,
        use_vmap=False,
        device=valid.device,
    )


def flash_segments(valid: torch.Tensor, doc_ids: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """``cu_seqlens`` over the flattened ``(B * S)`` sequence for variable-length flash attention.

    A segment is a maximal run of tokens in one row, one document and one validity state, so
    valid tokens only ever attend inside their own document; padding tokens form segments of
    their own (their outputs are never read by valid tokens).

    Returns:
        ``(cu_seqlens, max_seqlen)``: int32 ``(n_segments + 1,)`` and the longest segment.
    """
    batch, seq = valid.shape
    key = valid.long() if doc_ids is None else doc_ids * 2 + valid.long()
    flat = key.reshape(-1)
    boundary = torch.ones_like(flat, dtype=torch.bool)
    boundary[1:] = flat[1:] != flat[:-1]
    boundary[::seq] = True  # every row starts a segment
    starts = torch.nonzero(boundary).flatten()
    cu = torch.cat([starts, starts.new_tensor([batch * seq])]).to(torch.int32)
    check_cu_seqlens(cu, batch * seq)
    return cu, int((cu[1:] - cu[:-1]).max())


def check_cu_seqlens(cu: torch.Tensor, total: int) -> None:
    """Raise unless ``cu`` is a valid ``cu_seqlens`` for ``total`` packed tokens: int32 (the
    kernels' dtype), 1-D, starting at 0, strictly increasing, ending at ``total``. A wrong offset
    here is an out-of-bounds read inside a CUDA varlen kernel, not an exception."""
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of >= 2 offsets, got {cu.dtype} {tuple(cu.shape)}")
    if int(cu[0]) != 0 or int(cu[-1]) != total or not bool((cu[1:] > cu[:-1]).all()):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to {total}; got {cu.tolist()[:8]}...{int(cu[-1])}")
