"""Code that runs inside the ranks: tiny models, batches, and the SP-vs-unsharded comparison.

Every rank builds the same model (same seed) and the same full batch, runs the unsharded
reference on it, then the sequence-parallel model on its shard, and returns the relative
errors. The parent process asserts on them.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import hf_seqpar

VOCAB = 97

#: Training arguments every trainer-comparison case shares (SP run and one-process reference):
#: SGD at a constant learning rate 0.5 (differences show after a few steps), a log line per step,
#: nothing saved or reported, CPU ranks, seed 0 for the model's sampling and the data order.
TRAINER_ARGS = dict(
    learning_rate=0.5,
    lr_scheduler_type="constant",
    optim="sgd",
    logging_steps=1,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    seed=0,
    data_seed=0,
    disable_tqdm=True,
)


def tiny_model(
    family: str = "llama",
    heads: int = 4,
    kv_heads: int | None = None,
    attn: str = "sdpa",
    sliding_window: int | None = None,
    layers: int = 2,
    seed: int = 0,
):
    """A small random Llama-style causal LM in fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

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
    )
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common))
    return LlamaForCausalLM(LlamaConfig(**common))


def make_batch(kind: str = "plain", bsz: int = 2, seq: int = 32, seed: int = 1) -> dict:
    """A full batch of one of the shapes the parity matrix covers."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (bsz, seq), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if kind == "padding":  # row 0 left-padded, row 1 right-padded
        mask = torch.ones(bsz, seq, dtype=torch.long)
        mask[0, : seq // 5] = 0
        mask[1, seq - seq // 4 :] = 0
        batch["attention_mask"] = mask
        batch["labels"] = ids.masked_fill(mask == 0, -100)
        # the first real token of the left-padded row has no real predecessor: shard_batch drops
        # predictions made at padding positions, so the plain model must not count it either
        batch["labels"][0, seq // 5] = -100
    elif kind == "packed":  # one row of three documents of uneven length
        lengths = [seq * 2 // 5, seq // 7, seq - seq * 2 // 5 - seq // 7]
        batch = {k: v[:1] for k, v in batch.items()}
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
    elif kind == "packed_mixed":  # 2 rows, different structures: short documents (shorter than a
        # shard on 4 ranks) in row 0; in row 1 one document spanning 3+ shards between two short ones
        short = [3, 5, 4, 6, 2, 7, 5] * seq
        row0 = torch.cat([torch.arange(n) for n in short])[:seq]
        row1 = torch.cat([torch.arange(4), torch.arange(seq - 9), torch.arange(5)])
        batch["position_ids"] = torch.stack([row0, row1])
    elif kind == "tiny_docs":  # one row of many 1-3 token documents (packed into few kernel calls)
        lengths = torch.randint(1, 4, (seq,), generator=g).tolist()
        batch = {k: v[:1] for k, v in batch.items()}
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[:seq][None]
    elif kind in ("skewed", "longtail"):  # one packed row: bench's skewed / long-tailed documents
        from hf_seqpar.tools.rowbench import longtail_positions, skewed_positions

        batch = {k: v[:1] for k, v in batch.items()}
        batch["position_ids"] = skewed_positions(seq) if kind == "skewed" else longtail_positions(seq, seed)
    elif kind == "no_labels":
        del batch["labels"]
    elif kind == "labels_first_quarter":  # later ranks hold no label token at all
        batch["labels"][:, seq // 4 :] = -100
    elif kind != "plain":
        raise ValueError(kind)
    return batch


#: The parity matrix every attention strategy must pass (keyword arguments of :func:`parity`).
PARITY_CASES = {
    "mha": dict(),
    "gqa_kv_lt_sp": dict(model_kw=dict(heads=8, kv_heads=2)),
    "mqa": dict(model_kw=dict(heads=4, kv_heads=1)),
    "padding_left_right": dict(batch_kw=dict(kind="padding")),
    "packed_3_docs": dict(batch_kw=dict(kind="packed", seq=40)),
    "odd_length": dict(batch_kw=dict(seq=29)),
    "sliding_window_lt_shard": dict(model_kw=dict(family="mistral", sliding_window=5)),
    "sliding_window_packed": dict(model_kw=dict(family="mistral", sliding_window=6), batch_kw=dict(kind="packed")),
    "packed_mixed_rows_window": dict(
        model_kw=dict(family="mistral", sliding_window=7), batch_kw=dict(kind="packed_mixed", seq=48)
    ),
    "packed_mixed_rows": dict(batch_kw=dict(kind="packed_mixed", seq=45)),
    "packed_tiny_docs": dict(batch_kw=dict(kind="tiny_docs", seq=200)),
    "eager_padding": dict(model_kw=dict(attn="eager"), batch_kw=dict(kind="padding")),
    "lora": dict(lora=True, batch_kw=dict(kind="padding")),
    "grad_checkpointing": dict(checkpointing=True, batch_kw=dict(kind="packed")),
    "grad_checkpointing_reentrant": dict(checkpointing="reentrant", batch_kw=dict(kind="padding")),
    "rank_without_labels": dict(batch_kw=dict(kind="labels_first_quarter")),
    "ddp_wrapped": dict(ddp=True, batch_kw=dict(kind="packed")),
    "eval_no_grad": dict(mode="eval", batch_kw=dict(kind="padding")),
    "eval_no_labels_odd_length": dict(mode="eval", batch_kw=dict(kind="no_labels", seq=27)),
}

#: Tolerances (fp32 on CPU). The sharded model does the same arithmetic as the unsharded one up
#: to the order of a few reductions (the loss sum over ranks, the gradient average, attention
#: split into blocks merged by lse), so errors are a few float32 ulps (~1e-7 relative); the
#: bounds leave two orders of magnitude: loss 1e-5 relative, logits and every parameter gradient
#: 1e-4 relative (max abs difference over max abs reference value, per tensor).
LOSS_TOL, LOGITS_TOL, GRAD_TOL = 1e-5, 1e-4, 1e-4


def check_parity(results: list[dict]) -> None:
    """Assert every rank's errors from :func:`parity` are within the tolerances."""
    for rank, r in enumerate(results):
        if "loss" in r:
            assert r["loss"] <= LOSS_TOL, f"rank {rank}: loss rel error {r['loss']:.2e}"
        assert r["logits"] <= LOGITS_TOL, f"rank {rank}: logits rel error {r['logits']:.2e}"
        if "grad" in r:
            assert r["n_grads"] > 0
            assert r["grad"] <= GRAD_TOL, f"rank {rank}: grad of {r['grad_param']} rel error {r['grad']:.2e}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def parity(
    strategy: str = "ulysses",
    sp_size: int | None = None,
    model_kw: dict | None = None,
    batch_kw: dict | None = None,
    lora: bool = False,
    mode: str = "train",
    checkpointing=False,
    ddp: bool = False,
    options: dict | None = None,
    mesh_dims: tuple | None = None,
) -> dict:
    """Run one parity case on this rank; return the errors against the unsharded model.

    Args:
        mode: ``"train"`` (loss, logits, gradients), ``"eval"`` (eval mode under no_grad: logits, loss).
        checkpointing: False, True (``gradient_checkpointing_enable()`` as users call it) or
            ``"reentrant"``.
        ddp: wrap the SP model in ``DistributedDataParallel`` and let it average the gradients.
        mesh_dims: ``((name, size), ...)``: run on a user mesh of these named dimensions (over all
            ranks, in this order) instead of the ``("dp", "sp")`` mesh hf_seqpar builds.

    Returns:
        ``{"loss": rel, "logits": rel, "grad": worst rel, "grad_param": name, "n_grads": count}``.
    """
    model = tiny_model(**(model_kw or {}))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj", "o_proj"],
                lora_dropout=0.0,
                init_lora_weights=False,
            ),
        )
    batch = make_batch(**(batch_kw or {}))
    if checkpointing == "reentrant":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    elif checkpointing:
        model.gradient_checkpointing_enable()
    mesh = None
    if mesh_dims is not None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", tuple(s for _, s in mesh_dims), mesh_dim_names=tuple(n for n, _ in mesh_dims))
    enable = lambda m: hf_seqpar.enable_sequence_parallel(
        m,
        strategy,
        sp_size,
        mesh=mesh,  # noqa: E731
        **(options or {}),
    )
    wrap = torch.nn.parallel.DistributedDataParallel if ddp else None
    reference, ref, local, out, result = run_pair(model, batch, mode, enable, wrap)
    if mode == "train":
        world = dist.get_world_size()

        def averaged(name, grad):  # what DDP/FSDP do: average over all ranks
            if not ddp:
                grad = grad.clone()
                dist.all_reduce(grad)
                grad /= world
            return grad

        result.update(worst_grad_error(model, reference, averaged))
    lay = local["seqpar"].layout
    result["layout"] = (lay.kind, lay.multiple // lay.sp_size)  # the layout run, chunks per rank
    hf_seqpar.disable_sequence_parallel(model)
    return result


def run_pair(model, batch: dict, mode: str, enable, wrap=None):
    """Run an unsharded copy of ``model`` and the SP model (``enable(model)``, optionally wrapped
    by ``wrap``) on the same full batch; backward on both in ``"train"`` mode.

    Returns:
        ``(reference, ref_out, local_batch, sp_out, errors)`` with the loss and gathered-logits
        errors (logits compared where ``attention_mask`` is 1).
    """
    model.train(mode == "train")
    reference = copy.deepcopy(model)
    grad_ctx = torch.enable_grad() if mode == "train" else torch.no_grad()
    with grad_ctx:
        ref = reference(**batch, use_cache=False)
        if mode == "train":
            ref.loss.backward()
        enable(model)
        runner = wrap(model) if wrap is not None else model
        local = hf_seqpar.shard_batch(batch, runner)
        out = runner(**local)
        if mode == "train":
            out.loss.backward()
    assert out.loss is None or torch.isfinite(out.loss), out.loss
    logits = hf_seqpar.gather_sequence(out.logits, model)
    assert type(logits) is torch.Tensor and logits.shape == ref.logits.shape, (type(logits), logits.shape)
    valid = batch.get("attention_mask", torch.ones(batch["input_ids"].shape)).bool()
    errors = {"logits": _rel(logits[valid], ref.logits[valid].detach())}
    if ref.loss is not None:
        errors["loss"] = abs(float(out.loss) - float(ref.loss)) / abs(float(ref.loss))
    return reference, ref, local, out, errors


def worst_grad_error(model, reference, view) -> dict:
    """The largest relative gradient error over the trainable parameters, each SP gradient seen
    through ``view(name, grad)`` (averaging, gathering) before the comparison."""
    worst, worst_name, count = 0.0, None, 0
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad is not None, f"no gradient for {name}"
        err = _rel(view(name, p.grad), ref_params[name].grad)
        count += 1
        if err >= worst:
            worst, worst_name = err, name
    return {"grad": worst, "grad_param": worst_name, "n_grads": count}


def expect_error(fn, *args, **kwargs) -> str:
    """Call ``fn`` and return ``"ExceptionType: message"``; raise if it did not raise."""
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"{getattr(fn, '__name__', fn)} did not raise")


