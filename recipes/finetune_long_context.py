"""Fine-tune a Llama-style causal LM on long packed sequences with sequence parallelism.

    accelerate launch --config_file recipes/accelerate/cpu.yaml --num_processes 2 \\
        recipes/finetune_long_context.py --sp-config recipes/sp/ulysses.yaml --max-steps 6 --output-dir out/demo

Full fine-tuning or LoRA (``--lora``), any strategy (the ``--sp-config`` YAML, or the file named
by ``$HF_SEQPAR_CONFIG``). Documents are packed into rows of ``--max-seq-len`` tokens with
position_ids restarting at every document, so no token attends across documents and no token
predicts the next document's first token. Logs loss, tokens/s and per-rank peak memory; saves a
checkpoint (full model, or the LoRA adapter) that plain transformers / PEFT load.

Without ``--model``/``--dataset`` it runs offline: a tiny Llama-style model built from a config,
a byte-level tokenizer (token = byte), and Python's own standard-library sources as the corpus.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import resource
import sysconfig
import time

import torch
import torch.distributed as dist

import hf_seqpar
from hf_seqpar.accelerate import SP_CONFIG_ENV, SequenceParallelPlugin
from hf_seqpar.data import pack_documents


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sp-config", default=None,
                   help=f"SequenceParallelPlugin YAML (recipes/sp/*.yaml); default ${SP_CONFIG_ENV}, else Ulysses "
                        "over all ranks")
    p.add_argument("--model", default=None,
                   help="Hub name or local path of a causal LM (e.g. meta-llama/Llama-3.1-8B); default: a tiny "
                        "Llama-style model built from a config (offline)")
    p.add_argument("--dataset", default=None,
                   help="Hub dataset name, or local .txt/.json/.jsonl/.parquet/.csv file(s) or folder; default: "
                        "Python standard-library sources (offline)")
    p.add_argument("--dataset-config", default=None, help="configuration name of a Hub dataset (e.g. 20231101.en)")
    p.add_argument("--dataset-split", default="train", help="split to use (default: %(default)s)")
    p.add_argument("--text-column", default="text", help="column with the documents (default: %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="tokens per packed row (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=20, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="packed rows per micro-batch per data-parallel "
                                                             "replica (default: %(default)s)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 3e-3 for the tiny model, "
                                                          "2e-5 full / 2e-4 LoRA for --model)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup before cosine decay (default: %(default)s)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default: %(default)s)")
    p.add_argument("--output-dir", default="out/finetune", help="where the checkpoint goes (default: %(default)s)")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (peft) instead of all weights")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default: %(default)s)")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names LoRA adapts (default: %(default)s)")
    p.add_argument("--attn-implementation", default="sdpa",
                   help="attention kernel SP wraps: sdpa, eager, flash_attention_2 (use flash_attention_2 on GPUs "
                        "for long packed rows: sdpa needs an S x S mask) (default: %(default)s)")
    p.add_argument("--max-docs", type=int, default=2000, help="documents read from the corpus (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of model init and data order (default: %(default)s)")
    return p.parse_args(argv)


# ---- data ----------------------------------------------------------------------------------

def load_documents(args) -> list[str]:
    """The corpus as a list of texts, through ``datasets``."""
    from datasets import Dataset, load_dataset

    if args.dataset is None:  # offline default: the standard library's own sources
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)[: args.max_docs]
        ds = Dataset.from_dict({args.text_column: [p.read_text(errors="replace") for p in files]})
    elif os.path.exists(args.dataset):
        path = pathlib.Path(args.dataset)
        files = sorted(str(f) for f in path.rglob("*") if f.is_file()) if path.is_dir() else [str(path)]
        ext = pathlib.Path(files[0]).suffix.lstrip(".")
        builder = {"txt": "text", "jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(ext)
        if builder is None:
            raise ValueError(f"--dataset {args.dataset}: unsupported file type {ext!r}; use .txt/.json/.jsonl/.parquet/.csv")
        ds = load_dataset(builder, data_files=files, split="train")
    else:
        ds = load_dataset(args.dataset, args.dataset_config, split=args.dataset_split)
    if args.text_column not in ds.column_names:
        raise ValueError(f"dataset has no column {args.text_column!r} (columns: {ds.column_names}); pass --text-column")
    n = min(len(ds), args.max_docs)
    return [t for t in ds.select(range(n))[args.text_column] if t]


def tokenize(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids per document: bytes for the byte-level default, else the tokenizer plus EOS."""
    if tokenizer is None:
        return [list(t.encode("utf-8")) for t in texts]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [ids + eos for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def pack(docs: list[list[int]], seq_len: int) -> list[dict]:
    """Rows of ``seq_len`` tokens with position_ids restarting per document
    (:func:`hf_seqpar.data.pack_documents`)."""
    rows = list(pack_documents(docs, seq_len))
    if not rows:
        raise ValueError(f"the corpus has fewer than --max-seq-len={seq_len} tokens; lower it or add documents")
    return rows


# ---- model ---------------------------------------------------------------------------------

def build_model(args):
    """(model, tokenizer or None); tokenizer None means byte-level."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    if args.model is None:
        config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.max_seq_len,
                             attn_implementation=args.attn_implementation, use_cache=False)
        return LlamaForCausalLM(config), None
    # full fine-tuning keeps fp32 master weights (bf16 autocast from the accelerate config);
    # LoRA trains only the adapter, so the frozen base is loaded in bf16 on GPUs
    dtype = torch.bfloat16 if (args.lora and torch.cuda.is_available()) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn_implementation)
    model.config.use_cache = False
    return model, AutoTokenizer.from_pretrained(args.model)


def add_lora(model, args, base_dir: str | None):
    from peft import LoraConfig, get_peft_model

    targets = [t for t in args.lora_targets.split(",") if t]
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    if base_dir is not None:  # the tiny default has no Hub name: point the adapter at the saved base
        model.peft_config["default"].base_model_name_or_path = base_dir
    return model


def peak_memory_mib(device) -> float:
    """Peak allocated GPU memory, or on CPU the peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- training ------------------------------------------------------------------------------

def main(argv=None) -> None:
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    args = parse_args(argv)
    plugin = SequenceParallelPlugin.load(args.sp_config)  # validate before anything starts
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # CPU ranks started by `accelerate launch` (MULTI_GPU config -> torchrun): tell accelerate to
        # run them as MULTI_CPU on gloo; without it each process would think it is alone
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    # the plugin's collective_timeout_s (if set) bounds how long a collective waits for a stuck rank
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, **plugin.accelerator_kwargs())
    if accelerator.device.type == "cpu" and accelerator.num_processes > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // accelerator.num_processes))
    main_proc = accelerator.is_main_process

    model, tokenizer = build_model(args)
    base_dir = None
    if args.lora and args.model is None:
        base_dir = os.path.abspath(os.path.join(args.output_dir, "base_model"))
        if main_proc:
            model.save_pretrained(base_dir)
    if args.lora:
        model = add_lora(model, args, base_dir)
    lr = args.lr or (3e-3 if args.model is None else (2e-4 if args.lora else 2e-5))

    rows = pack(tokenize(load_documents(args), tokenizer), args.max_seq_len)
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    model, optimizer, loader, scheduler = hf_seqpar.prepare_sequence_parallel(
        accelerator, plugin, model, optimizer, loader, scheduler)
    state = hf_seqpar.find_state(model)
    dp_size = state.mesh.size(0)
    tokens_per_step = args.max_seq_len * args.batch_size * args.grad_accum * dp_size
    if main_proc:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"hf_seqpar finetune: {dist.get_world_size()} ranks ({accelerator.device.type}), "
              f"strategy={plugin.strategy} sp_size={state.sp_size} dp_size={dp_size}, {len(rows)} packed rows of "
              f"{args.max_seq_len} tokens, {n_train / 1e6:.2f}M trainable parameters, lr {lr:g}"
              f"{', LoRA' if args.lora else ''}", flush=True)

    model.train()
    bar = tqdm(total=args.max_steps, disable=not main_proc, desc="train", dynamic_ncols=True)
    step, epoch, micro_losses, t0 = 0, 0, [], time.perf_counter()
    while step < args.max_steps:
        loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else None
        for batch in loader:
            with accelerator.accumulate(model):
                out = model(**batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(out.loss.detach())
            if not accelerator.sync_gradients:
                continue
            step += 1
            # each rank's loss is its SP group's true loss; the mean over ranks is over dp replicas
            loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
            dt, micro_losses = time.perf_counter() - t0, []
            peaks = [None] * dist.get_world_size()
            dist.all_gather_object(peaks, round(peak_memory_mib(accelerator.device)))
            if main_proc:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                tqdm.write(f"step {step:4d}/{args.max_steps}  loss {loss:.4f}  {tokens_per_step / dt:,.0f} tokens/s  "
                           f"peak memory MiB per rank {peaks}")
            t0 = time.perf_counter()
            if step >= args.max_steps or not math.isfinite(loss):
                break
        epoch += 1
    bar.close()

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    unwrapped.save_pretrained(args.output_dir, is_main_process=main_proc, state_dict=state_dict,
                              save_function=accelerator.save)
    if main_proc:
        if tokenizer is not None:
            tokenizer.save_pretrained(args.output_dir)
        kind = "LoRA adapter (peft.AutoPeftModelForCausalLM)" if args.lora else "model (AutoModelForCausalLM)"
        print(f"saved {kind} to {args.output_dir}", flush=True)
    accelerator.end_training()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
