"""Rank code for TRL's GRPOTrainer with and without SequenceParallelMixin (tests/test_grpo.py).

Every run trains the same tiny Llama (saved once, so TRL loads the reference model from the same
files) on text prompts of different lengths with two rule-based rewards, fp32, SGD; the one-process
run and the SP ranks seed identically, and under SP only SP rank 0 samples (its RNG stream is the
one-process run's), so both train on the same completions.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from cases import TRAINER_ARGS

import hf_seqpar

#: completion tokens per sample (the byte tokenizer's eos ends some earlier, see GEN_KWARGS)
MAX_COMPLETION = 10
#: generation-only logit bias towards eos (257): completions of different lengths (not in the log-probs)
GEN_KWARGS = {"sequence_bias": [[[257], 3.0]]}
#: logged values that are wall-clock times, not results
TIMES = ("step_time",)


def prompts(n: int = 8, seed: int = 0) -> list[str]:
    """Prompts of 3-12 letters over 'abcdefgh' (the byte tokenizer scores bytes)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(3, 13, (1,), generator=g))
        out.append("".join("abcdefgh"[int(i)] for i in torch.randint(0, 8, (k,), generator=g)))
    return out


def reward_length(completions, **kwargs) -> list[float]:
    """Closer to 6 characters is better."""
    return [-abs(len(c) - 6) / 6.0 for c in completions]


def reward_ascii(completions, **kwargs) -> list[float]:
    """The share of the completion's characters that are ASCII (the tiny model samples any byte)."""
    return [sum(ch.isascii() for ch in c) / max(len(c), 1) for c in completions]


def saved_model(out_dir: str) -> str:
    """The tiny Llama saved on disk (rank 0 writes, the others wait): TRL builds GRPO's reference
    model from the policy's path."""
    from cases_trl import tiny_lm

    path = os.path.join(out_dir, "model")
    ranks = dist.is_initialized()
    if not ranks or dist.get_rank() == 0:
        tiny_lm().save_pretrained(path)
    if ranks:
        dist.barrier()
    return path


def grpo_config(out_dir: str, **kw):
    from trl import GRPOConfig

    base = dict(
        output_dir=out_dir,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        steps_per_generation=4,  # one generation per 2 optimizer steps: the old-policy ratio is computed
        num_generations=4,
        max_completion_length=MAX_COMPLETION,
        temperature=0.9,
        generation_kwargs=GEN_KWARGS,
        max_steps=3,
        **TRAINER_ARGS,
        bf16=False,
    )
    base.update(kw)
    return GRPOConfig(**base)


def grpo_run(
    sp: bool,
    out_dir: str,
    strategy: str = "ulysses",
    order: str = "mixin_first",
    sp_options: dict | None = None,
    **config,
) -> dict:
    """``max_steps`` optimizer steps of GRPOTrainer; the logged history (wall-clock times dropped),
    the final parameters, and under SP the (local, full) lengths of the last batch each SP model saw.
    ``sp=False`` on launched ranks is TRL's own data-parallel run."""
    from cases_trainer import reset_accelerate
    from datasets import Dataset
    from trl import GRPOTrainer

    from hf_seqpar.core.data import byte_tokenizer

    reset_accelerate()
    common = dict(
        model=saved_model(out_dir),
        reward_funcs=[reward_length, reward_ascii],
        args=grpo_config(out_dir, **config),
        train_dataset=Dataset.from_dict({"prompt": prompts()}),
        processing_class=byte_tokenizer(),
    )
    if sp:
        bases = (hf_seqpar.SequenceParallelMixin, GRPOTrainer)
        cls = type("SPGRPOTrainer", bases if order == "mixin_first" else bases[::-1], {})
        plugin = hf_seqpar.SequenceParallelPlugin(strategy=strategy, **(sp_options or {}))
        trainer = cls(**common, sp_plugin=plugin)
    else:
        trainer = GRPOTrainer(**common)
    trainer.train()
    logs = [
        {k: v for k, v in h.items() if k not in ("epoch", "learning_rate", "step", *TIMES)}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    model = hf_seqpar.core.mesh.unwrap_model(trainer.model)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    split = None
    if sp:
        states = [hf_seqpar.core.mesh.find_state(m) for m in (trainer.model, trainer.ref_model) if m is not None]
        split = [(s.last_layout.local_len, s.last_layout.seq_len) for s in states]
        hf_seqpar.disable_sequence_parallel(trainer.model)
    return {"logs": logs, "params": params, "rank": int(os.environ.get("RANK", "0")), "split": split}


def grpo_refusals(out_dir: str) -> dict:
    """The message of each GRPO set-up the mixin refuses at construction (None: not refused)."""
    from cases_trainer import reset_accelerate
    from datasets import Dataset
    from trl import GRPOTrainer

    from hf_seqpar.core.data import byte_tokenizer

    path = saved_model(out_dir)

    def attempt(strategy="ulysses", **kw):
        reset_accelerate()
        cls = type("SPGRPOTrainer", (hf_seqpar.SequenceParallelMixin, GRPOTrainer), {})
        try:
            cls(
                model=path,
                reward_funcs=[reward_length],
                args=grpo_config(out_dir, max_steps=1, **kw),
                train_dataset=Dataset.from_dict({"prompt": prompts()}),
                processing_class=byte_tokenizer(),
                sp_plugin=hf_seqpar.SequenceParallelPlugin(strategy=strategy),
            )
        except (ValueError, NotImplementedError) as e:
            return str(e)
        return None

    return {
        "cispo": attempt(loss_type="cispo"),
        "batch": attempt(steps_per_generation=1, gradient_accumulation_steps=1),
        "megatron": attempt(strategy="megatron"),
    }
