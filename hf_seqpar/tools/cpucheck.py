"""``hf-seqpar selftest`` on CPU: is this installation exact?

Spawns 2 gloo ranks; on each, a tiny Llama-style model (random weights built from a config, 4 query
/ 2 kv heads, 2 layers) takes one training step per strategy of :data:`hf_seqpar.STRATEGIES` on a
plain batch and on a packed one (three documents), and is compared with the unsharded model on the
same full batch: the loss, the gathered logits and every parameter gradient (averaged over the
ranks as DDP/FSDP do; Megatron-SP's gathered whole). Prints a pass/fail table and returns 1 when any
row fails.

Bounds (fp32): the sharded model does the unsharded model's arithmetic up to the order of a few
reductions (the loss summed over ranks, attention merged by log-sum-exp, gradients averaged), a
few float32 ulps (~1e-7 relative); :data:`BOUNDS` leaves two orders of magnitude, the bounds of
the project's test suite.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from collections.abc import Callable

__all__ = ["run_cpu_selftest", "check_strategies", "BOUNDS", "BATCHES"]

#: Largest relative error accepted: loss, then logits and every gradient (max |diff| / max |ref|).
BOUNDS = {"loss": 1e-5, "logits": 1e-4, "grad": 1e-4}
#: The batches each strategy is checked on.
BATCHES = ("plain", "packed")
VOCAB = 97


def _model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_implementation="sdpa",
            max_position_embeddings=256,
            use_cache=False,
        )
    )


def _batch(kind: str) -> dict:
    import torch

    g = torch.Generator().manual_seed(1)
    if kind == "plain":
        ids = torch.randint(0, VOCAB, (2, 48), generator=g)
        return {"input_ids": ids, "labels": ids.clone()}
    ids = torch.randint(0, VOCAB, (1, 48), generator=g)  # 3 documents, positions restart at each
    positions = torch.cat([torch.arange(n) for n in (20, 7, 21)])[None]
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}


def _rel(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max())


def _one_step(strategy: str, kind: str, perturb: Callable | None) -> dict:
    """One forward + backward of the SP model and of the unsharded one; the errors (this rank)."""
    import torch.distributed as dist

    import hf_seqpar
    from hf_seqpar.tp import full_tensor

    model, batch = _model(), _batch(kind)
    reference = copy.deepcopy(model)
    ref = reference(**batch)
    ref.loss.backward()
    hf_seqpar.enable_sequence_parallel(model, strategy)
    if perturb is not None:  # test-only: make the check see an inexact strategy
        perturb(strategy, model)
    try:
        out = model(**hf_seqpar.shard_batch(batch, model))
        out.loss.backward()
        logits = hf_seqpar.gather_sequence(out.logits, model)
        errors = {
            "loss": abs(float(out.loss.detach()) - float(ref.loss.detach())) / abs(float(ref.loss.detach())),
            "logits": _rel(logits, ref.logits),
        }
        shards = hf_seqpar.find_state(model).strategy.shards_parameters
        ref_params, worst = dict(reference.named_parameters()), 0.0
        for name, p in model.named_parameters():
            if shards:  # one shared graph: the gathered gradient is the unsharded one
                grad = full_tensor(model, name, p.grad)
            else:  # every rank its own replica: the mean over ranks, as DDP does
                grad = p.grad.clone()
                dist.all_reduce(grad)
                grad /= dist.get_world_size()
            worst = max(worst, _rel(grad, ref_params[name].grad))
        errors["grad"] = worst
    finally:
        hf_seqpar.disable_sequence_parallel(model)
    return errors


def check_strategies(strategies: list[str], perturb: Callable | None = None) -> list[dict]:
    """Every strategy x :data:`BATCHES` on this rank (inside an initialised gloo group); one row
    each with the errors, the worst over the ranks, and ``ok``."""
    import torch
    import torch.distributed as dist

    rows = []
    for strategy in strategies:
        for kind in BATCHES:
            try:
                errors = _one_step(strategy, kind, perturb)
                worst = torch.tensor([errors[k] for k in BOUNDS], dtype=torch.float64)
                dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                errors = dict(zip(BOUNDS, worst.tolist()))
                ok = all(errors[k] <= BOUNDS[k] for k in BOUNDS)  # NaN compares False: a failure
                rows.append({"strategy": strategy, "batch": kind, **errors, "ok": ok})
            except Exception as e:  # noqa: BLE001 - reported in the table, the other rows still run
                rows.append({"strategy": strategy, "batch": kind, "ok": False, "error": f"{type(e).__name__}: {e}"})
    return rows


def _worker(rank: int, world: int, port: int, strategies: list[str], perturb, out_path: str) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = check_strategies(strategies, perturb)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


def format_rows(rows: list[dict]) -> str:
    """The pass/fail table."""
    lines = [f"{'strategy':<10}{'batch':<8}{'loss err':>10}{'logits err':>12}{'grad err':>10}  result"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['strategy']:<10}{r['batch']:<8}{'':>32}  FAIL  {r['error'][:300]}")
            continue
        lines.append(
            f"{r['strategy']:<10}{r['batch']:<8}{r['loss']:>10.1e}{r['logits']:>12.1e}{r['grad']:>10.1e}  "
            f"{'pass' if r['ok'] else 'FAIL'}"
        )
    return "\n".join(lines)


def run_cpu_selftest(strategies: list[str] | None = None, world: int = 2, perturb: Callable | None = None) -> int:
    """Run the check on ``world`` spawned gloo ranks, print the table; 0 when every row passes.

    Args:
        strategies: names of :data:`hf_seqpar.STRATEGIES` (default: all of them).
        world: ranks to spawn.
        perturb: test-only hook, ``perturb(strategy, model)`` called on every rank right after
            ``enable_sequence_parallel`` (it must be picklable): the check's own test uses it to make
            a strategy inexact and sees the check fail.
    """
    import multiprocessing

    import torch.multiprocessing

    from hf_seqpar.strategies import STRATEGIES
    from hf_seqpar.tools.bench import _free_port

    strategies = strategies or list(STRATEGIES)
    start = time.monotonic()
    print(
        f"hf-seqpar selftest: {world} gloo ranks on CPU, one training step of {', '.join(strategies)} on "
        f"{' and '.join(BATCHES)} batches against the unsharded model (bounds: loss {BOUNDS['loss']:g}, "
        f"logits and every gradient {BOUNDS['grad']:g} relative, fp32)",
        flush=True,
    )
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        torch.multiprocessing.start_processes(
            _worker, args=(world, _free_port(), strategies, perturb, out), nprocs=world, start_method=method
        )
        with open(out) as f:
            rows = json.load(f)
    print(format_rows(rows))
    passed = sum(r["ok"] for r in rows)
    ok = passed == len(rows)
    print(
        f"selftest {'passed' if ok else 'FAILED'}: {passed} of {len(rows)} checks in {time.monotonic() - start:.0f} s"
    )
    return 0 if ok else 1
