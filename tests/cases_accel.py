"""Rank-side cases for the Accelerate plugin and the Trainer: SP training against an unsharded
reference computed on every rank in the same case (same seed, same global batches)."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from cases import TRAINER_ARGS, VOCAB, tiny_model

import hf_seqpar


def rows(n: int, seq: int = 23, seed: int = 3) -> list[dict]:
    """``n`` full rows: random tokens, two packed documents (position_ids restart), some ignored labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (seq,), generator=g)
        cut = 4 + i % (seq - 8)
        labels = ids.clone()
        labels[cut : cut + 3] = -100
        pos = torch.cat([torch.arange(cut), torch.arange(seq - cut)])
        out.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return out


class Stream(torch.utils.data.IterableDataset):
    """A torch iterable dataset over fixed rows: a stream without ``len``."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        yield from self.rows


def _fresh_accelerator(**kwargs):
    os.environ["ACCELERATE_USE_CPU"] = "true"  # the pool's ranks are CPU ranks of an existing gloo group
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(**kwargs)


def _params_err(model, reference) -> float:
    ref = dict(hf_seqpar.core.mesh.unwrap_model(reference).named_parameters())
    worst = 0.0
    from hf_seqpar.tp import full_tensor

    base = hf_seqpar.core.mesh.unwrap_model(model)
    for name, p in base.named_parameters():
        r = ref[name]
        p = full_tensor(base, name, p.detach())  # Megatron-SP: the whole tensor (a collective)
        worst = max(worst, float((p.detach() - r.detach()).abs().max() / r.detach().abs().max().clamp_min(1e-12)))
    return worst


def accelerate_parity(
    sp_size: int | None = None,
    steps: int = 3,
    grad_accum: int = 2,
    batch_size: int = 2,
    plugin_kw: dict | None = None,
    parallelism_config: dict | None = None,
    mixed_precision: str | None = None,
    stream: bool = False,
) -> dict:
    """Train ``steps`` optimizer steps through ``prepare_sequence_parallel`` and the same steps on an
    unsharded copy (DDP over ``dp`` replicas emulated exactly: mean of the replicas' gradients).

    ``parallelism_config``: fields of an accelerate ``ParallelismConfig`` put on the Accelerator's
    state (what a GPU run gets from ``Accelerator(parallelism_config=...)``; on CPU accelerate
    refuses them at construction, so they are set afterwards); ``sp_size`` is then the expected size.

    With ``mixed_precision="bf16"`` the Accelerator runs the SP model under bf16 autocast (fp32
    weights); the reference is trained twice, in fp32 and under the same autocast, so the SP
    error can be judged against the unsharded model's own bf16 error.

    Returns:
        ``{"param": worst relative parameter error, "loss": worst relative loss error, "steps": n,
        "strategy": the strategy that ran, "sp_size": its SP degree}`` against the fp32 reference,
        plus ``"param_lowp"``/``"loss_lowp"`` (the autocast reference against the fp32 one) with
        ``mixed_precision``, or ``{"error": message}`` when ``prepare_sequence_parallel`` raises
        ValueError.
    """
    accelerator = _fresh_accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision)
    if parallelism_config is not None:
        from accelerate.parallelism_config import ParallelismConfig

        accelerator.state.parallelism_config = ParallelismConfig(**parallelism_config)
    world = dist.get_world_size()
    dp = world // (sp_size or world)
    data = rows(steps * grad_accum * dp * batch_size)
    model = tiny_model(heads=4, kv_heads=2)
    initial = copy.deepcopy(model)
    # SGD: parameters move by exactly lr x gradient, so parameter errors are gradient errors
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    # stream: the rows as a torch IterableDataset (the shape of datasets' streaming=True data)
    loader = torch.utils.data.DataLoader(Stream(data) if stream else data, batch_size=batch_size, shuffle=False)
    plugin = hf_seqpar.SequenceParallelPlugin(
        **{"sp_size": None if parallelism_config else sp_size, **(plugin_kw or {})}
    )
    try:
        model, opt, sp_loader = hf_seqpar.prepare_sequence_parallel(accelerator, plugin, model, opt, loader)
    except ValueError as e:
        return {"error": str(e)}
    state = hf_seqpar.find_state(model)
    if not stream:
        assert len(sp_loader) == len(loader) // dp, (len(sp_loader), len(loader), dp)

    losses = []
    for batch in sp_loader:
        assert batch["input_ids"].shape[1] < 23  # it really is a sequence shard
        with accelerator.accumulate(model):
            out = model(**batch)
            accelerator.backward(out.loss)
            opt.step()
            opt.zero_grad()
        losses.append(out.loss.item())

    # reference: global batch j of the loader goes to replica j % dp (accelerate's batch sharding)
    full = list(loader)
    dp_rank = hf_seqpar.find_state(model).mesh.get_local_rank("dp")

    def train_reference(autocast: bool):
        reference = copy.deepcopy(initial)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
        ref_losses = []
        for step in range(steps):
            for micro in range(grad_accum):
                for r in range(dp):
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        out = reference(**full[(step * grad_accum + micro) * dp + r], use_cache=False)
                    (out.loss / (grad_accum * dp)).backward()
                    if r == dp_rank:
                        ref_losses.append(out.loss.item())
            ref_opt.step()
            ref_opt.zero_grad()
        return reference, ref_losses

    def loss_err(a, b):
        return max(abs(x - y) / abs(y) for x, y in zip(a, b))

    reference, ref_losses = train_reference(False)
    result = {
        "param": _params_err(model, reference),
        "loss": loss_err(losses, ref_losses),
        "steps": len(losses) // grad_accum,
        "strategy": state.strategy.name,
        "sp_size": state.sp_size,
    }
    if mixed_precision:
        low, low_losses = train_reference(True)
        result.update(param_lowp=_params_err(low, reference), loss_lowp=loss_err(low_losses, ref_losses))
    hf_seqpar.disable_sequence_parallel(model)
    return result


def fsdp2_parity(steps: int = 3, offload: bool = False) -> dict:
    """SP model sharded with torch's FSDP2 ``fully_shard`` (what accelerate's FSDP2 path applies)
    against the unsharded model on the same global batches. ``offload``: the states in host memory
    (``CPUOffloadPolicy``, accelerate's ``fsdp_offload_params: true``) with every memory feature of
    the longest-run recipes (checkpointing, offloaded checkpoints, MLP tiles, chunked loss)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    model = tiny_model(heads=4, kv_heads=2)
    reference = copy.deepcopy(model)
    features = dict(gradient_checkpointing=True, offload_checkpoints=True, mlp_tiles=2) if offload else {}
    plugin = hf_seqpar.SequenceParallelPlugin(loss_chunk_size=5, **features)
    hf_seqpar.integrations.accelerate.prepare_model(model, plugin)
    policy = dict(offload_policy=CPUOffloadPolicy(pin_memory=False)) if offload else {}  # (no CUDA to pin for)
    for layer in model.model.layers:
        fully_shard(layer, **policy)
    fully_shard(model, **policy)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    data = rows(steps * 2)
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    for batch in loader:
        out = model(**hf_seqpar.shard_batch(batch, model))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        ref = reference(**batch, use_cache=False)
        ref.loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    ref = dict(reference.named_parameters())
    worst = max(float((full[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in ref)
    return {"param": worst}


def trainer_parity(
    steps: int = 3,
    grad_accum: int = 2,
    batch_size: int = 1,
    sp_size: int | None = None,
    lora: bool = False,
    strategy: str = "ulysses",
) -> dict:
    """``SequenceParallelTrainer`` train + evaluate vs the same optimisation on the unsharded model
    with the HF Trainer's multi-device semantics: each optimizer step's loss is the summed token
    losses of all micro-batches of all data-parallel replicas over their label-token count
    (``average_tokens_across_devices``); eval loss is the mean over eval steps of the same."""
    import tempfile

    from datasets import Dataset
    from transformers import TrainingArguments

    _fresh_accelerator()
    world = dist.get_world_size()
    dp = world // (sp_size or world)
    data = rows(steps * grad_accum * batch_size * dp)
    eval_rows = rows(4 * dp, seed=7)
    to_ds = lambda rs: Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rs])  # noqa: E731
    model = tiny_model(heads=4, kv_heads=2)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
        )
    reference = copy.deepcopy(model)
    out_dir = tempfile.mkdtemp(prefix="sp_trainer_")
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=2,
        gradient_accumulation_steps=grad_accum,
        max_steps=steps,
        **TRAINER_ARGS,
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        remove_unused_columns=False,
    )
    trainer = hf_seqpar.SequenceParallelTrainer(
        model=model,
        args=args,
        train_dataset=to_ds(data),
        eval_dataset=to_ds(eval_rows),
        sp_plugin=hf_seqpar.SequenceParallelPlugin(strategy=strategy, sp_size=sp_size, loss_chunk_size=7),
    )
    trainer.train()
    metrics = trainer.evaluate()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    def stack(rs):
        return {k: torch.stack([r[k] for r in rs]) for k in rs[0]}

    def weighted_loss(batches, backward: bool) -> float:
        n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        total = 0.0
        for b in batches:
            loss = reference(**b, use_cache=False, num_items_in_batch=n).loss
            if backward:
                loss.backward()
            total += float(loss)
        return total

    # reference: the Trainer's seeded shuffle; loader batch j goes to data-parallel replica j % dp
    order = list(torch.utils.data.RandomSampler(data, generator=torch.Generator().manual_seed(0)))
    loader_batches = [stack([data[i] for i in order[j : j + batch_size]]) for j in range(0, len(order), batch_size)]
    opt = torch.optim.SGD(reference.parameters(), lr=0.5)
    ref_logged = []
    for step in range(steps):
        ref_logged.append(weighted_loss(loader_batches[step * grad_accum * dp : (step + 1) * grad_accum * dp], True))
        opt.step()
        opt.zero_grad()
    reference.eval()
    eval_batches = [stack(eval_rows[i : i + 2]) for i in range(0, len(eval_rows), 2)]
    with torch.no_grad():
        ev = [weighted_loss(eval_batches[e : e + dp], False) for e in range(0, len(eval_batches), dp)]
    trainer.save_model(out_dir)
    trained = hf_seqpar.core.mesh.unwrap_model(trainer.model)
    result = {
        "param": _params_err(trained, reference),
        "logged": [abs(a - b) / b for a, b in zip(logged, ref_logged)] if len(logged) == steps else None,
        "eval": abs(metrics["eval_loss"] - sum(ev) / len(ev)) / (sum(ev) / len(ev)),
        "out_dir": out_dir,
        "strategy": trainer.sp_state.strategy.name,
    }
    dist.barrier()
    if dist.get_rank() == 0:  # the checkpoint loads with plain transformers / PEFT and equals the trained weights
        if lora:
            from peft import PeftModel

            loaded = PeftModel.from_pretrained(tiny_model(heads=4, kv_heads=2), out_dir)
        else:
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(out_dir)
        result["reload"] = _params_err(loaded, reference)
    hf_seqpar.disable_sequence_parallel(trainer.model)
    return result
