"""Rank-side cases of the feature matrices: the memory features with every strategy and model
family (logit-modifying configs, MoE), and mixed precision (bf16 autocast over fp32 weights, and
bf16 weights) against the unsharded model, computed on every rank in the same case."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from cases import VOCAB, _rel, make_batch

import hf_seqpar
from hf_seqpar.integrations.accelerate import SequenceParallelPlugin, prepare_model
from hf_seqpar.tp import full_tensor


class BiasedLogitsLlama(__import__("transformers").LlamaForCausalLM):
    """A causal LM whose forward adds a constant to its logits: a logit transformation the
    chunked loss does not know, so it must refuse it."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        model_kw = {k: v for k, v in kwargs.items() if k not in ("num_items_in_batch", "shift_labels")}
        outputs = self.model(input_ids=input_ids, **model_kw)
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states)
        logits = logits + 0.5
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def matrix_model(
    family: str = "llama", heads: int = 4, kv_heads: int = 2, layers: int = 2, seed: int = 0, dtype=torch.float32
):
    """A tiny causal LM of ``family``: Llama, or one whose logits or loss differ from Llama's
    (Granite ``logits_scaling``, Cohere ``logit_scale``, Gemma-2 ``final_logit_softcapping``,
    Mixtral / Qwen3-MoE with the router auxiliary loss)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=16 * heads,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        attn_implementation="sdpa",
        max_position_embeddings=512,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    moe = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)
    builders = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common)),
        "biased_logits": lambda: BiasedLogitsLlama(tf.LlamaConfig(**common)),
        "granite": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(logits_scaling=3.0, **common)),
        "cohere": lambda: tf.CohereForCausalLM(tf.CohereConfig(logit_scale=0.3, **common)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(
            tf.Gemma2Config(
                final_logit_softcapping=2.0,
                attn_logit_softcapping=None,
                head_dim=16,
                sliding_window=4096,
                **{**common, "attn_implementation": "eager"},
            )
        ),
        "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4, **moe, **common)),
        "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(
            tf.Qwen3MoeConfig(
                num_experts=4,
                moe_intermediate_size=32,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                head_dim=16,
                norm_topk_prob=True,
                **moe,
                **common,
            )
        ),
    }
    model = builders[family]()
    return model.to(dtype)


def _grad_view(model, strategy: str):
    world = dist.get_world_size()

    def view(name, grad):
        if strategy == "megatron":  # full_tensor: the unsharded gradient, no averaging
            return full_tensor(model, name, grad)
        grad = grad.clone()
        dist.all_reduce(grad)  # what DDP does: the average over ranks
        return grad / world

    return view


def _errors(model, reference, out, ref, batch, strategy: str) -> dict:
    """Relative errors of loss, gathered logits (when the model returns them), aux loss and the
    worst parameter gradient (SP gradients averaged as DDP would, or gathered for Megatron-SP)."""
    errors = {"loss": abs(float(out.loss) - float(ref.loss)) / abs(float(ref.loss))}
    if out.logits is not None:
        logits = hf_seqpar.gather_sequence(out.logits, model)
        valid = batch.get("attention_mask", torch.ones(batch["input_ids"].shape)).bool()
        errors["logits"] = _rel(logits[valid].float(), ref.logits[valid].detach().float())
    if getattr(ref, "aux_loss", None) is not None:
        errors["aux"] = abs(float(out.aux_loss) - float(ref.aux_loss)) / abs(float(ref.aux_loss))
    view = _grad_view(model, strategy)
    ref_params = dict(reference.named_parameters())
    worst, worst_name, n = 0.0, None, 0
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        err = _rel(view(name, p.grad).float(), ref_params[name].grad.float())
        n += 1
        if err >= worst:
            worst, worst_name = err, name
    errors.update(grad=worst, grad_param=worst_name, n_grads=n)
    return errors


def feature_parity(
    strategy: str = "ulysses",
    sp_size: int | None = None,
    family: str = "llama",
    features: dict | None = None,
    batch_kw: dict | None = None,
    ulysses_size: int | None = None,
    model_kw: dict | None = None,
) -> dict:
    """The memory features (``features``: plugin fields such as ``loss_chunk_size``, ``mlp_tiles``,
    ``gradient_checkpointing``, ``offload_checkpoints``) applied through the plugin's
    :func:`~hf_seqpar.integrations.accelerate.prepare_model` on ``strategy``, against the plain unsharded model.

    Returns:
        Relative errors ``{"loss", "logits"?, "aux"?, "grad", "grad_param", "n_grads"}``.
    """
    model = matrix_model(family, **(model_kw or {}))
    model.train()
    reference = copy.deepcopy(model)
    batch = make_batch(**(batch_kw or {}))
    ref = reference(**batch, use_cache=False)
    ref.loss.backward()
    plugin = SequenceParallelPlugin(strategy=strategy, sp_size=sp_size, ulysses_size=ulysses_size, **(features or {}))
    prepare_model(model, plugin)
    out = model(**hf_seqpar.shard_batch(batch, model))
    out.loss.backward()
    errors = _errors(model, reference, out, ref, batch, strategy)
    hf_seqpar.disable_sequence_parallel(model)
    return errors


def plugin_refusal(strategy: str, family: str = "llama", **features) -> str:
    """The message :func:`prepare_model` raises for an unsupported combination (no forward runs)."""
    from cases import expect_error

    model = matrix_model(family)
    message = expect_error(prepare_model, model, SequenceParallelPlugin(strategy=strategy, **features))
    assert hf_seqpar.find_state(model) is None, "a refused model must be left without SP"
    return message


# ---- mixed precision ----------------------------------------------------------------------


def _run(model, batch, precision: str, sp: bool, strategy: str = "ulysses"):
    """Forward + backward in ``precision`` (``"fp32"``/``"fp64"``: plain; ``"autocast"``: bf16
    autocast over the model's weights; ``"bf16"``: the weights are bf16 already)."""
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast" else torch.autocast("cpu", enabled=False)
    )
    with ctx:
        out = model(**(hf_seqpar.shard_batch(batch, model) if sp else {**batch, "use_cache": False}))
    out.loss.backward()
    loss = float(out.loss)
    logits = out.logits
    if sp and logits is not None:
        logits = hf_seqpar.gather_sequence(logits, model)
    view = _grad_view(model, strategy) if sp else (lambda name, g: g)
    grads = {n: view(n, p.grad).double() for n, p in model.named_parameters()}
    return loss, (logits.detach().double() if logits is not None else None), grads


