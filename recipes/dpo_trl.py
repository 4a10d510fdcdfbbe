"""Preference training (DPO) with TRL's DPOTrainer and sequence parallelism.

    accelerate launch --config_file recipes/accelerate/cpu.yaml --num_processes 2 \\
        recipes/dpo_trl.py --max-steps 4 --output-dir out/dpo

The trainer is ``class SPDPOTrainer(hf_seqpar.SequenceParallelMixin, trl.DPOTrainer)``: TRL builds
the concatenated chosen + rejected batch, hf_seqpar splits every row over the SP ranks inside the
model call and gathers the per-token log-probs back in order
(:mod:`hf_seqpar.integrations.trl_dpo`), and TRL's loss and metrics (rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, logps/*, entropy) are those of the
one-process DPOTrainer. The reference model is a frozen copy of the initial policy with SP on the
same mesh (``--precompute-ref``: TRL's ``precompute_ref_log_probs`` instead).

Data: ``--dataset`` is a local .jsonl/.json/.parquet file with ``prompt``/``chosen``/``rejected``
text columns. Without ``--dataset``/``--model`` it runs offline: pairs built from Python's
standard-library sources (prompt = the start of a source chunk, chosen = its true continuation,
rejected = the continuation of another file's chunk), a byte-level tokenizer and a tiny Llama-style
model built from a config (as ``recipes/sft_trl.py``).
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import sys
import sysconfig

import torch

import hf_seqpar

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import recipe_common as common  # noqa: E402
from sft_trl import build_model, metrics_printer, train_and_save  # noqa: E402  (shared with the SFT recipe)

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
#: what the log shows each step (TRL's DPO metrics)
METRICS = (
    "loss",
    "grad_norm",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "num_tokens",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_trl_args(
        p, output_dir="out/dpo-trl", lr=1e-4, batch_help="pairs per data-parallel replica and micro-batch"
    )
    p.add_argument("--dataset", default=None, help="local prompt/chosen/rejected file (default: built from the stdlib)")
    p.add_argument("--max-pairs", type=int, default=64, help="pairs of the offline default")
    p.add_argument(
        "--chunk-chars", type=int, default=600, help="characters of prompt + completion in the offline default"
    )
    p.add_argument("--max-length", type=int, default=1024, help="tokens per prompt + completion row (truncation)")
    p.add_argument("--loss-type", choices=LOSS_TYPES, default="sigmoid")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument(
        "--precompute-ref", action="store_true", help="TRL's precompute_ref_log_probs instead of a reference model"
    )
    args = p.parse_args(argv)
    common.check_positive(
        p, args, ("max_length", "batch_size", "grad_accum", "max_steps", "max_pairs", "chunk_chars", "logging_steps")
    )
    if args.dataset is not None and not os.path.isfile(args.dataset):
        p.error(f"--dataset {args.dataset}: no such file")
    return args


def offline_pairs(max_pairs: int, chunk_chars: int) -> dict:
    """Preference pairs from the standard library's sources: the true continuation of a chunk is
    preferred over the continuation of the next file's chunk (a rule, no reward model)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks = []
    for path in sorted(p for p in root.glob("*.py") if p.stat().st_size > 4 * chunk_chars):
        text = path.read_text(errors="replace")
        chunks.append(text[chunk_chars : 2 * chunk_chars])
        if len(chunks) > max_pairs:
            break
    cut = chunk_chars // 3
    pairs = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(len(chunks) - 1):
        pairs["prompt"].append(chunks[i][:cut])
        pairs["chosen"].append(chunks[i][cut : cut + (i % 5 + 3) * cut // 4])  # completions of different lengths
        pairs["rejected"].append(chunks[i + 1][cut : cut + (i % 3 + 2) * cut // 3])
    return pairs


def load_dataset_(args):
    from datasets import Dataset, load_dataset

    if args.dataset is None:
        return Dataset.from_dict(offline_pairs(args.max_pairs, args.chunk_chars))
    ext = pathlib.Path(args.dataset).suffix.lstrip(".")
    builder = {"jsonl": "json", "json": "json", "parquet": "parquet"}.get(ext)
    if builder is None:
        raise ValueError(f"--dataset {args.dataset}: unsupported file type {ext!r}; use .jsonl/.json/.parquet")
    return load_dataset(builder, data_files=[args.dataset], split="train")


def main(argv=None) -> None:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    plugin, _, _, _ = common.trl_sp_plugin(args.sp_config, "dpo_trl.py", "DPOTrainer")  # before any loading

    from trl import DPOConfig, DPOTrainer

    class SPDPOTrainer(hf_seqpar.SequenceParallelMixin, DPOTrainer):
        """TRL's DPOTrainer with sequence parallelism."""

    config = DPOConfig(
        output_dir=args.output_dir,
        max_length=args.max_length,
        loss_type=args.loss_type,
        beta=args.beta,
        precompute_ref_log_probs=args.precompute_ref,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        logging_steps=args.logging_steps,
        bf16=args.bf16 or on_gpu,
        use_cpu=not on_gpu,
        report_to=[],
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=True,
    )
    model, tokenizer = build_model(
        argparse.Namespace(model=args.model, tokenizer=args.tokenizer, seed=args.seed, max_length=args.max_length)
    )
    ref_model = None if args.precompute_ref else copy.deepcopy(model).eval()
    trainer = SPDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=load_dataset_(args),
        processing_class=tokenizer,
        sp_plugin=plugin,
        callbacks=[metrics_printer(METRICS)],
    )
    train_and_save(
        trainer,
        args.output_dir,
        f"loss_type={args.loss_type} reference={'precomputed' if args.precompute_ref else 'model'}",
    )


if __name__ == "__main__":
    main()
