r"""Supervised fine-tuning with TRL's SFTTrainer and sequence parallelism.

    accelerate launch --config_file recipes/accelerate/cpu.yaml --num_processes 2 \
        recipes/sft_trl.py --max-steps 4 --output-dir out/sft

The trainer is ``class SPSFTTrainer(hf_seqpar.SequenceParallelMixin, trl.SFTTrainer)``: TRL
prepares and packs the data (``--packing bfd`` by default: best-fit packed, padding-free rows
whose position_ids restart at every document), hf_seqpar splits every row over the SP ranks, and
TRL's loss and metrics (loss, grad_norm, mean_token_accuracy, entropy, num_tokens) are those of
the one-process SFTTrainer. ``--lora`` trains a LoRA adapter instead of the full model.

SP settings: ``--sp-config``, ``$HF_SEQPAR_CONFIG``, or the ``hf_seqpar_*`` keys of the accelerate
config file the launcher read. TRL computes the loss with its own chunked LM head, so an SP
config's ``loss_chunk_size`` is set to null here (said when it happens); every shipped config runs.

Data: ``--dataset`` is a local .jsonl/.json/.parquet/.csv/.txt file, a dataset folder or a Hub
name (``datasets.load_dataset``), with a ``text`` column, or ``messages`` (chat), or
``prompt``/``completion`` (loss on the completion only). Without ``--dataset``/``--model`` it runs
offline: Python's standard-library sources as text, a byte-level tokenizer
(``hf_seqpar.core.data.byte_tokenizer``, given a chat template here so chat data work) and a tiny
Llama-style model built from a config (saved in OUTPUT_DIR/base_model with ``--lora``, where the
adapter's ``base_model_name_or_path`` points).

Checkpoints (``--save-steps``, ``--save-total-limit``), ``--resume-from DIR|latest`` (the Trainer's
exact resume), held-out evaluation (``--eval-fraction``, ``--eval-steps``) and trackers
(``--report-to tensorboard,wandb,...``) are the Trainer's own.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import torch

import hf_seqpar

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune_data  # noqa: E402  (the recipes' data module, next to this file)
import recipe_common as common  # noqa: E402

PROG = "sft_trl.py"
PACKING = ("bfd", "bfd_split", "wrapped", "none")
#: The byte-level tokenizer's chat template (the format finetune_long_context.py uses for it).
BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sp-config",
        default=None,
        help="SP plugin YAML (default: $HF_SEQPAR_CONFIG, else the hf_seqpar_* "
        "keys of the launcher's accelerate config, else Ulysses over all ranks)",
    )
    p.add_argument("--model", default=None, help="model name or path (default: a tiny Llama built from a config)")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer name or path (default: the model's; byte-level without --model)"
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="local data file or folder, or a Hub dataset name (default: the standard library's sources)",
    )
    p.add_argument("--dataset-config", default=None, help="configuration name of a Hub dataset")
    p.add_argument("--dataset-split", default="train", help="split to use (default: %(default)s)")
    p.add_argument("--max-docs", type=int, default=None, help="read only the first N rows (printed; default: all)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per packed row (per example without packing)")
    p.add_argument("--packing", choices=PACKING, default="bfd", help="TRL packing strategy, or none")
    p.add_argument("--padding-free", action="store_true", help="with --packing none: one flattened row per batch")
    p.add_argument(
        "--lora", action="store_true", help="train a LoRA adapter (r=--lora-r on the attention and MLP projections)"
    )
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=2, help="rows per data-parallel replica and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default on GPUs; fp32 on CPU)")
    p.add_argument("--logging-steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=0.0,
        help="share of the rows held out for evaluation (0 = no evaluation; default: %(default)s)",
    )
    p.add_argument("--eval-steps", type=int, default=None, help="evaluate every N steps (default: --logging-steps)")
    p.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every N steps; 0 = never (default)")
    p.add_argument("--save-total-limit", type=int, default=None, help="keep only the newest N checkpoints")
    p.add_argument(
        "--resume-from",
        default=None,
        help="a checkpoint-STEP folder, or 'latest' (the newest in --output-dir), to continue from exactly",
    )
    p.add_argument(
        "--report-to",
        default="none",
        help="Trainer trackers, comma-separated (tensorboard, wandb, ...), 'all' or 'none' (default)",
    )
    p.add_argument("--output-dir", default="out/sft-trl")
    args = p.parse_args(argv)
    if args.padding_free and args.packing != "none":
        p.error("--padding-free is for --packing none (the packing strategies are padding-free already)")
    for name in ("max_length", "batch_size", "grad_accum", "max_steps", "lora_r", "logging_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_docs", "eval_steps", "save_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1 (or left out), got {getattr(args, name)}")
    if args.save_steps < 0:
        p.error(f"--save-steps must be >= 0 (0 = never), got {args.save_steps}")
    if not 0 <= args.eval_fraction < 1:
        p.error(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    if args.dataset is not None and os.path.sep in args.dataset and not os.path.exists(args.dataset):
        p.error(f"--dataset {args.dataset}: no such file or folder")
    return args


def load_dataset_(args, say=print):
    """The rows: :func:`finetune_data.load_table` (the standard library's sources offline; files,
    folders and Hub names through ``datasets.load_dataset``; ``--max-docs`` printed)."""
    view = types.SimpleNamespace(
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        dataset_split=args.dataset_split,
        max_docs=args.max_docs,
        text_column="text",
    )
    return finetune_data.load_table(view, say)


def build_model(args):
    """``(model, tokenizer)``: the tiny default (byte-level tokenizer with a chat template) or ``--model``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_seqpar.core.data import byte_tokenizer

    torch.manual_seed(args.seed)
    if args.model is None:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else byte_tokenizer()
        if not args.tokenizer:
            tokenizer.chat_template = BYTE_CHAT_TEMPLATE
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max(args.max_length, 2048),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
        return LlamaForCausalLM(config), tokenizer
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(args.tokenizer or args.model)


