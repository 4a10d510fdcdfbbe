"""``hf-seqpar bench --kernels``: forward+backward speed of every attention backend, per device.

For each backend (CUDA: ``cuda_flash``, ``cuda_cudnn``, ``cuda_efficient``, ``flash_attn`` when
installed), each row structure (``causal``: one document of ``S`` tokens; ``packed``: documents of
the lengths in :data:`DOC_LENGTHS` repeated up to ``S``, planned into pieces by
:func:`hf_seqpar.core.segments.plan_pieces` as training does, tiny ones packed into masked tiles)
and each length, it times hf_seqpar's own variable-length attention
(:func:`hf_seqpar.kernels.varlen.varlen_attention`, the path training runs: fp32 accumulators and
lse merges included) forward and backward with the backend forced, at the Llama-3.1-8B attention
shape (32 query heads, 8 kv heads, ``d`` 128, bf16, one row). TFLOP/s count the causal work of the
documents (score entries per head ``w``): ``4 w h_q d`` forward, 2.5 times that backward (flash
recomputes the scores: the hardware's work), over the median of the timed steps.

Before timing, each backend and structure is checked against the float64 reference at
``check_len`` tokens (same structure): output error below 3e-2 and gradient errors below 5e-2
relative to the reference's largest entry, as the GPU selftest checks. A backend that fails is
timed but marked, and is not ranked.

Writes a JSON per device (``rows``, and ``table_entry``: the row of
:data:`hf_seqpar.kernels.speed.MEASURED` that makes the measured order the default there), after
every measurement (partial results survive a time limit). Without CUDA it says so and exits 2;
``--device cpu`` measures the CPU kernel instead (a smoke test of the command, small lengths).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["KernelBenchSpec", "DOC_LENGTHS", "run_kernel_bench", "format_kernel_table", "pieces_for", "work_of"]

#: Document lengths of the ``packed`` rows, repeated until the row is full (the last one cut):
#: long and short documents, and tiny ones that the planner packs into masked tiles (first, so
#: that the short correctness check has them too).
DOC_LENGTHS = (40, 24, 32, 16, 1024, 2048, 48, 20, 4096, 512, 3000, 8192)
CUDA_BACKENDS = ("cuda_flash", "cuda_cudnn", "cuda_efficient", "flash_attn")


@dataclass
class KernelBenchSpec:
    """What to measure."""

    lengths: list = field(default_factory=lambda: [8192, 32768, 131072])
    """Row lengths ``S`` (tokens)."""
    cases: list = field(default_factory=lambda: ["causal", "packed"])
    """Row structures: ``causal`` (one document) and ``packed`` (:data:`DOC_LENGTHS`)."""
    backends: list | None = None
    """Backends to measure (None: every CUDA backend available, or ``torch_cpu`` on CPU)."""
    heads: int = 32
    """Query heads (Llama-3.1-8B at P = 1)."""
    kv_heads: int = 8
    """kv heads."""
    head_dim: int = 128
    """Head dimension."""
    dtype: str = "bfloat16"
    """Compute dtype."""
    steps: int = 3
    """Timed forward+backward steps (the median is reported)."""
    warmup: int = 1
    """Untimed steps first."""
    check_len: int = 2048
    """Length of the correctness check against the float64 reference."""
    device: str = "cuda"
    """``cuda`` or ``cpu`` (a smoke test of the command)."""
    time_limit_s: float | None = None
    """Stop starting new measurements after this many seconds (None: no limit)."""


def pieces_for(case: str, seq: int, device):
    """The attention pieces of one row of ``seq`` tokens (``causal`` or ``packed``), planned as in
    training (:func:`hf_seqpar.core.segments.plan_pieces`), and the row's document lengths."""
    from hf_seqpar.core.masks import document_ids
    from hf_seqpar.core.segments import build_segments, plan_pieces

    if case == "causal":
        lengths = [seq]
    elif case == "packed":
        lengths, left, i = [], seq, 0
        while left:
            lengths.append(min(DOC_LENGTHS[i % len(DOC_LENGTHS)], left))
            left -= lengths[-1]
            i += 1
    else:
        raise ValueError(f"unknown case {case!r}; valid: causal, packed")
    # (1, S) positions restarting at each document -> document ids
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    valid = torch.ones(1, seq, dtype=torch.bool, device=device)
    docs = document_ids(pos) if len(lengths) > 1 else None
    return plan_pieces(build_segments(valid, docs), [(0, seq)], [(0, seq)], True, None), lengths


