r"""Fine-tune a Llama-style causal LM on long packed sequences with sequence parallelism.

    accelerate launch --config_file recipes/accelerate/cpu.yaml --num_processes 2 \
        recipes/finetune_long_context.py --sp-config recipes/sp/ulysses.yaml --max-steps 6 --output-dir out/demo

One config file for the whole run: an accelerate config file can carry the SP settings as
``hf_seqpar_*`` keys of its ``parallelism_config:`` section; name it once, to the launcher (the
recipe reads the file the launcher read; naming another with --sp-config as well is refused):

    accelerate launch --config_file recipes/accelerate/cpu-sp.yaml recipes/finetune_long_context.py \
        --max-steps 6 --output-dir out/demo

Full fine-tuning or LoRA (``--lora``), any strategy (``--sp-config``, or the file named by
``$HF_SEQPAR_CONFIG``). Data: plain text (``--text-column``), chat (a ``messages`` column of
``{"role", "content"}`` turns, rendered with the tokenizer's chat template; loss on the assistant
turns only) or prompt-completion (``prompt`` and ``completion`` columns; loss on the completion
only); ``--data-format`` overrides the guess from the columns. Data go through ``datasets``
(``load_dataset`` for files, folders and Hub names; tokenised with ``map``, cached, ``--num-proc``
workers, rank 0 first). Examples are packed into rows of ``--max-seq-len`` tokens with
position_ids restarting at every example, so no token attends across examples: ``--packing bfd``
(default) places whole examples best-fit decreasing and pads each row's free tail, ``wrapped``
concatenates and cuts at row edges; ``--max-doc-len`` splits longer ones into pieces that restart
positions (examples longer than a row are always split so).

Evaluation: ``--eval-fraction`` of the examples is held out and evaluated every ``--eval-every``
steps (token-weighted loss over the held-out rows). Checkpoints: every ``--save-every`` steps to
``OUTPUT_DIR/checkpoint-STEP`` (model, optimizer, and as data, never pickles: scheduler, RNG
states and the data position), written aside and renamed into place; ``--save-total-limit``
keeps the newest N. ``--resume-from`` (``latest``: the newest complete one) continues exactly
where one stopped (same losses as the uninterrupted run). Logging: a progress bar (loss, lr, grad
norm, tokens/s, memory), a line every ``--log-every`` steps, and accelerate's trackers
(``--report-to tensorboard``, wandb, ...; event files under OUTPUT_DIR). At
the end it saves a model (or LoRA adapter) that plain transformers / PEFT load. Options and the
world size are checked before any model or data is loaded.

Without ``--model``/``--dataset`` it runs offline: a tiny Llama-style model built from a config,
a byte-level tokenizer (token = byte; chat turns rendered as ``<|role|>\ncontent<|end|>\n``), and
Python's own standard-library sources as the corpus.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time

import torch
import torch.distributed as dist

import hf_seqpar
from hf_seqpar.integrations.accelerate import SP_CONFIG_ENV

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune_data as data  # noqa: E402  (the recipe's data module, next to this file)
import recipe_common as common  # noqa: E402

PROG = "finetune_long_context.py"

STATE_FILE = "recipe_state.json"
#: Options that must not change between a checkpoint and ``--resume-from`` (exact resume).
RESUME_KEYS = (
    "model",
    "tokenizer",
    "dataset",
    "dataset_config",
    "dataset_split",
    "text_column",
    "messages_column",
    "data_format",
    "max_seq_len",
    "max_doc_len",
    "max_docs",
    "packing",
    "batch_size",
    "grad_accum",
    "eval_fraction",
    "seed",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_targets",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("sequence parallelism")
    g.add_argument(
        "--sp-config",
        default=None,
        help=f"SP settings: a SequenceParallelPlugin YAML (recipes/sp/*.yaml); default ${SP_CONFIG_ENV}, "
        f"else the hf_seqpar_* keys of the accelerate config file the launcher read "
        f"(recipes/accelerate/cpu-sp.yaml), else Ulysses over all ranks",
    )
    g = p.add_argument_group("model and tokenizer")
    g.add_argument(
        "--model",
        default=None,
        help="Hub name or local path of a causal LM (e.g. meta-llama/Llama-3.1-8B); default: a tiny "
        "Llama-style model built from a config (offline)",
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        help="Hub name or local path of a tokenizer; default: the --model's, else byte-level (token = "
        "byte). With the tiny default model the vocabulary follows the tokenizer",
    )
    g.add_argument(
        "--attn-implementation",
        default="sdpa",
        help="attention kernel SP wraps: sdpa, eager, flash_attention_2 (default: %(default)s)",
    )
    g.add_argument("--lora", action="store_true", help="train a LoRA adapter (peft) instead of all weights")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: %(default)s)")
    g.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default: %(default)s)")
    g.add_argument(
        "--lora-targets",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="comma-separated module names LoRA adapts (default: %(default)s)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=None,
        help="Hub dataset name, or local .txt/.json/.jsonl/.parquet/.csv file(s) or folder; default: "
        "Python standard-library sources (offline)",
    )
    g.add_argument("--dataset-config", default=None, help="configuration name of a Hub dataset (e.g. 20231101.en)")
    g.add_argument("--dataset-split", default="train", help="split to use (default: %(default)s)")
    g.add_argument(
        "--data-format",
        default="auto",
        choices=["auto", "text", "chat", "prompt-completion"],
        help="auto: chat if there is a --messages-column, prompt-completion if there are prompt and "
        "completion columns, else text (default: %(default)s)",
    )
    g.add_argument("--text-column", default="text", help="column with the documents (default: %(default)s)")
    g.add_argument(
        "--messages-column",
        default="messages",
        help="column with chat turns [{role, content}, ...] (default: %(default)s)",
    )
    g.add_argument(
        "--max-docs",
        type=int,
        default=None,
        help="read only the first N rows of the dataset (printed when it drops rows; default: all)",
    )
    g.add_argument(
        "--num-proc", type=int, default=None, help="worker processes for tokenisation (datasets.map; default: one)"
    )
    g.add_argument(
        "--packing",
        default="bfd",
        choices=["bfd", "wrapped"],
        help="bfd: whole examples placed best-fit decreasing, each row's free tail padded (not trained "
        "on); wrapped: examples concatenated and cut at row edges (default: %(default)s)",
    )
    g.add_argument("--max-seq-len", type=int, default=2048, help="tokens per packed row (default: %(default)s)")
    g.add_argument(
        "--max-doc-len",
        type=int,
        default=None,
        help="split longer examples into pieces of at most this many tokens, each restarting its "
        "positions (default: no cap)",
    )
    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=int, default=20, help="optimizer steps (default: %(default)s)")
    g.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="packed rows per micro-batch per data-parallel replica (default: %(default)s)",
    )
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="AdamW learning rate (default: 3e-3 for the tiny model, 2e-5 full / 2e-4 LoRA for --model)",
    )
    g.add_argument(
        "--warmup-steps", type=int, default=0, help="linear warmup before cosine decay (default: %(default)s)"
    )
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 = off (default: %(default)s)")
    g.add_argument(
        "--seed", type=int, default=0, help="seed of model init, held-out split and data order (default: %(default)s)"
    )
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="evaluate on the held-out rows every N optimizer steps and at the end; 0 = never (default: %(default)s)",
    )
    g.add_argument(
        "--eval-fraction",
        type=float,
        default=0.05,
        help="share of the examples held out for evaluation when --eval-every > 0 (default: %(default)s)",
    )
    g.add_argument(
        "--eval-batches",
        type=int,
        default=0,
        help="at most this many held-out batches per evaluation; 0 = all (default: %(default)s)",
    )
    g.add_argument(
        "--save-every",
        type=int,
        default=0,
        help="save a checkpoint to OUTPUT_DIR/checkpoint-STEP every N optimizer steps; 0 = never "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--save-total-limit",
        type=int,
        default=0,
        help="keep only the newest N checkpoints; 0 = keep all (default: %(default)s)",
    )
    g.add_argument(
        "--resume-from",
        default=None,
        help="a checkpoint-STEP folder (or 'latest': the newest complete one in --output-dir) to "
        "continue from exactly; the data options must be those of the run that wrote it",
    )
    g = p.add_argument_group("logging")
    g.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="print a log line at the first step, every N optimizer steps and at the last (default: %(default)s); the "
        "progress bar updates every step",
    )
    g.add_argument(
        "--report-to",
        default="none",
        help="accelerate trackers, comma-separated: tensorboard, wandb, mlflow, comet_ml, aim, ... "
        "'all' (every installed one) or 'none'; logs train/loss, train/lr, train/grad_norm, "
        "eval/loss under --output-dir (default: %(default)s; accelerate's config file has no "
        "log_with key to take it from)",
    )
    g.add_argument(
        "--output-dir", default="out/finetune", help="where checkpoints and the final model go (default: %(default)s)"
    )
    return p.parse_args(argv)


# ---- checks before anything is loaded --------------------------------------------------------


def _fail(msg: str):
    raise SystemExit(f"{PROG}: error: {msg}")


def find_checkpoint(args) -> str | None:
    """The folder of ``--resume-from`` (``latest``: the newest complete ``checkpoint-*`` in ``--output-dir``)."""
    if args.resume_from is None:
        return None
    path = args.resume_from
    if path == "latest":
        path = common.latest_checkpoint(args.output_dir, PROG)
        if path is None:
            _fail(f"--resume-from latest: no complete checkpoint-* folder in --output-dir {args.output_dir}")
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        _fail(
            f"--resume-from {path}: not a complete checkpoint of this recipe (no {STATE_FILE}); give an "
            "OUTPUT_DIR/checkpoint-STEP folder written with --save-every"
        )
    custom = sorted(f for f in os.listdir(path) if f.startswith("custom_checkpoint_"))
    if custom:  # accelerate would unpickle these with weights_only=False: code in them would run
        _fail(
            f"--resume-from {path}: it holds {custom}, which this recipe never writes (its state is JSON and "
            "tensors); such pickles run code when loaded. Delete them if you trust them not, or resume from a "
            "checkpoint this version of the recipe wrote"
        )
    return path


def validate(args, plugin, source: str = "defaults") -> str | None:
    """Check the options, the world size and the model's heads against the SP plugin before any model
    or data is loaded. Returns the checkpoint folder to resume from (or None).

    Raises:
        SystemExit: a bad option or world size (the message names it and the fix).
    """
    for name in ("max_seq_len", "max_steps", "batch_size", "grad_accum", "lora_r", "lora_alpha", "log_every"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_docs", "num_proc"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1 (or left out), got {getattr(args, name)}")
    for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "save_total_limit"):
        if getattr(args, name) < 0:
            _fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.max_doc_len is not None and args.max_doc_len < 1:
        _fail(f"--max-doc-len must be >= 1 (or left out), got {args.max_doc_len}")
    if args.eval_every and not 0 < args.eval_fraction < 1:
        _fail(f"--eval-fraction must be in (0, 1) when --eval-every is set, got {args.eval_fraction}")
    if args.lr is not None and not args.lr > 0:
        _fail(f"--lr must be > 0, got {args.lr}")
    if args.max_grad_norm < 0:
        _fail(f"--max-grad-norm must be >= 0 (0 = off), got {args.max_grad_norm}")
    if args.warmup_steps > args.max_steps:
        _fail(f"--warmup-steps {args.warmup_steps} exceeds --max-steps {args.max_steps}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:  # the library's dry run: world size, auto, options and the model's checks, with no process group
        config = model_config(args, None) if args.model is None else _hub_config(args.model)
        resolved = hf_seqpar.resolve(plugin, world, config)
        sp, name, cls = resolved.sp_size, resolved.config.strategy, resolved.strategy
    except (ValueError, NotImplementedError) as e:
        _fail(f"{world} launched rank(s), SP config {source}: {e}")
    if cls.shards_parameters and args.save_every:
        _fail(
            f"--save-every with strategy {name} is not supported by this recipe (its tensor-parallel DTensor "
            "weights are not saved by accelerate's save_state here); use ulysses, ring or hybrid for resumable runs"
        )
    ckpt = find_checkpoint(args)
    if ckpt is not None:
        with open(os.path.join(ckpt, STATE_FILE)) as f:
            saved = json.load(f)
        changed = {
            k: (saved["args"].get(k), getattr(args, k)) for k in RESUME_KEYS if saved["args"].get(k) != getattr(args, k)
        }
        if changed:
            _fail(
                f"--resume-from {ckpt}: these options differ from the run that saved it (saved, now): {changed}; "
                "an exact resume needs the same data and model options"
            )
        if saved["world_size"] != world or saved["sp_size"] != sp:
            _fail(
                f"--resume-from {ckpt}: saved with {saved['world_size']} ranks and sp_size={saved['sp_size']}, now "
                f"{world} ranks and sp_size={sp}; resume with the same launch"
            )
        if saved["step"] >= args.max_steps:
            _fail(f"--resume-from {ckpt}: it is at step {saved['step']}, nothing left for --max-steps {args.max_steps}")
    return ckpt


def _hub_config(name: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(name)


# ---- model ---------------------------------------------------------------------------------


def load_tokenizer(args):
    """``--tokenizer``, else the ``--model``'s tokenizer, else None (byte-level)."""
    from transformers import AutoTokenizer

    name = args.tokenizer or args.model
    return AutoTokenizer.from_pretrained(name) if name else None


