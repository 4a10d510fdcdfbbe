"""Rank code for the sequence-parallel log-prob primitive (hf_seqpar.core.logprobs).

Every rank builds the same model and the same batch of prompt + completion rows of different
lengths (right padding), computes the unsharded reference (full logits, log_softmax, per-row
sums) and then the SP version on its shard with ``token_logprobs`` + ``sequence_sums`` /
``gather_tokens``, and returns the relative errors of values and of every parameter gradient
(the SP gradients averaged over the ranks, as DDP does).
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from cases import TRAINER_ARGS, VOCAB, tiny_model

import hf_seqpar
from hf_seqpar.core.logits import logit_transform
from hf_seqpar.core.logprobs import gather_tokens, sequence_sums, token_logprobs

TEMPERATURE = 0.7


def preference_batch(bsz: int = 4, seq: int = 27, seed: int = 3) -> dict:
    """Rows of different lengths (right padding) with a prompt of different length per row;
    ``completion_mask`` marks the tokens that are scored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (bsz, seq), generator=g)
    lengths = [seq, seq - 6, seq - 11, seq - 3][:bsz]
    prompts = [5, 3, 9, 1][:bsz]
    mask = torch.zeros(bsz, seq, dtype=torch.long)
    completion = torch.zeros(bsz, seq, dtype=torch.long)
    for r, (n, p) in enumerate(zip(lengths, prompts)):
        mask[r, :n] = 1
        completion[r, p:n] = 1
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "completion_mask": completion}


