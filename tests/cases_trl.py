"""TRL's SFTTrainer with and without sequence parallelism on the same data and initial weights.

``sft_run(mode, sp=False)`` in the test process is the reference (one process, stock SFTTrainer);
``sft_run(mode, sp=True)`` on every rank of a pool is SFTTrainer + :class:`hf_seqpar.SequenceParallelMixin`.
"""

from __future__ import annotations

import os

import torch
from cases import TRAINER_ARGS

import hf_seqpar

#: SFTConfig options of each batch shape TRL produces.
MODES = {
    "bfd": dict(packing=True),  # best-fit packing, padding-free rows
    "bfd_split": dict(packing=True, packing_strategy="bfd_split"),
    "wrapped": dict(packing=True, packing_strategy="wrapped"),  # concatenated and cut, attention_mask of ones
    "padding_free": dict(padding_free=True, max_length=None),  # one flattened row per batch
    "padding": dict(),  # right padding, attention_mask
}


def documents(n: int = 40, seed: int = 0) -> list[list[int]]:
    """Token documents of 4-27 tokens over an 8-token alphabet, each a repeated random motif
    (a tiny model learns to predict some of them, so the token accuracy is not zero)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        motif = torch.randint(0, 8, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        length = int(torch.randint(4, 28, (1,), generator=g))
        docs.append(motif.repeat(length // len(motif) + 1)[:length].tolist())
    return docs


def tiny_lm(seed: int = 0):
    """A small Llama over the byte tokenizer's 258 tokens, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=258,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=256,
            eos_token_id=257,
            bos_token_id=None,
            use_cache=False,
        )
    )


def sft_run(
    mode: str,
    sp: bool,
    out_dir: str,
    order: str = "mixin_first",
    steps: int = 3,
    lora: bool = False,
    grad_accum: int = 1,
) -> dict:
    """Train ``steps`` optimizer steps with SFTTrainer; return the logged history and the final
    parameters. ``sp``: the SequenceParallelMixin subclass in MRO ``order``
    (``mixin_first`` = ``(SequenceParallelMixin, SFTTrainer)``, else the reverse)."""
    from cases_trainer import reset_accelerate
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from hf_seqpar.core.data import byte_tokenizer

    reset_accelerate()
    kw = {"max_length": 40, **MODES[mode]}  # a mode may override max_length (padding_free: None)
    args = SFTConfig(
        output_dir=out_dir,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=grad_accum,
        max_steps=steps,
        **TRAINER_ARGS,
        bf16=False,
        **kw,
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    common = dict(
        model=tiny_lm(),
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": documents()}),
        processing_class=byte_tokenizer(),
        peft_config=peft_config,
    )
    if sp:
        bases = (
            (hf_seqpar.SequenceParallelMixin, SFTTrainer)
            if order == "mixin_first"
            else (SFTTrainer, hf_seqpar.SequenceParallelMixin)
        )
        trainer = type("SPSFTTrainer", bases, {})(**common, sp_plugin=hf_seqpar.SequenceParallelPlugin())
    else:
        trainer = SFTTrainer(**common)
    batch = next(iter(trainer.get_train_dataloader()))
    forwards = []  # decoder forwards during training (TRL's fused head runs the decoder once per forward)
    base = hf_seqpar.core.mesh.unwrap_model(trainer.model)
    decoder = (base.get_base_model() if hasattr(base, "get_base_model") else base).model
    hook = decoder.register_forward_pre_hook(lambda module, args: forwards.append(1))
    trainer.train()
    hook.remove()
    logs = [
        {k: v for k, v in h.items() if k in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens")}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    model = hf_seqpar.core.mesh.unwrap_model(trainer.model)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if sp:
        hf_seqpar.disable_sequence_parallel(trainer.model)
    return {
        "logs": logs,
        "params": params,
        "forwards": len(forwards),
        "keys": sorted(batch),
        "shape": tuple(batch["input_ids"].shape),
        "rank": int(os.environ.get("RANK", "0")),
    }
