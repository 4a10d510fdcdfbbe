"""RL training (GRPO / DAPO) with TRL's GRPOTrainer and sequence parallelism.

    accelerate launch --config_file recipes/accelerate/cpu.yaml --num_processes 2 \\
        recipes/grpo_trl.py --max-steps 4 --output-dir out/grpo

The trainer is ``class SPGRPOTrainer(hf_seqpar.SequenceParallelMixin, trl.GRPOTrainer)``: each SP
group generates its completions once (SP rank 0, transformers' ``generate`` on the unsharded model,
broadcast to the group), TRL scores them with the reward functions and turns them into advantages,
and the training forward (policy, old-policy and reference log-probs) splits every
prompt + completion row over the SP ranks (:mod:`hf_seqpar.integrations.trl_grpo`). TRL's loss
and metrics (reward, reward_std, rewards/*, kl, entropy, clip_ratio/*, completions/*) are those of
the one-process GRPOTrainer.

Data: ``--dataset`` is a local .jsonl/.json/.parquet file with a ``prompt`` text column and
optionally an ``answer`` column (then the completion is rewarded for starting with the answer).
Without ``--dataset``/``--model`` it runs offline: addition prompts (``"17+25="``, answer ``42``)
built here, a byte-level tokenizer and a tiny Llama-style model built from a config (as
``recipes/sft_trl.py``). Rewards are rules (no reward model): ``correct`` (1 for the right number
first; with an ``answer`` column) and ``digits`` (the share of digit characters, a format reward).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys

import torch

import hf_seqpar

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import recipe_common as common  # noqa: E402
from sft_trl import build_model, metrics_printer, train_and_save  # noqa: E402  (shared with the SFT recipe)

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
#: what the log shows each step (TRL's GRPO metrics; generation metrics on the steps that generate)
METRICS = (
    "loss",
    "grad_norm",
    "reward",
    "reward_std",
    "rewards/correct/mean",
    "rewards/digits/mean",
    "kl",
    "entropy",
    "clip_ratio/region_mean",
    "completions/mean_length",
    "num_tokens",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_trl_args(
        p,
        output_dir="out/grpo-trl",
        lr=1e-5,
        batch_help="completions per data-parallel replica and micro-batch (default 4: one prompt's group)",
    )
    p.set_defaults(batch_size=4)
    p.add_argument("--dataset", default=None, help="local prompt[/answer] file (default: addition prompts built here)")
    p.add_argument("--max-prompts", type=int, default=64, help="prompts of the offline default")
    p.add_argument("--num-generations", type=int, default=4, help="completions per prompt (the group)")
    p.add_argument("--max-completion-length", type=int, default=16, help="generated tokens per completion")
    p.add_argument("--loss-type", choices=LOSS_TYPES, default="dapo")
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0: a reference model with SP)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--num-iterations", type=int, default=1, help="optimisation passes per generation")
    p.add_argument(
        "--steps-per-generation", type=int, default=None, help="micro-batches per generation (default: --grad-accum)"
    )
    p.add_argument("--optim", default="adamw_torch", help="TrainingArguments.optim (e.g. adafactor: small states)")
    p.add_argument("--model-dtype", choices=("float32", "bfloat16"), default="float32", help="--model's weights")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the metric lines stay)")
    args = p.parse_args(argv)
    names = ["batch_size", "grad_accum", "max_steps", "max_prompts", "num_generations", "max_completion_length"]
    common.check_positive(p, args, [*names, "num_iterations", "logging_steps"])
    if args.dataset is not None and not os.path.isfile(args.dataset):
        p.error(f"--dataset {args.dataset}: no such file")
    return args


def offline_prompts(n: int, seed: int) -> dict:
    """Addition prompts of different lengths (``"7+15="`` ... ``"385+9021="``) and their answers."""
    g = torch.Generator().manual_seed(seed)
    rows = {"prompt": [], "answer": []}
    for i in range(n):
        a, b = (int(torch.randint(0, 10 ** (1 + (i + k) % 4), (1,), generator=g)) for k in range(2))
        rows["prompt"].append(f"{a}+{b}=")
        rows["answer"].append(str(a + b))
    return rows


def correct(completions, answer, **kwargs) -> list[float]:
    """1 when the completion starts with the right number, else 0."""
    firsts = (re.match(r"\s*(\d+)", c) for c in completions)
    return [float(m is not None and m.group(1) == str(a)) for m, a in zip(firsts, answer)]


def digits(completions, **kwargs) -> list[float]:
    """The share of the completion's characters that are digits (a format reward)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def load_prompts(args):
    from datasets import Dataset, load_dataset

    if args.dataset is None:
        return Dataset.from_dict(offline_prompts(args.max_prompts, args.seed))
    ext = pathlib.Path(args.dataset).suffix.lstrip(".")
    builder = {"jsonl": "json", "json": "json", "parquet": "parquet"}.get(ext)
    if builder is None:
        raise ValueError(f"--dataset {args.dataset}: unsupported file type {ext!r}; use .jsonl/.json/.parquet")
    return load_dataset(builder, data_files=[args.dataset], split="train")