def metrics_printer(keys):
    """A callback printing ``step i/n`` with the logged ``keys``, and eval losses, on the main process."""
    from transformers import TrainerCallback

    class PrintMetrics(TrainerCallback):
        def on_log(self, targs, state, control, logs=None, **kw):
            if not (state.is_world_process_zero and logs):
                return
            if "loss" in logs:
                print(
                    f"step {state.global_step:4d}/{state.max_steps} "
                    + " ".join(f"{k} {logs[k]:.6g}" for k in keys if k in logs),
                    flush=True,
                )
            if "eval_loss" in logs:
                print(f"eval at step {state.global_step}: loss {logs['eval_loss']:.6g}", flush=True)

    return PrintMetrics()


def train_and_save(trainer, output_dir: str, detail: str, resume=None, restore=None) -> None:
    """Print the SP layout, train (from ``resume``), call ``restore()`` if given, save the model."""
    state = trainer.sp_state
    if trainer.is_world_process_zero():
        print(f"strategy={state.strategy.name} sp_size={state.sp_size} dp_size={state.dp_size} {detail}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    if restore is not None:
        restore()
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        print(f"saved to {output_dir}", flush=True)
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():  # a clean exit: no gloo thread left running at interpreter shutdown
        torch.distributed.destroy_process_group()


def sp_plugin(args):
    """The SP settings, ``loss_chunk_size`` dropped (loudly) for TRL's own chunked loss."""
    import dataclasses

    plugin, source = common.load_sp_plugin(args.sp_config, PROG)  # a bad file fails here, before any loading
    if plugin.loss_chunk_size is not None:
        common.warn(
            PROG,
            f"SP config {source} sets loss_chunk_size={plugin.loss_chunk_size}; TRL's SFTTrainer computes "
            "the loss with its own chunked LM head (hf_seqpar's chunked loss would replace it), so this "
            "recipe runs with loss_chunk_size: null. Sequence sharding and every other setting are kept.",
        )
        plugin = dataclasses.replace(plugin, loss_chunk_size=None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        hf_seqpar.resolve(plugin, world)  # the library's dry run against the launched world, before any loading
    except ValueError as e:
        raise SystemExit(f"{PROG}: error: {world} launched rank(s), SP config {source}: {e}") from None
    return plugin, source


def main(argv=None) -> None:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    plugin, source = sp_plugin(args)
    common.warn_if_one_process(PROG)
    resume = args.resume_from
    if resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if resume is None:
            raise SystemExit(f"{PROG}: error: --resume-from latest: no checkpoint-* folder in {args.output_dir}")
    elif resume is not None and not os.path.isdir(resume):
        raise SystemExit(f"{PROG}: error: --resume-from {resume}: no such folder")

    from trl import SFTConfig, SFTTrainer

    import hf_seqpar

    class SPSFTTrainer(hf_seqpar.SequenceParallelMixin, SFTTrainer):
        """TRL's SFTTrainer with sequence parallelism."""

    packing = (
        dict(packing=False, padding_free=args.padding_free)
        if args.packing == "none"
        else dict(packing=True, packing_strategy=args.packing)
    )
    evaluation = (
        dict(eval_strategy="steps", eval_steps=args.eval_steps or args.logging_steps) if args.eval_fraction else {}
    )
    config = SFTConfig(
        output_dir=args.output_dir,
        max_length=None if args.padding_free else args.max_length,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        logging_steps=args.logging_steps,
        bf16=args.bf16 or on_gpu,
        use_cpu=not on_gpu,
        report_to=[r for r in args.report_to.split(",") if r] if args.report_to != "all" else "all",
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=True,
        **evaluation,
        **packing,
    )
    model, tokenizer = build_model(args)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        if args.model is None:  # no Hub name: save the base where the adapter's config can point
            base_dir = os.path.abspath(os.path.join(args.output_dir, "base_model"))
            if int(os.environ.get("RANK", "0")) == 0:
                model.save_pretrained(base_dir)
                tokenizer.save_pretrained(base_dir)
            model.name_or_path = model.config._name_or_path = base_dir
        peft_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
    use_cache = model.config.use_cache
    model.config.use_cache = False  # training; the saved config gets the user's value back below
    data = load_dataset_(args, print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None))
    if "messages" in data.column_names:
        finetune_data.require_chat_template(tokenizer)
    eval_data = None
    if args.eval_fraction:
        split = data.train_test_split(test_size=args.eval_fraction, seed=args.seed)
        data, eval_data = split["train"], split["test"]
    trainer = SPSFTTrainer(
        model=model,
        args=config,
        train_dataset=data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
        sp_plugin=plugin,
        callbacks=[metrics_printer(("loss", "grad_norm", "mean_token_accuracy", "entropy", "num_tokens"))],
    )

    def restore_use_cache():
        base = trainer.model.get_base_model() if args.lora else trainer.model
        base.config.use_cache = use_cache

    train_and_save(
        trainer,
        args.output_dir,
        f"(SP config: {source}) packing={args.packing} lora={args.lora}",
        resume=resume,
        restore=restore_use_cache,
    )


if __name__ == "__main__":
    main()
