"""The transformers extension points SP uses: new names in the attention and mask registries.

For every wrapped implementation ``X`` (``sdpa``, ``eager``, ``flash_attention_2/3``) we register
``hf_seqpar_X`` in ``AttentionInterface`` and ``AttentionMaskInterface`` through their public
``register`` class methods. Existing entries are never overwritten. The attention entry finds the
strategy and the batch structure on the ``seqpar=`` keyword that ``shard_batch`` adds; the mask
entry returns None because the structure of the full sequence is built by the strategy itself
(transformers would only see the local shard).
"""

from __future__ import annotations

from transformers import AttentionInterface, AttentionMaskInterface

__all__ = [
    "PREFIX",
    "registered_name",
    "register",
    "sp_attention_forward",
    "require_batch",
    "missing_batch_error",
    "shards_itself",
]

PREFIX = "hf_seqpar_"
#: Attribute of an instance ``forward`` that calls ``shard_batch`` on its full batch itself.
SHARDS_ITSELF = "_hf_seqpar_shards_itself"


def registered_name(inner: str) -> str:
    """The registry name that wraps implementation ``inner``."""
    return PREFIX + inner


def missing_batch_error() -> RuntimeError:
    """The error of a forward of an SP model without the ``seqpar=`` structure of ``shard_batch``."""
    return RuntimeError(
        "this model runs sequence-parallel attention but the forward got no `seqpar=` batch "
        "structure: pass `model(**hf_seqpar.shard_batch(batch, model))`, or call "
        "`hf_seqpar.disable_sequence_parallel(model)` (or `with hf_seqpar.unsharded(model):`) to run it "
        "unsharded; generate with `hf_seqpar.generate(model, ...)`."
    )


def require_batch(module, args, kwargs):
    """Forward pre-hook of an SP model: refuse a forward without ``seqpar=`` before any layer runs
    (Megatron-SP would otherwise fail deep inside its sharded layers, e.g. in rotary embedding)."""
    if kwargs.get("seqpar") is not None or getattr(module, "hf_seqpar_state", None) is None:
        return  # a sharded batch, or no state: inside ``hf_seqpar.unsharded`` the plain model runs
    if kwargs.get("fused_lm_head") and shards_itself(getattr(module, "forward", None)):
        return  # a forward that shards its full batch itself (TRL's DPO fused head: integrations/trl_dpo)
    raise missing_batch_error()


def shards_itself(forward) -> bool:
    """Whether ``forward`` (a model's instance forward) is, or wraps, one marked :data:`SHARDS_ITSELF`.

    The mark is looked for down the ``__wrapped__`` chain: accelerate's ``prepare_model`` under mixed
    precision (DDP with ``bf16``/``fp16``) replaces the instance forward with its autocast and
    ``convert_outputs_to_fp32`` wrappers, whose outer function keeps the inner one only as
    ``__wrapped__``; the marked forward still runs inside them."""
    for _ in range(16):  # wrappers nest a few deep; a cycle must not loop forever
        if forward is None:
            return False
        if getattr(forward, SHARDS_ITSELF, False):
            return True
        forward = getattr(forward, "__wrapped__", None)
    return False


def sp_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: dispatch to the strategy of this batch.

    Raises:
        RuntimeError: the forward was not given a batch from ``hf_seqpar.shard_batch``.
    """
    batch = kwargs.pop("seqpar", None)
    if batch is None:
        raise missing_batch_error()
    decode = getattr(batch, "decode_attention", None)  # a decode step of hf_seqpar.generate
    if decode is not None:
        out = decode(module, query, key, value, **kwargs)
    else:
        out = batch.state.strategy.attention(module, query, key, value, batch, **kwargs)
    return out.contiguous(), None  # (B, S_local, h, D); models may `.view` it, as after sdpa


def sp_mask(*args, **kwargs):
    """Mask hook: the strategies build the full-sequence mask from the batch structure."""
    return None


def register(inner: str) -> str:
    """Register the SP wrapper of ``inner`` (idempotent) and return its name."""
    name = registered_name(inner)
    AttentionInterface.register(name, sp_attention_forward)
    AttentionMaskInterface.register(name, sp_mask)
    return name