def model_config(args, tokenizer):
    """The tiny default model's config (vocabulary: 256 bytes, or the tokenizer's)."""
    from transformers import LlamaConfig

    vocab = 256 if tokenizer is None else len(tokenizer)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.max_seq_len,
        attn_implementation=args.attn_implementation,
    )


def build_model(args, tokenizer):
    """The model: the tiny default from :func:`model_config`, or ``--model``'s weights."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(args.seed)
    if args.model is None:
        return LlamaForCausalLM(model_config(args, tokenizer))
    # full fine-tuning keeps fp32 master weights (bf16 autocast from the accelerate config);
    # LoRA trains only the adapter, so the frozen base is loaded in bf16 on GPUs
    dtype = torch.bfloat16 if (args.lora and torch.cuda.is_available()) else torch.float32
    return AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn_implementation)


def add_lora(model, args, base_dir: str | None):
    from peft import LoraConfig, get_peft_model

    targets = [t for t in args.lora_targets.split(",") if t]
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"
        ),
    )
    if base_dir is not None:  # the tiny default has no Hub name: point the adapter at the saved base
        model.peft_config["default"].base_model_name_or_path = base_dir
    return model


# ---- data order, evaluation, checkpoints ---------------------------------------------------


class EpochShuffle(torch.utils.data.Sampler):
    """A random order of ``n`` rows that depends only on ``(seed, epoch)`` (``set_epoch`` picks the
    epoch), so a resumed run sees the batches the uninterrupted run saw."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class Position:
    """Where training is (optimizer step, epoch, micro-batches of this epoch done), saved with checkpoints."""

    def __init__(self):
        self.step = self.epoch = self.batch_in_epoch = self.accum_step = 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