def _reference(model, batch):
    """Unsharded per-token log-probs (B, S-1), entropies and per-row sums, from the full logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    logsm = torch.log_softmax(logits / TEMPERATURE, dim=-1)  # (B, S-1, V)
    labels = batch["input_ids"][:, 1:]
    keep = batch["completion_mask"][:, 1:].bool()
    logp = logsm.gather(-1, labels[..., None])[..., 0] * keep
    ent = -(logsm.exp() * logsm).sum(-1) * keep
    return logp, ent


def _loss(sums: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
    """A non-linear function of the per-row sums and of the per-token values (as DPO/GRPO are)."""
    w = torch.linspace(0.5, 1.5, per_token.shape[1])
    return -F.logsigmoid(sums[0::2] - sums[1::2]).mean() + (per_token.exp() * w).sum() / per_token.shape[0]


def logprob_parity(strategy: str) -> dict:
    """Relative errors of sums, gathered per-token log-probs, entropies and gradients vs unsharded."""
    batch = preference_batch()
    ref_model = tiny_model(seed=5)
    model = copy.deepcopy(ref_model)
    logp, ent = _reference(ref_model, batch)
    ref_loss = _loss(logp.sum(1), logp)
    ref_loss.backward()

    hf_seqpar.enable_sequence_parallel(model, strategy=strategy)
    state = hf_seqpar.core.mesh.find_state(model)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    local = hf_seqpar.shard_batch(
        {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}, model
    )
    hidden = model.model(
        input_ids=local["input_ids"], position_ids=local["position_ids"], seqpar=local["seqpar"]
    ).last_hidden_state
    lp, en = token_logprobs(
        hidden,
        model.lm_head,
        local["shift_labels"],
        temperature=TEMPERATURE,
        transform=logit_transform(model),
        chunk=5,
        entropy=True,
    )
    sums = sequence_sums(lp, state.sp_group, state.counter)
    layout = local["seqpar"].layout
    full_lp = gather_tokens(lp, layout, state.sp_rank, state.sp_group)[:, :-1]
    full_en = gather_tokens(en, layout, state.sp_rank, state.sp_group)[:, :-1]
    loss = _loss(sums, full_lp)
    loss.backward()
    world = dist.get_world_size()
    grad_err = 0.0
    for (_name, p), (_, q) in zip(ref_model.named_parameters(), model.named_parameters()):
        g = q.grad.clone()
        dist.all_reduce(g)
        g /= world  # DDP's mean over the ranks
        grad_err = max(grad_err, float((g - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)))
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))  # noqa: E731
    hf_seqpar.disable_sequence_parallel(model)
    return {
        "sums": rel(sums.detach(), logp.sum(1).detach()),
        "tokens": rel(full_lp.detach(), logp.detach()),
        "entropy": rel(full_en.detach(), ent.detach()),
        "loss": rel(loss.detach(), ref_loss.detach()),
        "grads": grad_err,
        "local_len": int(lp.shape[1]),
        "seq": int(batch["input_ids"].shape[1]),
    }


# ---- TRL's DPOTrainer with and without SP -------------------------------------------------------


def preference_pairs(n: int = 6, seed: int = 0) -> dict:
    """Text preference pairs over 8 letters (the byte tokenizer scores bytes): prompts of 3-9 letters,
    chosen completions that continue the prompt's motif, rejected ones random, of different lengths."""
    g = torch.Generator().manual_seed(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        motif = torch.randint(0, 8, (3,), generator=g)
        prompt = motif.repeat(3)[: int(torch.randint(3, 10, (1,), generator=g))]
        chosen = motif.repeat(6)[: int(torch.randint(4, 16, (1,), generator=g))]
        rejected = torch.randint(0, 8, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g)
        for key, value in zip(rows, (prompt, chosen, rejected)):
            rows[key].append("".join("abcdefgh"[int(i)] for i in value))
    return rows


def _shared_dataset(out_dir: str, sp: bool):
    """The pairs as an on-disk dataset that every rank opens (TRL's precompute_ref_log_probs writes its
    cache next to the dataset's files on the main process; an in-memory dataset has a temporary
    cache directory per process, so the other ranks would not find it, with or without SP)."""
    from datasets import Dataset, load_from_disk

    path = os.path.join(out_dir, "pairs")
    if not sp or dist.get_rank() == 0:
        Dataset.from_dict(preference_pairs()).save_to_disk(path)
    if sp:
        dist.barrier()
    return load_from_disk(path)


def dpo_run(
    sp: bool,
    out_dir: str,
    strategy: str = "ulysses",
    loss_type="sigmoid",
    ref: str = "model",
    order: str = "mixin_first",
    steps: int = 3,
    sp_options: dict | None = None,
    fsdp: bool = False,
    bf16: bool = False,
) -> dict:
    """``steps`` optimizer steps of DPOTrainer (batch 2, fp32, SGD); the logged history and the final
    parameters. ``ref``: ``"model"`` (an explicit, different reference model) or ``"precompute"``
    (``precompute_ref_log_probs`` with the initial policy as reference). ``fsdp``: accelerate's
    FSDP2 with the ``fsdp_config`` of ``recipes/accelerate/gpu-8.yaml`` (:func:`_fsdp2_on_cpu`);
    ``bf16``: accelerate's bf16 mixed precision (autocast under DDP, ``MixedPrecisionPolicy`` under FSDP2)."""
    if fsdp:
        with _fsdp2_on_cpu():
            return _dpo_run(sp, out_dir, strategy, loss_type, ref, order, steps, sp_options, fsdp, bf16)
    return _dpo_run(sp, out_dir, strategy, loss_type, ref, order, steps, sp_options, fsdp, bf16)


def _dpo_run(sp, out_dir, strategy, loss_type, ref, order, steps, sp_options, fsdp, bf16) -> dict:
    from cases_trainer import reset_accelerate
    from cases_trl import tiny_lm
    from trl import DPOConfig, DPOTrainer

    from hf_seqpar.core.data import byte_tokenizer

    reset_accelerate()
    args = DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=2,
        max_steps=steps,
        **TRAINER_ARGS,
        bf16=bf16,
        beta=0.5,
        loss_type=loss_type,
        max_length=None,
        precompute_ref_log_probs=ref == "precompute",
        **({"fsdp": True, "fsdp_config": gpu8_fsdp_config()} if fsdp else {}),
    )
    common = dict(
        model=_policy_from_path(out_dir, sp) if fsdp and ref == "precompute" else tiny_lm(),
        ref_model=tiny_lm(seed=1) if ref == "model" else None,
        args=args,
        train_dataset=_shared_dataset(out_dir, sp),
        processing_class=byte_tokenizer(),
    )
    if sp:
        bases = (
            (hf_seqpar.SequenceParallelMixin, DPOTrainer)
            if order == "mixin_first"
            else (DPOTrainer, hf_seqpar.SequenceParallelMixin)
        )
        bases = (_FSDPOnCPU, *bases) if fsdp else bases
        trainer = type("SPDPOTrainer", bases, {})(
            **common, sp_plugin=hf_seqpar.SequenceParallelPlugin(strategy=strategy, **(sp_options or {}))
        )
    else:
        trainer = DPOTrainer(**common)
    trainer.train()
    logs = [
        {k: v for k, v in h.items() if k not in ("epoch", "learning_rate", "step")}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    model = hf_seqpar.core.mesh.unwrap_model(trainer.model)
    params = {n: _full(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    split = None
    if sp:  # (local, full) length of the last batch each SP model saw: the rows really were split
        states = [hf_seqpar.core.mesh.find_state(m) for m in (trainer.model, trainer.ref_model) if m is not None]
        split = [(s.last_layout.local_len, s.last_layout.seq_len) for s in states]
        hf_seqpar.disable_sequence_parallel(trainer.model)
    out = {"logs": logs, "params": params, "rank": int(os.environ.get("RANK", "0")), "split": split}
    if fsdp:
        out["placement"] = _fsdp_placement(trainer)
        out["saved"] = _saved_error(trainer, os.path.join(out_dir, "saved"), params)
    return out


# ---- accelerate's FSDP2 on gloo CPU ranks --------------------------------------------------------


def gpu8_fsdp_config() -> dict:
    """The ``fsdp_config`` of ``recipes/accelerate/gpu-8.yaml`` (the documented 8-GPU DPO launch) as
    ``TrainingArguments(fsdp_config=...)``: FSDP2, full shard, transformer-layer auto wrap (the model's
    ``_no_split_modules``: ``LlamaDecoderLayer``), reshard after forward, CPU-RAM-efficient loading."""
    import pathlib

    import yaml

    path = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "gpu-8.yaml"
    return dict(yaml.safe_load(path.read_text())["fsdp_config"])


class _FSDPOnCPU:
    """Put the Trainer's Accelerator on accelerate's FSDP path on gloo CPU ranks.

    accelerate 1.16 switches its state to ``DistributedType.FSDP`` only for GPU-like distributed types
    (``AcceleratorState.__init__``: the ``MULTI_GPU, MULTI_NPU, ...`` branch); under ``MULTI_CPU`` it drops
    the ``fsdp_plugin`` the Trainer passes, ``Trainer.is_fsdp_enabled`` is False and the model is DDP-wrapped
    (checked: ``DistributedType.MULTI_CPU``, ``DistributedDataParallel``). This sets what that branch sets
    on GPUs (the state's type, also in ``PartialState``, and the plugin with its mixed-precision policy),
    so everything after it (TRL's
    ``prepare_fsdp`` of the reference, ``Accelerator._prepare_fsdp2`` of the policy, FSDP2's
    reduce-scatter and grad-norm clipping) runs as on GPUs, on CPU tensors."""

    def create_accelerator_and_postprocess(self):
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        if state.mixed_precision != "no":  # as that branch does: FSDP2's MixedPrecisionPolicy
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        self.is_fsdp_enabled = True


class _fsdp2_on_cpu:
    """Context of a :class:`_FSDPOnCPU` run: the process-wide state it changes (accelerate's shared
    state, the ``ACCELERATE_USE_FSDP`` / ``FSDP_*`` environment the Accelerator sets) is put back, so the
    pool's later cases see plain gloo ranks."""

    def __enter__(self):
        self.env = dict(os.environ)

    def __exit__(self, *exc):
        from accelerate.state import AcceleratorState, GradientState, PartialState
        from accelerate.utils import DistributedType

        os.environ.clear()
        os.environ.update(self.env)
        if PartialState._shared_state.get("distributed_type") == DistributedType.FSDP:
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return False


def _policy_from_path(out_dir: str, sp: bool):
    """``tiny_lm()`` saved and loaded back: under FSDP with ``precompute_ref_log_probs`` and no
    ``ref_model``, TRL loads its scoring reference from the policy's path (``config._name_or_path``)."""
    from cases_trl import tiny_lm
    from transformers import AutoModelForCausalLM

    path = os.path.join(out_dir, "initial")
    if not sp or dist.get_rank() == 0:
        tiny_lm().save_pretrained(path)
    if sp:
        dist.barrier()
    return AutoModelForCausalLM.from_pretrained(path)


def _saved_error(trainer, path: str, params: dict) -> float:
    """``trainer.save_model`` (the recipes' last step; FSDP's full state dict) reloaded with
    ``from_pretrained`` on every rank (under the FSDP environment: CPU-RAM-efficient loading on the
    other ranks): the largest relative difference from the trained parameters."""
    from transformers import AutoModelForCausalLM

    trainer.save_model(path)
    trainer.accelerator.wait_for_everyone()
    loaded = dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())
    return max(float((loaded[n] - p).abs().max() / p.abs().max().clamp_min(1e-12)) for n, p in params.items())


def _full(p):
    """A parameter's full value (FSDP2 parameters are sharded DTensors)."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _fsdp_placement(trainer) -> dict:
    """How FSDP2 placed the models: the policy's decoder layers and root are FSDP modules with
    sharded (DTensor) parameters; the reference is one root-only ``fully_shard`` (TRL's ``prepare_fsdp``)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    policy = hf_seqpar.core.mesh.unwrap_model(trainer.model)
    ref = trainer.ref_model
    return {
        "distributed_type": str(trainer.accelerator.distributed_type),
        "policy_root": isinstance(policy, FSDPModule),
        "policy_layers": [isinstance(layer, FSDPModule) for layer in policy.model.layers],
        "policy_sharded": all(isinstance(p, DTensor) for p in policy.parameters()),
        "ref_root": ref is not None and isinstance(ref, FSDPModule),
        "ref_layers": [] if ref is None else [isinstance(layer, FSDPModule) for layer in ref.model.layers],
        "ref_sharded": ref is not None and all(isinstance(p, DTensor) for p in ref.parameters()),
    }


def dpo_refusals(out_dir: str) -> dict:
    """The message of each DPO/TRL set-up the mixin refuses at construction (None: not refused)."""
    from cases_trainer import reset_accelerate
    from cases_trl import tiny_lm
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from hf_seqpar.core.data import byte_tokenizer

    def attempt(strategy="ulysses", **kw):
        reset_accelerate()
        args = DPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=2,
            max_steps=1,
            report_to=[],
            use_cpu=True,
            bf16=False,
            disable_tqdm=True,
            save_strategy="no",
            **kw,
        )
        cls = type("SPDPOTrainer", (hf_seqpar.SequenceParallelMixin, DPOTrainer), {})
        try:
            cls(
                model=tiny_lm(),
                ref_model=tiny_lm(seed=1),
                args=args,
                processing_class=byte_tokenizer(),
                train_dataset=Dataset.from_dict(preference_pairs(2)),
                sp_plugin=hf_seqpar.SequenceParallelPlugin(strategy=strategy),
            )
        except (ValueError, NotImplementedError) as e:
            return str(e)
        return None

    return {
        "nca_pair": attempt(loss_type="nca_pair"),
        "sync_ref_model": attempt(sync_ref_model=True),
        "megatron": attempt(strategy="megatron"),
    }
