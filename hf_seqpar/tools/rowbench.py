"""Memory and speed of one training step against the sequence length, per row structure.

``hf-seqpar bench --rows single,packed,padded,window`` runs this: for every (strategy, rows,
length) it starts fresh ranks (so no configuration inherits another's peak), builds a small
Llama-style model from a config, and measures one forward+backward step on rows that are a single
document, packed documents of ``doc_len`` tokens (restarting ``position_ids``), right-padded
(``pad_frac`` of the row), or one document under a sliding window. It reports per-rank peak step
memory (peak resident memory during the last step minus the resident memory before the first
step, i.e. with the model and the batch already built, on CPU), the step time, tokens/s, and the
growth exponent of memory between consecutive lengths (``log(m2 / m1) / log(S2 / S1)``: 1.0 is linear).

The ranks run with glibc's ``mmap`` threshold fixed at 128 KiB
(:func:`hf_seqpar.tools.bench.malloc_follows_tensors`, unless the environment sets
``MALLOC_MMAP_THRESHOLD_``): every tensor buffer is then its own mapping, returned to the system when
freed, so resident memory tracks the live tensors. With glibc's default (a threshold that grows
after large frees) freed buffers stay in the heap and the peak depends on the order of earlier
allocations: the same Ulysses step measured 219-220 MiB at 32K tokens and 429-498 MiB at 64K
(apparent growth S^0.97-1.18 between runs), against 122.6 and 233.8 MiB (S^0.93) with the fixed
threshold (BENCHMARKS.md).
"""

from __future__ import annotations

import math
import os
import queue as queue_module
import socket
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from hf_seqpar.tools.bench import _PeakRSS, malloc_follows_tensors, status_bytes

__all__ = [
    "RowSpec",
    "ROW_KINDS",
    "make_rows",
    "measure_rows",
    "run_ranks",
    "growth_table",
    "format_rows",
    "init_rank",
    "skewed_positions",
    "longtail_positions",
    "PARETO_ALPHA",
]

ROW_KINDS = ("single", "packed", "padded", "window", "short", "skewed", "longtail")
#: Tail index of the ``longtail`` rows' document lengths (Pareto: P(len > x) ~ x^-alpha).
PARETO_ALPHA = 1.2


def skewed_positions(seq_len: int) -> torch.Tensor:
    """``(1, S)`` position ids of a ``skewed`` row: its first 3/4 one document, the rest
    documents of ``S / 32`` tokens (the last one shorter if they do not fit)."""
    long, short = 3 * seq_len // 4, max(1, seq_len // 32)
    rest = torch.arange(seq_len - long) % short
    return torch.cat([torch.arange(long), rest])[None]


def longtail_positions(seq_len: int, seed: int = 0, alpha: float = PARETO_ALPHA) -> torch.Tensor:
    """``(1, S)`` position ids of a ``longtail`` row: documents packed in the order drawn, their
    lengths Pareto-distributed (tail index ``alpha``, shortest ``max(16, S / 256)`` tokens, at most
    ``S``; the last one cut at the row's end), from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    shortest = max(16, seq_len // 256)
    parts, total = [], 0
    while total < seq_len:
        u = float(torch.rand((), generator=g))
        n = min(int(shortest * (1.0 - u) ** (-1.0 / alpha)), seq_len - total)
        parts.append(torch.arange(n))
        total += n
    return torch.cat(parts)[None]


@dataclass(frozen=True)
class RowSpec:
    """One measured configuration."""

    strategy: str
    """SP strategy (``ulysses``, ``ring``, ``hybrid``, ``megatron``) or ``none`` (plain model)."""
    world: int
    """Ranks (one SP group)."""
    seq_len: int
    """Tokens per row."""
    rows: str = "single"
    """Row structure: one of :data:`ROW_KINDS` (``short``: plain rows of ``doc_len`` tokens;
    ``skewed``: :func:`skewed_positions`; ``longtail``: :func:`longtail_positions`, seed 0)."""
    doc_len: int = 1024
    """Document length of ``packed`` rows (and the row length of ``short``)."""
    window: int = 1024
    """Sliding window of ``window`` rows."""
    pad_frac: float = 0.125
    """Fraction of a ``padded`` row that is right padding."""
    layers: int = 1
    """Decoder layers of the model."""
    hidden: int = 64
    """Hidden size (2 heads of 32)."""
    steps: int = 2
    """Steps run; the last one is measured (the first warms up)."""
    options: tuple = ()
    """Strategy options as ``((key, value), ...)``."""


def make_rows(spec: RowSpec, vocab: int) -> dict:
    """The full batch for ``spec`` (identical on every rank)."""
    s = spec.doc_len if spec.rows == "short" else spec.seq_len
    rows = spec.seq_len // s if spec.rows == "short" else 1
    ids = torch.randint(0, vocab, (rows, s), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    if spec.rows == "packed":
        batch["position_ids"] = (torch.arange(s) % spec.doc_len)[None]
    elif spec.rows == "skewed":
        batch["position_ids"] = skewed_positions(s)
    elif spec.rows == "longtail":
        batch["position_ids"] = longtail_positions(s)
    elif spec.rows == "padded":
        mask = torch.ones(rows, s, dtype=torch.long)
        mask[:, s - int(s * spec.pad_frac) :] = 0
        batch["attention_mask"] = mask
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


def _model(spec: RowSpec):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(
        vocab_size=97,
        hidden_size=spec.hidden,
        intermediate_size=2 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1 << 22,
        use_cache=False,
        attn_implementation="sdpa",
        sliding_window=spec.window if spec.rows == "window" else None,
    )
    return MistralForCausalLM(cfg)


def init_rank(rank: int, world: int, port: int) -> None:
    """Set up a measuring rank: glibc's allocator following the tensors, one thread, gloo."""
    malloc_follows_tensors()
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _rank_main(rank: int, spec: RowSpec, port: int, queue) -> None:
    try:
        init_rank(rank, spec.world, port)
        import hf_seqpar

        model = _model(spec).train()
        if spec.strategy != "none":
            hf_seqpar.enable_sequence_parallel(model, spec.strategy, spec.world, **dict(spec.options))
        batch = make_rows(spec, model.config.vocab_size)
        # the baseline is taken once, before the first step: later steps reuse memory the
        # allocator kept from the first, so "RSS before this step" would hide the step's peak
        before = status_bytes("VmRSS")
        for _step in range(spec.steps):
            model.zero_grad(set_to_none=True)
            local = batch if spec.strategy == "none" else hf_seqpar.shard_batch(batch, model)
            _PeakRSS.reset()
            t0 = time.perf_counter()
            loss = model(**local).loss
            loss.backward()
            seconds = time.perf_counter() - t0
            peak = status_bytes("VmHWM") - before
            del loss, local
        queue.put((rank, {"peak_mib": peak / 2**20, "seconds": seconds}))
        dist.destroy_process_group()
    except BaseException as e:  # report, never hang the parent
        queue.put((rank, {"error": f"{type(e).__name__}: {e}"}))


