"""``hf-seqpar plan --post-training``: the arithmetic of TRL's DPO and GRPO terms (hf_seqpar.tools.plan_post).

Every expected value is derived here from the arithmetic the module states (no recorded results):
pairs are two rows, the reference weights are ``params x bytes / shards``, the reference forward is
one layer's no-grad working set, GRPO's generation holds a KV cache of whole rows.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from hf_seqpar.core.shape import FP32, INDEX, ModelShape
from hf_seqpar.strategies.ulysses import kv_replication
from hf_seqpar.tools import cli
from hf_seqpar.tools.memmodel import (
    TRL_TOKEN_TILE,
    TRL_VOCAB_TILE,
    Features,
    MemoryModelInputs,
    peak_memory,
    trl_fused_head_terms,
)
from hf_seqpar.tools.plan import Cluster, Setup, candidates, evaluate
from hf_seqpar.tools.plan_post import PostTraining
from hf_seqpar.tools.presets import load_config
from hf_seqpar.tools.theory import comm_bytes

SHAPE = ModelShape.from_config(load_config("llama-3.1-8b"))
CLUSTER = Cluster(gpus=8)
DPO = PostTraining("dpo")
GRPO = PostTraining("grpo", prompt_len=2048)


def _cand(label: str):
    return next(c for c in candidates(SHAPE, CLUSTER) if c.label == label)


def _row(label: str, seq: int = 65536, **setup):
    return evaluate(SHAPE, seq, _cand(label), CLUSTER, Setup(**setup))


def _base(row) -> float:
    """The states (reference weights included) and FSDP's gathered layers: every phase holds them."""
    return row["states_bytes"] + row["gathered_bytes"]


@pytest.mark.parametrize("sharding,shards", [("none", 1), ("zero2", 1), ("fsdp", 8)])
@pytest.mark.parametrize("ref_elem", [2, 4])
def test_reference_weights_add_params_times_bytes_over_shards(sharding, shards, ref_elem):
    """TRL's prepare_fsdp shards the reference over all GPUs; DDP / DeepSpeed stage 0 replicate it."""
    same = _row("ulysses 8", sharding=sharding, post_training=replace(DPO, ref_elem=ref_elem))
    pre = _row("ulysses 8", sharding=sharding, post_training=replace(DPO, ref_model="precompute"))
    assert same["ref_bytes"] == SHAPE.params * ref_elem / shards
    assert same["states_bytes"] - pre["states_bytes"] == pytest.approx(SHAPE.params * ref_elem / shards, rel=1e-12)
    assert pre["ref_bytes"] == 0


def test_offloaded_states_keep_the_reference_in_host_memory():
    same = _row("ulysses 8", sharding="fsdp_offload", post_training=DPO)
    pre = _row("ulysses 8", sharding="fsdp_offload", post_training=replace(DPO, ref_model="precompute"))
    assert same["ref_bytes"] == 0 and same["states_bytes"] == pre["states_bytes"]
    per_node = min(CLUSTER.gpus, CLUSTER.gpus_per_node)  # the node's GPUs each hold a 1/N shard in host memory
    assert same["host_node_bytes"] - pre["host_node_bytes"] == pytest.approx(per_node * SHAPE.params * 2 / 8)


@pytest.mark.parametrize("label", ["ulysses 8", "ring 4", "hybrid 2x4"])
@pytest.mark.parametrize("pairs", [1, 2])
def test_pairs_are_two_rows(label, pairs):
    """A DPO micro-batch of B pairs is the training step of 2B rows: the same as GRPO's step of 2B
    completion rows without reference or generation, the activations of peak_memory at batch 2B with
    TRL's fused head, twice the kept activations and SP traffic of B rows."""
    dpo = _row(label, batch=pairs, post_training=replace(DPO, ref_model="precompute"))
    grpo = _row(label, batch=2 * pairs, post_training=replace(GRPO, ref_model="none", generation="external"))
    assert dpo["post_phases"]["training step"] == grpo["post_phases"]["training step"]
    assert dpo["comm_bytes"] == grpo["comm_bytes"]
    cand = _cand(label)
    mem = peak_memory(
        MemoryModelInputs(
            SHAPE,
            65536,
            cand.strategy,
            cand.sp,
            Setup().features,
            2 * pairs,
            2,
            2,
            ulysses_size=getattr(cand.opts, "ulysses_size", None),
            grads_in_peak=False,
            fused_head=True,
        )
    )
    assert dpo["post_phases"]["training step"] == pytest.approx(_base(dpo) + mem.activation_peak, rel=1e-12)
    one_row = _row(label, batch=pairs, post_training=replace(GRPO, ref_model="none", generation="external"))
    assert dpo["kept_bytes"] == pytest.approx(2 * one_row["kept_bytes"], rel=1e-12)
    traffic = comm_bytes(
        cand.strategy, SHAPE, 65536, cand.sp, 2 * pairs, 2, ulysses_size=getattr(cand.opts, "ulysses_size", None)
    )
    assert dpo["comm_bytes"] == traffic["total"]  # the SP traffic of 2B rows


