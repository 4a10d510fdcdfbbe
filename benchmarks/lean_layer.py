"""Per-token slope of the peak step memory before and after the leaner recomputed layer (issue 23), and where it is set.

On 2 gloo CPU ranks, the model and measurement of :mod:`hf_seqpar.tools.memcheck` (a Llama of hidden
128, 4 layers, 4 query / 2 kv heads of 32, MLP 1024 or ``--intermediate``, vocabulary 4096, one row;
the second step's peak resident memory above the memory before it) at ``S`` and ``2 S`` tokens, with checkpointing,
``--tiles`` MLP tiles and loss chunks of 128 tokens, in ``--dtype``. The slope
``(peak(2S) - peak(S)) / S`` is the bytes per token of the row that the step's peak grows by (the
constant part, the gradients, cancels).

Rows: transformers' RMSNorm or the lean one (``lean_norms``), and the variable-length attention
either as before (fp32 accumulators over the whole local sequence, cast at the end: the output and
lse in the forward, dq/dk/dv in the backward; this script's ranks replace
:func:`hf_seqpar.kernels.varlen.pieces_output` and :func:`~hf_seqpar.kernels.varlen.pieces_gradients`
by that code, the same numbers) or as now (the kernel's output and gradients where one piece covers
the row). ``--variants`` picks the rows (``norms:before|now``). The ring's attention path is not
changed by the second; its rows show the norm only. ``predicted`` is the memory model's slope
(:func:`hf_seqpar.tools.memmodel.peak_memory`, which describes the code that runs now).

Each case is measured traced (:class:`hf_seqpar.tools.memtrace.NodePeaks`, hooks that only observe:
the same peak as without them): the autograd node during
which the step's peak was set, and the peak while the attention kernel's backward ran (its node:
``_VarlenAttentionBackward`` or ``_RingAttentionBackward``), with its slope and the model's slope
for that phase (the last layer's backward with the attention working set). A discarded measurement
at each length comes before the others: the first case a rank measures at a length reads 1 to 17 MiB
higher than the same case measured again (measured: something the process keeps grows once per
length), which would otherwise be counted as a saving of whatever row comes first.

The default ``S = 16384`` is the smallest at which, with 32 tiles on 2 ranks, every per-token
tensor is one of glibc's own mappings (over 128 KiB: a tile's gradient is ``S / 2 / 32 x 128 x 4``
bytes in fp32): below it the tiles' gradients come from the heap, whose free resident pages depend on
what ran before, and the same case measured twice at ``S = 8192`` differed by up to 6 MiB.
In bf16 the same holds from ``S = 32768``.

    python benchmarks/lean_layer.py [--seq 16384] [--tiles 32] [--intermediate 1024] [--dtype float32]
        [--strategies ulysses,ring] [--variants transformers:before,transformers:now,lean:now]

Prints two markdown tables; measures, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.multiprocessing as mp

#: The autograd node of each strategy's attention backward.
ATTENTION_NODE = {"ulysses": "_VarlenAttentionBackward", "ring": "_RingAttentionBackward"}
MIB = 2**20


def _whole_sequence_fp32(dout, q, k, v, out, lse, pieces, *, scale, backend=None):
    """The attention gradients as computed before issue 23: fp32 accumulators over the whole sequence."""
    from hf_seqpar.kernels.varlen import pieces_backward

    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (q, k, v))
    pieces_backward(dout, q, k, v, out, lse, pieces, dq, dk, dv, scale=scale, backend=backend)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _whole_sequence_fp32_output(q, k, v, pieces, *, scale, backend=None):
    """The attention output as computed before: fp32 out/lse accumulators over the whole sequence."""
    from hf_seqpar.kernels.varlen import pieces_forward

    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    pieces_forward(q, k, v, pieces, out, lse, scale=scale, backend=backend)
    return out.to(q.dtype), lse


def _rank(rank, world, port, jobs, queue):
    """Measure every job on this rank (``jobs``: ``(key, case, old_attention, trace)``)."""
    import torch.distributed as dist

    from hf_seqpar.kernels import varlen
    from hf_seqpar.tools.memcheck import measure_case

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lean_grads, lean_output = varlen.pieces_gradients, varlen.pieces_output
    try:
        for key, case, old_attention, trace in jobs:
            varlen.pieces_gradients = _whole_sequence_fp32 if old_attention else lean_grads
            varlen.pieces_output = _whole_sequence_fp32_output if old_attention else lean_output
            queue.put((key, measure_case(case, trace=trace)))
    finally:
        dist.destroy_process_group()


def _measure(jobs, world: int = 2) -> dict:
    """``{key: [result of each rank]}`` for ``jobs``, on ``world`` fresh spawned ranks."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, jobs, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got: dict = {}
    for _ in range(world * len(jobs)):
        key, res = queue.get(timeout=1800)
        got.setdefault(key, []).append(res)
    for p in procs:
        p.join(timeout=30)
    return got


def _case(strategy, norms, n, args):
    from hf_seqpar.tools.memcheck import MemCase

    return MemCase(
        strategy,
        n,
        True,
        False,
        args.tiles,
        128,
        lean_norms=norms == "lean",
        dtype=args.dtype,
        intermediate_size=args.intermediate,
    )


