"""Attention over a gathered full sequence (Ulysses after its all-to-all, Megatron-SP).

After Ulysses' all-to-all a rank holds a few heads of the whole sequence. For ``sdpa`` and
``eager`` models the attention runs as variable-length pieces planned from the batch's segments
(:mod:`hf_seqpar.core.segments`, :mod:`hf_seqpar.kernels.varlen`): one kernel call per document (or
window-band tile), O(S) memory, no dense mask. ``flash_attention_2/3`` run transformers' own
varlen flash function over the document segments. Only features the kernels do not have (logit
soft-capping, attention sinks, attention dropout) fall back to the model's own eager/sdpa
function with transformers' dense full-sequence mask (O(S^2) memory for padded, packed or
windowed batches; see :mod:`hf_seqpar.core.masks`).
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_seqpar.core.masks import dense_mask, flash_segments
from hf_seqpar.core.segments import plan_pieces
from hf_seqpar.kernels.varlen import varlen_attention

__all__ = ["SUPPORTED_INNER", "full_sequence_attention", "needs_dense_path"]

#: Implementations SP can wrap: dense masks (sdpa, eager) or varlen segments (flash).
DENSE_INNER = ("sdpa", "eager")
FLASH_INNER = ("flash_attention_2", "flash_attention_3")
SUPPORTED_INNER = DENSE_INNER + FLASH_INNER


class _ConfigView:
    """The module's config, but reporting the original attention implementation (flash
    attention picks its kernel from ``config._attn_implementation``)."""

    def __init__(self, config, impl: str):
        self._config, self._attn_implementation = config, impl

    def __getattr__(self, name):
        return getattr(self._config, name)


class _ModuleView:
    """The attention module as the inner implementation must see it: with the head grouping of
    the local heads (``num_key_value_groups``) and the original attention implementation."""

    def __init__(self, module: torch.nn.Module, kv_groups: int, impl: str, sinks: torch.Tensor | None = None):
        self._module = module
        self.num_key_value_groups = kv_groups
        if sinks is not None:  # eager functions read `module.sinks`: the sinks of the local heads
            self.sinks = sinks
        self.config = _ConfigView(module.config, impl) if hasattr(module, "config") else None
        self.training = module.training

    def __getattr__(self, name):
        return getattr(self._module, name)


def _inner_function(module: torch.nn.Module, impl: str):
    if impl == "eager":
        # Models define their own eager function next to the attention class (some add softcap
        # or sinks); transformers looks it up the same way through `get_interface(..., default)`.
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        return fn
    return ALL_ATTENTION_FUNCTIONS[impl]


def needs_dense_path(kwargs) -> str | None:
    """The attention feature (if any) in the model's attention keywords that the variable-length
    kernels do not implement, so that the model's own function must run on a dense mask."""
    if kwargs.get("softcap") is not None:
        return "logit soft-capping"
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        return "attention sinks"
    if kwargs.get("dropout", 0.0):
        return "attention dropout"
    return None


def full_sequence_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    batch,
    impl: str,
    *,
    backend=None,
    **kwargs,
) -> torch.Tensor:
    """Exact attention over the whole (padded) sequence.

    Args:
        module: the model's attention module (for ``is_causal``, ``layer_idx``, ``config``).
        query: ``(B, h_q, S, D)`` for the full padded sequence, in global order.
        key: ``(B, h_kv, S, D)``; ``h_q`` must be a multiple of ``h_kv``.
        value: like ``key``.
        batch: the :class:`~hf_seqpar.core.sharding.SeqParBatch` of this forward.
        impl: the model's original attention implementation.
        backend: the block-attention backend of the variable-length path (a ``hf_seqpar.kernels``
            ``Backend`` or name; None: per block for the device and dtype).
        **kwargs: what the model passed to attention (``scaling``, ``dropout``,
            ``sliding_window``, ...); ``s_aux`` (attention sinks) must be those of the heads of
            ``query``.

    Returns:
        ``(B, S, h_q, D)`` attention output.
    """
    view = _ModuleView(module, query.shape[1] // key.shape[1], impl, kwargs.get("s_aux"))
    fn = _inner_function(module, impl)
    is_causal = getattr(module, "is_causal", True)
    window = kwargs.get("sliding_window")
    seq_len = query.shape[2]
    for name in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)  # these describe the local shard; the full structure is on `batch`
    if impl in FLASH_INNER:
        cu, max_len = batch.cached(("flash",), lambda: flash_segments(batch.valid, batch.doc_ids))
        bsz, _, seq, _ = query.shape
        # (B, h, S, D) -> (1, h, B*S, D): varlen flash runs on one flattened row
        flat = [t.transpose(0, 1).reshape(1, t.shape[1], bsz * seq, t.shape[-1]) for t in (query, key, value)]
        cu = cu.to(query.device)
        out, _ = fn(
            view,
            *flat,
            None,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=max_len,
            max_length_k=max_len,
            is_causal=is_causal,
            **kwargs,
        )
        return out.reshape(bsz, seq, *out.shape[-2:])  # (1, B*S, h, D) -> (B, S, h, D)
    # the varlen kernels need one head size; MLA values (v_head_dim != qk_head_dim) take the dense path
    if needs_dense_path(kwargs) is None and value.shape[-1] == query.shape[-1]:
        pieces = batch.cached(
            ("pieces", seq_len, is_causal, window),
            lambda: plan_pieces(batch.segments, [(0, seq_len)], [(0, seq_len)], is_causal, window),
        )
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        # (B, h, S, D) -> (B, S, h, D) as the model's own attention functions return it
        return varlen_attention(query, key, value, pieces, scale=scale, backend=backend).transpose(1, 2)
    mask_fn = AttentionMaskInterface._global_mapping[impl]
    mask = batch.cached(
        ("dense", impl, window, query.dtype, is_causal),
        lambda: dense_mask(
            mask_fn,
            valid=batch.valid,
            doc_ids=batch.doc_ids,
            is_causal=is_causal,
            sliding_window=window,
            dtype=query.dtype,
        ),
    )
    out, _ = fn(view, query, key, value, mask, **kwargs)
    return out