def test_fused_head_terms_by_hand():
    """TRL's ChunkedLogProbFunction: a (4096 x 32768) projection tile, fp32 statistics, fp32 accumulators."""
    m = ModelShape(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1000)
    n, e, sp = 10000, 2, 4
    t = trl_fused_head_terms(m, n, e, sp)
    tile = TRL_TOKEN_TILE * TRL_VOCAB_TILE * e
    outputs = (3 * 4 + 1) * (2 + sp) * n  # 3 fp32 fields + a bool flag; kernel, scatter and gathered rows
    assert t["saved_per_token"] == INDEX + 2 * FP32 + e * 64
    assert t["forward"] == tile + 7 * 4 * n + outputs
    assert t["backward"] == tile + (4 + e) * 64 * n + 4 * 1000 * 64 + 4 * n + outputs
    assert trl_fused_head_terms(m, 100, e, sp)["forward"] == 100 * TRL_VOCAB_TILE * e + 7 * 4 * 100 + 13 * 6 * 100
    # in peak_memory the head replaces the loss's working sets
    mem = peak_memory(MemoryModelInputs(m, 4 * n, "ulysses", sp, Features(True), fused_head=True))
    assert mem.components["loss_fwd"] == t["forward"] and mem.components["loss_bwd"] == t["backward"]
    with pytest.raises(ValueError, match="not modelled"):
        peak_memory(MemoryModelInputs(m, 4 * n, "ulysses", sp, Features(True, True), fused_head=True))


def _no_grad_layer_per_token(u: int, r: int, e: int = 2) -> float:
    """One layer's no-grad working set per local token (hf_seqpar.tools.plan_infer's prefill terms)."""
    m = SHAPE
    kv = m.kv_heads * kv_replication(m.heads, m.kv_heads, u) if u > 1 else m.kv_heads
    work = e * (2 * m.hidden + (m.heads + 2 * m.kv_heads) * m.head_dim + 3 * m.intermediate + 2 * m.heads * m.head_dim)
    work += 2 * e * (m.heads + 2 * kv) * m.head_dim if u > 1 else 0
    work += e * 4 * kv * m.head_dim + 4 * m.heads * m.head_dim if r > 1 else 0
    return work


@pytest.mark.parametrize("label,u,r", [("ulysses 8", 8, 1), ("ring 8", 1, 8)])
def test_dpo_reference_forward_phase(label, u, r):
    """TRL runs the policy forward, then the reference forward (no grad), then the backward: the phase
    holds the policy's forward-end activations without its loss working set, the head's outputs, and
    one reference layer's working set over 2B S / P tokens; FSDP2 gathers the whole reference."""
    seq, pairs = 65536, 1
    row = _row(label, seq, sharding="none", batch=pairs, post_training=DPO)
    local = 2 * pairs * seq / 8
    cand = _cand(label)
    mem = peak_memory(
        MemoryModelInputs(
            SHAPE, seq, cand.strategy, 8, Setup().features, 2 * pairs, grads_in_peak=False, fused_head=True
        )
    )
    head = trl_fused_head_terms(SHAPE, local, 2, 8)
    kept = mem.phases["forward"] - head["forward"] + head["outputs_per_token"] * local
    ref_fwd = _no_grad_layer_per_token(u, r) * local + head["forward"]
    assert row["post_phases"]["reference forward"] == pytest.approx(_base(row) + kept + ref_fwd, rel=1e-12)
    fsdp = _row(label, seq, sharding="fsdp", batch=pairs, post_training=DPO)
    gathered = fsdp["post_phases"]["reference forward"] - _base(fsdp)
    assert gathered - (row["post_phases"]["reference forward"] - _base(row)) == pytest.approx(SHAPE.params * 2)
    assert row["total_bytes"] == max(row["post_phases"].values())


def test_dpo_precompute_is_an_unsharded_pass_before_training():
    row = _row("ulysses 8", sharding="none", post_training=replace(DPO, ref_model="precompute"))
    tokens = 2 * 65536  # one pair, whole rows on one GPU
    want = (
        SHAPE.params * 2
        + _no_grad_layer_per_token(1, 1) * tokens
        + trl_fused_head_terms(SHAPE, tokens, 2, 1)["forward"]
    )
    assert row["post_phases"]["reference precompute"] == pytest.approx(want, rel=1e-12)
    assert "reference forward" not in row["post_phases"]


