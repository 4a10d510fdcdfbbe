"""``hf-seqpar plan``: which strategy and degrees for a model, a sequence length and a cluster.

Per candidate (strategy x SP degree x Ulysses/ring split) it predicts per-rank memory (model
states under the chosen sharding, activations with or without checkpointing, logits with or
without the chunked loss; :mod:`hf_seqpar.tools.theory`) and communication per step with its time on
the links the groups span, then recommends the fitting candidate with the least SP communication
time. It also finds the longest sequence each candidate fits.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_seqpar.strategies import STRATEGIES, strategy_class
from hf_seqpar.tools.theory import ModelShape, activation_bytes, comm_bytes

__all__ = ["Cluster", "Setup", "Candidate", "candidates", "evaluate", "recommend", "max_seq_len", "GiB"]

GiB = 2**30
#: Share of the memory budget a recommended candidate may use.
HEADROOM = 0.9

#: Bytes per parameter of the model states: (parameters, gradients, optimizer incl. fp32 master).
STATE_BYTES = {"adamw": (2, 2, 12), "sgd": (2, 2, 4)}
#: Which model states each sharding splits over all ranks.
SHARDED = {"none": (), "zero1": ("opt",), "zero2": ("opt", "grad"), "fsdp": ("opt", "grad", "param")}


@dataclass(frozen=True)
class Cluster:
    """The machines."""

    gpus: int
    """GPUs in total."""
    gpu_mem_gib: float = 80.0
    """Memory of one GPU, GiB."""
    gpus_per_node: int = 8
    """GPUs per node (the fast-link domain)."""
    intra_gbps: float = 450.0
    """Per-GPU bandwidth inside a node, GB/s (NVLink 4: ~450 one way)."""
    inter_gbps: float = 50.0
    """Per-GPU bandwidth across nodes, GB/s (400 Gb/s InfiniBand: 50)."""
    reserve_gib: float = 4.0
    """Memory kept free per GPU for the CUDA context, NCCL and kernel workspaces, GiB (``hf-seqpar
    plan --reserve``); the budget of a candidate is ``gpu_mem_gib - reserve_gib``."""


@dataclass(frozen=True)
class Setup:
    """How the model is trained."""

    elem: int = 2
    """Bytes per activation element (2: bf16)."""
    optimizer: str = "adamw"
    """``adamw`` (16 bytes per parameter in mixed precision) or ``sgd``."""
    sharding: str = "fsdp"
    """Model-state sharding over all ranks: ``none``, ``zero1``, ``zero2`` or ``fsdp``."""
    checkpointing: bool = True
    """Per-layer activation checkpointing."""
    chunked_loss: bool = True
    """lm_head + cross-entropy in chunks (no fp32 logits kept)."""
    batch: int = 1
    """Rows per micro-batch."""


@dataclass(frozen=True)
class Candidate:
    """A strategy with its degrees."""

    strategy: str
    """Strategy name."""
    sp: int
    """SP degree."""
    ulysses: int
    """Ulysses degree (1 for ring and tensor parallel)."""
    ring: int
    """Ring degree (1 for Ulysses and tensor parallel)."""
    options: object = None
    """The strategy's typed options (None: its defaults)."""

    @property
    def cls(self):
        return strategy_class(self.strategy)

    @property
    def opts(self):
        return self.options if self.options is not None else self.cls.Options()

    @property
    def label(self) -> str:
        return self.cls.label(self.sp, self.opts)


def candidates(shape: ModelShape, cluster: Cluster) -> list[Candidate]:
    """Every strategy and split that can run ``shape`` on the cluster (``sp`` divides the GPUs); each
    strategy says which option sets it can run with (``Strategy.plan_options``)."""
    out = []
    for sp in (d for d in range(1, cluster.gpus + 1) if cluster.gpus % d == 0):
        for name, cls in STRATEGIES.items():
            for options in cls.plan_options(shape.heads, sp, cluster.gpus_per_node):
                u, r = cls.split(sp, options, shape.heads)
                out.append(Candidate(name, sp, u, r, options))
    return out


def _states(shape: ModelShape, cand: Candidate, cluster: Cluster, setup: Setup) -> float:
    per = dict(zip(("param", "grad", "opt"), STATE_BYTES[setup.optimizer]))
    tp = cand.sp if cand.cls.shards_parameters else 1  # tensor parallel: each rank holds 1/T of the model
    params, shard_over = shape.params / tp, cluster.gpus // tp
    return sum(params * b / (shard_over if k in SHARDED[setup.sharding] else 1) for k, b in per.items())