def mixed_precision_parity(
    strategy: str = "ulysses",
    precision: str = "autocast",
    sp_size: int | None = None,
    ulysses_size: int | None = None,
    family: str = "llama",
    batch_kw: dict | None = None,
    features: dict | None = None,
) -> dict:
    """SP in low precision against the fp64 unsharded model, next to the unsharded model's own
    low-precision error.

    Three runs of the same weights and batch: the unsharded model in fp64 (the truth), the
    unsharded model in ``precision`` (its own rounding error: what any bf16 training accepts), and
    the SP model in ``precision``. Returns, for the loss, the logits (where valid) and every
    parameter gradient, the pair ``(sp_err, ref_err)`` of errors against fp64 (absolute for the
    loss, max-abs relative to the fp64 tensor's max for logits and gradients).
    """
    base = matrix_model(family)
    base.train()
    batch = make_batch(**(batch_kw or {}))
    valid = batch.get("attention_mask", torch.ones(batch["input_ids"].shape)).bool()
    truth = _run(copy.deepcopy(base).double(), batch, "fp64", sp=False)
    low = copy.deepcopy(base).to(torch.bfloat16 if precision == "bf16" else torch.float32)
    sp_model = copy.deepcopy(low)
    ref = _run(low, batch, precision, sp=False)
    plugin = SequenceParallelPlugin(strategy=strategy, sp_size=sp_size, ulysses_size=ulysses_size, **(features or {}))
    prepare_model(sp_model, plugin)
    sp = _run(sp_model, batch, precision, sp=True, strategy=strategy)
    hf_seqpar.disable_sequence_parallel(sp_model)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    out = {"loss": (abs(sp[0] - truth[0]), abs(ref[0] - truth[0])), "loss_value": truth[0]}
    if sp[1] is not None:  # the chunked loss returns no logits
        out["logits"] = (rel(sp[1][valid], truth[1][valid]), rel(ref[1][valid], truth[1][valid]))
    out["grads"] = {n: (rel(sp[2][n], g), rel(ref[2][n], g)) for n, g in truth[2].items()}
    return out