def test_grpo_generation_holds_a_kv_cache_of_whole_rows():
    seq, prompt, batch, steps = 34816, 2048, 2, 4
    post = replace(GRPO, prompt_len=prompt, steps_per_generation=steps)
    row = _row("ulysses 8", seq, batch=batch, post_training=post)
    m, rows = SHAPE, batch * steps
    kv = rows * seq * 2 * m.layers * m.kv_heads * m.head_dim * 2
    want = kv + rows * prompt * _no_grad_layer_per_token(1, 1) + rows * m.vocab * 4
    assert row["post_phases"]["generation"] - _base(row) == pytest.approx(want, rel=1e-12)
    # the reference (beta > 0) and old-policy scoring after generation: one reference forward of B rows
    local = batch * seq / 8
    ref_fwd = m.params * 2 + _no_grad_layer_per_token(8, 1) * local + trl_fused_head_terms(m, local, 2, 8)["forward"]
    assert row["post_phases"]["scoring"] - _base(row) == pytest.approx(ref_fwd, rel=1e-12)  # FSDP: whole gather
    # vLLM elsewhere, beta = 0, one step per generation: the training step alone
    alone = _row(
        "ulysses 8",
        seq,
        batch=batch,
        post_training=replace(post, generation="external", ref_model="none", steps_per_generation=1),
    )
    assert set(alone["post_phases"]) == {"training step"} and alone["ref_bytes"] == 0
    assert row["states_bytes"] - alone["states_bytes"] == pytest.approx(m.params * 2 / 8)


def test_plan_cli_dpo_prints_assumptions_phases_and_skips_megatron(capsys, tmp_path):
    out = tmp_path / "plan.json"
    argv = ["plan", "--seq-len", "65536", "--post-training", "dpo", "--sharding", "none", "--json", str(out)]
    cli.main(argv + ["--gpu-mem", "141"])
    text = capsys.readouterr().out
    for words in (
        "assumes: DPO: 1 pair(s) per micro-batch = 2 rows",
        "a frozen reference copy (2 B/weight, --ref-bytes; replicated on every GPU)",
        "TRL's fused LM head",
        "ref GiB",
        "phases of ",
        "reference forward",
    ):
        assert words in text, text
    data = json.loads(out.read_text())
    assert not any(r["strategy"] == "megatron" for r in data["candidates"])
    for r in data["candidates"]:
        assert r["total_bytes"] == max(r["post_phases"].values())
        assert r["ref_bytes"] == SHAPE.params * 2
    cli.main(["plan", "--seq-len", "65536", "--post-training", "dpo", "--json", str(out)])
    assert "refuses" not in capsys.readouterr().out  # FSDP2 (the default sharding) runs
    for sharding, refused in (("zero2", "refuses DeepSpeed today"), ("fsdp_offload", "refuses FSDP's CPU offload")):
        cli.main(["plan", "--seq-len", "65536", "--post-training", "dpo", "--sharding", sharding, "--json", str(out)])
        said = capsys.readouterr().out
        assert refused in said and "--sharding fsdp (accelerate's FSDP2) or none is what runs now" in said, said


def test_plan_cli_grpo(capsys):
    argv = ["plan", "--seq-len", "34816", "--post-training", "grpo", "--prompt-len", "2048", "--num-generations", "4"]
    cli.main(argv)
    text = capsys.readouterr().out
    assert "GRPO: 1 completion row(s) per micro-batch (each 2,048 prompt tokens" in text, text
    assert "4 generations per prompt" in text and "HF generate on the training GPUs" in text
    cli.main(argv + ["--generation", "external", "--ref-model", "none"])
    text = capsys.readouterr().out
    assert "vLLM colocate is not modelled" in text and "no reference model" in text


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--inference", "--ref-model", "same"], ["--ref-model", "with --inference"]),
        (["--inference", "--post-training", "dpo"], ["--post-training dpo with --inference"]),
        (["--ref-model", "same"], ["--ref-model need --post-training"]),
        (["--prompt-len", "100"], ["--prompt-len need --post-training"]),
        (["--post-training", "grpo", "--ref-model", "precompute", "--prompt-len", "100"], ["no precomputed reference"]),
        (["--post-training", "grpo"], ["needs --prompt-len"]),
        (["--post-training", "grpo", "--prompt-len", "131072"], ["--prompt-len in (0, --seq-len 131072)"]),
        (["--post-training", "grpo", "--prompt-len", "9", "--num-generations", "1"], ["at least 2"]),
        (["--post-training", "dpo", "--num-generations", "4"], ["--num-generations: GRPO options"]),
        (["--post-training", "dpo", "--ref-model", "none"], ["needs a reference", "--ref-model same"]),
        (["--post-training", "dpo", "--offload"], ["--offload with --post-training: not modelled"]),
        (["--post-training", "dpo", "--lora-rank", "8"], ["--lora-rank", "refuses PEFT"]),
        (["--post-training", "dpo", "--max-seq"], ["--max-seq"]),
        (["--post-training", "dpo", "--ref-bytes", "3"], ["invalid choice"]),
    ],
)
def test_plan_refuses_post_training_combinations(argv, words, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["plan", *argv])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    for w in words:
        assert w in msg, msg
