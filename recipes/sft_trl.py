"""Supervised fine-tuning with TRL's SFTTrainer and sequence parallelism.

    accelerate launch --config_file recipes/accelerate/cpu.yaml --num_processes 2 \\
        recipes/sft_trl.py --max-steps 4 --output-dir out/sft

The trainer is ``class SPSFTTrainer(hf_seqpar.SequenceParallelMixin, trl.SFTTrainer)``: TRL
prepares and packs the data (``--packing bfd`` by default: best-fit packed, padding-free rows
whose position_ids restart at every document), hf_seqpar splits every row over the SP ranks, and
TRL's loss and metrics (loss, grad_norm, mean_token_accuracy, entropy, num_tokens) are those of
the one-process SFTTrainer. ``--lora`` trains a LoRA adapter instead of the full model.

Data: ``--dataset`` is a local .jsonl/.json/.parquet/.csv/.txt file with a ``text`` column, or
``messages`` (chat, needs a tokenizer with a chat template), or ``prompt``/``completion``
(loss on the completion only). Without ``--dataset``/``--model`` it runs offline: Python's
standard-library sources as text, a byte-level tokenizer (``hf_seqpar.core.data.byte_tokenizer``) and
a tiny Llama-style model built from a config.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sysconfig

import torch

PACKING = ("bfd", "bfd_split", "wrapped", "none")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sp-config", default=None, help="SP plugin YAML (default: $HF_SEQPAR_CONFIG, else Ulysses over all ranks)")
    p.add_argument("--model", default=None, help="model name or path (default: a tiny Llama built from a config)")
    p.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: the model's; byte-level without --model)")
    p.add_argument("--dataset", default=None, help="local data file (default: the standard library's sources)")
    p.add_argument("--max-docs", type=int, default=200, help="documents of the offline default")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per packed row (per example without packing)")
    p.add_argument("--packing", choices=PACKING, default="bfd", help="TRL packing strategy, or none")
    p.add_argument("--padding-free", action="store_true", help="with --packing none: one flattened row per batch")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (r=--lora-r on the attention and MLP projections)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2, help="rows per data-parallel replica and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default on GPUs; fp32 on CPU)")
    p.add_argument("--logging-steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="out/sft-trl")
    args = p.parse_args(argv)
    if args.padding_free and args.packing != "none":
        p.error("--padding-free is for --packing none (the packing strategies are padding-free already)")
    for name in ("max_length", "batch_size", "grad_accum", "max_steps", "max_docs", "lora_r", "logging_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.dataset is not None and not os.path.isfile(args.dataset):
        p.error(f"--dataset {args.dataset}: no such file")
    return args


def load_dataset_(args):
    from datasets import Dataset, load_dataset

    if args.dataset is None:  # offline default: the standard library's own sources
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)[: args.max_docs]
        return Dataset.from_dict({"text": [p.read_text(errors="replace") for p in files]})
    ext = pathlib.Path(args.dataset).suffix.lstrip(".")
    builder = {"txt": "text", "jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
    if builder is None:
        raise ValueError(f"--dataset {args.dataset}: unsupported file type {ext!r}; use .jsonl/.json/.parquet/.csv/.txt")
    return load_dataset(builder, data_files=[args.dataset], split="train")


def build_model(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_seqpar.core.data import byte_tokenizer

    torch.manual_seed(args.seed)
    if args.model is None:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else byte_tokenizer()
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(args.max_length, 2048),
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             bos_token_id=None, use_cache=False)
        return LlamaForCausalLM(config), tokenizer
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    return model, AutoTokenizer.from_pretrained(args.tokenizer or args.model)


def main(argv=None) -> None:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    from hf_seqpar.config import resolve
    from hf_seqpar.integrations.accelerate import SequenceParallelPlugin

    plugin = SequenceParallelPlugin.load(args.sp_config)  # a bad file fails here, before any loading
    if plugin.loss_chunk_size is not None:
        raise SystemExit(f"loss_chunk_size={plugin.loss_chunk_size} in the SP config: TRL's SFTTrainer computes the "
                         "loss with its own fused, chunked LM head; use an SP config with loss_chunk_size: null "
                         "(or none: Ulysses over all ranks).")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolve(plugin, world)  # sizes against the launched world, before any loading

    from trl import SFTConfig, SFTTrainer
    from transformers import TrainerCallback

    import hf_seqpar

    class SPSFTTrainer(hf_seqpar.SequenceParallelMixin, SFTTrainer):
        """TRL's SFTTrainer with sequence parallelism."""

    class PrintMetrics(TrainerCallback):
        def on_log(self, targs, state, control, logs=None, **kw):
            if state.is_world_process_zero and logs and "loss" in logs:
                keys = ("loss", "grad_norm", "mean_token_accuracy", "entropy", "num_tokens")
                print(f"step {state.global_step:4d}/{state.max_steps} " +
                      " ".join(f"{k} {logs[k]:.6g}" for k in keys if k in logs), flush=True)

    packing = dict(packing=False, padding_free=args.padding_free) if args.packing == "none" else \
        dict(packing=True, packing_strategy=args.packing)
    config = SFTConfig(output_dir=args.output_dir, max_length=None if args.padding_free else args.max_length,
                       per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
                       max_steps=args.max_steps, learning_rate=args.lr, logging_steps=args.logging_steps,
                       bf16=args.bf16 or on_gpu, use_cpu=not on_gpu, report_to=[], save_strategy="no",
                       seed=args.seed, disable_tqdm=True, **packing)
    model, tokenizer = build_model(args)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = SPSFTTrainer(model=model, args=config, train_dataset=load_dataset_(args), processing_class=tokenizer,
                           peft_config=peft_config, sp_plugin=plugin, callbacks=[PrintMetrics()])
    state = trainer.sp_state
    if trainer.is_world_process_zero():
        print(f"strategy={plugin.strategy} sp_size={state.sp_size} dp_size={state.dp_size} "
              f"packing={args.packing} lora={args.lora}", flush=True)
    trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        print(f"saved to {args.output_dir}", flush=True)


if __name__ == "__main__":
    main()
