"""``hf-seqpar bench``: measure SP strategies (time, per-rank memory, traffic vs theory).

For every (strategy, world, sequence length) it runs forward+backward steps of a Llama-style
model built from a config (random weights: speed and memory do not depend on their values) and
reports the step time after warm-up (min / median / max over the timed steps), tokens/s (at the
median), per-rank peak resident memory around the step, the activation bytes autograd saved
(measured with ``saved_tensors_hooks``), the bytes the byte counter saw per step and the theory
for them (:mod:`hf_seqpar.tools.theory`), and on CUDA the MFU.
Baselines in the same run: the plain model on one rank (strategy ``none``) and every strategy at
``P = 1``. Every configuration runs in freshly spawned ranks (gloo on CPU, NCCL on GPUs), so its
peak memory does not include what earlier configurations left in the process's heap; under
``torchrun``/``accelerate launch`` the configurations whose world equals the launched world run in
place, one after the other (rows say ``fresh_process: false``: their CPU peaks can include earlier
configurations' memory).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from hf_seqpar.core.mesh import find_state

__all__ = ["BenchSpec", "run_bench", "format_table", "plot_rows"]


@dataclass
class BenchSpec:
    """What to measure."""

    model: str = "tiny"
    """Preset name, config.json, folder or Hub name (config only)."""
    layers: int | None = None
    """Override the number of layers (shrink big shapes to fit a CPU)."""
    strategies: list = field(default_factory=lambda: ["ulysses", "ring"])
    """Strategies to run."""
    worlds: list = field(default_factory=lambda: [2])
    """Rank counts (the SP degree is the world: one SP group)."""
    seq_lens: list = field(default_factory=lambda: [1024, 2048])
    """Total sequence lengths."""
    batch: int = 1
    """Rows per step."""
    steps: int = 5
    """Timed steps (min, median and max are reported)."""
    warmup: int = 2
    """Untimed steps first."""
    dtype: str = "float32"
    """Activation/parameter dtype (``bfloat16`` on GPUs)."""
    baselines: bool = True
    """Add the plain model on one rank and every strategy at P=1."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one GPU for MFU; None: by the device's name
    (:data:`hf_seqpar.tools.mfu.PEAK_TFLOPS`; an unknown device gets tokens/s only)."""
    options: dict = field(default_factory=dict)
    """Strategy options (e.g. ``{"ulysses_size": 2}``)."""


def _configs(spec: BenchSpec) -> list[tuple[str, int, int]]:
    rows = []
    for n in spec.seq_lens:
        if spec.baselines:
            rows.append(("none", 1, n))
            rows += [(s, 1, n) for s in spec.strategies]
        rows += [(s, w, n) for w in spec.worlds for s in spec.strategies if w > 1]
    return list(dict.fromkeys(rows))


def status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; 0 where it is absent.

    Raises:
        OSError: no ``/proc`` (not Linux).
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


#: glibc's ``mallopt`` parameters (``malloc.h``) and the threshold every measuring tool here uses.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_THRESHOLD = 128 * 1024
#: glibc's environment variable for the same setting; where it is set, the user's value stands.
MALLOC_ENV = "MALLOC_MMAP_THRESHOLD_"


def malloc_follows_tensors(threshold: int = MALLOC_THRESHOLD) -> bool:
    """Make resident memory follow the live tensors on CPU, as ``max_memory_allocated`` does on a GPU.

    glibc is told (``mallopt``) to serve every allocation over ``threshold`` bytes with its own
    ``mmap`` (returned to the system when freed) and to trim free heap top over ``threshold``. With
    glibc's default (a threshold that grows after large frees) freed buffers stay in the heap and a
    step's peak depends on the order of earlier allocations (BENCHMARKS.md: the same step read
    219-498 MiB between runs). Called at the start of each measuring rank (bench's row and memory
    checks); does nothing where ``MALLOC_MMAP_THRESHOLD_`` is set (the user's choice stands).

    Args:
        threshold: bytes above which an allocation is its own mapping.

    Returns:
        True when glibc took the setting; False elsewhere (not glibc, or the variable is set).
    """
    import ctypes

    if MALLOC_ENV in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, threshold))


class _PeakRSS:
    """Peak resident memory of this process around a region (Linux ``VmHWM``, reset through
    ``/proc/self/clear_refs``; falls back to the lifetime peak elsewhere)."""

    @staticmethod
    def reset() -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    @staticmethod
    def read() -> int:
        try:
            return status_bytes("VmHWM")
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def saved_activation_bytes(model, inputs: dict) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward."""
    from torch.distributed.tensor import DTensor

    def storage(t):
        return (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()

    params = {storage(p).data_ptr() for p in model.parameters()}
    seen: dict = {}

    def pack(t):
        st = storage(t)
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    del out
    return sum(seen.values())


def _backward_meter(model, strategy: str | None = None):
    """The context in which backward's collectives are counted: the strategy's ``metering()``
    (Megatron-SP's DTensor collectives need a dispatch-mode meter; the others count through
    comm.py, so theirs does nothing). ``strategy`` is unused (kept for callers)."""
    state = find_state(model)
    return contextlib.nullcontext() if state is None else state.strategy.metering()


def _run_one(spec: BenchSpec, strategy: str, seq_len: int, device: torch.device) -> dict:
    from transformers import LlamaForCausalLM

    import hf_seqpar
    from hf_seqpar.tools.presets import load_config
    from hf_seqpar.tools.theory import ModelShape, activation_bytes, comm_bytes

    dtype = getattr(torch, spec.dtype)
    elem = torch.finfo(dtype).bits // 8
    config = load_config(spec.model, num_hidden_layers=spec.layers)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    world = dist.get_world_size()
    if strategy != "none":
        hf_seqpar.enable_sequence_parallel(model, strategy, world, count_comm=True, **spec.options)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (spec.batch, seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids}
    local = hf_seqpar.shard_batch(batch, model) if strategy != "none" else {**batch, "use_cache": False}
    state = hf_seqpar.find_state(model)

    def step():
        loss = model(**local).loss
        with _backward_meter(model, strategy):
            loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(spec.warmup):
        step()
    times, comm, peaks = [], [], []
    for _ in range(spec.steps):
        if state is not None:
            state.counter.reset()
        _PeakRSS.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        dist.barrier()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        dist.barrier()
        peaks.append(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _PeakRSS.read())
        comm.append(state.counter.total if state is not None else 0)
    activation = saved_activation_bytes(model, local)
    shape = ModelShape.from_config(config)
    padded = local["seqpar"].layout.padded_len if strategy != "none" else seq_len
    theory = (
        0
        if strategy == "none" or world == 1
        else comm_bytes(
            strategy, shape, padded, world, spec.batch, elem, ulysses_size=spec.options.get("ulysses_size")
        )["total"]
    )
    act_theory = activation_bytes(
        None if strategy == "none" or world == 1 else strategy,
        shape,
        padded,
        world,
        spec.batch,
        elem,
        ulysses_size=spec.options.get("ulysses_size"),
    )
    step_time = statistics.median(times)
    row = dict(
        strategy=strategy,
        world=world,
        seq_len=seq_len,
        batch=spec.batch,
        padded_len=padded,
        step_time_s=step_time,
        step_times_s=times,
        pid=os.getpid(),
        tokens_per_s=spec.batch * seq_len / step_time,
        peak_mem_bytes=max(peaks),
        activation_bytes=activation,
        activation_bytes_theory=act_theory,
        comm_bytes_measured=comm[-1],
        comm_bytes_theory=theory,
        comm_ratio=(comm[-1] / theory) if theory else None,
        device=device.type,
    )
    row["tokens_per_s_per_gpu"] = row["tokens_per_s"] / world
    if device.type == "cuda":
        from hf_seqpar.tools.mfu import utilisation

        u = utilisation(
            shape, seq_len, step_time, world, spec.batch, torch.cuda.get_device_name(device), spec.peak_tflops
        )
        row.update(
            mfu=u.mfu, peak_tflops=u.peak_tflops, device_name=u.device, model_tflops_per_gpu=u.model_tflops_per_device
        )
    return row


def _gather_rows(row: dict) -> list[dict]:
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    return rows


def _merge(per_rank: list[dict]) -> dict:
    """One row per configuration: the largest memory and traffic of any rank; step times are those
    of the slowest rank at each step (min / median / max over the steps)."""
    row = dict(per_rank[0])
    for key in ("peak_mem_bytes", "activation_bytes", "comm_bytes_measured"):
        row[key] = max(r[key] for r in per_rank)
        row[key + "_per_rank"] = [r[key] for r in per_rank]
    row["pid_per_rank"] = [r.pop("pid") for r in per_rank]
    row.pop("pid", None)
    times = [max(step) for step in zip(*(r["step_times_s"] for r in per_rank))]
    row["step_times_s"] = times
    row["step_time_s"] = statistics.median(times)
    row["step_time_min_s"], row["step_time_max_s"] = min(times), max(times)
    row["tokens_per_s"] = row["batch"] * row["seq_len"] / row["step_time_s"]
    row["tokens_per_s_per_gpu"] = row["tokens_per_s"] / row["world"]
    if row.get("model_tflops_per_gpu") is not None:
        # the slowest rank's median step: MFU of the configuration (same FLOPs, the merged time)
        scale = per_rank[0]["step_time_s"] / row["step_time_s"]
        row["model_tflops_per_gpu"] *= scale
        row["mfu"] = row["model_tflops_per_gpu"] / row["peak_tflops"] if row.get("peak_tflops") else None
    row["comm_ratio"] = row["comm_bytes_measured"] / row["comm_bytes_theory"] if row["comm_bytes_theory"] else None
    return row


def _worker(rank: int, world: int, port: int, spec_dict: dict, configs: list, out_path: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    rows = _measure(BenchSpec(**spec_dict), configs, device, fresh=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _measure(spec: BenchSpec, configs: list, device: torch.device, fresh: bool) -> list[dict]:
    rows = []
    for strategy, _, seq_len in configs:
        rows.append({**_merge(_gather_rows(_run_one(spec, strategy, seq_len, device))), "fresh_process": fresh})
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bench(spec: BenchSpec) -> list[dict]:
    """Run every configuration of ``spec`` and return one row per configuration.

    Under an initialised process group (torchrun/accelerate) only configurations whose world
    equals the launched world run, in this process, one after the other; otherwise every
    configuration gets freshly spawned ranks (its peak memory is its own).

    Raises:
        ValueError: an unknown strategy name.
    """
    from hf_seqpar.strategies import strategy_class

    for s in spec.strategies:
        if s != "none":
            strategy_class(s)
    configs = _configs(spec)
    if dist.is_initialized():
        world = dist.get_world_size()
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        return _measure(spec, [c for c in configs if c[1] == world], device, fresh=False)
    import multiprocessing

    from tqdm import tqdm

    # fresh ranks per configuration, forked from a server that imported torch and transformers once
    # (spawn would import them again for every configuration)
    start = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if start == "forkserver":
        multiprocessing.set_forkserver_preload(["hf_seqpar.tools.bench", "transformers.models.llama.modeling_llama"])
    rows = []
    bar = tqdm(configs, desc="bench", leave=False)
    for config in bar:
        bar.set_postfix_str(f"{config[0]} P={config[1]} N={config[2]}")
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            torch.multiprocessing.start_processes(
                _worker,
                args=(config[1], _free_port(), asdict(spec), [config], out),
                nprocs=config[1],
                start_method=start,
            )
            with open(out) as f:
                rows += json.load(f)
    return rows


def _mib(x) -> str:
    return f"{x / 2**20:,.1f}"


def format_table(rows: list[dict]) -> str:
    """A plain-text table of bench rows, with overhead at P=1 against the plain model."""
    plain = {r["seq_len"]: r["step_time_s"] for r in rows if r["strategy"] == "none"}
    head = [
        "strategy",
        "P",
        "seq",
        "step s min/med/max",
        "tok/s",
        "peak MiB",
        "act MiB",
        "act theory",
        "comm MiB",
        "theory MiB",
        "ratio",
        "vs plain",
    ]
    with_mfu = any("mfu" in r for r in rows)
    if with_mfu:
        head += ["tok/s/GPU", "MFU"]
    lines = [head]
    for r in rows:
        over = ""
        if r["world"] == 1 and r["strategy"] != "none" and r["seq_len"] in plain:
            over = f"{100 * (r['step_time_s'] / plain[r['seq_len']] - 1):+.1f}%"
        spread = (
            f"{r.get('step_time_min_s', r['step_time_s']):.3f}/{r['step_time_s']:.3f}/"
            f"{r.get('step_time_max_s', r['step_time_s']):.3f}"
        )
        lines.append(
            [
                r["strategy"],
                str(r["world"]),
                str(r["seq_len"]),
                spread + ("" if r.get("fresh_process", True) else "*"),
                f"{r['tokens_per_s']:,.0f}",
                _mib(r["peak_mem_bytes"]),
                _mib(r["activation_bytes"]),
                _mib(r["activation_bytes_theory"]),
                _mib(r["comm_bytes_measured"]),
                _mib(r["comm_bytes_theory"]),
                f"{r['comm_ratio']:.4f}" if r["comm_ratio"] else "-",
                over,
            ]
            + (
                [
                    f"{r.get('tokens_per_s_per_gpu', r['tokens_per_s'] / r['world']):,.0f}",
                    f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-",
                ]
                if with_mfu
                else []
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
    peaks = {(r.get("device_name"), r.get("peak_tflops")) for r in rows if "mfu" in r}
    for name, peak in sorted(peaks, key=str):
        text += (
            f"\nMFU: (6 x params x tokens + attention FLOPs, recompute not counted) / (step time x {peak:,.0f} "
            f"TFLOP/s dense bf16 peak of {name} x GPUs)"
            if peak
            else f"\nMFU: no peak known for {name!r}: tokens/s only (pass --peak-tflops)"
        )
    if any(not r.get("fresh_process", True) for r in rows):
        text += (
            "\n* ran in place under a launcher, after the configurations above it in the same processes: "
            "its CPU peak memory can include theirs (run without a launcher for per-configuration processes)"
        )
    return text


def plot_rows(rows: list[dict], path: str):
    """Activation memory and step time per strategy and P, written to a PNG.

    With several sequence lengths: lines against the length (step time: median with a min-max
    band). With one length: bars per configuration (median step time with min-max error bars),
    since a line over a single x value shows nothing.

    Returns:
        The matplotlib figure (already saved).

    Raises:
        ImportError: matplotlib is missing (``pip install 'hf_seqpar[bench]'``).
        ValueError: no rows.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install 'hf_seqpar[bench]'") from e
    if not rows:
        raise ValueError("nothing to plot: no bench rows")
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    keys = list(dict.fromkeys((r["strategy"], r["world"]) for r in rows))
    lengths = sorted({r["seq_len"] for r in rows})
    lo = lambda r: r.get("step_time_min_s", r["step_time_s"])  # noqa: E731
    hi = lambda r: r.get("step_time_max_s", r["step_time_s"])  # noqa: E731
    if len(lengths) == 1:
        labels = [f"{s} P={w}" for s, w in keys]
        sel = [next(r for r in rows if (r["strategy"], r["world"]) == k) for k in keys]
        x = list(range(len(sel)))
        ax_mem.bar(x, [r["activation_bytes"] / 2**20 for r in sel], color="tab:blue")
        ax_time.bar(
            x,
            [r["step_time_s"] for r in sel],
            color="tab:orange",
            yerr=[[r["step_time_s"] - lo(r) for r in sel], [hi(r) - r["step_time_s"] for r in sel]],
            capsize=4,
        )
        for ax in (ax_mem, ax_time):
            ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
            ax.grid(alpha=0.3, axis="y")
        ax_mem.set(ylabel="activation memory per rank (MiB)", title=f"{lengths[0]:,} tokens")
        ax_time.set(ylabel="step time (s): median, min-max", title=f"{lengths[0]:,} tokens")
    else:
        for key in keys:
            sel = sorted((r for r in rows if (r["strategy"], r["world"]) == key), key=lambda r: r["seq_len"])
            label = f"{key[0]} P={key[1]}"
            xs = [r["seq_len"] for r in sel]
            ax_mem.plot(xs, [r["activation_bytes"] / 2**20 for r in sel], "o-", label=label)
            (line,) = ax_time.plot(xs, [r["step_time_s"] for r in sel], "o-", label=label)
            ax_time.fill_between(xs, [lo(r) for r in sel], [hi(r) for r in sel], color=line.get_color(), alpha=0.2)
        ax_mem.set(xlabel="sequence length (tokens)", ylabel="activation memory per rank (MiB)")
        ax_time.set(xlabel="sequence length (tokens)", ylabel="step time (s): median, min-max band")
        for ax in (ax_mem, ax_time):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    device = rows[0]["device"]
    fig.suptitle(f"hf_seqpar bench ({'CPU / gloo' if device == 'cpu' else 'CUDA / NCCL'})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
