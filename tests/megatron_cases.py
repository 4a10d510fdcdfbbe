"""Megatron-SP code that runs inside the ranks: tiny models of each family, and the comparison
of the tensor-parallel model with the unsharded one.

Gradient semantics compared here (see hf_seqpar.strategies.megatron and hf_seqpar.tp): on every rank, for every
parameter, ``full_tensor(grad)`` (all-gathered shards, or summed ``Partial`` contributions, fused
rows laid back out) equals the unsharded model's gradient, with no averaging over the SP
group; with ``dp > 1`` the gradients are first averaged over the data-parallel replicas only.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from cases import VOCAB, _rel, make_batch, run_pair, worst_grad_error

import hf_seqpar
from hf_seqpar.tp import average_gradients_over_dp, counting, full_tensor


def family_model(
    family: str = "llama",
    heads: int = 4,
    kv_heads: int | None = None,
    attn: str = "sdpa",
    sliding_window: int | None = None,
    layers: int = 2,
    tie: bool = False,
    seed: int = 0,
):
    """A small random causal LM of ``family`` in fp32, with non-trivial norm weights."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=16 * heads,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        attn_implementation=attn,
        max_position_embeddings=512,
        use_cache=False,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(sliding_window=sliding_window, **common))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(
            tf.Qwen2Config(sliding_window=sliding_window, use_sliding_window=sliding_window is not None, **common)
        )
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=16, **common))
    elif family == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common))
    else:
        raise ValueError(family)
    with torch.no_grad():  # norms start at ones: perturb them so their gradients are checked for real
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model


def megatron_parity(
    sp_size: int | None = None,
    model_kw: dict | None = None,
    batch_kw: dict | None = None,
    mode: str = "train",
    checkpointing: bool = False,
    mesh_dims: tuple | None = None,
) -> dict:
    """Run one Megatron-SP parity case on this rank; errors against the unsharded model
    (``mesh_dims``: a user mesh of these ``(name, size)`` dimensions, as in ``cases.parity``).

    Returns:
        ``{"loss", "logits", "grad", "grad_param", "n_grads", "dtensor_params"}``.
    """
    model = family_model(**(model_kw or {}))
    batch = make_batch(**(batch_kw or {}))
    if checkpointing:
        model.gradient_checkpointing_enable()
    mesh = None
    if mesh_dims is not None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", tuple(s for _, s in mesh_dims), mesh_dim_names=tuple(n for n, _ in mesh_dims))
    reference, ref, local, out, result = run_pair(
        model, batch, mode, lambda m: hf_seqpar.enable_sequence_parallel(m, "megatron", sp_size, mesh=mesh)
    )
    # no rank holds full-sequence x full-vocab logits: only its (B, S_pad / T, V) shard
    assert type(out.logits) is torch.Tensor and out.logits.shape == (*local["input_ids"].shape, VOCAB), out.logits.shape
    layout = hf_seqpar.find_state(model).last_layout
    assert out.logits.shape[1] == layout.padded_len // layout.sp_size, layout
    assert layout.sp_size == 1 or out.logits.shape[1] < batch["input_ids"].shape[1], layout
    result["dtensor_params"] = sum(isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters())
    if mode == "train":
        average_gradients_over_dp(model)
        result.update(worst_grad_error(model, reference, lambda name, grad: full_tensor(model, name, grad)))
    hf_seqpar.disable_sequence_parallel(model)
    return result


