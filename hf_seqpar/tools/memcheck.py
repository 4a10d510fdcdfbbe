"""Measure what :mod:`hf_seqpar.tools.memmodel` predicts: per-rank step memory and offloaded bytes on CPU ranks.

One :class:`MemCase` is a strategy, a sequence length and a set of memory features on a small
Llama model built from a config (fp32, or the case's ``dtype``; ``sdpa``, so attention runs
hf_seqpar's variable-length kernels). :func:`measure_case` runs on every rank of an initialised gloo group and returns:

- ``peak_bytes``: the step's peak resident memory minus the resident memory just before it
  (Linux ``VmHWM`` after a reset through ``/proc/self/clear_refs``, minus ``VmRSS``), measured on
  the second step (the first one builds the lazily created buffers) with gradients set to None
  before it, so model and batch are in the baseline and the step's activations, buffers and
  gradients are in the peak. glibc is told to serve every allocation over 128 KiB with its own
  ``mmap`` and to give freed memory back at once (:func:`hf_seqpar.tools.bench.malloc_follows_tensors`,
  as for the row benchmark): resident memory then follows the live tensors, as a GPU's
  ``max_memory_allocated`` does, instead of what the heap kept. No
  constant is added for the allocator: a step of 16 tokens measures its gradients plus 0.1 MiB.
- ``host_bytes``: what ``offload_checkpoints`` moves to host memory, counted exactly: the bytes of
  every tensor autograd saves outside the checkpointed layers during one forward (the tensors
  ``torch.autograd.graph.save_on_cpu`` copies to CPU; on a CPU both sides are the same memory, so
  offloading cannot change resident memory here and is validated by this count instead).

``python -m hf_seqpar.tools.memcheck`` prints the measured table next to the predictions (2 ranks).
"""

from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, replace

import torch

from .bench import _PeakRSS, malloc_follows_tensors, status_bytes
from .memmodel import Features, MemoryModelInputs, peak_memory

__all__ = ["MemCase", "measure_case", "model_inputs", "predict_case", "tiny_shape_config", "validation_cases"]


@dataclass(frozen=True)
class MemCase:
    """One measured configuration (the model: :func:`tiny_shape_config`)."""

    strategy: str
    """``ulysses`` or ``ring`` (the SP degree is the world size)."""
    seq_len: int
    """Tokens of the one row."""
    checkpointing: bool = False
    """Per-layer activation checkpointing."""
    offload_checkpoints: bool = False
    """Checkpointed layer inputs to host memory (needs ``checkpointing``)."""
    mlp_tiles: int | None = None
    """MLP sequence tiles."""
    loss_chunk_size: int | None = None
    """Tokens per chunk of the chunked loss."""
    sp: int | None = None
    """SP degree; None = the world size (1: every rank trains its own row, the single-GPU mode)."""
    lean_norms: bool = True
    """hf_seqpar's lean RMSNorm (the plugin's default); False: transformers' own."""
    dtype: str = "float32"
    """Parameters and activations (``float32`` or ``bfloat16``: the model is cast, as a bf16 GPU run is)."""
    intermediate_size: int = 1024
    """The model's MLP width (:func:`tiny_shape_config`; 1024 = 8x hidden, 448 = the 3.5x of Llama-3.1-8B)."""

    @property
    def elem(self) -> int:
        """Bytes per element of parameters and activations."""
        return getattr(torch, self.dtype).itemsize

    @property
    def features(self) -> Features:
        return Features(
            self.checkpointing, self.offload_checkpoints, self.mlp_tiles, self.loss_chunk_size, self.lean_norms
        )

    @property
    def label(self) -> str:
        sp = "" if self.sp is None else f" sp={self.sp}"
        dtype = "" if self.dtype == "float32" else f" {self.dtype}"
        return f"{self.strategy}{sp} S={self.seq_len} {self.features.label}{dtype}"