def _comm_seconds(cand: Candidate, comm: dict, cluster: Cluster) -> float:
    """Seconds of SP traffic per step on the links the groups span (groups are consecutive ranks;
    a group crosses nodes once it is larger than a node)."""
    if cand.sp == 1:
        return 0.0
    bw = lambda ranks: (cluster.intra_gbps if ranks <= cluster.gpus_per_node else cluster.inter_gbps) * 1e9  # noqa
    return cand.cls.comm_seconds(comm, cand.sp, cand.opts, bw)


def evaluate(shape: ModelShape, seq_len: int, cand: Candidate, cluster: Cluster, setup: Setup) -> dict:
    """Predicted memory (bytes) and communication of one candidate at one sequence length."""
    multiple = cand.cls.seq_multiple(cand.sp, cand.opts)
    seq = -(-seq_len // multiple) * multiple
    states = _states(shape, cand, cluster, setup)
    acts = activation_bytes(cand.strategy if cand.sp > 1 else None, shape, seq, cand.sp, setup.batch, setup.elem,
                            ulysses_size=getattr(cand.opts, "ulysses_size", None),
                            checkpointing=setup.checkpointing, chunked_loss=setup.chunked_loss)
    comm = comm_bytes(cand.strategy, shape, seq, cand.sp, setup.batch, setup.elem,
                      ulysses_size=getattr(cand.opts, "ulysses_size", None)) if cand.sp > 1 else {"total": 0}
    total = states + acts
    budget = (cluster.gpu_mem_gib - cluster.reserve_gib) * GiB
    return dict(candidate=cand.label, strategy=cand.strategy, sp=cand.sp, ulysses=cand.ulysses, ring=cand.ring, dp=cluster.gpus // cand.sp, seq_len=seq,
                states_bytes=states, activation_bytes=acts, total_bytes=total, budget_bytes=budget,
                reserve_bytes=cluster.reserve_gib * GiB,
                fits=total <= budget,
                comm_bytes=comm["total"], comm_seconds=_comm_seconds(cand, comm, cluster))


def recommend(rows: list[dict]) -> tuple[dict | None, str]:
    """The fitting candidate with the least SP communication time (then the smallest SP degree,
    which leaves the most data parallelism), and the reason."""
    fitting = [r for r in rows if r["fits"]]
    if not fitting:
        smallest = min(rows, key=lambda r: r["total_bytes"])
        reserve = smallest.get("reserve_bytes", 0) / GiB
        return None, (f"nothing fits: the smallest footprint is {smallest['candidate']} at "
                      f"{smallest['total_bytes'] / GiB:.1f} GiB per GPU, over the budget of "
                      f"{smallest['budget_bytes'] / GiB:.1f} GiB (GPU memory minus a {reserve:g} GiB reserve, "
                      "--reserve); add GPUs, enable checkpointing and the chunked loss, or shorten the sequence")
    # prefer candidates that leave 10% of the budget as headroom (allocator fragmentation, spikes)
    roomy = [r for r in fitting if r["total_bytes"] <= HEADROOM * r["budget_bytes"]] or fitting
    best = min(roomy, key=lambda r: (r["comm_seconds"], r["sp"], r["ring"]))
    why = (f"{best['candidate']} fits in {best['total_bytes'] / GiB:.1f} GiB per GPU "
           f"({best['states_bytes'] / GiB:.1f} states + {best['activation_bytes'] / GiB:.1f} activations) with "
           f"{best['comm_seconds'] * 1e3:.1f} ms of SP traffic per step, the least of the "
           f"{len(roomy)} candidates that fit with 10% headroom (dp={best['dp']})")
    return best, why


def max_seq_len(shape: ModelShape, cand: Candidate, cluster: Cluster, setup: Setup, step: int = 1024) -> int:
    """The longest sequence (a multiple of ``step``) that ``cand`` fits; activations are linear in
    the length (flash-style attention keeps no ``S x S`` tensor), so this is solved directly."""
    lo = evaluate(shape, step * cand.sp * 2, cand, cluster, setup)
    hi = evaluate(shape, step * cand.sp * 4, cand, cluster, setup)
    per_token = (hi["activation_bytes"] - lo["activation_bytes"]) / (hi["seq_len"] - lo["seq_len"])
    budget = (cluster.gpu_mem_gib - cluster.reserve_gib) * GiB - lo["states_bytes"]
    fixed = lo["activation_bytes"] - per_token * lo["seq_len"]
    if budget <= fixed or per_token <= 0:
        return 0
    n = int((budget - fixed) / per_token) // step * step
    while n > 0 and not evaluate(shape, n, cand, cluster, setup)["fits"]:
        n -= step
    return n
