"""``hf-seqpar selftest --gpu``: the one-command check of the CUDA paths on one GPU.

Runs, each in its own process (a CUDA fault in one case cannot hide the others), within a time
budget: the ``gpu``-marked tests (kernel backends against float64, strategies at ``sp_size=1``
against the unsharded model in bf16 and under autocast, memory features), a kernel sweep (every
available CUDA backend x fp16/bf16 x causal/window/mask, forward and backward, plus the
variable-length pieces on packed and padded rows), single-GPU long-sequence steps
(memory and time at S and 2S for one-document and packed rows: the growth must be linear), and
one step at the longest length :mod:`hf_seqpar.tools.memmodel` says fits a third of the GPU (its
predicted peak against the measured one, within 15%), and
writes ``selftest.json`` and ``selftest.md``. Without a GPU it selects nothing CUDA, says so and
exits 0 (dry mode), so the same command is safe in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

__all__ = ["run_selftest", "CASES"]

#: Long-sequence cases: (strategy, rows, S). Llama-3.1-8B attention/MLP shapes, 2 layers, bf16.
LONG_CASES = [
    ("ulysses", "single", 65536),
    ("ulysses", "single", 131072),
    ("ulysses", "packed", 65536),
    ("ulysses", "packed", 131072),
    ("ring", "packed", 65536),
    ("ring", "packed", 131072),
    ("ring", "single", 65536),
]
CASES = ["kernels", "pieces", "predicted"] + [f"long:{s}:{r}:{n}" for s, r, n in LONG_CASES]
#: The ``predicted`` case's features: single-GPU mode (sp_size 1) as in the long cases.
PREDICTED_FEATURES = dict(loss_chunk_size=4096, gradient_checkpointing=True, mlp_tiles=4)


def _init_world_of_one(port: int) -> None:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` in float64 (``b``: the float64 reference)."""
    return float((a.detach().double() - b).abs().max())


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``: a gradient's error at the scale of the reference."""
    return _max_err(a, b) / float(b.abs().max())


def _case_kernels() -> dict:
    from hf_seqpar.kernels import BACKENDS, block_backward, block_forward, reference_backward, reference_forward

    results = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for name in ("cuda_flash", "cuda_efficient", "cuda_cudnn", "flash_attn"):
        impl = BACKENDS[name]
        if not impl.available():
            results[name] = "not installed"
            continue
        for dtype in (torch.bfloat16, torch.float16):
            for causal, window, masked in (
                (True, None, False),
                (False, None, False),
                (True, 37, False),
                (True, None, True),
            ):
                key = f"{name}/{str(dtype)[6:]}/causal={causal}/window={window}/mask={masked}"
                if (masked or window and not impl.native_window) and not impl.supports_mask:
                    continue
                try:
                    q = torch.randn(2, 8, 333, 128, device="cuda", dtype=dtype, generator=g)
                    k, v = (torch.randn(2, 2, 333, 128, device="cuda", dtype=dtype, generator=g) for _ in range(2))
                    mask = (torch.rand(2, 1, 333, 333, device="cuda", generator=g) > 0.3) if masked else None
                    kw = dict(scale=128**-0.5, causal=causal, window=window, mask=mask)
                    out, lse = block_forward(q, k, v, backend=name, **kw)
                    ref, ref_lse = reference_forward(q, k, v, **kw)
                    dout = torch.randn_like(out)
                    grads = block_backward(dout, q, k, v, out, lse, backend=name, **kw)
                    refg = reference_backward(dout, q, k, v, ref, ref_lse, **kw)
                    torch.cuda.synchronize()
                    errs = [_max_err(out, ref)] + [_rel_err(a, b) for a, b in zip(grads, refg)]
                    results[key] = {
                        "out_err": errs[0],
                        "grad_rel_err": max(errs[1:]),
                        "ok": errs[0] < 3e-2 and max(errs[1:]) < 5e-2,
                    }
                except Exception as e:  # noqa: BLE001 (recorded in the report)
                    results[key] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    return results