def evaluate(model, loader, accelerator, max_batches: int) -> float:
    """Token-weighted loss over the held-out rows (every rank of an SP group holds its group's loss;
    the sums run over all ranks, so each group counts ``sp_size`` times in both the numerator and
    the denominator)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for i, batch in enumerate(loader):
            if max_batches and i >= max_batches:
                break
            n = batch["num_items_in_batch"]
            total += torch.stack([model(**batch).loss.double() * n, n.double()])
    model.train()
    total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1])


def save_checkpoint(accelerator, args, position, scheduler, world: int, sp: int) -> str:
    """``OUTPUT_DIR/checkpoint-STEP``: accelerate's model and optimizer state, each rank's RNG state
    (tensors), and :data:`STATE_FILE` (JSON: the data position, the scheduler's state and the options
    an exact resume needs unchanged). Written into a staging folder that is renamed into place once
    complete, so a crash leaves no folder that looks like a checkpoint."""
    staging = common.staging_dir(args.output_dir, position.step)
    if accelerator.is_main_process and os.path.exists(staging):
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(staging, f"rng_state_{accelerator.process_index}.pt"))
    accelerator.wait_for_everyone()
    path = os.path.join(args.output_dir, f"checkpoint-{position.step}")
    if accelerator.is_main_process:
        with open(os.path.join(staging, STATE_FILE), "w") as f:
            json.dump(
                {
                    "step": position.step,
                    "world_size": world,
                    "sp_size": sp,
                    "position": position.state_dict(),
                    "scheduler": scheduler.scheduler.state_dict(),
                    "args": {k: getattr(args, k) for k in RESUME_KEYS},
                },
                f,
                indent=1,
            )
        path = common.publish(staging, args.output_dir, position.step, args.save_total_limit)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(accelerator, path: str, position, scheduler) -> None:
    """Restore :func:`save_checkpoint`'s folder: no pickle is run (accelerate loads the model and the
    optimizer with ``torch.load(weights_only=True)``, the RNG state is tensors, the rest JSON; custom
    objects are never registered, so no ``custom_checkpoint_*.pkl`` is read)."""
    accelerator.load_state(path, load_kwargs={"weights_only": True})
    with open(os.path.join(path, STATE_FILE)) as f:
        saved = json.load(f)
    position.load_state_dict(saved["position"])
    scheduler.scheduler.load_state_dict(saved["scheduler"])
    rng = torch.load(os.path.join(path, f"rng_state_{accelerator.process_index}.pt"), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def peak_memory_mib(device) -> float:
    """Peak allocated GPU memory, or on CPU the peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- training ------------------------------------------------------------------------------


