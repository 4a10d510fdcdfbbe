"""hf_seqpar.generate (SP prefill, sequence-sharded KV cache, lse-merged decode) against the
unsharded model's generate on 2 and 4 gloo ranks, fp32.

Tolerances: the per-step logits of the tiny fp32 model differ from the unsharded ones only by the
order of fp32 sums (softmax over key shards merged by log-sum-exp, the prefill's SP attention):
a few ulp of values of order 1, far below 1e-4; greedy tokens must then be identical.
"""

from __future__ import annotations

import math

import cases
import cases_generate as cg
import pytest
import torch

from hf_seqpar.core.shape import ModelShape
from hf_seqpar.tools.plan_infer import inference_rows, kv_bytes_per_rank, longest_prompt

#: (strategy, options) per world size, in the default suite (one prompt kind each, cheap) ...
DEFAULT = [
    (2, "ulysses", None, "doc"),
    (2, "ring", None, "padded"),
    (4, "ring", None, "doc"),
    (4, "hybrid", dict(ulysses_size=2), "padded"),
]
#: ... and every strategy x prompt kind with a longer prompt under `slow`.
SLOW = [
    (w, s, o, k)
    for w, s, o in [
        (2, "ulysses", None),
        (2, "ring", None),
        (4, "ulysses", None),
        (4, "ring", None),
        (4, "hybrid", dict(ulysses_size=2)),
    ]
    for k in ("doc", "padded")
]


def check(results: list[dict], seq: int, batch: int = 1) -> None:
    """Same tokens as unsharded, logits within 1e-4, every rank identical, KV bytes 1/P."""
    world = len(results)
    for r in results:
        assert r["same_tokens"], r
        assert r["steps"] == r["ref_steps"] == cg.NEW_TOKENS and r["scores_equal_shape"]
        assert r["logit_err"] < 1e-4, r["logit_err"]
        assert torch.equal(r["sequences"], results[0]["sequences"])
    check_kv_bytes([r["report"] for r in results], results[0]["ref_kv_bytes"], seq, world)
    # the planner's prediction (hf-seqpar plan --inference) is the fullest rank's measured bytes, for
    # the prompt length the layout pads to (layout="auto" may take the balanced layout for a padded
    # batch, whose shard multiple is larger than zigzag's)
    padded_seq = results[0]["report"]["padded_prompt_positions"] * world
    predicted = kv_bytes_per_rank(
        ModelShape.from_config(cases.tiny_model().config), padded_seq, world, cg.NEW_TOKENS, batch, elem=4
    )
    assert max(r["report"]["local_bytes"] for r in results) == predicted


def check_kv_bytes(reports: list[dict], ref_bytes: int, seq: int, world: int) -> None:
    """Rank r holds its prompt shard (shard padding included) and the new tokens at positions
    t = r (mod P): measured bytes are exactly that, i.e. 1/P of the unsharded cache plus at most
    one shard's worth of padding and one new token per P."""
    cached = seq + cg.NEW_TOKENS - 1  # the last new token is never fed back
    assert all(r["unsharded_bytes"] == ref_bytes and r["tokens"] == cached for r in reports)
    per_token = ref_bytes / cached
    prompt_local = reports[0]["padded_prompt_positions"]
    for rank, r in enumerate(reports):
        owned = sum(1 for t in range(seq - 1, cached) if t % world == rank)
        assert r["local_tokens"] == prompt_local + owned, (rank, r)
        assert r["local_bytes"] == per_token * r["local_tokens"], (rank, r)
        pad = prompt_local * world - (seq - 1)
        assert r["local_bytes"] <= ref_bytes / world + per_token * (pad + math.ceil(cg.NEW_TOKENS / world)), r
    assert max(r["local_tokens"] for r in reports) - min(r["local_tokens"] for r in reports) <= 1


@pytest.mark.parametrize("world,strategy,options,kind", DEFAULT)
def test_greedy_matches_unsharded(pools, world, strategy, options, kind):
    seq = 2048
    check(
        pools[world].run(cg.generate_parity, strategy, kind=kind, seq=seq, options=options),
        seq,
        2 if kind == "padded" else 1,
    )


@pytest.mark.parametrize("world,strategy,options", [(2, "ulysses", None), (4, "hybrid", dict(ulysses_size=2))])
def test_seeded_sampling_matches_unsharded(pools, world, strategy, options):
    seq = 1024
    check(pools[world].run(cg.generate_parity, strategy, kind="padded", seq=seq, sample=True, options=options), seq, 2)