def megatron_traffic(layers: int = 2, seq: int = 37) -> dict:
    """Bytes of the DTensor collectives per layer, forward and backward, measured by the meter,
    against 2 all-gathers + 2 reduce-scatters of the local activations ``(B, S/T, h)`` (fp32)."""
    model = family_model(heads=8, kv_heads=4, layers=layers)
    hf_seqpar.enable_sequence_parallel(model, "megatron", count_comm=True)
    state = hf_seqpar.find_state(model)
    local = hf_seqpar.shard_batch(make_batch(seq=seq), model)
    out = model(**local)
    fwd = dict(state.counter.by_layer), dict(state.counter.calls)
    with counting(model):
        out.loss.backward()
    p = state.sp_size
    bsz, n_local = local["input_ids"].shape
    local_bytes = bsz * n_local * model.config.hidden_size * 4
    by_layer, calls = state.counter.by_layer, state.counter.calls
    result = {
        "theory_per_op": 2 * local_bytes * (p - 1),  # two collectives of each kind per layer
        "fwd_ag": [by_layer[(i, "tp_all_gather_into_tensor.fwd")] for i in range(layers)],
        "fwd_rs": [by_layer[(i, "tp_reduce_scatter_tensor.fwd")] for i in range(layers)],
        "bwd_ag": [by_layer[(i, "tp_all_gather_into_tensor.bwd")] for i in range(layers)],
        "bwd_rs": [by_layer[(i, "tp_reduce_scatter_tensor.bwd")] for i in range(layers)],
        "fwd_calls": {k: v for k, v in fwd[1].items() if k.startswith("tp_")},
        "fwd_other": {k: v for k, v in fwd[0].items() if k[1].startswith("tp_") and k[0] is None},
        "calls": {k: v for k, v in calls.items() if k.startswith("tp_")},
        "layers": layers,
    }
    hf_seqpar.disable_sequence_parallel(model)
    return result


def save_reload(path: str, family: str = "phi3", kv_heads: int | None = None) -> dict:
    """Enable Megatron-SP, take a training step's gradient (weights unchanged), save with
    ``save_pretrained``; rank 0 reloads with plain transformers and compares logits with the
    original model. Also checks that ``disable_sequence_parallel`` gives back plain parameters."""
    from transformers import AutoModelForCausalLM

    model = family_model(family, kv_heads=kv_heads, tie=family == "llama")
    reference = copy.deepcopy(model)
    batch = make_batch()
    hf_seqpar.enable_sequence_parallel(model, "megatron")
    model(**hf_seqpar.shard_batch(batch, model)).loss.backward()
    rank = dist.get_rank()
    model.save_pretrained(path, is_main_process=rank == 0)  # every rank: gathering is a collective
    dist.barrier()
    result = {}
    if rank == 0:
        plain = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
        with torch.no_grad():
            result["reloaded_logits"] = _rel(plain(**batch).logits, reference(**batch).logits)
        result["files"] = sorted(os.listdir(path))
    hf_seqpar.disable_sequence_parallel(model)
    params = dict(model.named_parameters())
    result["plain_after_disable"] = not any(isinstance(p, torch.distributed.tensor.DTensor) for p in params.values())
    result["same_names"] = sorted(params) == sorted(dict(reference.named_parameters()))
    with torch.no_grad():
        result["disabled_logits"] = _rel(model(**batch).logits, reference(**batch).logits)
    result["tied"] = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    result["hooks_left"] = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    # enabling again after disabling works (parallelize_module's once-only flag was cleared)
    hf_seqpar.enable_sequence_parallel(model, "megatron")
    local = hf_seqpar.shard_batch(batch, model)
    with torch.no_grad():
        again = hf_seqpar.gather_sequence(model(**local).logits, model)
        result["reenabled_logits"] = _rel(again, reference(**batch).logits)
    hf_seqpar.disable_sequence_parallel(model)
    return result