def prepare_data(args, accelerator, tokenizer, dp_size: int):
    """``(fmt, rows, eval_rows)``: the dataset loaded, tokenised (rank 0 first; the others read its
    ``datasets`` cache), split and packed. Every cap is printed by the main process."""
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    with accelerator.main_process_first():
        table = data.load_table(args, say)
        fmt = data.data_format(table.column_names, args)
        examples = data.tokenize(table, fmt, tokenizer, args)
    examples = data.cap_length(examples, args.max_doc_len)
    train_ex, eval_ex = data.split_heldout(examples, args.eval_fraction if args.eval_every else 0.0, args.seed)
    rows = data.pack(train_ex, args.max_seq_len, args.packing, say)
    if len(rows) < args.batch_size * dp_size:
        _fail(
            f"the training data make {len(rows)} packed rows of --max-seq-len={args.max_seq_len} tokens, fewer than "
            f"one batch of --batch-size {args.batch_size} x {dp_size} data-parallel replicas; lower --max-seq-len, "
            "raise --max-docs or add data"
        )
    eval_rows = data.pack(eval_ex, args.max_seq_len, args.packing, say) if args.eval_every else []
    per_batch = args.batch_size * dp_size
    if len(rows) % per_batch:
        say(
            f"{len(rows) % per_batch} of {len(rows)} packed rows left out of each epoch (the order changes per "
            f"epoch): a batch is --batch-size {args.batch_size} x {dp_size} replicas",
            flush=True,
        )
    if len(eval_rows) % per_batch:
        say(
            f"{len(eval_rows) % per_batch} of {len(eval_rows)} held-out rows dropped: evaluation uses whole batches "
            f"of {per_batch} rows",
            flush=True,
        )
    eval_rows = eval_rows[: len(eval_rows) // per_batch * per_batch]
    if args.eval_every and not eval_rows:
        _fail(
            f"the held-out {args.eval_fraction:g} of the examples ({len(eval_ex)}) makes fewer packed rows than one "
            f"batch ({args.batch_size} x {dp_size} replicas of {args.max_seq_len} tokens); raise --eval-fraction"
        )
    return fmt, rows, eval_rows


def main(argv=None) -> None:
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    args = parse_args(argv)
    plugin, source = common.load_sp_plugin(args.sp_config, PROG)  # validate before anything starts
    ckpt = validate(args, plugin, source)
    common.warn_if_one_process(PROG)
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # CPU ranks started by `accelerate launch` (MULTI_GPU config -> torchrun): tell accelerate to
        # run them as MULTI_CPU on gloo; without it each process would think it is alone
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    # the plugin's collective_timeout_s (if set) bounds how long a collective waits for a stuck rank
    accelerator = Accelerator(
        gradient_accumulation_steps=args.grad_accum,
        log_with=common.report_to(args.report_to),
        project_dir=args.output_dir,
        **plugin.accelerator_kwargs(),
    )
    if accelerator.device.type == "cpu" and accelerator.num_processes > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // accelerator.num_processes))
    main_proc = accelerator.is_main_process
    world = accelerator.num_processes
    dp_size = world // (plugin.sp_size or world)

    # data first (cheap, and its errors come before the model is loaded)
    tokenizer = load_tokenizer(args)
    fmt, rows, eval_rows = prepare_data(args, accelerator, tokenizer, dp_size)

    model = build_model(args, tokenizer)
    use_cache = model.config.use_cache  # the user's value, restored in the saved config
    base_dir = None
    if args.lora and args.model is None:
        base_dir = os.path.abspath(os.path.join(args.output_dir, "base_model"))
        if main_proc:
            model.save_pretrained(base_dir)
    model.config.use_cache = False  # no KV cache in training
    if args.lora:
        model = add_lora(model, args, base_dir)
    lr = args.lr or (3e-3 if args.model is None else (2e-4 if args.lora else 2e-5))

    loader = torch.utils.data.DataLoader(
        rows, batch_size=args.batch_size, sampler=EpochShuffle(len(rows), args.seed), drop_last=True
    )
    objects = [loader] + ([torch.utils.data.DataLoader(eval_rows, batch_size=args.batch_size)] if eval_rows else [])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.max_steps)
    model, optimizer, scheduler, loader, *eval_loader = hf_seqpar.prepare_sequence_parallel(
        accelerator, plugin, model, optimizer, scheduler, *objects
    )
    position = Position()
    state = hf_seqpar.find_state(model)
    tokens_per_step = args.max_seq_len * args.batch_size * args.grad_accum * dp_size
    accelerator.init_trackers("finetune_long_context", config=common.tracker_config(args))
    if main_proc:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"hf_seqpar finetune: {world} ranks ({accelerator.device.type}), strategy={state.strategy.name} "
            f"sp_size={state.sp_size} dp_size={dp_size} (SP config: {source}), {fmt} data, {len(rows)} packed rows "
            f"of {args.max_seq_len} tokens ({len(loader)} batches per epoch per replica), {len(eval_rows)} held-out "
            f"rows, {n_train / 1e6:.2f}M trainable parameters, lr {lr:g}{', LoRA' if args.lora else ''}",
            flush=True,
        )
    if ckpt is not None:
        load_checkpoint(accelerator, ckpt, position, scheduler)
        accelerator.step = position.accum_step
        if main_proc:
            print(
                f"resumed from {ckpt} at step {position.step} (epoch {position.epoch + 1}, batch "
                f"{position.batch_in_epoch} of {len(loader)})",
                flush=True,
            )

    loss = train(
        args,
        accelerator,
        model,
        optimizer,
        scheduler,
        loader,
        eval_loader,
        position,
        state.sp_size,
        tokens_per_step,
        len(eval_rows),
        tqdm,
    )
    if not math.isfinite(loss):
        accelerator.end_training()
        if dist.is_initialized():
            dist.destroy_process_group()
        _fail(
            f"the training loss is {loss} at step {position.step}: stopped, and no model saved (its weights "
            f"are no longer finite); lower --lr (now {lr:g}), keep --max-grad-norm > 0, or resume from an "
            "earlier checkpoint"
        )

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    (unwrapped.get_base_model() if args.lora else unwrapped).config.use_cache = use_cache
    unwrapped.save_pretrained(
        args.output_dir, is_main_process=main_proc, state_dict=state_dict, save_function=accelerator.save
    )
    if main_proc:
        if tokenizer is not None:
            tokenizer.save_pretrained(args.output_dir)
        kind = "LoRA adapter (peft.AutoPeftModelForCausalLM)" if args.lora else "model (AutoModelForCausalLM)"
        print(f"saved {kind} to {args.output_dir}", flush=True)
    accelerator.end_training()
    if dist.is_initialized():
        dist.destroy_process_group()