def _case_pieces(device: str = "cuda", seq: int = 4096) -> dict:
    """The variable-length pieces (packed, padded, windowed rows) against the float64 dense masked
    reference, forward and backward (bf16). On CUDA the window-band tiles run on the
    memory-efficient kernel, the rest on flash; ``device="cpu"`` runs the same check on CPU."""
    from hf_seqpar.core.masks import document_ids
    from hf_seqpar.core.segments import build_segments, plan_pieces
    from hf_seqpar.kernels import reference_backward, reference_forward
    from hf_seqpar.kernels.varlen import varlen_attention

    results = {}
    s = seq
    g = torch.Generator(device=device).manual_seed(0)
    for rows, window in (("packed", None), ("padded", None), ("packed", 300), ("single", 300)):
        valid = torch.ones(2, s, dtype=torch.bool, device=device)
        pos = torch.arange(s, device=device).repeat(2, 1)
        if rows == "packed":
            pos = pos % 777
        if rows == "padded":
            valid[0, :100] = False
            valid[1, s - 333 :] = False
        docs = document_ids(pos)
        pieces = plan_pieces(build_segments(valid, docs), [(0, s)], [(0, s)], True, window)
        q, k, v = (
            torch.randn(2, h, s, 64, device=device, generator=g).to(torch.bfloat16).requires_grad_() for h in (8, 2, 2)
        )
        out = varlen_attention(q, k, v, pieces, scale=0.125)
        qi, ki = torch.arange(s, device=device)[:, None], torch.arange(s, device=device)[None]
        allowed = (ki <= qi) & (ki > qi - (window or s))
        allowed = allowed[None] & valid[:, None, :] & valid[:, :, None]
        if docs is not None:
            allowed &= docs[:, :, None] == docs[:, None, :]
        mask = allowed[:, None]
        ref, ref_lse = reference_forward(q.detach(), k.detach(), v.detach(), scale=0.125, mask=mask)
        live = valid[:, None, :, None].expand_as(out)
        err = _max_err(out[live], ref[live])
        # (B, h, S, D) upstream gradient, zero on padding (whose outputs are 0 on both sides)
        dout = torch.randn(out.shape, device=device, generator=g).to(out.dtype) * live
        out.backward(dout)
        refg = reference_backward(dout, q.detach(), k.detach(), v.detach(), ref, ref_lse, scale=0.125, mask=mask)
        gerr = max(_rel_err(t.grad, r) for t, r in zip((q, k, v), refg))
        results[f"{rows}/window={window}"] = {
            "pieces": len(pieces),
            "out_err": err,
            "grad_rel_err": gerr,
            "ok": err < 3e-2 and gerr < 5e-2,
        }
    return results


def _long_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=1 << 22,
        rope_theta=500000.0,
        attn_implementation="sdpa",
        use_cache=False,
    )


def predicted_length(budget_bytes: float, step: int = 4096) -> tuple[int, float]:
    """The longest row (a multiple of ``step``) whose predicted step peak (activations and
    gradients, bf16, :data:`PREDICTED_FEATURES`, one GPU) fits ``budget_bytes``, and that peak."""
    from hf_seqpar.core.shape import ModelShape

    from .memmodel import GPU_KERNEL, Features, MemoryModelInputs, peak_memory

    shape = ModelShape.from_config(_long_config())
    f = PREDICTED_FEATURES
    feats = Features(f["gradient_checkpointing"], False, f["mlp_tiles"], f["loss_chunk_size"])
    peak = lambda k: peak_memory(MemoryModelInputs(shape, k * step, "ulysses", 1, feats, kernel=GPU_KERNEL)).total  # noqa: E731
    lo, hi = 0, 1
    while peak(hi) <= budget_bytes:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if peak(mid) <= budget_bytes else (lo, mid)
    return lo * step, (peak(lo) if lo else 0.0)


def _case_predicted() -> dict:
    """One step at the longest length the memory model says fits a third of the GPU: predicted
    vs measured peak (``max_memory_allocated`` minus the allocated memory before the step)."""
    seq, predicted = predicted_length(torch.cuda.get_device_properties(0).total_memory / 3)
    res = _case_long("ulysses", "single", seq, PREDICTED_FEATURES)
    res.update(
        seq_len=seq,
        predicted_step_gib=round(predicted / 2**30, 3),
        ratio=round(res["peak_step_gib"] * 2**30 / predicted, 3) if predicted else None,
    )
    res["ok"] = bool(res["ok"] and res["ratio"] is not None and abs(res["ratio"] - 1) <= 0.15)
    return res