def test_one_token_prompt_decodes_from_an_empty_cache(pool2):
    """Nothing to prefill: the first step's K/V land on rank 0, rank 1 attends over no key at all."""
    results = pool2.run(cg.generate_parity, "ring", kind="doc", seq=1)
    for r in results:
        assert r["same_tokens"] and r["logit_err"] < 1e-4 and r["steps"] == cg.NEW_TOKENS, r
    assert [r["report"]["local_tokens"] for r in results] == [16, 16]


@pytest.mark.slow
@pytest.mark.parametrize("world,strategy,options,kind", SLOW)
def test_greedy_matches_unsharded_long(pools, world, strategy, options, kind):
    seq = 6000
    check(
        pools[world].run(cg.generate_parity, strategy, kind=kind, seq=seq, options=options),
        seq,
        2 if kind == "padded" else 1,
    )


def test_unsupported_modes_refused_before_any_forward(pool2):
    results = pool2.run(cg.refusals)
    words = {
        "beams": "beam search",
        "assisted": "prompt_lookup_num_tokens",
        "static": "cache_implementation",
        "chunks": "prefill_chunk_size",
        "attentions": "output_attentions",
        "hidden": "output_hidden_states",
        "guidance": "guidance_scale",
        "no_cache": "use_cache=False",
        "right_padding": "pad on the left",
        "megatron": "tensor",
    }
    for r in results:
        assert set(r) == set(words)
        for name, (message, forwards) in r.items():
            assert words[name] in message, (name, message)
            assert forwards == 0, (name, forwards, message)


@pytest.mark.e2e
def test_generate_long_recipe_runs_on_2_cpu_ranks():
    """The needle recipe end to end: table with the SP answers equal to the unsharded ones, KV share
    1/2, and the 8-GPU launch line."""
    import pathlib
    import re
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(root / "recipes/generate_long.py"),
        "--lengths",
        "256",
        "--depths",
        "0",
        "1",
        "--new-tokens",
        "4",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = re.findall(r"^ +256 +(\S+) .* (yes|NO) +\S+ +\S+ +\S+ +(\S+)$", proc.stdout, re.M)
    assert [(d, same) for d, same, _ in rows] == [("0.00", "yes"), ("1.00", "yes")], proc.stdout
    assert all(abs(float(share) - 0.5) < 0.02 for *_, share in rows), rows
    assert "accuracy at 256 tokens:" in proc.stdout
    assert re.search(r"= \d+\.\d GiB.*\ntorchrun .*--nproc_per_node 8 .*--lengths 1048576", proc.stdout), proc.stdout


def test_recipe_help():
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "recipes/generate_long.py"), "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    for flag in ("--lengths", "--depths", "--strategy", "--model", "--no-compare", "--new-tokens"):
        assert flag in out


def test_plan_inference_llama_8b_at_1m_on_8_gpus(capsys):
    """128 KiB of KV per token (the issue's number), 16 GiB per GPU at 1M tokens over 8, the whole
    bf16 model per GPU, and the longest prompt filling the budget; the CLI prints the table."""
    from hf_seqpar.tools.cli import main
    from hf_seqpar.tools.presets import load_config

    m = ModelShape.from_config(load_config("llama-3.1-8b"))
    assert kv_bytes_per_rank(m, 1, 1, new=0) == 128 * 2**10
    rows = {r.label: r for r in inference_rows(m, 1 << 20, 8, new=0, budget_gib=76.0)}
    assert "megatron 8" not in rows and rows["ulysses 8"].kv_gib == 16.0
    assert rows["ulysses 8"].weights_gib == m.params * 2 / 2**30 and rows["ulysses 8"].fits
    best = longest_prompt(list(rows.values()))
    at_best = {r.label: r for r in inference_rows(m, best.longest_prompt, 8, new=0, budget_gib=76.0)}[best.label]
    above = {r.label: r for r in inference_rows(m, best.longest_prompt + 64, 8, new=0, budget_gib=76.0)}[best.label]
    assert at_best.fits and not above.fits
    assert main(["plan", "--inference", "--seq-len", "1048576", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "ulysses 8" in out and "longest prompt on this cluster" in out