def train(
    args,
    accelerator,
    model,
    optimizer,
    scheduler,
    loader,
    eval_loader,
    position,
    sp_size: int,
    tokens_per_step: int,
    n_eval_rows: int,
    tqdm,
) -> float:
    """The training loop from ``position`` to ``--max-steps``; returns the last step's loss (stops
    early at a non-finite one)."""
    main_proc = accelerator.is_main_process
    model.train()
    bar = tqdm(total=args.max_steps, initial=position.step, disable=not main_proc, desc="train", dynamic_ncols=True)
    micro_losses, t0, loss = [], time.perf_counter(), float("nan")
    clip = args.max_grad_norm if args.max_grad_norm > 0 else float("inf")  # inf: measure the norm, clip nothing
    grad_norm = lr = float("nan")
    while position.step < args.max_steps:
        loader.set_epoch(position.epoch)
        for i, batch in enumerate(loader):
            if i < position.batch_in_epoch:  # resumed mid-epoch: these batches were trained on
                continue
            with accelerator.accumulate(model):
                out = model(**batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), clip))
                    lr = scheduler.get_last_lr()[0]  # the rate this step uses
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(out.loss.detach())
            position.batch_in_epoch = i + 1
            if not accelerator.sync_gradients:
                continue
            position.step += 1
            # each rank's loss is its SP group's true loss; the mean over ranks is over dp replicas
            loss = accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean").item()
            dt, micro_losses = time.perf_counter() - t0, []
            peaks = [None] * dist.get_world_size()
            dist.all_gather_object(peaks, round(peak_memory_mib(accelerator.device)))
            accelerator.log(
                {
                    "train/loss": loss,
                    "train/lr": lr,
                    "train/grad_norm": grad_norm,
                    "train/tokens_per_s": tokens_per_step / dt,
                    "train/peak_memory_mib": max(peaks),
                },
                step=position.step,
            )
            if main_proc:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss:.4f}",
                    lr=f"{lr:.2e}",
                    grad_norm=f"{grad_norm:.3f}",
                    tok_s=f"{tokens_per_step / dt:,.0f}",
                    mem_mib=max(peaks),
                )
                if (
                    position.step % args.log_every == 0
                    or position.step in (1, args.max_steps)
                    or not math.isfinite(loss)
                ):
                    tqdm.write(
                        f"step {position.step:4d}/{args.max_steps}  loss {loss:.6f}  lr {lr:.4e}  grad_norm "
                        f"{grad_norm:.4f}  {tokens_per_step / dt:,.0f} tokens/s  peak memory MiB per rank {peaks}"
                    )
            if not math.isfinite(loss):
                break
            if args.eval_every and (position.step % args.eval_every == 0 or position.step == args.max_steps):
                eval_loss = evaluate(model, eval_loader[0], accelerator, args.eval_batches)
                accelerator.log({"eval/loss": eval_loss}, step=position.step)
                if main_proc:
                    tqdm.write(
                        f"eval at step {position.step}: loss {eval_loss:.6f} over {n_eval_rows} held-out rows"
                        f"{f' (first {args.eval_batches} batches)' if args.eval_batches else ''}"
                    )
            if args.save_every and position.step % args.save_every == 0:
                position.accum_step = accelerator.step
                path = save_checkpoint(accelerator, args, position, scheduler, accelerator.num_processes, sp_size)
                if main_proc:
                    tqdm.write(f"saved checkpoint {path}")
            t0 = time.perf_counter()
            if position.step >= args.max_steps:
                break
        else:
            position.epoch, position.batch_in_epoch = position.epoch + 1, 0
            continue
        break
    bar.close()
    return loss


if __name__ == "__main__":
    main()
