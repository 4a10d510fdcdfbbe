"""Model families shipped by transformers, built tiny, and the SP-vs-unsharded check run on them.

Every causal-LM family transformers lists in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` is built from
its own config class with small sizes (:func:`tiny_config`); :func:`family_check` then enables a
strategy and either compares loss, logits and every gradient with the unsharded model on a plain
and a packed batch, or records the refusal ``enable_sequence_parallel`` raised. Code here runs
inside the ranks of ``tests/harness.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from cases import VOCAB, make_batch, run_pair

import hf_seqpar

#: Small sizes, applied to every config attribute of these names that the family's config has.
#: Heads 4 / kv heads 2 split over 2 ranks (GQA); head size 16 (MLA: q/k 8 + 8, v 12).
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    max_window_layers=2,
    # mixture of experts
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    moe_num_experts=4,
    moe_k=2,
    num_shared_experts=1,
    expert_intermediate_size=32,
    # multi-head latent attention
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=12,
    rotary_dim=8,
    # windows and chunks shorter than the test batches, so they act
    sliding_window=6,
    attention_chunk_size=8,
    # other spellings of the sizes
    n_embd=64,
    n_layer=2,
    n_head=4,
    n_positions=256,
    d_model=64,
    num_layers=2,
    n_inner=64,
    ffn_dim=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    # misc
    use_cache=False,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    attention_dropout=0.0,
    hidden_dropout=0.0,
    dropout=0.0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)
#: Families whose tiny model the matrix does not build, and why.
NOT_BUILT = {
    "phi4_multimodal": "its config builds the full-size audio and vision towers (minutes per model on CPU)",
    "phimoe": "its router samples experts at random in training (sparsemixer), so two runs never agree",
}
#: One layer of each kind when the family interleaves attention kinds.
LAYERS = 2


def causal_lm_families() -> list[str]:
    """Every model type transformers maps to a causal-LM class, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def causal_lm_class(model_type: str):
    """The causal-LM class transformers maps ``model_type`` to (not instantiated)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[CONFIG_MAPPING[model_type]]


def through_registry(model_type: str) -> bool:
    """Whether the family routes attention through transformers' AttentionInterface (the class
    attribute ``enable_sequence_parallel`` checks; families without it are refused)."""
    return bool(getattr(causal_lm_class(model_type), "_supports_attention_backend", False))


def _layer_types(default: list) -> list:
    kinds = list(dict.fromkeys(default))  # first appearance order
    return (kinds * LAYERS)[:LAYERS] if len(kinds) <= LAYERS else kinds


def tiny_config(model_type: str, **overrides):
    """The family's config class with :data:`SIZES` applied to the attributes it has."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    text = default.get_text_config()
    kw = {k: v for k, v in SIZES.items() if hasattr(text, k)}
    if "qk_rope_head_dim" in kw:  # MLA: head_dim is the rotary part; keys are per query head
        kw.update({k: v for k, v in (("head_dim", kw["qk_rope_head_dim"]), ("num_key_value_heads", 4)) if k in kw})
    if getattr(text, "layer_types", None):
        kw["layer_types"] = _layer_types(list(text.layer_types))
        kw["num_hidden_layers"] = len(kw["layer_types"])
    for key in ("mlp_layer_types", "moe_layer_freq"):
        if isinstance(getattr(text, key, None), list):
            kw[key] = (list(text.get(key) if hasattr(text, "get") else getattr(text, key)) * 2)[
                : kw.get("num_hidden_layers", LAYERS)
            ]
    for key, value in text.to_dict().items():  # no randomness: both runs must compute the same network
        random = "dropout" in key or "pdrop" in key or "jitter" in key  # MoE router jitter is random too
        if random and isinstance(value, float) and value > 0 and key not in kw:
            kw[key] = 0.0
    kw.update(overrides)
    config = type(text)(**kw)
    config._attn_implementation_internal = None
    return config


