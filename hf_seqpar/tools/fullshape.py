"""The full Llama-3.1-8B shape on one GPU: MFU at 128K, and the longest row the memory model fits.

Two parts of ``recipes/gpu_check.sh``, each one process (``python -m hf_seqpar.tools.fullshape
PART OUT_JSON [--time-limit S]``), each writing its JSON before it starts the step and again after:

- ``mfu128k``: the 32-layer 8B shape (bf16, random weights built from the preset config), one
  warm-up step at 8K then one timed step at 131,072 tokens (checkpointing, MLP tiles, chunked loss;
  ``sp_size`` 1); step time, tokens/s and MFU (:mod:`hf_seqpar.tools.mfu`, the device's peak named).
- ``longest``: the longest row that the memory model (:func:`~hf_seqpar.tools.memmodel.peak_memory`,
  the planner's activation model, with the CUDA kernel's buffers) fits on this GPU with every memory
  feature (checkpointing, offloaded checkpoints, 16 MLP tiles, chunked loss), weights and gradients
  in bf16 on the device, host memory for the offloaded checkpoints within the machine's; one step
  there, predicted against measured peak (within 15%) and step time. When the predicted step time
  at that length exceeds the part's time limit, the step runs at the longest length whose predicted
  time fits (the report names both lengths): a step of the quadratic attention at the memory bound
  of a 141 GB GPU takes longer than the whole GPU check may.

Without CUDA, ``--dry`` prints the lengths and predictions the part would use (the CPU smoke test).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

__all__ = ["LONGEST_FEATURES", "MFU_FEATURES", "plan_longest", "predicted_step_s", "main"]

#: Every memory feature, single-GPU mode.
LONGEST_FEATURES = dict(gradient_checkpointing=True, offload_checkpoints=True, mlp_tiles=16, loss_chunk_size=4096)
#: The 128K step (no offload needed at 128K on an 80 GB+ GPU).
MFU_FEATURES = dict(gradient_checkpointing=True, mlp_tiles=4, loss_chunk_size=4096)
#: Fraction of the device memory the prediction may use (allocator fragmentation, CUDA context).
DEVICE_FRACTION = 0.9
#: Fraction of the host memory the offloaded checkpoints may use.
HOST_FRACTION = 0.7
#: Assumed MFU for the predicted step time (checkpointing's recompute counted as work).
ASSUMED_MFU = 0.35


def _shape():
    from hf_seqpar.core.shape import ModelShape
    from hf_seqpar.tools.presets import load_config

    return ModelShape.from_config(load_config("llama-3.1-8b"))


def _features(f: dict):
    from hf_seqpar.tools.memmodel import Features

    return Features(
        f["gradient_checkpointing"], f.get("offload_checkpoints", False), f["mlp_tiles"], f["loss_chunk_size"]
    )


def predicted_bytes(seq: int, features: dict) -> tuple[float, float]:
    """(device bytes: bf16 weights + the step's peak of activations and gradients, host bytes) of one
    step of ``seq`` tokens on one GPU."""
    from hf_seqpar.tools.memmodel import GPU_KERNEL, MemoryModelInputs, peak_memory

    shape = _shape()
    mem = peak_memory(MemoryModelInputs(shape, seq, "ulysses", 1, _features(features), kernel=GPU_KERNEL))
    return 2 * shape.params + mem.total, mem.host_bytes


def predicted_step_s(seq: int, peak_tflops: float, mfu: float = ASSUMED_MFU) -> float:
    """A step's seconds at ``mfu`` of the peak, the checkpointed forward counted again (hardware work)."""
    from hf_seqpar.tools.memmodel import attention_flops

    shape = _shape()
    flops = 8 * shape.params * seq + attention_flops(shape, seq, 1, checkpointing=True)
    return flops / (peak_tflops * 1e12 * mfu)


def plan_longest(device_bytes: float, host_bytes: float, peak_tflops: float, time_limit_s: float, step: int = 4096):
    """The memory model's longest row on this GPU, and the longest whose predicted step fits the time.

    Returns:
        ``{"longest", "longest_step_s", "run", "run_step_s", "predicted_device_bytes", ...}``.
    """

    def fits(k):
        dev, host = predicted_bytes(k * step, LONGEST_FEATURES)
        return dev <= DEVICE_FRACTION * device_bytes and host <= HOST_FRACTION * host_bytes

    lo, hi = 0, 1
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    longest = lo * step
    run = longest
    while run > step and predicted_step_s(run, peak_tflops) > time_limit_s:
        run -= step
    dev, host = predicted_bytes(run, LONGEST_FEATURES)
    return {
        "longest": longest,
        "longest_step_s": round(predicted_step_s(longest, peak_tflops), 1) if longest else None,
        "run": run,
        "run_step_s": round(predicted_step_s(run, peak_tflops), 1),
        "predicted_device_gib": round(dev / 2**30, 2),
        "predicted_host_gib": round(host / 2**30, 2),
        "features": LONGEST_FEATURES,
    }


def _step(seq: int, features: dict, warmup: int | None = None) -> dict:
    """One training step (forward + backward) of the 8B shape at ``seq`` tokens on this GPU."""
    import torch
    from transformers import LlamaForCausalLM

    import hf_seqpar
    from hf_seqpar.integrations.accelerate import SequenceParallelPlugin, prepare_model
    from hf_seqpar.tools.presets import load_config

    cfg = load_config("llama-3.1-8b")
    cfg._attn_implementation = "sdpa"
    cfg.use_cache = False
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, seq)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly (this process runs one step)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).train()
    finally:
        torch.set_default_dtype(torch.float32)
    prepare_model(model, SequenceParallelPlugin(strategy="ulysses", sp_size=1, **features))

    def run(n):
        ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
        out = model(**hf_seqpar.shard_batch({"input_ids": ids, "labels": ids.clone()}, model))
        out.loss.backward()
        loss = float(out.loss)
        model.zero_grad(set_to_none=True)
        return loss

    if warmup:
        run(warmup)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = run(seq)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {
        "seq_len": seq,
        "loss": loss,
        "step_s": round(seconds, 2),
        # weights were allocated before the step (base); the step's peak on top of them, plus them
        "measured_device_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "measured_step_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2),
        "ok": bool(torch.isfinite(torch.tensor(loss))),
    }