def megatron_bad_inputs() -> dict:
    """The message each bad Megatron input raises (before any change to the model)."""
    from cases import expect_error
    from transformers import GPT2Config, GPT2LMHeadModel

    out = {}
    model = family_model(heads=3)
    out["heads_not_divisible"] = expect_error(hf_seqpar.enable_sequence_parallel, model, "megatron")
    out["untouched_after_error"] = hf_seqpar.find_state(model) is None and not any(
        isinstance(p, torch.distributed.tensor.DTensor) for p in model.parameters()
    )
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, attn_implementation="sdpa"))
    out["unknown_family"] = expect_error(hf_seqpar.enable_sequence_parallel, gpt2, "megatron")
    out["phi3_kv_not_divisible"] = expect_error(
        hf_seqpar.enable_sequence_parallel, family_model("phi3", heads=4, kv_heads=1), "megatron"
    )
    out["unknown_option"] = expect_error(hf_seqpar.enable_sequence_parallel, family_model(), "megatron", tp=2)
    odd_mlp = family_model()
    odd_mlp.config.intermediate_size = 63  # only the config is read by the check
    out["intermediate_not_divisible"] = expect_error(hf_seqpar.enable_sequence_parallel, odd_mlp, "megatron")
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(family_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    out["lora_wrapped"] = expect_error(hf_seqpar.enable_sequence_parallel, lora, "megatron")
    base = lora.get_base_model()
    out["lora_untouched_after_error"] = (
        hf_seqpar.find_state(lora) is None
        and not any(isinstance(p, torch.distributed.tensor.DTensor) for p in lora.parameters())
        and (base.config._attn_implementation == "sdpa")
    )
    return out


def megatron_training_steps(
    steps: int = 3,
    family: str = "qwen3",
    kv_heads: int = 1,
    sp_size: int | None = None,
    optimizer: str = "sgd",
    clip: float | None = 0.5,
) -> dict:
    """A few AdamW steps (with gradient clipping) on the Megatron-SP model and on the unsharded
    one; the parameters must stay equal. Checks that optimizers handle the ``Partial`` gradients
    of replicated parameters and the sharded ones as the unsharded gradients."""
    model = family_model(family, heads=4, kv_heads=kv_heads)
    reference = copy.deepcopy(model)
    hf_seqpar.enable_sequence_parallel(model, "megatron", sp_size)
    make = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
    }[optimizer]
    opts = [make(m.parameters()) for m in (model, reference)]
    for step in range(steps):
        batch = make_batch(kind="padding", seed=10 + step)
        for m, opt in zip((model, reference), opts):
            opt.zero_grad()
            if m is model:
                m(**hf_seqpar.shard_batch(batch, m)).loss.backward()
                average_gradients_over_dp(m)
            else:
                m(**batch, use_cache=False).loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            opt.step()
    ref_params = dict(reference.named_parameters())
    worst = max(_rel(full_tensor(model, n, p.detach()), ref_params[n].detach()) for n, p in model.named_parameters())
    hf_seqpar.disable_sequence_parallel(model)
    return {"param": worst}


def replicas_follow_rank0() -> dict:
    """Ranks that hold different weights end up with SP rank 0's everywhere (sharded ones are
    scattered from rank 0 by torch's styles, replicated ones broadcast by hf_seqpar)."""
    model = family_model()
    with torch.no_grad():
        model.model.norm.weight.add_(dist.get_rank())  # this rank's own, different replica
        model.lm_head.weight.add_(dist.get_rank())
    hf_seqpar.enable_sequence_parallel(model, "megatron")
    mine = [model.model.norm.weight.to_local().clone(), model.lm_head.weight.to_local().clone()]
    hf_seqpar.disable_sequence_parallel(model)
    rank0 = family_model()
    return {
        "equal_rank0": all(torch.equal(a, b) for a, b in zip(mine, [rank0.model.norm.weight, rank0.lm_head.weight]))
    }


def forward_without_shard_batch() -> dict:
    """Megatron-SP fed a plain batch (no ``shard_batch``): a plain forward and ``generate()``
    must raise the "no seqpar= batch structure" error before any layer runs, and the model must
    stay usable with a sharded batch afterwards."""
    from cases import expect_error

    model = family_model()
    reference = copy.deepcopy(model)
    hf_seqpar.enable_sequence_parallel(model, "megatron")
    ids = make_batch(seq=16)["input_ids"]
    out = {
        "forward": expect_error(model, input_ids=ids),
        "generate": expect_error(model.generate, input_ids=ids, max_new_tokens=2, do_sample=False),
    }
    local = hf_seqpar.shard_batch({"input_ids": ids}, model)
    with torch.no_grad():
        logits = hf_seqpar.gather_sequence(model(**local).logits, model)
        out["logits_after"] = _rel(logits, reference(input_ids=ids).logits)
    hf_seqpar.disable_sequence_parallel(model)
    return out
