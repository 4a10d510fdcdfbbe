"""``hf-seqpar plan``: which strategy and degrees for a model, a sequence length and a cluster.

Per candidate (strategy x SP degree x Ulysses/ring split) it predicts per-rank memory (model
states under the chosen sharding, FSDP's gathered layers, the step's activation peak with the
memory features of :class:`Setup`: :mod:`hf_seqpar.tools.memmodel`), host memory per node, attention
time and communication per step with its time on the links the groups span (:mod:`hf_seqpar.tools.theory`),
then recommends the smallest SP degree that fits (the most data parallelism; among those, the
least SP communication time), printing the training assumptions it predicts for (checkpointing,
loss chunks, optimizer bytes, trained parameters: full or LoRA). It also finds the
longest sequence each candidate fits (:mod:`hf_seqpar.tools.maxseq` searches the features too).
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_seqpar.strategies import STRATEGIES, strategy_class
from hf_seqpar.tools import cost
from hf_seqpar.tools.memmodel import GPU_KERNEL, Features, MemoryModelInputs, attention_flops, peak_memory
from hf_seqpar.tools.plan_post import PostTraining, post_assumptions, post_memory
from hf_seqpar.tools.theory import ModelShape, comm_bytes

__all__ = [
    "Cluster",
    "Setup",
    "Candidate",
    "candidates",
    "evaluate",
    "recommend",
    "max_seq_len",
    "GiB",
    "lora_params",
    "assumptions",
    "attention_balance",
    "PLAN_ROWS",
]

GiB = 2**30
#: Share of the memory budget a recommended candidate may use.
HEADROOM = 0.9

#: Bytes per parameter of the model states: (parameters, gradients, optimizer incl. fp32 master).
STATE_BYTES = {"adamw": (2, 2, 12), "sgd": (2, 2, 4)}
#: Which model states each sharding splits over all ranks.
SHARDED = {
    "none": (),
    "zero1": ("opt",),
    "zero2": ("opt", "grad"),
    "fsdp": ("opt", "grad", "param"),
    "fsdp_offload": ("opt", "grad", "param"),
}
#: Shardings whose (sharded) states live in host memory (FSDP's CPU offload of parameters, gradients
#: and optimizer state: accelerate's ``fsdp_offload_params: true``); the GPU holds the gathered layers.
HOST_STATES = ("fsdp_offload",)


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
    host_mem_gib: float = 1900.0
    """Host memory per node the job may fill with offloaded checkpoints and offloaded model states, GiB
    (``--host-mem``). Default: an 8 x H100 node's 2 TiB (DGX H100, AWS p5.48xlarge) less ~150 GiB for
    the OS, data loading and pinned buffers, which is also what Azure's ND H100 v5 offers (1900 GiB)."""
    peak_tflops: float = 989.0
    """Dense bf16 TFLOP/s of one GPU (H100 SXM: 989), for the attention time per step."""
    attention_mfu: float = 0.5
    """Share of the peak the attention kernels reach (flash attention on H100: ~0.5)."""
    max_step_s: float | None = None
    """Longest acceptable attention time per step, seconds (``--max-step-s``), or None for no limit:
    with a limit, a length whose attention alone takes longer is reported as bound by time, not
    memory. Without one the longest-sequence search answers the memory question (as the published
    records do) and reports the predicted attention time beside it."""


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
    loss_chunk_size: int = 4096
    """Tokens per chunk when ``chunked_loss``."""
    offload_checkpoints: bool = False
    """Checkpointed layer inputs (and the other saved tensors outside the layers) in host memory."""
    mlp_tiles: int | None = None
    """MLP sequence tiles (None = off)."""
    trainable_params: int | None = None
    """Parameters that train, i.e. have gradients and optimizer states (None: all of them, full
    fine-tuning; a LoRA adapter: :func:`lora_params`). The others are frozen weights only."""
    optim_bytes: float | None = None
    """Optimizer-state bytes per trained parameter, fp32 master copy included (None: the
    optimizer's, :data:`STATE_BYTES`: adamw 12, sgd 4; e.g. 6 for 8-bit Adam with a master copy)."""
    post_training: PostTraining | None = None
    """TRL's DPO or GRPO instead of a language-model loss (``--post-training``): pairs or completion
    rows, TRL's fused LM head, the reference model, generation (:mod:`hf_seqpar.tools.plan_post`)."""

    def state_bytes(self) -> tuple[float, float, float]:
        """Bytes per parameter of (weights, gradients, optimizer states) for a trained parameter."""
        param, grad, opt = STATE_BYTES[self.optimizer]
        return param, grad, (opt if self.optim_bytes is None else self.optim_bytes)

    def trained(self, shape: ModelShape) -> int:
        """How many of ``shape``'s parameters train."""
        return shape.params if self.trainable_params is None else self.trainable_params

    @property
    def features(self) -> Features:
        """The memory features of :mod:`hf_seqpar.tools.memmodel`."""
        return Features(
            self.checkpointing,
            self.offload_checkpoints and self.checkpointing,
            self.mlp_tiles,
            self.loss_chunk_size if self.chunked_loss else None,
        )


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
        return cost.label(self.cls, self.sp, self.opts)