def tiny_shape_config(layers: int = 4, vocab_size: int = 4096, intermediate_size: int = 1024):
    """The measured model: Llama with hidden 128, 4 query / 2 kv heads of 32, MLP ``intermediate_size``
    (1024 by default), vocab 4096 (MLP and vocabulary wide enough for the tiles and the chunked loss to
    matter)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1 << 20,
        attn_implementation="sdpa",
        use_cache=False,
    )


def validation_cases(strategies=("ulysses", "ring"), seq_lens=(2048, 4096)) -> list[MemCase]:
    """Each feature on and off: alone against nothing, and removed from the full set."""
    chunk, tiles = 128, 8
    sets = [
        dict(),
        dict(checkpointing=True),
        dict(checkpointing=True, offload_checkpoints=True),
        dict(mlp_tiles=tiles),
        dict(loss_chunk_size=chunk),
        dict(checkpointing=True, offload_checkpoints=True, mlp_tiles=tiles, loss_chunk_size=chunk),
        dict(checkpointing=True, mlp_tiles=tiles, loss_chunk_size=chunk),
        dict(mlp_tiles=tiles, loss_chunk_size=chunk),
        dict(checkpointing=True, offload_checkpoints=True, loss_chunk_size=chunk),
        dict(checkpointing=True, offload_checkpoints=True, mlp_tiles=tiles),
        dict(lean_norms=False),
        dict(checkpointing=True, offload_checkpoints=True, mlp_tiles=tiles, loss_chunk_size=chunk, lean_norms=False),
    ]
    return [MemCase(s, n, **kw) for s in strategies for n in seq_lens for kw in sets]


def model_inputs(case: MemCase, world: int = 2, layers: int = 4) -> MemoryModelInputs:
    """The memory model's inputs for ``case`` on ``world`` ranks (in the case's dtype, no optimizer
    states: the step's gradients are in the peak, as measured)."""
    from hf_seqpar.core.shape import ModelShape

    shape = ModelShape.from_config(tiny_shape_config(layers, intermediate_size=case.intermediate_size))
    return MemoryModelInputs(
        shape=shape,
        seq_len=case.seq_len,
        strategy=case.strategy,
        sp=case.sp or world,
        features=case.features,
        elem=case.elem,
        param_elem=case.elem,
    )


def predict_case(case: MemCase, world: int = 2, layers: int = 4) -> dict:
    """The model's prediction for ``case`` on ``world`` ranks (:func:`model_inputs`)."""
    mem = peak_memory(model_inputs(case, world, layers))
    return {"device_bytes": mem.total, "host_bytes": mem.host_bytes, "phase": mem.peak_phase}


