"""``hf-seqpar plan --max-seq``: the longest sequence a cluster trains, searching memory features too.

For every candidate that uses all GPUs for one sequence (the longest rows need every GPU's
memory) and every combination of the plugin's memory features (checkpointing, checkpoint
offload, MLP tiles, loss chunks), and each model-state sharding asked for (``plan --max-seq``
without ``--sharding``: FSDP with the states on the GPUs, and FSDP with them in host memory),
:func:`hf_seqpar.tools.plan._limits` gives the longest length the device memory, the host memory
and (only when a limit is set, ``--max-step-s``) the attention time per step each allow; the
answer is the longest over all, with the constraint that binds it. Among settings within 1% of the
longest the simplest is chosen (states on the GPUs before host states, no offload before offload,
fewer tiles, larger loss chunks), since each feature costs time (host transfers, recomputation,
smaller kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hf_seqpar.core.shape import ModelShape
from hf_seqpar.tools.plan import HOST_STATES, Cluster, Setup, _limits, candidates, evaluate

__all__ = ["FEATURE_GRID", "SEARCHED_SHARDINGS", "Longest", "longest"]

#: The feature settings searched: (checkpointing, offload, mlp_tiles, loss_chunk_size or None).
FEATURE_GRID = [
    (ckpt, off, tiles, chunk)
    for ckpt in (False, True)
    for off in ((False, True) if ckpt else (False,))
    for tiles in (None, 4, 16, 64)
    for chunk in (None, 4096, 1024)
]

BINDING = {"device": "device memory", "host": "host memory", "time": "attention time per step"}


@dataclass
class Longest:
    """The longest sequence found."""

    seq_len: int
    """Tokens (a multiple of 1024)."""
    candidate: str
    """Strategy and degrees."""
    setup: Setup
    """The settings (features included)."""
    binding: str
    """What stops a longer sequence: ``device memory``, ``host memory`` or ``attention time per step``
    (only with a time limit)."""
    limits: dict
    """The length each resource allows on its own (``device``, ``host``, ``time``; may be inf)."""
    row: dict
    """:func:`hf_seqpar.tools.plan.evaluate` at ``seq_len``."""
    strategy: str = ""
    sp: int = 0
    ulysses: int = 0

    def plugin_yaml(self) -> str:
        """The ``SequenceParallelPlugin`` YAML for this run."""
        f = self.setup.features.plugin_fields()
        lines = [f"strategy: {self.strategy}", f"sp_size: {self.sp}"]
        if 1 < self.ulysses < self.sp:  # a 2-D split: the Ulysses degree is part of the config
            lines.append(f"ulysses_size: {self.ulysses}")
        lines += ["check_batch: first"] + [f"{k}: {_yaml(v)}" for k, v in f.items()]
        return "\n".join(lines) + "\n"


def _yaml(v) -> str:
    return "null" if v is None else ("true" if v is True else "false" if v is False else str(v))


#: The model-state shardings ``plan --max-seq`` searches when ``--sharding`` is not given, simplest first.
SEARCHED_SHARDINGS = ("fsdp", "fsdp_offload")


def _cost(s: Setup) -> tuple:
    chunk = s.loss_chunk_size if s.chunked_loss else 1 << 30
    return (s.sharding in HOST_STATES, s.checkpointing, s.offload_checkpoints, s.mlp_tiles or 1, -chunk)


def longest(
    shape: ModelShape, cluster: Cluster, base: Setup, step: int = 1024, shardings: tuple[str, ...] | None = None
) -> Longest | None:
    """Search candidates using every GPU, :data:`FEATURE_GRID` and ``shardings`` for the longest sequence.

    Args:
        shape: the model.
        cluster: GPUs, memory, host memory, attention speed and the time limit (None: no limit).
        base: the setup whose optimizer, dtype and batch are kept (features are searched).
        step: length granularity.
        shardings: the model-state shardings searched (None: only ``base.sharding``).

    Returns:
        The :class:`Longest` (None when nothing fits even at ``step`` tokens per GPU).
    """
    found = []
    grid = [(sh, *f) for sh in (shardings or (base.sharding,)) for f in FEATURE_GRID]
    for cand in (c for c in candidates(shape, cluster) if c.sp == cluster.gpus):
        for sharding, ckpt, off, tiles, chunk in grid:
            setup = replace(
                base,
                sharding=sharding,
                checkpointing=ckpt,
                offload_checkpoints=off,
                mlp_tiles=tiles,
                chunked_loss=chunk is not None,
                loss_chunk_size=chunk or base.loss_chunk_size,
            )
            lim = _limits(shape, cand, cluster, setup, step)
            n = lim["memory"] if lim["time"] == float("inf") else min(lim["memory"], int(lim["time"]) // step * step)
            if n > 0:
                found.append((n, cand, setup, lim))
    if not found:
        return None
    best_n = max(f[0] for f in found)
    n, cand, setup, lim = min((f for f in found if f[0] >= 0.99 * best_n), key=lambda f: (_cost(f[2]), -f[0]))
    if lim["time"] < lim["memory"] + step:
        binding = "time"
    else:
        binding = "host" if lim["host"] < lim["device"] else "device"
    return Longest(
        n,
        cand.label,
        setup,
        BINDING[binding],
        {k: lim[k] for k in ("device", "host", "time")},
        evaluate(shape, n, cand, cluster, setup),
        cand.strategy,
        cand.sp,
        cand.ulysses,
    )