def candidates(shape: ModelShape, cluster: Cluster) -> list[Candidate]:
    """Every strategy and split that can run ``shape`` on the cluster (``sp`` divides the GPUs); each
    strategy's declared facts say which option sets it can run with (:func:`hf_seqpar.tools.cost.plan_options`)."""
    out = []
    for sp in (d for d in range(1, cluster.gpus + 1) if cluster.gpus % d == 0):
        for name, cls in STRATEGIES.items():
            for options in cost.plan_options(cls, shape.heads, sp, cluster.gpus_per_node):
                u, r = cost.split(cls, sp, options, shape.heads)
                out.append(Candidate(name, sp, u, r, options))
    return out


def lora_params(shape: ModelShape, rank: int) -> int:
    """Parameters of a LoRA adapter of rank ``rank`` on every attention and MLP projection (the
    recipe's default ``--lora-targets``: q, k, v, o, gate, up, down): ``rank x (in + out)`` each
    (Hu et al. 2021, https://arxiv.org/abs/2106.09685)."""
    h, q, kv, inter = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h)
    return shape.layers * rank * per_layer


def _states(shape: ModelShape, cand: Candidate, cluster: Cluster, setup: Setup) -> float:
    param_b, grad_b, opt_b = setup.state_bytes()
    tp = cand.sp if cand.cls.shards_parameters else 1  # tensor parallel: each rank holds 1/T of the model
    shard_over = cluster.gpus // tp
    counts = {"param": shape.params / tp, "grad": setup.trained(shape) / tp, "opt": setup.trained(shape) / tp}
    per = {"param": param_b, "grad": grad_b, "opt": opt_b}
    return sum(counts[k] * per[k] / (shard_over if k in SHARDED[setup.sharding] else 1) for k in per)


def _gathered(shape: ModelShape, cand: Candidate, setup: Setup) -> float:
    """FSDP's unsharded working set on the GPU: the computing and the prefetched layer's bf16
    parameters and one layer's unsharded gradient (the embedding/lm_head is the largest "layer")."""
    if setup.sharding not in ("fsdp", "fsdp_offload"):
        return 0.0
    biggest = max((shape.params - 2 * shape.vocab * shape.hidden) / shape.layers, shape.vocab * shape.hidden)
    biggest /= cand.sp if cand.cls.shards_parameters else 1
    param_b, grad_b, _ = setup.state_bytes()
    trained_share = setup.trained(shape) / shape.params  # a frozen layer has no gradient to hold
    return biggest * (2 * param_b + grad_b * trained_share)


def _comm_seconds(cand: Candidate, comm: dict, cluster: Cluster) -> float:
    """Seconds of SP traffic per step on the links the groups span (groups are consecutive ranks;
    a group crosses nodes once it is larger than a node)."""
    if cand.sp == 1:
        return 0.0
    bw = lambda ranks: (cluster.intra_gbps if ranks <= cluster.gpus_per_node else cluster.inter_gbps) * 1e9  # noqa
    return cost.comm_seconds(cand.cls, comm, cand.sp, cand.opts, bw)


