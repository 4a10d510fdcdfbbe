"""Per-rank peak memory of one SP training step with the plain loss and with the chunked loss.

    python recipes/bench_memory.py --nproc 2 --seq-len 2048 --vocab 128256 --chunk 512

Each mode runs in fresh processes (``--nproc`` gloo ranks on CPU, SP over all of them) so the
peak resident set size (``ru_maxrss``) of each rank belongs to that mode alone. A small
Llama-style model with a real 128K vocabulary: the plain loss materialises
``(seq_len / nproc) x vocab`` fp32 logits per rank (plus their log-softmax and gradient); the
chunked loss holds ``chunk x vocab`` at a time.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket

import torch
import torch.multiprocessing as mp


def _rank(rank, world, port, args, mode, queue):
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_seqpar

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=args.seq_len,
        attn_implementation="sdpa",
        use_cache=False,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    plugin = hf_seqpar.SequenceParallelPlugin(loss_chunk_size=args.chunk if mode == "chunked" else None)
    hf_seqpar.integrations.accelerate.prepare_model(model, plugin)
    ids = torch.randint(0, args.vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(1))
    out = model(**hf_seqpar.shard_batch({"input_ids": ids, "labels": ids}, model))
    out.loss.backward()
    queue.put((rank, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, out.loss.item()))
    dist.destroy_process_group()


def measure(args, mode: str) -> tuple[list[float], float]:
    """Run one step in fresh ranks; return (peak RSS MiB per rank, loss)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, args.nproc, port, args, mode, queue)) for r in range(args.nproc)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    return [g[1] for g in got], got[0][2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="gloo ranks (SP over all) (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens of the sequence (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=128256, help="vocabulary size (default: Llama-3's %(default)s)")
    p.add_argument("--chunk", type=int, default=512, help="tokens per loss chunk (default: %(default)s)")
    args = p.parse_args(argv)
    if "LOCAL_RANK" in os.environ:
        raise SystemExit(
            "run bench_memory.py with plain `python`: it starts its own ranks (--nproc), "
            "fresh ones per mode, so that each peak belongs to one mode"
        )
    local = args.seq_len // args.nproc
    print(
        f"{args.nproc} ranks, {args.seq_len} tokens ({local} per rank), vocab {args.vocab}: plain fp32 logits "
        f"per rank {local * args.vocab * 4 / 2**20:.0f} MiB, chunked {args.chunk * args.vocab * 4 / 2**20:.0f} MiB"
    )
    for mode in ("plain", "chunked"):
        peaks, loss = measure(args, mode)
        print(f"{mode} peak_rss_mib_per_rank={','.join(f'{x:.0f}' for x in peaks)} loss={loss:.6f}", flush=True)


if __name__ == "__main__":
    main()
