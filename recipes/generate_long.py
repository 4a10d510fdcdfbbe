"""Needle in a haystack with hf_seqpar.generate: a long prompt prefilled sequence-parallel, its KV
cache sharded over the ranks, answers decoded with transformers' generate loop.

    torchrun --standalone --nproc_per_node 2 recipes/generate_long.py --lengths 1024 4096 --depths 0 0.5 1

The haystack is built here (numbered filler sentences, deterministic); a needle sentence ("The
magic number is NNNNN.") sits at each requested depth (0 = start, 1 = end) and the prompt ends with
the question. Without --model the tiny random Llama of the CPU recipes runs with a byte-level
tokenizer, so the accuracy is ~0 (random weights) while the table, the KV bytes per rank and the
comparison against the unsharded model's answer (--compare, on by default) are what it shows. With
--model (a folder or Hub name with a tokenizer) the real model answers. The launch line for
Llama-3.1-8B at 1M tokens on 8 GPUs, with its predicted per-GPU memory, is printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.distributed as dist

import hf_seqpar

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or Hub name (default: the tiny random CPU model)")
    p.add_argument(
        "--strategy",
        default="ulysses",
        choices=["ulysses", "ring", "hybrid"],
        help="SP strategy of the prefill (default: %(default)s)",
    )
    p.add_argument(
        "--lengths", type=int, nargs="+", default=[1024, 2048], help="prompt lengths in tokens (default: %(default)s)"
    )
    p.add_argument(
        "--depths",
        type=float,
        nargs="+",
        default=[0.0, 0.5, 1.0],
        help="needle depths, 0 = start of the haystack, 1 = end (default: %(default)s)",
    )
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per answer (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="(default: %(default)s)")
    p.add_argument(
        "--no-compare",
        action="store_true",
        help="skip the unsharded model's answer (it needs the whole prompt's KV cache on one device)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny model and of the needles")
    args = p.parse_args(argv)
    if any(n < 32 for n in args.lengths):
        p.error(f"--lengths {args.lengths}: each prompt needs at least 32 tokens for the needle and the question")
    if any(not 0 <= d <= 1 for d in args.depths):
        p.error(f"--depths {args.depths}: depths are fractions of the haystack in [0, 1]")
    if args.new_tokens < 1:
        p.error("--new-tokens must be >= 1")
    return args


class ByteTokenizer:
    """Bytes shifted past 3 special ids (0 pad, 1 bos, 2 eos), folded into the tiny vocabulary."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        return [3 + b % (self.vocab - 3) for b in text.encode()]

    def decode(self, ids) -> str:
        return "".join(chr(b) if 32 <= b < 127 else "?" for b in ((i - 3) % 256 for i in ids if i >= 3))