def evaluate(shape: ModelShape, seq_len: int, cand: Candidate, cluster: Cluster, setup: Setup) -> dict:
    """Predicted memory (bytes), host memory, attention time and communication of one candidate at
    one sequence length (activations: :func:`hf_seqpar.tools.memmodel.peak_memory`)."""
    multiple = cost.seq_multiple(cand.cls, cand.sp, cand.opts)
    seq = -(-seq_len // multiple) * multiple
    states = _states(shape, cand, cluster, setup)
    host_states = states if setup.sharding in HOST_STATES else 0.0
    ulysses_size = getattr(cand.opts, "ulysses_size", None)
    post = setup.post_training
    rows = post.rows(setup.batch) if post else setup.batch  # DPO: a pair is two rows
    mem = peak_memory(
        MemoryModelInputs(
            shape,
            seq,
            cand.strategy,
            cand.sp,
            setup.features,
            rows,
            setup.elem,
            setup.elem,
            ulysses_size=ulysses_size,
            grads_in_peak=False,
            fused_head=post is not None,
            kernel=GPU_KERNEL,  # the CUDA kernel's own backward buffers (flash: fp32 dq accumulator, expanded dk/dv)
        )
    )
    acts = mem.activation_peak
    comm = (
        comm_bytes(cand.strategy, shape, seq, cand.sp, rows, setup.elem, ulysses_size=ulysses_size)
        if cand.sp > 1
        else {"total": 0}
    )
    device_states = states - host_states
    gathered = _gathered(shape, cand, setup)
    total = device_states + gathered + acts
    peak_phase, ref_bytes, phases = mem.peak_phase, 0.0, None
    if post is not None:
        # the reference weights are model states; the largest phase (training step, reference forward,
        # generation, scoring, precompute) is the total, its part beyond the states the transient
        extra = post_memory(shape, seq, cand, cluster, setup, mem, device_states + gathered)
        ref_bytes = extra["ref_device"]
        device_states += ref_bytes
        host_states += extra["ref_host"]
        phases = extra["phases"]
        total = phases[extra["peak_phase"]]
        acts = total - device_states - gathered
        if extra["peak_phase"] != "training step":
            peak_phase = extra["peak_phase"]
    budget = (cluster.gpu_mem_gib - cluster.reserve_gib) * GiB
    per_node = min(cluster.gpus, cluster.gpus_per_node)
    host_node = per_node * (mem.host_bytes + host_states)
    flops = attention_flops(shape, seq, cand.sp, rows, setup.checkpointing)
    if post is not None and post.has_ref_model:  # the reference's forward: the forward share of the step
        flops += flops / (3.5 + setup.checkpointing)
    attn_s = flops / (cluster.peak_tflops * 1e12 * cluster.attention_mfu)
    return dict(
        candidate=cand.label,
        strategy=cand.strategy,
        sp=cand.sp,
        ulysses=cand.ulysses,
        ring=cand.ring,
        dp=cluster.gpus // cand.sp,
        seq_len=seq,
        states_bytes=device_states,
        ref_bytes=ref_bytes,
        gathered_bytes=gathered,
        activation_bytes=acts,
        total_bytes=total,
        budget_bytes=budget,
        reserve_bytes=cluster.reserve_gib * GiB,
        peak_phase=peak_phase,
        post_phases=phases,
        kept_bytes=mem.kept_bytes,
        host_bytes=mem.host_bytes + host_states,
        host_node_bytes=host_node,
        host_budget_bytes=cluster.host_mem_gib * GiB,
        attention_seconds=attn_s,
        features=setup.features.label,
        fits=total <= budget and host_node <= cluster.host_mem_gib * GiB,
        comm_bytes=comm["total"],
        comm_seconds=_comm_seconds(cand, comm, cluster),
    )


def assumptions(shape: ModelShape, cluster: Cluster, setup: Setup) -> list[str]:
    """The training set-up the predictions assume, one short line each (the table's header)."""
    param_b, grad_b, opt_b = setup.state_bytes()
    trained = setup.trained(shape)
    who = (
        "all parameters train (full fine-tuning)"
        if setup.trainable_params is None
        else f"{trained / 1e6:,.1f}M parameters train (LoRA/adapters), the {shape.params / 1e9:.2f}B base is frozen"
    )
    loss = (
        f"loss in chunks of {setup.loss_chunk_size:,} tokens (no full logits; --loss-chunk, --no-chunked-loss)"
        if setup.chunked_loss
        else "full fp32 logits (no chunked loss)"
    )
    ckpt = "activation checkpointing of every layer" if setup.checkpointing else "no activation checkpointing"
    extra = (["checkpoints offloaded to host memory"] if setup.offload_checkpoints and setup.checkpointing else []) + (
        [f"MLP in {setup.mlp_tiles} tiles"] if setup.mlp_tiles else []
    )
    if setup.post_training is not None:
        loss = "TRL's fused LM head"
    head = [
        f"{ckpt}; {loss}" + "".join(f"; {e}" for e in extra),
        f"{setup.optimizer}: {param_b:g} B weights + {grad_b:g} B gradients + {opt_b:g} B optimizer states per "
        f"trained parameter (--optimizer, --optim-bytes); {who}",
        f"states sharded by {setup.sharding} over {cluster.gpus} GPUs (--sharding); {setup.batch} "
        f"{'pair(s)' if setup.post_training is not None and setup.post_training.kind == 'dpo' else 'row(s)'} per "
        f"micro-batch, {setup.elem}-byte activations",
    ]
    return head + (post_assumptions(shape, cluster, setup) if setup.post_training is not None else [])


#: Row kinds ``plan --rows`` predicts the ring's attention balance for.
PLAN_ROWS = ("single", "skewed", "longtail")


def attention_balance(cand: Candidate, seq_len: int, rows: str = "single") -> dict:
    """The per-ring-rank causal attention work of one row of ``rows`` (``single``, ``skewed``:
    :func:`~hf_seqpar.tools.rowbench.skewed_positions`, ``longtail``:
    :func:`~hf_seqpar.tools.rowbench.longtail_positions`) under the layout the candidate would
    apply (``layout="auto"`` unless its options name one) and under whole-row zigzag:
    ``{"layout", "work_max_over_mean", "zigzag_work_max_over_mean", "pad"}``. Strategies without
    a ring attend over all tokens on every rank (max/mean 1.0). O(S), no ranks."""
    import torch

    from hf_seqpar.core.balance import choose_layout, layout_report
    from hf_seqpar.core.masks import document_ids
    from hf_seqpar.tools.rowbench import longtail_positions, skewed_positions

    if cand.ring == 1:
        return dict(layout=None, work_max_over_mean=1.0, zigzag_work_max_over_mean=1.0, pad=0)
    docs = {
        "single": None,
        "skewed": lambda: document_ids(skewed_positions(seq_len)),
        "longtail": lambda: document_ids(longtail_positions(seq_len)),
    }[rows]
    docs = docs() if docs else None
    valid = torch.ones(1, seq_len, dtype=torch.bool)
    multiple = cost.seq_multiple(cand.cls, cand.sp, cand.opts)
    kind = getattr(cand.opts, "layout", "auto")
    chosen = layout_report(choose_layout(kind, seq_len, cand.sp, multiple, cand.ulysses, valid, docs), valid, docs)
    zigzag = layout_report(choose_layout("zigzag", seq_len, cand.sp, multiple, cand.ulysses), valid, docs)
    return dict(
        layout=chosen["layout"],
        work_max_over_mean=chosen["work_max_over_mean"],
        zigzag_work_max_over_mean=zigzag["work_max_over_mean"],
        pad=chosen["pad"],
    )


def recommend(rows: list[dict]) -> tuple[dict | None, str]:
    """The smallest SP degree that fits (it leaves the most data parallelism, and data parallelism
    trains whole sequences with no SP traffic), among its candidates the least SP communication
    time, and the reason."""
    fitting = [r for r in rows if r["fits"]]
    if not fitting:
        smallest = min(rows, key=lambda r: r["total_bytes"])
        reserve = smallest.get("reserve_bytes", 0) / GiB
        states = smallest["states_bytes"] + smallest.get("gathered_bytes", 0)
        if states > smallest["budget_bytes"]:
            return None, (
                f"nothing fits: the model states alone take {states / GiB:.1f} GiB per GPU "
                f"({smallest['candidate']}), over the budget of {smallest['budget_bytes'] / GiB:.1f} GiB; "
                "shard them over more GPUs, keep them in host memory (--sharding fsdp_offload: "
                "accelerate's fsdp_offload_params), or train an adapter (--lora-rank) or with fewer "
                "optimizer bytes (--optim-bytes)"
            )
        if smallest.get("host_node_bytes", 0) > smallest.get("host_budget_bytes", float("inf")):
            return None, (
                f"nothing fits: {smallest['candidate']} needs {smallest['host_node_bytes'] / GiB:.0f} GiB "
                f"of host memory per node, over --host-mem {smallest['host_budget_bytes'] / GiB:.0f} GiB; "
                "add nodes (the states shard over more GPUs) or host memory"
            )
        return None, (
            f"nothing fits: the smallest footprint is {smallest['candidate']} at "
            f"{smallest['total_bytes'] / GiB:.1f} GiB per GPU, over the budget of "
            f"{smallest['budget_bytes'] / GiB:.1f} GiB (GPU memory minus a {reserve:g} GiB reserve, "
            "--reserve); add GPUs, enable checkpointing and the chunked loss, or shorten the sequence"
        )
    # prefer candidates that leave 10% of the budget as headroom (allocator fragmentation, spikes)
    roomy = [r for r in fitting if r["total_bytes"] <= HEADROOM * r["budget_bytes"]]
    among = "candidates that fit with 10% headroom" if roomy else "candidates that fit (none with 10% headroom)"
    roomy = roomy or fitting
    best = min(roomy, key=lambda r: (r["sp"], r["comm_seconds"], r["ring"]))
    same_sp = sum(r["sp"] == best["sp"] for r in roomy)
    why = (
        f"{best['candidate']} fits in {best['total_bytes'] / GiB:.1f} GiB per GPU "
        f"({(best['states_bytes'] + best.get('gathered_bytes', 0)) / GiB:.1f} states + "
        f"{best['activation_bytes'] / GiB:.1f} activations): the smallest SP degree of the {len(roomy)} "
        f"{among}, leaving the most data parallelism (dp={best['dp']}), and "
        f"the least SP traffic of the {same_sp} at that degree ({best['comm_seconds'] * 1e3:.1f} ms per step)"
    )
    return best, why


def max_seq_len(shape: ModelShape, cand: Candidate, cluster: Cluster, setup: Setup, step: int = 1024) -> int:
    """The longest sequence (a multiple of ``step``) that ``cand`` fits in device and host memory;
    both are linear in the length (flash-style attention keeps no ``S x S`` tensor), so this is
    solved directly (then checked). :func:`hf_seqpar.tools.maxseq.longest` adds the time limit and
    searches the memory features."""
    return _limits(shape, cand, cluster, setup, step)["memory"]


def _limits(shape: ModelShape, cand: Candidate, cluster: Cluster, setup: Setup, step: int = 1024) -> dict:
    """The longest length each resource allows: ``device`` memory, ``host`` memory per node,
    ``time`` (attention seconds per step), and ``memory`` (device and host together, a multiple of
    ``step``). Host memory and attention time are closed forms (linear and quadratic in the
    length); the device peak is a maximum of phases linear in the length, so it is bracketed from
    the slope at long lengths and bisected."""
    at = lambda k: evaluate(shape, k * step, cand, cluster, setup)  # noqa: E731
    a, b = at(1 << 12), at(1 << 13)
    span = b["seq_len"] - a["seq_len"]
    host_per = (b["host_node_bytes"] - a["host_node_bytes"]) / span
    host_fixed = a["host_node_bytes"] - host_per * a["seq_len"]
    budget = a["host_budget_bytes"]
    host = 0.0 if budget < host_fixed else (float("inf") if host_per <= 0 else (budget - host_fixed) / host_per)
    dev_per = (b["total_bytes"] - a["total_bytes"]) / span
    dev_fixed = a["total_bytes"] - dev_per * a["seq_len"]
    est = (a["budget_bytes"] - dev_fixed) / dev_per if dev_per > 0 else float("inf")
    device_fits = lambda k: at(k)["total_bytes"] <= a["budget_bytes"]  # noqa: E731
    if est == float("inf"):
        device = float("inf")
    else:
        lo_k, hi_k = 0, max(2, int(max(est, 0) / step) * 2 + 2)
        while device_fits(hi_k):  # the slope at long lengths can only overestimate: rarely taken
            lo_k, hi_k = hi_k, 2 * hi_k
        while hi_k - lo_k > 1:
            mid = (lo_k + hi_k) // 2
            lo_k, hi_k = (mid, hi_k) if device_fits(mid) else (lo_k, mid)
        device = lo_k * step
    per_s2 = a["attention_seconds"] / a["seq_len"] ** 2
    limited = cluster.max_step_s is not None and per_s2 > 0
    time = (cluster.max_step_s / per_s2) ** 0.5 if limited else float("inf")
    memory = min(device, host)
    memory = int(min(memory, 1 << 40)) // step * step
    return {"device": device, "host": host, "time": time, "memory": memory}