def ulysses_traffic() -> dict:
    """Forward+backward bytes of Ulysses with GQA, against ``(2 h_q + 2 h_kv') N/P D b (P-1)/P``
    per layer per direction (``h_kv'`` after the kv replication Ulysses needs)."""
    from hf_seqpar.strategies.ulysses import kv_replication

    heads, kv_heads, layers = 8, 2, 2
    model = tiny_model(heads=heads, kv_heads=kv_heads, layers=layers)
    hf_seqpar.enable_sequence_parallel(model, count_comm=True)
    state = hf_seqpar.find_state(model)
    batch = make_batch(seq=37)
    local = hf_seqpar.shard_batch(batch, model)
    model(**local).loss.backward()
    p = state.sp_size
    bsz, n_local = local["input_ids"].shape
    head_dim = model.config.hidden_size // heads
    kv_eff = kv_heads * kv_replication(heads, kv_heads, p)
    per_layer = (2 * heads + 2 * kv_eff) * bsz * n_local * head_dim * 4 * (p - 1) // p
    by_layer = state.counter.by_layer
    measured = state.counter.by_op["all_to_all.fwd"] + state.counter.by_op["all_to_all.bwd"]
    per_layer_ok = all(
        by_layer[(i, d)] == per_layer for i in range(layers) for d in ("all_to_all.fwd", "all_to_all.bwd")
    )
    hf_seqpar.disable_sequence_parallel(model)
    return {"measured": measured, "theory": 2 * layers * per_layer, "per_layer_equal": per_layer_ok}