def _saved_bytes_outside_checkpoints(model, batch) -> int:
    """Bytes of every tensor autograd saves outside the checkpointed layers in one forward (what
    ``save_on_cpu`` copies to host memory: each saved tensor on its own, parameters included)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    del loss
    return total


def _measured_step(model, batch, trace: bool = False) -> tuple[int, dict]:
    """One step's peak resident memory above the memory before it, with the gradients set to None
    first; with ``trace``, also where it was set (:class:`hf_seqpar.tools.memtrace.NodePeaks`):
    ``node_peaks`` (per autograd node name, and ``forward``, the largest memory while it ran, above
    the memory before the step) and ``site`` (the name with the largest)."""
    from .memtrace import NodePeaks

    model.zero_grad(set_to_none=True)
    gc.collect()
    before = status_bytes("VmRSS")
    _PeakRSS.reset()
    loss = model(**batch).loss
    nodes = NodePeaks(loss.grad_fn) if trace else None
    loss.backward()
    del loss
    if nodes is None:
        return status_bytes("VmHWM") - before, {}
    peaks = {name: p - before for name, p in nodes.close().items()}
    return max(peaks.values()), {"site": nodes.site, "node_peaks": peaks}


def measure_case(case: MemCase, layers: int = 4, trace: bool = False) -> dict:
    """Measure ``case`` on this rank (every rank of the default gloo group calls it).

    Args:
        case: the configuration.
        layers: decoder layers of the model.
        trace: also say where the measured step's peak was set: each autograd node's peak
            (``node_peaks``) and the node of the largest (``site``), from
            :class:`hf_seqpar.tools.memtrace.NodePeaks` (hooks that only observe).

    Returns:
        ``{"peak_bytes", "host_bytes", "rank"}`` (``host_bytes`` 0 without offload), plus ``site``
        and ``node_peaks`` with ``trace``.
    """
    import torch.distributed as dist

    import hf_seqpar
    from hf_seqpar.core.memory import install_memory_features

    malloc_follows_tensors()
    world = dist.get_world_size()
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    config = tiny_shape_config(layers, intermediate_size=case.intermediate_size)
    model = LlamaForCausalLM(config).to(getattr(torch, case.dtype)).train()
    if case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    world = case.sp or world
    hf_seqpar.enable_sequence_parallel(model, case.strategy, world)
    install_memory_features(
        model, case.loss_chunk_size, case.mlp_tiles, case.offload_checkpoints, lean_norms=case.lean_norms
    )
    ids = torch.randint(0, model.config.vocab_size, (1, case.seq_len), generator=torch.Generator().manual_seed(1))
    # the first step (a short row: lazily built buffers, gloo's connections) is not measured
    warm = hf_seqpar.shard_batch({"input_ids": ids[:, : 64 * world], "labels": ids[:, : 64 * world]}, model)
    local = hf_seqpar.shard_batch({"input_ids": ids, "labels": ids.clone()}, model)
    _measured_step(model, warm)
    peak, traced = _measured_step(model, local, trace)
    host = 0
    if case.offload_checkpoints:
        model.zero_grad(set_to_none=True)
        # count what it would move
        install_memory_features(model, case.loss_chunk_size, case.mlp_tiles, False, lean_norms=case.lean_norms)
        host = _saved_bytes_outside_checkpoints(model, local)
    hf_seqpar.disable_sequence_parallel(model)
    del model, local, warm
    gc.collect()
    return {"peak_bytes": peak, "host_bytes": host, "rank": dist.get_rank(), **traced}


def compare(case: MemCase, measured: list[dict], world: int = 2) -> dict:
    """Predicted vs measured (max over ranks) for one case."""
    pred = predict_case(case, world)
    peak = max(r["peak_bytes"] for r in measured)
    host = max(r["host_bytes"] for r in measured)
    row = dict(
        asdict(case),
        label=case.label,
        measured_peak=peak,
        predicted_peak=pred["device_bytes"],
        peak_ratio=pred["device_bytes"] / peak,
        phase=pred["phase"],
        measured_host=host,
        predicted_host=pred["host_bytes"] if case.offload_checkpoints else 0,
    )
    # on CPU "device" and host are one memory: offloaded tensors stay resident, so the measured
    # peak is compared with the prediction for the same features without offload
    if case.offload_checkpoints:
        row["predicted_peak"] = predict_case(replace(case, offload_checkpoints=False), world)["device_bytes"]
        row["peak_ratio"] = row["predicted_peak"] / peak
        row["predicted_device_when_offloaded"] = pred["device_bytes"]
        row["host_ratio"] = row["predicted_host"] / host if host else None
    return row


def _rank(rank: int, world: int, port: int, cases, queue) -> None:
    import os

    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        for case in cases:
            queue.put((rank, case, measure_case(case)))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - report, never hang the parent
        queue.put((rank, None, f"{type(e).__name__}: {e}"))


def run(cases: list[MemCase], world: int = 2) -> list[dict]:
    """Measure ``cases`` on ``world`` fresh spawned ranks; the rows of :func:`compare`."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, cases, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    got: dict = {}
    try:
        while sum(len(v) for v in got.values()) < world * len(cases):
            rank, case, res = queue.get(timeout=1800)
            if case is None:
                raise RuntimeError(f"rank {rank}: {res}")
            got.setdefault(case, []).append(res)
            if len(got[case]) == world:
                print(_line(compare(case, got[case], world)), flush=True)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [compare(c, got[c], world) for c in cases]


def _line(r: dict) -> str:
    host = (
        f"  host {r['measured_host'] / 2**20:7.2f} MiB pred {r['predicted_host'] / 2**20:7.2f}"
        if r["measured_host"]
        else ""
    )
    return (
        f"{r['label']:<48} peak {r['measured_peak'] / 2**20:8.2f} MiB pred {r['predicted_peak'] / 2**20:8.2f} "
        f"({r['peak_ratio']:.3f}, {r['phase']}){host}"
    )


if __name__ == "__main__":
    import sys

    lens = tuple(int(x) for x in sys.argv[1].split(",")) if len(sys.argv) > 1 else (2048, 4096)
    strategies = tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else ("ulysses", "ring")
    run(validation_cases(strategies, lens))
