"""``hf-seqpar bench --scaling``: step time and each rank's own compute from 1 to P ranks, per row kind.

For every (strategy, world, row kind, layout) it starts fresh ranks (gloo on CPU, one thread per
rank), builds a Llama-style model from a preset (``tiny`` by default), and times
``shard_batch`` + forward + backward per step after a warm-up. Per step it records the wall time
(the slowest rank, all ranks starting from a barrier) and every rank's CPU time
(``time.process_time``: the compute a rank spends itself; a rank blocked in a gloo collective
does not spend it, so on a shared, loaded machine the CPU times still show each rank's share of
the work while wall times also show the waiting and the load). It reports medians with min/max
over the timed steps, the per-rank CPU max/mean (1.0: every rank computes the same), and the
layout's predicted per-rank attention work (:func:`hf_seqpar.core.balance.layout_report`).

Row kinds are :mod:`hf_seqpar.tools.rowbench`'s: ``single`` (one document), ``skewed`` (3/4 one
document, the rest S/32-token documents), ``longtail`` (Pareto document lengths, seeded), and
the others it knows.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

__all__ = ["ScalingSpec", "measure_scaling", "format_scaling"]


@dataclass(frozen=True)
class ScalingSpec:
    """One measured configuration."""

    strategy: str
    """``ulysses``, ``ring``, ``hybrid`` (or any strategy name)."""
    world: int
    """Ranks (one SP group)."""
    rows: str = "single"
    """Row kind (:data:`hf_seqpar.tools.rowbench.ROW_KINDS`)."""
    seq_len: int = 8192
    """Tokens of the row."""
    layout: str | None = None
    """``ring``/``hybrid`` layout option (None: the default, ``auto``)."""
    model: str = "tiny"
    """Preset name or config (:func:`hf_seqpar.tools.presets.load_config`)."""
    layers: int | None = None
    """Override the number of layers."""
    steps: int = 3
    """Timed steps."""
    warmup: int = 1
    """Untimed steps first."""
    options: tuple = ()
    """Further strategy options as ``((key, value), ...)`` (e.g. ``(("ulysses_size", 2),)``)."""


def _rank_main(rank: int, spec: ScalingSpec, port: int, queue) -> None:
    try:
        from hf_seqpar.tools.rowbench import init_rank

        init_rank(rank, spec.world, port)
        queue.put((rank, _measure(spec)))
        dist.destroy_process_group()
    except BaseException as e:  # report, never hang the parent
        queue.put((rank, {"error": f"{type(e).__name__}: {e}"}))


def _measure(spec: ScalingSpec) -> dict:
    from transformers import LlamaForCausalLM

    import hf_seqpar
    from hf_seqpar.core.balance import layout_report
    from hf_seqpar.core.masks import document_ids
    from hf_seqpar.tools import cost
    from hf_seqpar.tools.presets import load_config
    from hf_seqpar.tools.rowbench import RowSpec, make_rows

    config = load_config(spec.model, num_hidden_layers=spec.layers)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    options = dict(spec.options)
    if spec.layout is not None:
        options["layout"] = spec.layout
    hf_seqpar.enable_sequence_parallel(model, spec.strategy, spec.world, **options)
    batch = make_rows(RowSpec(spec.strategy, spec.world, spec.seq_len, spec.rows), config.vocab_size)
    walls, cpus = [], []
    for step in range(spec.warmup + spec.steps):
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        local = hf_seqpar.shard_batch(batch, model)
        model(**local).loss.backward()
        model.zero_grad(set_to_none=True)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        if step >= spec.warmup:
            walls.append(wall)
            cpus.append(cpu)
    pos = batch.get("position_ids")
    docs = document_ids(pos) if pos is not None else None
    mask = batch.get("attention_mask")
    report = layout_report(local["seqpar"].layout, None if mask is None else mask.bool(), docs)
    strategy = hf_seqpar.find_state(model).strategy
    if cost.split(type(strategy), spec.world, strategy.options, config.num_attention_heads)[1] == 1:
        report["work_max_over_mean"] = 1.0  # no ring: every rank attends over all tokens for its heads
    return dict(walls=walls, cpus=cpus, **report)


def measure_scaling(spec: ScalingSpec, timeout: float = 1800.0) -> dict:
    """Run ``spec`` in fresh ranks; return its row: ``wall_s`` (median step, slowest rank) with
    ``wall_min_s``/``wall_max_s``, ``cpu_s_per_rank`` (each rank's median CPU seconds per step),
    ``cpu_max_over_mean``, the per-step lists and the layout report."""
    from hf_seqpar.tools.rowbench import run_ranks

    results = run_ranks(_rank_main, spec, spec.world, timeout)
    ranks = [results[r] for r in range(spec.world)]
    walls = [max(r["walls"][i] for r in ranks) for i in range(spec.steps)]
    cpu = [statistics.median(r["cpus"]) for r in ranks]
    first = ranks[0]
    return dict(
        asdict(spec),
        wall_s=statistics.median(walls),
        wall_min_s=min(walls),
        wall_max_s=max(walls),
        walls_s=walls,
        cpu_s_per_rank=cpu,
        cpu_max_over_mean=max(cpu) / (sum(cpu) / len(cpu)),
        cpus_s=[r["cpus"] for r in ranks],
        layout_used=first["layout"],
        work_max_over_mean=first["work_max_over_mean"],
        spans_per_rank=first["spans_per_rank"],
        pad=first["pad"],
    )


def format_scaling(rows: list[dict]) -> str:
    """A markdown table of :func:`measure_scaling` rows, with the speed-up from the same
    strategy and row kind at one rank (wall, and by the slowest rank's CPU time)."""
    base = {(r["strategy"], r["rows"], r["seq_len"]): r for r in rows if r["world"] == 1}
    head = (
        "| strategy | rows | S | layout (used) | P | wall s/step med (min-max) | CPU s/step per rank | "
        "CPU max/mean | work max/mean | pad | speed-up wall | speed-up CPU |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        b = base.get((r["strategy"], r["rows"], r["seq_len"]))
        up_wall = f"{b['wall_s'] / r['wall_s']:.2f}x" if b else ""
        up_cpu = f"{max(b['cpu_s_per_rank']) / max(r['cpu_s_per_rank']):.2f}x" if b else ""
        cpu = " / ".join(f"{c:.2f}" for c in r["cpu_s_per_rank"])
        lines.append(
            f"| {r['strategy']} | {r['rows']} | {r['seq_len']} | {r['layout'] or 'auto'} ({r['layout_used']}) "
            f"| {r['world']} | {r['wall_s']:.2f} ({r['wall_min_s']:.2f}-{r['wall_max_s']:.2f}) | {cpu} | "
            f"{r['cpu_max_over_mean']:.2f} | {r['work_max_over_mean']:.2f} | {r['pad']} | {up_wall} | "
            f"{up_cpu} |"
        )
    return "\n".join(lines)