def tiny_family_model(model_type: str, attn: str | None = None, seed: int = 0, **overrides):
    """A tiny fp32 causal LM of ``model_type`` (``sdpa`` when the family supports it, else eager)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    if attn is None:
        attn = "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"
    model.set_attn_implementation(attn)
    return model


def _batches() -> dict:
    return {"plain": make_batch("plain", seq=24), "packed": make_batch("packed", seq=30)}


def parity_on(model, batch: dict, strategy: str, options: dict | None = None) -> dict:
    """Loss, logits and worst gradient error of ``strategy`` against the unsharded ``model``."""
    model.zero_grad(set_to_none=True)
    enable = lambda m: hf_seqpar.enable_sequence_parallel(m, strategy, **(options or {}))  # noqa: E731
    reference, _, _, _, errors = run_pair(model, batch, "train", enable)
    ref_params = dict(reference.named_parameters())
    # A gradient that is zero in exact arithmetic (a key bias: softmax ignores a constant added to
    # every score of a row) is float noise in both runs; it is measured against 1e-3 of the
    # model's largest gradient instead of its own size.
    floor = 1e-3 * max(float(p.grad.abs().max()) for p in reference.parameters() if p.grad is not None)
    worst, worst_name, count = 0.0, None, 0
    for name, p in model.named_parameters():
        ref_grad = ref_params[name].grad
        if ref_grad is None:  # a parameter the loss does not use (e.g. an unused bias)
            assert p.grad is None or not bool(p.grad.any()), f"{name}: gradient under SP only"
            continue
        assert p.grad is not None, f"no gradient for {name}"
        grad = p.grad.clone()
        dist.all_reduce(grad)  # what DDP/FSDP do: average over all ranks
        diff = (grad / dist.get_world_size() - ref_grad).abs().max()
        err = float(diff / max(float(ref_grad.abs().max()), floor))
        count += 1
        if err >= worst:
            worst, worst_name = err, name
    errors.update(grad=worst, grad_param=worst_name, n_grads=count)
    hf_seqpar.disable_sequence_parallel(model)
    model.zero_grad(set_to_none=True)
    return errors


def family_check(model_type: str, strategies=("ulysses", "ring"), **overrides) -> dict:
    """For each strategy: ``{"refused": message}`` when ``enable_sequence_parallel`` refuses the
    family, else ``{"plain": errors, "packed": errors}`` (see :func:`parity_on`), where a batch
    ``shard_batch`` refuses up front gives ``{"refused_batch": message}`` instead of errors.

    A tiny model that cannot be built, or an unsharded forward that fails, is reported as
    ``{"build_error": ...}`` (a problem of the test's configuration, not of hf_seqpar).
    """
    if model_type in NOT_BUILT:
        return {"build_error": NOT_BUILT[model_type]}
    try:
        model = tiny_family_model(model_type, **overrides)
        batches = _batches()
        with torch.no_grad():
            model(**batches["plain"], use_cache=False)
    except Exception as e:  # noqa: BLE001
        return {"build_error": f"{type(e).__name__}: {e}"[:300]}
    out = {}
    for strategy in strategies:
        try:
            hf_seqpar.enable_sequence_parallel(model, strategy)
        except (TypeError, ValueError, NotImplementedError) as e:
            out[strategy] = {"refused": f"{type(e).__name__}: {e}"}
            continue
        out[strategy] = {}
        for kind, batch in batches.items():
            try:
                hf_seqpar.shard_batch(batch, model)
            except ValueError as e:  # refused before any forward or collective
                out[strategy][kind] = {"refused_batch": f"{type(e).__name__}: {e}"}
                continue
            finally:
                hf_seqpar.disable_sequence_parallel(model)
                hf_seqpar.enable_sequence_parallel(model, strategy)
        hf_seqpar.disable_sequence_parallel(model)
        for kind, batch in batches.items():
            if kind in out[strategy]:
                continue
            try:
                out[strategy][kind] = parity_on(model, batch, strategy)
            except Exception as e:  # noqa: BLE001 - the matrix reports it (every rank fails alike here)
                hf_seqpar.disable_sequence_parallel(model)
                out[strategy][kind] = {"crash": f"{type(e).__name__}: {e}"[:500]}
    return out


def parity_cases(model_factory, strategy: str, batches: dict, options: dict | None = None) -> dict:
    """:func:`parity_on` for each named batch, on a fresh model from ``model_factory()``."""
    return {kind: parity_on(model_factory(), batch, strategy, options) for kind, batch in batches.items()}


def refusal(model, strategy: str, **options) -> str:
    """The message ``enable_sequence_parallel`` raises for ``model`` (the model is left unchanged)."""
    try:
        hf_seqpar.enable_sequence_parallel(model, strategy, **options)
    except NotImplementedError as e:
        assert hf_seqpar.find_state(model) is None, "a refused model must be left as it was"
        return str(e)
    hf_seqpar.disable_sequence_parallel(model)
    raise AssertionError(f"{strategy} accepted the model")


def mask_and_restarting_positions() -> dict:
    """Item: ``attention_mask`` plus ``position_ids`` that restart inside the real tokens."""
    from cases import expect_error, tiny_model

    import hf_seqpar.core.sharding as sharding

    calls = []
    real_gather = sharding.all_gather_object_fingerprints
    sharding.all_gather_object_fingerprints = lambda *a, **k: calls.append(1) or real_gather(*a, **k)
    try:
        out = {}
        model = hf_seqpar.enable_sequence_parallel(tiny_model(), check_batch="always")
        packed = make_batch("packed", seq=30)
        ones = dict(packed, attention_mask=torch.ones_like(packed["input_ids"]))
        out["ones"] = expect_error(hf_seqpar.shard_batch, ones, model)
        with_pad = dict(ones, attention_mask=ones["attention_mask"].clone())
        with_pad["attention_mask"][:, -3:] = 0
        out["padding"] = expect_error(hf_seqpar.shard_batch, with_pad, model)
        out["collectives_before_refusal"] = len(calls)
        hf_seqpar.disable_sequence_parallel(model)
    finally:
        sharding.all_gather_object_fingerprints = real_gather
    # the two readings really differ in transformers: with the mask, documents attend to each other
    ref = tiny_model()
    with torch.no_grad():
        out["transformers_mask_vs_no_mask"] = float((ref(**ones).logits - ref(**packed).logits).abs().max())
    # the recommended fix (drop the mask) is exact against transformers' document separation
    for strategy in ("ulysses", "ring"):
        out[f"{strategy}_without_mask"] = parity_on(tiny_model(), packed, strategy)
        # a mask whose real tokens are one run means the same in both: accepted and exact
        left = make_batch("padding", seq=30)
        mask = left["attention_mask"]
        left["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0)
        out[f"{strategy}_left_padding_cumsum_positions"] = parity_on(tiny_model(), left, strategy)
    return out


def _structure_batches() -> dict:
    return {
        "plain": make_batch("plain", seq=24),
        "packed": make_batch("packed", seq=30),
        "padding": make_batch("padding", seq=26),
    }


def gpt_oss_sinks() -> dict:
    """GPT-OSS: Ulysses exact with the sinks of the local heads (kv heads 2 and 1, the latter
    replicated for the all-to-all); ring and hybrid refused at enable time; packed documents
    refused by ``shard_batch`` (transformers' GPT-OSS does not separate them)."""
    from cases import expect_error

    out = {}
    batches = _structure_batches()
    packed = batches.pop("packed")  # GPT-OSS builds its mask without position_ids: no documents
    for kv in (2, 1):
        factory = lambda kv=kv: tiny_family_model("gpt_oss", num_key_value_heads=kv)  # noqa: E731
        out[f"ulysses_kv{kv}"] = parity_cases(factory, "ulysses", batches)
    model = hf_seqpar.enable_sequence_parallel(tiny_family_model("gpt_oss"), "ulysses")
    out["packed"] = expect_error(hf_seqpar.shard_batch, packed, model)
    out["ring"] = refusal(tiny_family_model("gpt_oss"), "ring")
    out["hybrid"] = refusal(tiny_family_model("gpt_oss"), "hybrid")
    return out


def mla() -> dict:
    """DeepSeek-V3 (multi-head latent attention, v_head_dim 12 != qk_head_dim 16): Ulysses exact,
    ring refused at enable time."""
    factory = lambda: tiny_family_model("deepseek_v3")  # noqa: E731
    model = factory()
    from hf_seqpar.core.features import attention_features

    f = attention_features(model)
    return {
        "dims": (f.qk_head_dim, f.v_head_dim),
        "ulysses": parity_cases(factory, "ulysses", _structure_batches()),
        "ring": refusal(model, "ring"),
    }


def gemma3_bidirectional() -> dict:
    """Gemma3 with ``use_bidirectional_attention=True`` (window 6 < shard, sliding and full
    layers): Ulysses and ring exact on plain, packed and padded batches."""
    factory = lambda: tiny_family_model("gemma3_text", use_bidirectional_attention=True)  # noqa: E731
    model = factory()
    return {
        "is_causal": [m.is_causal for m in model.modules() if hasattr(m, "is_causal")],
        "layer_types": list(model.config.layer_types),
        "window": model.config.sliding_window,
        "ulysses": parity_cases(factory, "ulysses", _structure_batches()),
        "ring": parity_cases(factory, "ring", _structure_batches()),
    }


def within_tolerance(errors: dict) -> bool:
    """The errors of :func:`parity_on` are within ``cases.check_parity``'s tolerances."""
    from cases import GRAD_TOL, LOGITS_TOL, LOSS_TOL

    return (
        errors.get("loss", 0.0) <= LOSS_TOL
        and errors["logits"] <= LOGITS_TOL
        and errors["n_grads"] > 0
        and errors["grad"] <= GRAD_TOL
    )


def _reason(message: str) -> str:
    """A short table reason for a refusal message."""
    if "does not dispatch attention through" in message:
        return "attention bypasses transformers' attention registry"
    if "mixes tokens outside attention" in message:
        return "mixes tokens outside attention: " + message.split(", in ", 1)[1].split(" (", 1)[0].replace("'", "")
    if "kernels have no " in message:
        return "ring kernels have no " + message.split("kernels have no ", 1)[1].split(". Use", 1)[0]
    if "builds attention masks of its own" in message:
        return "builds attention masks of its own inside the attention layer"
    if "does not pass keyword arguments on" in message:
        return "does not pass keyword arguments on to its attention"
    if "chunked local attention" in message:
        return "chunked local attention (attention_chunk_size)"
    if "derives position ids from input_ids" in message:
        return "derives position ids from input_ids (RoBERTa-style offset)"
    if "without position_ids" in message:
        return "transformers does not separate its packed documents"
    return message.split(". ", 1)[0][:160]


def verdict(entry: dict) -> tuple[bool, str]:
    """``(ok, text)`` for one strategy's entry of :func:`family_check`: ok when the family is
    refused at enable time, or every batch is exact or refused up front by ``shard_batch``."""
    if "refused" in entry:
        return True, "refused: " + _reason(entry["refused"])
    parts = []
    for kind, e in entry.items():
        if "crash" in e:
            return False, f"CRASH on the {kind} batch: {e['crash'][:200]}"
        if "refused_batch" in e:
            parts.append(f"{kind} batch refused ({_reason(e['refused_batch'])})")
        elif within_tolerance(e):
            parts.append(f"{kind} exact")
        else:
            return False, f"WRONG on the {kind} batch: {e}"
    return True, ", ".join(parts)


def _family_check_quiet(model_type: str) -> dict:
    """:func:`family_check` without transformers' config warnings."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return family_check(model_type)