def policy(args):
    """``(model or path, tokenizer)``: TRL builds GRPO's reference model from the policy's path, so the
    offline tiny model is saved first (OUTPUT_DIR/initial_model) when ``--beta > 0``."""
    max_length = 4096 + args.max_completion_length
    if args.model is not None:
        dtype = getattr(torch, args.model_dtype)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model, tokenizer = build_model(
        argparse.Namespace(model=None, tokenizer=args.tokenizer, seed=args.seed, max_length=max_length)
    )
    if args.beta == 0:
        return model, tokenizer
    from accelerate import PartialState

    path = os.path.join(args.output_dir, "initial_model")
    state = PartialState()
    if state.is_main_process:
        model.save_pretrained(path)
    state.wait_for_everyone()
    return path, tokenizer


def main(argv=None) -> None:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available()
    plugin, _, world, sp_size = common.trl_sp_plugin(args.sp_config, "grpo_trl.py", "GRPOTrainer")
    replicas, steps = world // sp_size, args.steps_per_generation or args.grad_accum
    if args.batch_size * replicas * steps % args.num_generations:
        raise SystemExit(
            f"grpo_trl.py: error: a generation batch is --batch-size ({args.batch_size}) x data-parallel replicas "
            f"({replicas}) x steps per generation ({steps}) = {args.batch_size * replicas * steps} completions, not a "
            f"multiple of --num-generations ({args.num_generations}); raise --batch-size, --grad-accum or "
            "--steps-per-generation"
        )

    from trl import GRPOConfig, GRPOTrainer

    class SPGRPOTrainer(hf_seqpar.SequenceParallelMixin, GRPOTrainer):
        """TRL's GRPOTrainer with sequence parallelism."""

    config = GRPOConfig(
        output_dir=args.output_dir,
        loss_type=args.loss_type,
        beta=args.beta,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        num_iterations=args.num_iterations,
        steps_per_generation=args.steps_per_generation,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.max_steps,
        learning_rate=args.lr,
        optim=args.optim,
        logging_steps=args.logging_steps,
        bf16=args.bf16 or on_gpu,
        use_cpu=not on_gpu,
        report_to=[],
        save_strategy="no",
        seed=args.seed,
        disable_tqdm=args.no_progress,
    )
    dataset = load_prompts(args)
    rewards = [digits] + ([correct] if "answer" in dataset.column_names else [])
    model, tokenizer = policy(args)
    trainer = SPGRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        sp_plugin=plugin,
        callbacks=[metrics_printer(METRICS)],
    )
    train_and_save(
        trainer,
        args.output_dir,
        f"loss_type={args.loss_type} beta={args.beta} num_generations={args.num_generations} "
        f"generation_batch_size={config.generation_batch_size}",
    )


if __name__ == "__main__":
    main()
