"""Per-token slope of the peak step memory, before and after the leaner recomputed layer (issue 23).

On 2 gloo CPU ranks, the model and measurement of :mod:`hf_seqpar.tools.memcheck` (a Llama of hidden
128, 4 layers, 4 query / 2 kv heads of 32, MLP 1024, vocabulary 4096, fp32, one row; the second
step's peak resident memory above the memory before it) at ``S`` and ``2 S`` tokens, with
checkpointing, 32 MLP tiles and loss chunks of 128 tokens (so that the recomputed layer's attention,
not its MLP, sets the backward's working set, as for the 8B model at millions of tokens; and both
lengths peak in the same phase, the last layer's backward). The slope ``(peak(2S) - peak(S)) / S`` is the
bytes per token of the row that the step's peak grows by (the constant part, the gradients, cancels).

Rows: transformers' RMSNorm or the lean one (``lean_norms``), and the attention gradients either as
before (fp32 dq/dk/dv accumulators over the whole local sequence, cast at the end: this script's
ranks replace :func:`hf_seqpar.kernels.varlen.pieces_gradients` by that code, the same numbers) or
as now (the kernel's gradients when one piece covers the row). The ring's attention path is not
changed by the second; its rows show the norm only. ``predicted`` is the memory model's slope for the
row where it describes the code that ran.

    python benchmarks/lean_layer.py [--seq 8192] [--tiles 32] [--strategies ulysses,ring]

Prints a markdown table; measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.multiprocessing as mp


def _whole_sequence_fp32(dout, q, k, v, out, lse, pieces, *, scale, backend=None):
    """The attention gradients as computed before issue 23: fp32 accumulators over the whole sequence."""
    from hf_seqpar.kernels.varlen import pieces_backward

    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    pieces_backward(dout, q, k, v, out, lse, pieces, dq, dk, dv, scale=scale, backend=backend)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _rank(rank, world, port, jobs, queue):
    import torch.distributed as dist

    from hf_seqpar.kernels import varlen
    from hf_seqpar.tools.memcheck import measure_case

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lean_grads = varlen.pieces_gradients
    try:
        for key, case, old_attention in jobs:
            varlen.pieces_gradients = _whole_sequence_fp32 if old_attention else lean_grads
            queue.put((key, measure_case(case)["peak_bytes"]))
    finally:
        dist.destroy_process_group()


def main() -> None:
    from hf_seqpar.tools.memcheck import MemCase, predict_case

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=8192, help="S (the second length is 2 S)")
    ap.add_argument("--tiles", type=int, default=32, help="MLP tiles")
    ap.add_argument("--strategies", default="ulysses,ring")
    args = ap.parse_args()
    s = args.seq
    rows = []
    for strategy in args.strategies.split(","):
        variants = [("transformers", True), ("transformers", False), ("lean", False)]
        if strategy != "ulysses":
            variants = [("transformers", False), ("lean", False)]  # the ring keeps its own accumulators
        rows += [(strategy, norms, old) for norms, old in variants]
    jobs = []
    for row in rows:
        strategy, norms, old = row
        for n in (s, 2 * s):
            case = MemCase(strategy, n, True, False, args.tiles, 128, lean_norms=norms == "lean")
            jobs.append(((row, n), case, old))
    world = 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, jobs, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    peaks: dict = {}
    for _ in range(world * len(jobs)):
        key, peak = queue.get(timeout=1800)
        peaks[key] = max(peaks.get(key, 0), peak)
    for p in procs:
        p.join(timeout=30)
    print(f"| strategy | norms | attention gradients | peak at S={s} (MiB) | at 2S (MiB) | slope B/token | predicted B/token |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        strategy, norms, old = row
        a, b = peaks[(row, s)], peaks[(row, 2 * s)]
        grads = "fp32 over the sequence (before)" if old else ("per piece (now)" if strategy == "ulysses" else "ring's own")
        pred = ""
        if not old:
            cases = [MemCase(strategy, n, True, False, args.tiles, 128, lean_norms=norms == "lean") for n in (s, 2 * s)]
            pa, pb = (predict_case(c)["device_bytes"] for c in cases)
            pred = f"{(pb - pa) / s:.0f}"
        print(f"| {strategy} | {norms} | {grads} | {a / 2**20:.2f} | {b / 2**20:.2f} | {(b - a) / s:.0f} | {pred} |")


if __name__ == "__main__":
    main()
