"""``hf_seqpar.generate``: transformers' ``generate`` with a sequence-parallel prefill and a KV cache
sharded along the sequence.

Called on every rank of the SP group with the same full prompt, it runs ``model.generate`` with
a decoding callable (``custom_generate=``, transformers' documented hook) that

1. runs the prompt but its last token through the model *sequence-parallel*, with the model's
   strategy (``shard_batch`` + the strategy's attention), the positions and padding exactly as
   ``generate`` prepared them, while a :class:`~hf_seqpar.generation.cache.ShardedCache` keeps
   each rank's keys and values;
2. hands over to transformers' own decoding loop (greedy or sampling: logits processors,
   stopping criteria, ``max_new_tokens``, ``return_dict_in_generate`` outputs as usual), which
   first feeds the last prompt token and then one new token per step; in those forwards the
   attention hook receives ``seqpar=`` a :class:`~hf_seqpar.generation.attention.DecodeStep`, and
   each rank attends the query over its own shard, merged by log-sum-exp over the SP group.

Everything that cannot work this way is refused before any forward runs (see
:func:`check_generation`).
"""

from __future__ import annotations

import logging

import torch

from hf_seqpar.core.mesh import find_state, unwrap_model
from hf_seqpar.core.sharding import shard_batch
from hf_seqpar.generation.attention import DecodeStep
from hf_seqpar.generation.cache import ShardedCache

logger = logging.getLogger("hf_seqpar")

__all__ = ["generate", "check_generation", "UNSUPPORTED_KWARGS"]

#: generate() arguments hf_seqpar.generate refuses, with the reason.
UNSUPPORTED_KWARGS = {
    "assistant_model": "assisted decoding verifies several draft tokens per forward",
    "prompt_lookup_num_tokens": "prompt-lookup decoding is assisted decoding (several tokens per forward)",
    "assistant_early_exit": "self-speculative decoding is assisted decoding (several tokens per forward)",
    "custom_generate": "hf_seqpar.generate is itself the decoding method",
    "cache": "hf_seqpar.generate builds its own sequence-sharded cache",
    "past_key_values": "hf_seqpar.generate builds its own sequence-sharded cache",
    "cache_implementation": "only the sequence-sharded dynamic cache is supported (no static, offloaded or "
    "quantized caches)",
    "prefill_chunk_size": "the prefill runs sequence-parallel in one pass (chunks are what SP replaces)",
    "inputs_embeds": "pass input_ids (the prefill shards them with hf_seqpar.shard_batch)",
    "negative_prompt_ids": "classifier-free guidance runs an extra unsharded forward",
    "negative_prompt_attention_mask": "classifier-free guidance runs an extra unsharded forward",
}


def _refuse(what: str, why: str) -> None:
    raise NotImplementedError(
        f"hf_seqpar.generate does not support {what}: {why}. Greedy decoding and sampling "
        "(with any logits processors and stopping criteria) are supported."
    )


def check_generation(config, model_config=None) -> None:
    """Refuse what the sharded decode cannot do, from the resolved ``GenerationConfig``.

    Args:
        config: the ``GenerationConfig`` ``generate`` resolved (defaults + arguments).
        model_config: unused; reserved for model-dependent checks.

    Raises:
        NotImplementedError: beam search, assisted decoding, static/quantized caches, prefill
            chunks, guidance, attention/hidden-state outputs.
    """
    if (config.num_beams or 1) > 1:
        _refuse(f"beam search (num_beams={config.num_beams})", "beams reorder the cache between steps")
    if config.cache_implementation is not None:
        _refuse(f"cache_implementation={config.cache_implementation!r}", UNSUPPORTED_KWARGS["cache_implementation"])
    if config.prefill_chunk_size is not None:
        _refuse(f"prefill_chunk_size={config.prefill_chunk_size}", UNSUPPORTED_KWARGS["prefill_chunk_size"])
    if config.guidance_scale not in (None, 1, 1.0):
        _refuse(f"guidance_scale={config.guidance_scale}", "classifier-free guidance runs an extra unsharded forward")
    if config.prompt_lookup_num_tokens is not None:
        _refuse("prompt-lookup decoding", UNSUPPORTED_KWARGS["prompt_lookup_num_tokens"])
    if getattr(config, "assistant_early_exit", None) is not None:
        _refuse("assistant_early_exit", UNSUPPORTED_KWARGS["assistant_early_exit"])
    if config.output_attentions:
        _refuse("output_attentions=True", "SP attention never materialises attention weights")
    if config.output_hidden_states:
        _refuse(
            "output_hidden_states=True",
            "the prompt's hidden states stay sharded over the ranks (the first "
            "step's would hold only the last prompt token)",
        )


def _check_model(state, base) -> None:
    if state is None:
        raise RuntimeError(
            f"{type(base).__name__} has no sequence parallelism: call "
            "hf_seqpar.enable_sequence_parallel(model, ...) first (or use model.generate unsharded)"
        )
    if state.strategy.shards_parameters:
        _refuse(
            f"strategy {state.strategy.name!r}",
            "it splits the parameters over the SP group (tensor "
            "parallel), so the ranks cannot decode the same token independently; enable 'ulysses', 'ring' or "
            "'hybrid' for generation",
        )
    f = state.features
    if f is not None and (f.sinks or f.softcap is not None or f.qk_head_dim != f.v_head_dim):
        _refuse(
            f"this {f.model_type} model's attention (sinks={f.sinks}, softcap={f.softcap}, value head size "
            f"{f.v_head_dim} vs {f.qk_head_dim})",
            "the decode kernel computes plain softmax attention",
        )
    text = base.config.get_text_config(decoder=True)
    layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
    window = getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None)
    if layer_types != {"full_attention"} or window is not None:
        _refuse(
            f"layers of types {sorted(layer_types)} (sliding_window={window})",
            "the sharded cache keeps every position; only full-attention models are supported",
        )