def bad_inputs() -> dict:
    """Each bad input on a live process group: the message it raises (collected per rank)."""
    from transformers import AttentionInterface, BloomConfig, BloomForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rank = dist.get_rank()
    out = {}
    out["sp_not_dividing_world"] = expect_error(hf_seqpar.enable_sequence_parallel, tiny_model(), sp_size=3)
    out["heads_not_divisible"] = expect_error(hf_seqpar.enable_sequence_parallel, tiny_model(heads=3))
    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2))
    out["not_through_registry"] = expect_error(hf_seqpar.enable_sequence_parallel, bloom)
    AttentionInterface.register("my_custom_attention", sdpa_attention_forward)
    out["unknown_attn_impl"] = expect_error(hf_seqpar.enable_sequence_parallel, tiny_model(attn="my_custom_attention"))
    out["unknown_strategy"] = expect_error(hf_seqpar.enable_sequence_parallel, tiny_model(), "spiral")
    out["unknown_option"] = expect_error(hf_seqpar.enable_sequence_parallel, tiny_model(), "ulysses", ring_size=2)
    out["shard_without_sp"] = expect_error(hf_seqpar.shard_batch, make_batch(), tiny_model())

    model = hf_seqpar.enable_sequence_parallel(tiny_model(), check_batch="always")
    out["empty_sequence"] = expect_error(
        hf_seqpar.shard_batch, {"input_ids": torch.zeros(2, 0, dtype=torch.long)}, model
    )
    out["unknown_batch_key"] = expect_error(
        hf_seqpar.shard_batch, {**make_batch(), "pixel_values": torch.ones(2, 3)}, model
    )
    out["forward_without_shard_batch"] = expect_error(model, **make_batch())
    hf_seqpar.shard_batch(make_batch(seed=1), model)  # identical batches pass
    out["different_batches"] = expect_error(hf_seqpar.shard_batch, make_batch(seed=1 + rank), model)
    out["different_lengths"] = expect_error(hf_seqpar.shard_batch, make_batch(seq=30 + rank), model)
    out["enable_twice_differently"] = expect_error(hf_seqpar.enable_sequence_parallel, model, sp_size=1)
    out["enable_twice_same_is_noop"] = hf_seqpar.enable_sequence_parallel(model, check_batch="always") is model

    # check_batch="first": only the first call pays for the all-gather
    first = hf_seqpar.enable_sequence_parallel(tiny_model(), check_batch="first")
    out["first_mismatch"] = expect_error(hf_seqpar.shard_batch, make_batch(seed=5 + rank), first)
    hf_seqpar.disable_sequence_parallel(first)
    out["disabled_restores"] = first.config._attn_implementation == "sdpa" and hf_seqpar.find_state(first) is None
    return out