def _case_long(strategy: str, rows: str, seq: int, features: dict | None = None) -> dict:
    from transformers import LlamaForCausalLM

    import hf_seqpar
    from hf_seqpar.integrations.accelerate import SequenceParallelPlugin, prepare_model

    cfg = _long_config()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).train()
    prepare_model(model, SequenceParallelPlugin(strategy=strategy, sp_size=1, **(features or PREDICTED_FEATURES)))
    ids = torch.randint(0, cfg.vocab_size, (1, seq), device="cuda")
    batch = {"input_ids": ids, "labels": ids.clone()}
    if rows == "packed":
        batch["position_ids"] = (torch.arange(seq, device="cuda") % 1024)[None]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = model(**hf_seqpar.shard_batch(batch, model))
    out.loss.backward()
    torch.cuda.synchronize()
    return {
        "loss": float(out.loss),
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_step_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 3),
        "ok": bool(torch.isfinite(out.loss)),
    }


def _run_case(name: str) -> dict:
    _init_world_of_one(29600 + CASES.index(name))
    if name == "kernels":
        return _case_kernels()
    if name == "pieces":
        return _case_pieces()
    if name == "predicted":
        return _case_predicted()
    _, strategy, rows, seq = name.split(":")
    return _case_long(strategy, rows, int(seq))


def _pytest(tests_dir: Path, timeout: float, log: Path) -> dict:
    """Run the ``gpu``-marked tests; their whole output goes to ``log``, its tail to the report."""
    if not tests_dir.is_dir():
        return {"skipped": f"no tests folder at {tests_dir} (run from a source checkout)"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfE",
        "--tb=short",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        str(tests_dir),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tests_dir)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log.write_text(out)
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "log": log.name}
    log.write_text(proc.stdout + proc.stderr)
    tail = proc.stdout.strip().splitlines()[-25:]
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "tail": tail, "log": log.name}


def _markdown(report: dict) -> str:
    lines = [
        f"# hf-seqpar selftest on {report['device']}",
        "",
        f"torch {report['torch']}, transformers {report['transformers']}, {report['seconds']:.0f} s",
        "",
    ]
    for name, res in report["results"].items():
        lines.append(f"## {name}")
        lines.append("```")
        lines.append(json.dumps(res, indent=1)[:4000])
        lines.append("```")
    return "\n".join(lines) + "\n"


def run_selftest(
    out_dir: str = ".", budget_s: float = 540.0, tests_dir: str | None = None, cases: list[str] | None = None
) -> int:
    """Run the GPU check and write ``selftest.json``/``selftest.md`` to ``out_dir``.

    Args:
        out_dir: where the report goes.
        budget_s: stop starting new cases after this many seconds.
        tests_dir: the repository's ``tests`` folder (default: next to the package source).
        cases: case names to run (default: all of :data:`CASES`).

    Returns:
        0 when every case passed (or no GPU: dry mode), 1 otherwise.
    """
    if not torch.cuda.is_available():
        print(
            "hf-seqpar selftest: no GPU (torch.cuda.is_available() is False): nothing CUDA selected, "
            f"dry mode. On a GPU it runs: gpu-marked tests, then {', '.join(CASES)}."
        )
        return 0
    import transformers

    start = time.monotonic()
    tests = Path(tests_dir) if tests_dir else Path(__file__).resolve().parent.parent / "tests"
    report = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "results": {},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report["results"]["pytest -m gpu"] = _pytest(tests, timeout=min(300.0, budget_s / 2), log=out / "pytest-gpu.log")
    print("pytest -m gpu", json.dumps(report["results"]["pytest -m gpu"])[:2000], flush=True)
    for name in cases or CASES:
        left = budget_s - (time.monotonic() - start)
        if left < 20:
            report["results"][name] = {"ok": False, "error": "not run: time budget spent"}
            continue
        cmd = [sys.executable, "-m", "hf_seqpar.tools.selftest", "--case", name]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
            last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
            res = json.loads(last) if last.startswith("{") else {"ok": False, "error": proc.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            res = {"ok": False, "error": "timed out"}
        report["results"][name] = res
        print(name, json.dumps(res)[:300], flush=True)
    report["seconds"] = time.monotonic() - start
    (out / "selftest.json").write_text(json.dumps(report, indent=1))
    (out / "selftest.md").write_text(_markdown(report))
    ok = all(_ok(r) for r in report["results"].values())
    print(f"selftest {'passed' if ok else 'FAILED'}: report in {out / 'selftest.md'}")
    return 0 if ok else 1


def _ok(res) -> bool:
    if not isinstance(res, dict):
        return True
    if "ok" in res:
        return bool(res["ok"]) and all(_ok(v) for v in res.values() if isinstance(v, dict))
    return all(_ok(v) for v in res.values())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        print(json.dumps(_run_case(sys.argv[2])))
    else:
        sys.exit(run_selftest(*sys.argv[1:2]))