def _check_inputs(input_ids, attention_mask) -> None:
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(
            f"input_ids must be a non-empty (B, S) tensor, got "
            f"{tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__}"
        )
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}"
            )
        right = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
        if right:
            raise ValueError(
                f"rows {right} end in padding (attention_mask 0 at the last position): pad on the "
                "left for generation (tokenizer.padding_side = 'left'), as transformers requires for "
                "decoder-only models"
            )


def _prefill(model, state, cache: ShardedCache, input_ids, attention_mask, position_ids) -> None:
    """Run all prompt tokens but the last sequence-parallel, filling ``cache`` with each rank's shard."""
    bsz, seq = input_ids.shape[0], input_ids.shape[1] - 1
    if seq == 0:
        return
    batch = {"input_ids": input_ids[:, :seq]}
    if attention_mask is not None:
        batch["attention_mask"] = attention_mask[:, :seq]
    if position_ids is not None:  # generate's own positions (mask.cumsum - 1, padding at 0)
        batch["position_ids"] = position_ids[..., :seq].expand(bsz, seq)
    local = shard_batch(batch, model)
    seqpar = local["seqpar"]
    valid = seqpar.layout.shard(seqpar.valid, state.sp_rank)  # (B, L_local)
    with cache.prefilling(valid, seq):
        model(
            input_ids=local["input_ids"],
            position_ids=local["position_ids"],
            seqpar=seqpar,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )


def _decoding_method(state, streamer, synced_gpus):
    """The ``custom_generate`` callable: SP prefill, then transformers' greedy/sampling loop."""

    def decode(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        check_generation(generation_config)
        # the decode reads the sharded cache whatever the model config's use_cache (often False after training)
        generation_config.use_cache = model_kwargs["use_cache"] = True
        cache = model_kwargs["cache"]
        _check_inputs(input_ids, model_kwargs.get("attention_mask"))
        _prefill(model, state, cache, input_ids, model_kwargs.get("attention_mask"), model_kwargs.get("position_ids"))
        out = model._sample(
            input_ids,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            generation_config=generation_config,
            synced_gpus=synced_gpus,
            streamer=streamer,
            seqpar=DecodeStep(state, cache),
            **model_kwargs,
        )
        report = cache.report()
        logger.info(
            "hf_seqpar.generate: KV cache on SP rank %d: %d bytes (%.3f of the unsharded %d)",
            state.sp_rank,
            report["local_bytes"],
            report["fraction"],
            report["unsharded_bytes"],
        )
        return out

    return decode


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generation_kwargs):
    """``model.generate`` for a sequence-parallel model: SP prefill, sequence-sharded KV cache.

    Call on every rank of the SP group with the same full prompt (and the same RNG state for
    sampling, e.g. ``torch.manual_seed(s)`` everywhere); every rank returns the same result.

    Args:
        model: a model after :func:`hf_seqpar.enable_sequence_parallel` with ``ulysses``, ``ring`` or
            ``hybrid`` (any wrapper).
        input_ids: ``(B, S)`` the full prompt (left-padded when rows differ in length).
        attention_mask: optional ``(B, S)``, 1 = token, 0 = left padding.
        **generation_kwargs: what ``model.generate`` takes (``max_new_tokens``, ``do_sample``,
            ``temperature``, ``top_k``, ``top_p``, ``logits_processor``, ``stopping_criteria``,
            ``eos_token_id``, ``return_dict_in_generate``, ``output_scores``, ``output_logits``,
            ``generation_config``, ``streamer``, ...).

    Returns:
        What ``model.generate`` returns for the unsharded model: the ``(B, S + new)`` sequences, or
        a ``GenerateDecoderOnlyOutput`` with ``return_dict_in_generate=True``, whose ``cache`` is
        this rank's :class:`~hf_seqpar.generation.cache.ShardedCache` (``cache.report()`` gives
        its bytes against the unsharded cache).

    Raises:
        RuntimeError: the model has no SP.
        NotImplementedError: an unsupported mode or model (beam search, assisted decoding, static or
            quantized caches, Megatron-SP, sliding-window or sink attention, ...), before any forward.
        ValueError: malformed or right-padded inputs.
    """
    base = unwrap_model(model)
    state = find_state(base)
    _check_model(state, base)
    for key, why in UNSUPPORTED_KWARGS.items():
        if generation_kwargs.get(key) is not None:
            _refuse(f"{key}=", why)
    if generation_kwargs.get("use_cache") is False:
        _refuse("use_cache=False", "the decode reads the sharded KV cache of the prompt")
    _check_inputs(input_ids, attention_mask)
    streamer = generation_kwargs.pop("streamer", None)
    synced_gpus = bool(generation_kwargs.pop("synced_gpus", False))
    layers = base.config.get_text_config(decoder=True).num_hidden_layers
    cache = ShardedCache(layers, state.sp_size, state.sp_rank)
    return base.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        cache=cache,
        custom_generate=_decoding_method(state, streamer, synced_gpus),
        **generation_kwargs,
    )