def ring_traffic(strategy: str = "ring", options: dict | None = None, batch_kw: dict | None = None) -> dict:
    """Ring bytes per layer from the counter, with the theory: forward ``(R-1)`` x local K/V;
    backward ``(R-1)`` x local K/V plus ``R`` x fp32 dK/dV accumulators (``R``: ring size), on
    ``make_batch(**batch_kw)`` (default: 41 plain tokens)."""
    heads, kv_heads, layers = 4, 2, 2
    model = tiny_model(heads=heads, kv_heads=kv_heads, layers=layers)
    hf_seqpar.enable_sequence_parallel(model, strategy, count_comm=True, **(options or {}))
    state = hf_seqpar.find_state(model)
    batch = make_batch(**(batch_kw or dict(seq=41)))
    local = hf_seqpar.shard_batch(batch, model)
    # positions follow the layout: every rank holds the global position of each of its tokens
    assert torch.equal(
        local["position_ids"],
        batch["seqpar"].layout.shard(batch["seqpar"].positions, state.sp_rank)
        if "seqpar" in batch
        else local["seqpar"].layout.shard(local["seqpar"].positions, state.sp_rank),
    )
    model(**local).loss.backward()
    u = getattr(state.strategy, "ulysses_size", 1)
    ring = state.sp_size // u
    bsz, n_local = local["input_ids"].shape
    head_dim = model.config.hidden_size // heads
    kv_local = kv_heads * (u if kv_heads < u else 1) // u  # kv heads per rank after the all-to-all
    kv_bytes = 2 * bsz * kv_local * (n_local * u) * head_dim * 4  # K and V of this rank's ring shard
    by_layer = state.counter.by_layer
    result = {
        "layout": local["seqpar"].layout.kind,
        "fwd": [by_layer[(i, "ring_kv.fwd")] for i in range(layers)],
        "fwd_theory": (ring - 1) * kv_bytes,
        "bwd": [by_layer[(i, "ring_kv.bwd")] + by_layer[(i, "ring_dkv.bwd")] for i in range(layers)],
        "bwd_theory": (ring - 1) * kv_bytes + (ring * kv_bytes if ring > 1 else 0),
    }
    hf_seqpar.disable_sequence_parallel(model)
    return result