def _rows(strategies, variants) -> list[tuple]:
    """``(strategy, norms, old_attention)`` per row, ``variants`` as ``(norms, old_attention)`` (the
    ring keeps its own accumulators: no "before")."""
    return [(st, norms, old) for st in strategies for norms, old in variants if st == "ulysses" or not old]


def _predicted(case) -> tuple[float, float]:
    """The model's step peak and its peak while attention's backward runs (the layers' backward
    with the attention working set in place of the larger of the MLP's and attention's; a norm's
    backward, which may set the layer's working set, runs at another time), bytes."""
    from hf_seqpar.tools.memcheck import model_inputs
    from hf_seqpar.tools.memmodel import peak_memory

    x = model_inputs(case)
    mem = peak_memory(x)
    ws = mem.components
    eh = x.elem * x.shape.hidden * x.batch * x.seq_len / x.sp  # one e h vector over the local tokens
    mlp, attn = ws["ws.mlp"], ws["ws.attention"]
    without_norm = max(eh + mlp, 2 * eh + attn)  # the layer working set with the norms' left out
    attention = max(
        mem.phases[phase] - ws["layer_ws"] + without_norm - max(mlp, attn) + attn + mem.grad_at_phase[phase]
        for phase in ("last layer backward", "first layer backward")
    )
    return mem.total, attention


def _grads_label(strategy: str, old: bool) -> str:
    if old:
        return "fp32 accumulators over the sequence (before)"
    return "per piece (now)" if strategy == "ulysses" else "ring's own"


def _header(*columns: str) -> None:
    cols = ("strategy", "norms", "attention gradients", *columns)
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))


def _line(*cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |")


def _site_label(results) -> str:
    """The autograd node of the highest rank's peak (``forward``: before the backward)."""
    return max(results, key=lambda r: r["peak_bytes"])["site"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384, help="S (the second length is 2 S; above: the smallest clean S)")
    ap.add_argument("--tiles", type=int, default=32, help="MLP tiles")
    ap.add_argument("--intermediate", type=int, default=1024, help="MLP width (1024 = 8x hidden; 448 = 3.5x, as 8B)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameters and activations")
    ap.add_argument("--strategies", default="ulysses,ring", help="comma-separated: ulysses, ring")
    ap.add_argument(
        "--variants",
        default="transformers:before,transformers:now,lean:now",
        help="comma-separated rows, norms:attention with norms transformers|lean and attention before|now "
        "(before: fp32 output and gradient accumulators over the whole sequence; Ulysses only)",
    )
    args = ap.parse_args()
    s = args.seq
    variants = []
    for variant in args.variants.split(","):
        norms, _, when = variant.partition(":")
        if norms not in ("transformers", "lean") or when not in ("before", "now"):
            ap.error(f"--variants: {variant!r} is not norms:attention (transformers|lean : before|now)")
        variants.append((norms, when == "before"))
    rows = _rows(args.strategies.split(","), variants)
    first = rows[0]
    jobs = [(("warm-up", n), _case(first[0], first[1], n, args), first[2], False) for n in (2 * s, s)]
    for row in rows:
        for n in (s, 2 * s):
            jobs.append(((row, n), _case(row[0], row[1], n, args), row[2], True))
    got = _measure(jobs)
    print(f"{args.dtype}, MLP {args.intermediate}, {args.tiles} MLP tiles, S = {s}:\n")
    _step_table(rows, got, s, args)
    print()
    _attention_table(rows, got, s, args)


def _step_table(rows, got, s, args) -> None:
    """Step peaks, slopes (measured, predicted) and where the peak is set."""
    _header("peak at S (MiB)", "at 2S (MiB)", "slope B/token", "predicted B/token", "peak set in (S; 2S)")
    for row in rows:
        strategy, norms, old = row
        a, b = (max(r["peak_bytes"] for r in got[(row, n)]) for n in (s, 2 * s))
        pred = ""
        if not old:
            pa, pb = (_predicted(_case(strategy, norms, n, args))[0] for n in (s, 2 * s))
            pred = f"{(pb - pa) / s:.0f}"
        where = "; ".join(_site_label(got[(row, n)]) for n in (s, 2 * s))
        _line(
            strategy,
            norms,
            _grads_label(strategy, old),
            f"{a / MIB:.2f}",
            f"{b / MIB:.2f}",
            f"{(b - a) / s:.0f}",
            pred,
            where,
        )


def _attention_table(rows, got, s, args) -> None:
    """The peak while the attention kernel's backward runs, measured and predicted."""
    _header("attention backward's peak at S (MiB)", "at 2S (MiB)", "slope B/token", "predicted B/token")
    for row in rows:
        strategy, norms, old = row
        node = ATTENTION_NODE[strategy]
        a, b = (max(r["node_peaks"].get(node, 0) for r in got[(row, n)]) for n in (s, 2 * s))
        pred = ""
        if not old:
            pa, pb = (_predicted(_case(strategy, norms, n, args))[1] for n in (s, 2 * s))
            pred = f"{(pb - pa) / s:.0f}"
        _line(
            strategy, norms, _grads_label(strategy, old), f"{a / MIB:.2f}", f"{b / MIB:.2f}", f"{(b - a) / s:.0f}", pred
        )


if __name__ == "__main__":
    main()
