"""Many tiny documents against a few long ones: one packed row, same length, per strategy.

A row of 300 documents of 1-3 tokens and a row of 3 documents of the same total length are run
(forward + backward of a small Llama-style model) unsharded and under each strategy on 2 gloo
ranks; each rank reports the CPU time of its steps (``time.process_time``, one thread: less
sensitive to other load on the machine than wall time), the median over the measured steps is
taken, then the maximum over the ranks. ``--unpacked`` also runs the rows with the packing of
small attention pieces turned off (``hf_seqpar.core.segments.pack_pieces`` replaced by the
identity inside this script's ranks), i.e. one kernel call per document as before.

    python benchmarks/many_docs.py [--steps 8] [--unpacked] [--strategies none,ulysses,ring,megatron]

Prints a markdown table; measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DOCS, SEED = 300, 0


def rows() -> dict:
    """``{name: position_ids (1, S)}``: 300 documents of 1-3 tokens, and 3 of the same length."""
    lengths = torch.randint(1, 4, (DOCS,), generator=torch.Generator().manual_seed(SEED)).tolist()
    s = sum(lengths)
    three = [s // 3, s // 3, s - 2 * (s // 3)]
    return {f"{DOCS} docs": torch.cat([torch.arange(n) for n in lengths])[None],
            "3 docs": torch.cat([torch.arange(n) for n in three])[None]}


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, use_cache=False,
                                        attn_implementation="sdpa", max_position_embeddings=4096))


def step_seconds(m, batch, shard, steps: int, warmup: int = 2) -> float:
    times = []
    for i in range(warmup + steps):
        m.zero_grad(set_to_none=True)
        t0 = time.process_time()
        m(**shard(batch)).loss.backward()
        if i >= warmup:
            times.append(time.process_time() - t0)
    return statistics.median(times)


def rank_main(rank: int, world: int, port: int, strategy: str, packed: bool, steps: int, queue) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import hf_seqpar
    import hf_seqpar.core.segments as segments

    if not packed:
        segments.pack_pieces = lambda pieces: pieces  # one kernel call per document, as before packing
    m = model()
    shard = lambda b: b  # noqa: E731
    if strategy != "none":
        hf_seqpar.enable_sequence_parallel(m, strategy, world)
        shard = lambda b: hf_seqpar.shard_batch(b, m)  # noqa: E731
    out = {}
    for name, pos in rows().items():
        ids = torch.randint(0, 4096, pos.shape, generator=torch.Generator().manual_seed(1))
        out[name] = step_seconds(m, {"input_ids": ids, "labels": ids.clone(), "position_ids": pos}, shard, steps)
    queue.put((rank, out))
    dist.destroy_process_group()


def measure(strategy: str, world: int, packed: bool, steps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, strategy, packed, steps, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600)[1] for _ in procs]
    for p in procs:
        p.join()
    return {name: max(r[name] for r in results) for name in results[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--unpacked", action="store_true", help="also run without packing small pieces (the old path)")
    ap.add_argument("--strategies", default="none,ulysses,ring,megatron", help="comma-separated (default: all)")
    args = ap.parse_args()
    s = rows()["3 docs"].shape[1]
    print(f"one row of {s} tokens; CPU seconds per forward+backward step (median of {args.steps}, max over ranks)\n")
    print(f"| strategy | ranks | pieces packed | {DOCS} docs s | 3 docs s | ratio |")
    print("|---|---|---|---|---|---|")
    for strategy in args.strategies.split(","):
        world = 1 if strategy == "none" else 2
        for packed in (True, False) if args.unpacked and strategy != "none" else (True,):
            r = measure(strategy, world, packed, args.steps)
            many, few = r[f"{DOCS} docs"], r["3 docs"]
            label = "-" if strategy == "none" else ("yes" if packed else "no (before)")
            print(f"| {strategy} | {world} | {label} | {many:.4f} | {few:.4f} | {many / few:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