def _write(path: Path, res: dict) -> None:
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res), flush=True)


def main(argv=None) -> int:
    import argparse

    import torch

    from hf_seqpar.tools.mfu import describe, peak_tflops, utilisation

    p = argparse.ArgumentParser(prog="python -m hf_seqpar.tools.fullshape")
    p.add_argument("part", choices=["mfu128k", "longest"])
    p.add_argument("out", help="JSON file to write (after planning and after the step)")
    p.add_argument("--time-limit", type=float, default=150.0, help="seconds the step may take (longest)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak (default: by name)")
    p.add_argument("--dry", action="store_true", help="plan only (no step; works without CUDA: 80 GB assumed)")
    args = p.parse_args(argv)
    out = Path(args.out)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry:
        print("fullshape: no CUDA device (use --dry to see the plan)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if cuda else "dry run (80 GB, 128 GiB host assumed)"
    peak = args.peak_tflops or peak_tflops(name) or 989.0
    res = {"part": args.part, "device": name, "torch": torch.__version__, "peak_tflops_used": peak}
    shape = _shape()
    if cuda and not args.dry:
        from hf_seqpar.tools.selftest import _init_world_of_one

        _init_world_of_one(29700 + (args.part == "longest"))  # sp_size 1 still runs in a process group
    if args.part == "mfu128k":
        seq = 131072
        dev, host = predicted_bytes(seq, MFU_FEATURES)
        res.update(seq_len=seq, features=MFU_FEATURES, predicted_device_gib=round(dev / 2**30, 2))
        _write(out, {**res, "status": "running"})
        if args.dry:
            return 0
        step = _step(seq, MFU_FEATURES, warmup=8192)
    else:
        device_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else 80 * 2**30
        host_bytes = _host_bytes() if cuda else 128 * 2**30
        res.update(plan_longest(device_bytes, host_bytes, peak, args.time_limit))
        _write(out, {**res, "status": "running"})
        if args.dry or not res["run"]:
            return 0
        step = _step(res["run"], LONGEST_FEATURES)
        step["predicted_vs_measured_peak"] = round(step["measured_device_gib"] / res["predicted_device_gib"], 3)
        step["ok"] = step["ok"] and abs(step["predicted_vs_measured_peak"] - 1) <= 0.15
    u = utilisation(shape, step["seq_len"], step["step_s"], device_name=name, peak=args.peak_tflops)
    step.update(mfu=u.mfu, tokens_per_s_per_gpu=round(u.tokens_per_s_per_device, 1), summary=describe(u))
    _write(out, {**res, **step, "status": "done"})
    return 0 if step["ok"] else 1


def _host_bytes() -> float:
    """The machine's total memory (``/proc/meminfo``)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0.0


if __name__ == "__main__":
    sys.exit(main())