def measured_vs_theory(
    strategy: str, seq: int = 64, options: dict | None = None, heads: int = 4, kv_heads: int = 2
) -> dict:
    """Saved activation bytes and counted traffic of one step, next to :mod:`hf_seqpar.tools.theory`."""
    from hf_seqpar.tools.bench import _backward_meter, saved_activation_bytes
    from hf_seqpar.tools.theory import ModelShape, activation_bytes, comm_bytes

    model = tiny_model(heads=heads, kv_heads=kv_heads)
    shape = ModelShape.from_config(model.config)
    batch = make_batch(seq=seq)
    if strategy == "none":
        return {
            "measured_act": saved_activation_bytes(model, {**batch, "use_cache": False}),
            "theory_act": activation_bytes(None, shape, seq, batch=2),
        }
    hf_seqpar.enable_sequence_parallel(model, strategy, count_comm=True, **(options or {}))
    state = hf_seqpar.find_state(model)
    local = hf_seqpar.shard_batch(batch, model)
    padded, p = local["seqpar"].layout.padded_len, state.sp_size
    u = (options or {}).get("ulysses_size")
    act = saved_activation_bytes(model, local)
    state.counter.reset()
    loss = model(**local).loss
    with _backward_meter(model, strategy):  # Megatron-SP's DTensor collectives in backward
        loss.backward()
    out = {
        "measured_act": act,
        "theory_act": activation_bytes(strategy, shape, padded, p, batch=2, ulysses_size=u),
        "measured_comm": state.counter.total,
        "theory_comm": comm_bytes(strategy, shape, padded, p, batch=2, ulysses_size=u)["total"],
    }
    hf_seqpar.disable_sequence_parallel(model)
    return out