def work_of(lengths) -> int:
    """Causal score entries per head of documents of these lengths (``n (n + 1) / 2`` each)."""
    return sum(n * (n + 1) // 2 for n in lengths)


def _available(spec: KernelBenchSpec) -> list[str]:
    from hf_seqpar.kernels import BACKENDS

    if spec.backends:
        return list(spec.backends)
    names = CUDA_BACKENDS if spec.device == "cuda" else ("torch_cpu",)
    return [n for n in names if BACKENDS[n].available()]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(spec, seq, device, requires_grad=True, dtype=None):
    g = torch.Generator(device=device).manual_seed(seq)
    dtype = dtype or getattr(torch, spec.dtype)
    return [
        torch.randn(1, h, seq, spec.head_dim, device=device, generator=g).to(dtype).requires_grad_(requires_grad)
        for h in (spec.heads, spec.kv_heads, spec.kv_heads)
    ]


def _check(spec: KernelBenchSpec, backend: str, case: str, device) -> dict:
    """Errors of one backend on one structure at ``check_len`` against the float64 reference."""
    from hf_seqpar.kernels.varlen import varlen_attention

    seq = spec.check_len
    pieces, _ = pieces_for(case, seq, device)
    q, k, v = _inputs(spec, seq, device)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scale = spec.head_dim**-0.5
    out = varlen_attention(q, k, v, pieces, scale=scale, backend=backend)
    ref = varlen_attention(q64, k64, v64, pieces, scale=scale, backend="reference")
    dout = torch.randn(out.shape, device=device, generator=torch.Generator(device=device).manual_seed(7))
    out.backward(dout.to(out.dtype))
    ref.backward(dout.double())
    out_err = float((out.detach().double() - ref.detach()).abs().max())
    grad_err = max(
        float((a.grad.double() - b.grad).abs().max() / b.grad.abs().max()) for a, b in ((q, q64), (k, k64), (v, v64))
    )
    return {"out_err": out_err, "grad_rel_err": grad_err, "correct": out_err < 3e-2 and grad_err < 5e-2}


def _time(spec: KernelBenchSpec, backend: str, case: str, seq: int, device) -> dict:
    from hf_seqpar.kernels.varlen import varlen_attention

    pieces, lengths = pieces_for(case, seq, device)
    q, k, v = _inputs(spec, seq, device)
    dout = torch.randn(q.shape, device=device, dtype=q.dtype)
    times = []
    for i in range(spec.warmup + spec.steps):
        q.grad = k.grad = v.grad = None
        _sync(device)
        t0 = time.perf_counter()
        varlen_attention(q, k, v, pieces, scale=spec.head_dim**-0.5, backend=backend).backward(dout)
        _sync(device)
        if i >= spec.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    flops = 4 * work_of(lengths) * spec.heads * spec.head_dim * (1 + 2.5)
    return {"time_s": step, "tflops": flops / step / 1e12, "docs": len(lengths), "pieces": len(pieces)}


def device_name(device) -> str:
    """The device's name (``torch.cuda.get_device_name``; ``cpu`` on CPU)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_kernel_bench(spec: KernelBenchSpec, out_path: str | None = None, echo=print) -> dict:
    """Measure every backend, structure and length of ``spec``; returns (and writes, after every
    measurement, to ``out_path``) ``{"device", "torch", "rows", "table_entry"}``.

    Raises:
        RuntimeError: ``spec.device`` is ``cuda`` and there is no CUDA device.
    """
    from hf_seqpar.kernels.speed import table_entry

    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    device = torch.device(spec.device, 0) if spec.device == "cuda" else torch.device("cpu")
    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "spec": asdict(spec),
        "rows": [],
        "table_entry": {},
        "complete": False,
    }
    start = time.perf_counter()

    def save():
        report["table_entry"] = table_entry(report["rows"])
        if out_path:
            Path(out_path).write_text(json.dumps(report, indent=1))

    for backend in _available(spec):
        for case in spec.cases:
            try:
                check = _check(spec, backend, case, device)
            except Exception as e:  # noqa: BLE001 (a kernel that cannot run this structure: recorded)
                check = {"correct": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            for seq in spec.lengths:
                if spec.time_limit_s is not None and time.perf_counter() - start > spec.time_limit_s:
                    echo(f"time limit of {spec.time_limit_s:.0f} s reached: partial table")
                    save()
                    return report
                row = {"backend": backend, "case": case, "seq_len": seq, **check, "tflops": None}
                if "error" not in check:
                    try:
                        row.update(_time(spec, backend, case, seq, device))
                    except Exception as e:  # noqa: BLE001 (e.g. out of memory at 128K: recorded)
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                report["rows"].append(row)
                echo(_row_line(row))
                save()
    report["complete"] = True
    save()
    return report


def _row_line(r: dict) -> str:
    speed = f"{r['tflops']:.1f} TFLOP/s ({r['time_s'] * 1e3:.1f} ms)" if r.get("tflops") else r.get("error", "-")
    ok = "ok" if r.get("correct") else "WRONG" if "out_err" in r else "not run"
    return f"{r['backend']:>15} {r['case']:>7} S={r['seq_len']:>7}: {speed} [{ok}]"


def format_kernel_table(report: dict) -> str:
    """Backends x (structure, length) TFLOP/s, and the order the table gives."""
    from hf_seqpar.kernels.speed import CASES, order_from_table

    rows = report["rows"]
    cols = sorted({(r["case"], r["seq_len"]) for r in rows}, key=lambda c: (c[0] != "causal", c[1]))
    head = ["backend"] + [f"{c} {s // 1024}K" if s >= 1024 else f"{c} {s}" for c, s in cols] + ["correct"]
    lines = [head]
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = {(r["case"], r["seq_len"]): r for r in rows if r["backend"] == backend}
        cells = [f"{mine[c]['tflops']:.1f}" if c in mine and mine[c].get("tflops") else "-" for c in cols]
        wrong = sorted({c for c, _ in mine if not mine[(c, _)].get("correct")})
        lines.append([backend] + cells + ["yes" if not wrong else "no: " + ",".join(wrong)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)
    text += f"\nforward+backward TFLOP/s on {report['device']} (torch {report['torch']}), causal work only"
    table = {report["device"]: report["table_entry"]}
    for needs_mask, case in CASES.items():
        order = order_from_table(report["device"], needs_mask, table)
        text += f"\ndefault order for {'masked' if needs_mask else 'dense'} blocks ({case} rows): {', '.join(order)}"
    text += (
        f"\nto make it the default on this device, add to kernels/speed.py MEASURED:\n"
        f"    {report['device']!r}: {json.dumps(report['table_entry'])},"
    )
    return text


def default_out(name: str) -> str:
    """``kernel-speed-<device>.json`` with the device name made a file name."""
    return "kernel-speed-" + re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() + ".json"


def main(argv=None) -> int:
    """``python -m hf_seqpar.tools.kernelbench`` (and ``hf-seqpar bench --kernels``): 0 when measured,
    2 without a CUDA device (``--device cpu`` measures the CPU kernel instead)."""
    import argparse
    import sys

    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m hf_seqpar.tools.kernelbench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--kernel-lengths", type=ints, default=[8192, 32768, 131072], help="row lengths (default: 8K,32K,128K)"
    )
    p.add_argument("--kernel-backends", type=names, default=None, help="backends (default: all available)")
    p.add_argument("--kernel-cases", type=names, default=["causal", "packed"], help="causal,packed (default: both)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--time-limit", type=float, default=None, help="stop starting measurements after this many seconds")
    p.add_argument("--json", default=None, help="output file (default: kernel-speed-<device>.json)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "hf-seqpar bench --kernels: no CUDA device here; the speed table measures the CUDA attention "
            "kernels (run it on the GPU; --device cpu --kernel-lengths 512 smoke-tests the command on CPU)",
            file=sys.stderr,
        )
        return 2
    spec = KernelBenchSpec(
        lengths=args.kernel_lengths,
        cases=args.kernel_cases,
        backends=args.kernel_backends,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        time_limit_s=args.time_limit,
        check_len=min(2048, min(args.kernel_lengths)),
    )
    out = args.json or default_out(torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu")
    report = run_kernel_bench(spec, out)
    print(format_kernel_table(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