def build(args, device):
    """(model, tokenizer): the tiny random Llama of the CPU recipes, or --model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.model is None:
        torch.manual_seed(args.seed)
        config = LlamaConfig(
            vocab_size=256,
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max(args.lengths) * 2,
            attn_implementation="sdpa",
            use_cache=False,
        )
        model, tok = LlamaForCausalLM(config), ByteTokenizer(256)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
        tok = AutoTokenizer.from_pretrained(args.model)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None  # answers of exactly --new-tokens tokens
    return model.to(device=device, dtype=dtype).eval(), tok


def haystack_prompt(tok, length: int, depth: float, needle: int) -> list[int]:
    """``length`` token ids: filler with the needle sentence at ``depth``, then the question."""
    needle_ids = tok.encode(f" The magic number is {needle}. ")
    question = tok.encode(" What is the magic number? The magic number is")
    room = length - len(needle_ids) - len(question)
    filler: list[int] = []
    i = 0
    while len(filler) < room:
        filler += tok.encode(f" {FILLER[i % len(FILLER)]}")
        i += 1
    filler = filler[:room]
    cut = int(round(depth * room))
    return filler[:cut] + needle_ids + filler[cut:] + question


def launch_line() -> str:
    """The 8-GPU, 1M-token command for Llama-3.1-8B, with the predicted per-GPU memory."""
    from hf_seqpar.core.shape import ModelShape
    from hf_seqpar.tools.plan_infer import inference_rows
    from hf_seqpar.tools.presets import load_config

    seq = 1 << 20
    rows = inference_rows(ModelShape.from_config(load_config("llama-3.1-8b")), seq, 8, new=32, budget_gib=76.0)
    row = next(r for r in rows if r.label == "ulysses 8")
    return (
        f"# Llama-3.1-8B, 1M tokens, 8 GPUs (predicted per GPU: weights {row.weights_gib:.1f} GiB + KV "
        f"{row.kv_gib:.1f} GiB + prefill {row.prefill_gib:.1f} GiB = {row.total_gib:.1f} GiB; "
        "hf-seqpar plan --inference --seq-len 1048576 for the others):\n"
        "torchrun --standalone --nproc_per_node 8 recipes/generate_long.py --model meta-llama/Llama-3.1-8B-Instruct "
        f"--dtype bfloat16 --strategy ulysses --lengths {seq} --depths 0.1 0.5 0.9 --new-tokens 16 --no-compare"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model, tok = build(args, device)
    reference = None if args.no_compare else copy.deepcopy(model)
    hf_seqpar.enable_sequence_parallel(model, args.strategy)
    trials = [(n, d) for n in args.lengths for d in args.depths]
    from tqdm import tqdm

    rows = []
    for i, (length, depth) in enumerate(tqdm(trials, desc="needles", disable=rank != 0)):
        needle = 10000 + (args.seed * 7919 + i * 104729) % 90000
        ids = torch.tensor([haystack_prompt(tok, length, depth, needle)], device=device)
        t0 = time.perf_counter()
        out = hf_seqpar.generate(
            model, input_ids=ids, max_new_tokens=args.new_tokens, do_sample=False, return_dict_in_generate=True
        )
        seconds = time.perf_counter() - t0
        answer = out.sequences[0, length:]
        same = None
        if reference is not None:
            ref = reference.generate(input_ids=ids, max_new_tokens=args.new_tokens, do_sample=False)
            same = torch.equal(ref[0, length:], answer)
        report = out.cache.report()
        text = tok.decode(answer.tolist())
        rows.append(
            dict(
                length=length,
                depth=depth,
                needle=needle,
                answer=text,
                correct=str(needle) in text,
                same=same,
                seconds=seconds,
                tok_s=(length + args.new_tokens) / seconds,
                kv_mib=report["local_bytes"] / 2**20,
                kv_frac=report["fraction"],
            )
        )
    if rank == 0:
        print(format_table(rows, dist.get_world_size(), args.strategy))
        print(launch_line())
    dist.destroy_process_group()
    return 0


def format_table(rows: list[dict], world: int, strategy: str) -> str:
    """The per-needle table and the accuracy per length."""
    lines = [
        f"needle in a haystack: {strategy} on {world} ranks",
        f"{'length':>8} {'depth':>5} {'needle':>6}  {'answer':<18} {'correct':>7} {'=unsharded':>10} "
        f"{'seconds':>8} {'tok/s':>8} {'KV MiB/rank':>11} {'KV share':>8}",
    ]
    for r in rows:
        same = "-" if r["same"] is None else ("yes" if r["same"] else "NO")
        lines.append(
            f"{r['length']:>8} {r['depth']:>5.2f} {r['needle']:>6}  {r['answer'][:18]!r:<18} "
            f"{'yes' if r['correct'] else 'no':>7} {same:>10} {r['seconds']:>8.2f} {r['tok_s']:>8.0f} "
            f"{r['kv_mib']:>11.2f} {r['kv_frac']:>8.3f}"
        )
    for length in sorted({r["length"] for r in rows}):
        mine = [r for r in rows if r["length"] == length]
        lines.append(f"accuracy at {length} tokens: {sum(r['correct'] for r in mine)}/{len(mine)}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