def mesh_without_sp() -> str:
    """The error ``enable_sequence_parallel`` raises for a user mesh with no ``"sp"`` dimension."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("cp",))
    try:
        hf_seqpar.enable_sequence_parallel(tiny_model(), "ulysses", mesh=mesh)
    except ValueError as e:
        return str(e)
    return "no error"


def unsharded_generation(strategy: str = "ulysses") -> dict:
    """``hf_seqpar.unsharded`` inside training: model A takes an SP step, generates inside the block,
    takes another SP step; model B (same seed) takes the two steps with nothing between. Inside the
    block A must be the plain model (generation and logits equal an unsharded copy with A's weights,
    bit for bit: the same code on the same weights), and after it A must be B, bit for bit."""
    from hf_seqpar.core.mesh import find_state

    def step(model, batch):
        model(**hf_seqpar.shard_batch(batch, model)).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)  # what DDP does: the mean over ranks
                    p -= 0.1 * p.grad / dist.get_world_size()
                    p.grad = None

    a, b = tiny_model(), tiny_model()
    for m in (a, b):
        hf_seqpar.enable_sequence_parallel(m, strategy)
    state = find_state(a)
    batch1, batch2 = make_batch(seed=3), make_batch(seed=4)
    step(a, batch1)
    step(b, batch1)
    prompt = make_batch(bsz=1, seq=8, seed=5)["input_ids"]
    out = {}
    with hf_seqpar.unsharded(a) as plain:
        ref = tiny_model()
        ref.load_state_dict(plain.state_dict())
        plain.eval(), ref.eval()
        kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        out["generate_equal"] = torch.equal(plain.generate(prompt, **kw), ref.generate(prompt, **kw))
        full = make_batch(seed=6)
        with torch.no_grad():
            mine, theirs = plain(**full), ref(**full)
        out["loss_equal"] = torch.equal(mine.loss, theirs.loss)
        out["logits_equal"] = torch.equal(mine.logits, theirs.logits)
        out["attn_inside"] = plain.config._attn_implementation
        out["shard_batch_inside"] = expect_error(hf_seqpar.shard_batch, full, plain)
        plain.train()
    out["same_state_after"] = find_state(a) is state
    out["attn_after"] = a.config._attn_implementation
    step(a, batch2)
    step(b, batch2)
    out["params_equal_after"] = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    hf_seqpar.disable_sequence_parallel(b)
    out["not_enabled"] = expect_error(lambda: hf_seqpar.unsharded(b).__enter__())
    return out


def unsharded_refuses_megatron() -> str:
    model = hf_seqpar.enable_sequence_parallel(tiny_model(), "megatron")
    return expect_error(lambda: hf_seqpar.unsharded(model).__enter__())


def inexact_ring(strategy: str, model) -> None:
    """A perturbation for ``hf-seqpar selftest``'s own test: ring attention off by 0.1% (a test-only
    hook argument of :func:`hf_seqpar.tools.cpucheck.check_strategies`, no switch in the package)."""
    if strategy == "ring":
        strat = hf_seqpar.find_state(model).strategy
        exact = strat.attention
        strat.attention = lambda *args, **kwargs: exact(*args, **kwargs) * 1.001


def shared_config() -> dict:
    """Two models built from one config object; SP enabled on the first only. The second's plain
    forward must stay the plain model's, the first stays exact, disabling restores the first's
    own config object everywhere, a save carries no hf_seqpar name, and a model built from the SP
    model's config is fixed by the advice its error gives (``disable_sequence_parallel``)."""
    import json
    import tempfile

    from transformers import LlamaForCausalLM

    m1 = tiny_model()
    config = m1.config
    torch.manual_seed(5)
    m2 = LlamaForCausalLM(config)
    ids = make_batch(seq=16)["input_ids"]
    with torch.no_grad():
        m2_before, m1_before = m2(input_ids=ids).logits, m1(input_ids=ids).logits
    hf_seqpar.enable_sequence_parallel(m1, "ulysses")
    out = {"shared_impl": config._attn_implementation, "m2_impl": m2.config._attn_implementation}
    with torch.no_grad():
        out["m2_plain"] = _rel(m2(input_ids=ids).logits, m2_before)
        local = hf_seqpar.shard_batch({"input_ids": ids}, m1)
        out["m1_sp"] = _rel(hf_seqpar.gather_sequence(m1(**local).logits, m1), m1_before)
        m3 = LlamaForCausalLM(m1.config)  # from the SP model's own config
        out["m3_error"] = expect_error(m3, input_ids=ids)
        hf_seqpar.disable_sequence_parallel(m3)
        out["m3_fixed"] = tuple(m3(input_ids=ids).logits.shape)
    with tempfile.TemporaryDirectory() as d:
        if dist.get_rank() == 0:
            m1.save_pretrained(d)
            with open(f"{d}/config.json") as f:
                out["saved_seqpar_names"] = [k for k, v in json.load(f).items() if "seqpar" in f"{k}{v}"]
    hf_seqpar.disable_sequence_parallel(m1)
    out["restored"] = m1.config is config and all(
        m.__dict__.get("config", config) is config
        for m in m1.modules()
        if isinstance(m.__dict__.get("config"), type(config))
    )
    out["impl_after"] = m1.config._attn_implementation
    with torch.no_grad():
        out["m1_after"] = _rel(m1(input_ids=ids).logits, m1_before)
    return out


