"""CPU demo: train a tiny Llama-style model with sequence parallelism on 2 gloo ranks.

    torchrun --standalone --nproc_per_node 2 recipes/demo_cpu.py

Everything is offline: the model is built from a config, the tokenizer is byte-level, and the
text is Python's own standard-library source, packed into long rows whose position_ids restart
at every document (so no token attends across documents).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sysconfig
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

import hf_seqpar
from hf_seqpar.core.data import pack_documents
from hf_seqpar.tp import average_gradients_over_dp


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default="ulysses", help="SP strategy (default: %(default)s)")
    p.add_argument("--sp-size", type=int, default=None, help="ranks per sequence (default: all ranks)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per packed row (default: %(default)s)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def stdlib_documents(max_docs: int = 400) -> list[bytes]:
    """Source files of the standard library, sorted (identical on every rank)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)[:max_docs]
    return [p.read_bytes() for p in files]


def packed_rows(docs: list[bytes], seq_len: int):
    """Batches of one packed row (see :func:`hf_seqpar.core.data.pack_documents`)."""
    for row in pack_documents(docs, seq_len):
        yield {k: v[None] for k, v in row.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if backend == "gloo":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // dist.get_world_size()))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq_len,
        attn_implementation="sdpa",
        use_cache=False,
    )
    model = LlamaForCausalLM(config).to(device)
    hf_seqpar.enable_sequence_parallel(model, args.strategy, args.sp_size)
    state = hf_seqpar.find_state(model)
    # tensor-parallel strategies (Megatron-SP): every SP rank already holds the exact gradient
    # (DTensors, which DDP cannot wrap); average over dp only
    sharded = state.strategy.shards_parameters
    ddp = model if sharded else DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)

    # every SP group gets the same rows; data-parallel replicas take every dp_size-th row
    dp_size, dp_rank = state.dp_size, state.dp_rank
    rows = (r for i, r in enumerate(packed_rows(stdlib_documents(), args.seq_len)) if i % dp_size == dp_rank)
    if rank == 0:
        print(
            f"hf_seqpar demo: {dist.get_world_size()} ranks ({backend}), strategy={args.strategy}, "
            f"sp_size={state.sp_size}, dp_size={dp_size}, {args.seq_len} tokens per row, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters",
            flush=True,
        )
    for step in range(1, args.steps + 1):
        batch = {k: v.to(device) for k, v in next(rows).items()}
        t0 = time.perf_counter()
        out = ddp(**hf_seqpar.shard_batch(batch, model))
        out.loss.backward()
        if sharded:
            average_gradients_over_dp(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if rank == 0:
            print(
                f"step {step:3d}/{args.steps}  loss {out.loss.item():.4f}  {args.seq_len * dp_size / dt:,.0f} tokens/s",
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