def measure_rows(spec: RowSpec, timeout: float = 1800.0) -> dict:
    """Run ``spec`` in fresh ranks; return the row of results (max over ranks).

    Raises:
        RuntimeError: a rank failed (its error) or did not answer within ``timeout`` seconds.
    """
    results = run_ranks(_rank_main, spec, spec.world, timeout)
    tokens = spec.seq_len
    seconds = max(r["seconds"] for r in results.values())
    return dict(
        asdict(spec),
        peak_mib=max(r["peak_mib"] for r in results.values()),
        seconds=seconds,
        tokens_per_s=tokens / seconds,
    )


def run_ranks(target, spec, world: int, timeout: float = 1800.0) -> dict:
    """Start ``world`` fresh spawned ranks running ``target(rank, spec, port, queue)`` (each puts
    ``(rank, result)`` on the queue, or ``(rank, {"error": ...})``); return ``{rank: result}``.

    Raises:
        RuntimeError: a rank failed (its error) or did not answer within ``timeout`` seconds.
    """
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, spec, port, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        deadline = time.monotonic() + timeout
        while len(results) < world:
            try:
                rank, res = queue.get(timeout=5.0)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"ranks {dead or 'all'} of {spec} died or timed out without a result") from None
                continue
            if "error" in res:
                raise RuntimeError(f"rank {rank} of {spec}: {res['error']}")
            results[rank] = res
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return results


def growth_table(rows: list[dict]) -> list[dict]:
    """Add ``growth`` (memory exponent against the previous length of the same strategy/rows)
    and ``vs_single`` (memory relative to the single-document row of the same strategy/length)."""
    by_key: dict = {}
    for r in sorted(rows, key=lambda r: (r["strategy"], r["world"], r["rows"], r["seq_len"])):
        prev = by_key.get((r["strategy"], r["world"], r["rows"]))
        r["growth"] = (
            math.log(r["peak_mib"] / prev["peak_mib"]) / math.log(r["seq_len"] / prev["seq_len"])
            if prev and prev["peak_mib"] > 0 and r["peak_mib"] > 0
            else None
        )
        by_key[(r["strategy"], r["world"], r["rows"])] = r
    single = {(r["strategy"], r["world"], r["seq_len"]): r["peak_mib"] for r in rows if r["rows"] == "single"}
    for r in rows:
        base = single.get((r["strategy"], r["world"], r["seq_len"]))
        r["vs_single"] = r["peak_mib"] / base if base else None
    return rows


def format_rows(rows: list[dict]) -> str:
    """A markdown table of :func:`measure_rows` results after :func:`growth_table`."""
    head = "| strategy | P | rows | S | peak step MiB/rank | growth S^x | vs single | step s | tokens/s |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        g = f"{r['growth']:.2f}" if r.get("growth") is not None else ""
        v = f"{r['vs_single']:.2f}x" if r.get("vs_single") is not None else ""
        lines.append(
            f"| {r['strategy']} | {r['world']} | {r['rows']} | {r['seq_len']} | {r['peak_mib']:.1f} | {g} | "
            f"{v} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} |"
        )
    return "\n".join(lines)