def gather_earlier_batch(strategy: str = "ulysses") -> dict:
    """gather_sequence of an earlier batch's logits after a later batch sharded to the same local
    length (31 then 32 tokens): it used to take the latest layout (32 positions under Ulysses, 29
    with 2 real tokens lost under ring). Model outputs remember their batch; a tensor that is no
    model output needs its batch named (else: an error, never a guess); a named batch that is not
    the tensor's is refused."""
    model = tiny_model()
    reference = copy.deepcopy(model)
    hf_seqpar.enable_sequence_parallel(model, strategy)
    b1, b2 = make_batch(seq=31, seed=1), make_batch(seq=32, seed=2)
    gather = hf_seqpar.gather_sequence
    with torch.no_grad():
        ref1 = reference(input_ids=b1["input_ids"]).logits
        l1 = hf_seqpar.shard_batch(b1, model)
        out1 = model(**l1).logits
        l2 = hf_seqpar.shard_batch(b2, model)
        out2 = model(**l2).logits
        ref2 = reference(input_ids=b2["input_ids"]).logits
        result = {"same_local_len": out1.shape[1] == out2.shape[1]}
        for name, full, ref in (
            ("default", gather(out1, model), ref1),
            ("latest", gather(out2, model), ref2),
            ("named", gather(out1.detach(), model, batch=l1), ref1),
            ("seqpar", gather(out1.detach() * 1, model, batch=l1["seqpar"]), ref1),
            ("batch_as_model", gather(out1.detach(), l1), ref1),
        ):
            result[name] = _rel(full, ref) if full.shape == ref.shape else f"shape {tuple(full.shape)}"
        result["unnamed_derived"] = expect_error(gather, out1.detach(), model)
        result["wrong_batch"] = expect_error(gather, out1, model, batch=l2)
        result["wrong_length"] = expect_error(
            gather, out1.detach(), model, batch=hf_seqpar.shard_batch(make_batch(seq=64), model)
        )
    hf_seqpar.disable_sequence_parallel(model)
    return result


def check_gather_earlier_batch(results: list[dict]) -> None:
    """Assert :func:`gather_earlier_batch`'s results: every gather exact, every mismatch refused."""
    for r in results:
        assert r["same_local_len"] is True
        for name in ("default", "latest", "named", "seqpar", "batch_as_model"):
            assert isinstance(r[name], float) and r[name] <= LOGITS_TOL, (name, r[name])
        assert r["unnamed_derived"].startswith("ValueError:") and "batch=local" in r["unnamed_derived"], r
        assert r["wrong_batch"].startswith("ValueError:") and "31" in r["wrong_batch"] and "32" in r["wrong_batch"], r
        assert r["wrong_length"].startswith("ValueError:") and "batch=local" in r["wrong_length"], r
