"""Megatron-SP on 2 and 4 gloo ranks against the unsharded HF model, in the same test.

Gradients: on every rank ``full_tensor(grad)`` of each parameter (shards all-gathered,
``Partial`` sums reduced, Phi-3's fused rows laid back out) must equal the unsharded model's
gradient; there is no averaging over the SP (= tensor-parallel) group. Tolerances as for
Ulysses (fp32 CPU): loss 1e-5 relative, gathered logits and every gradient 1e-4 relative.
"""

from __future__ import annotations

import cases
import megatron_cases
import pytest

CASES = {
    "llama_mha": dict(),
    "llama_gqa_kv_lt_sp": dict(model_kw=dict(heads=8, kv_heads=2)),
    "llama_mqa": dict(model_kw=dict(heads=4, kv_heads=1)),
    "llama_kv_groups_straddle_ranks": dict(model_kw=dict(heads=12, kv_heads=3)),
    "llama_padding_left_right": dict(batch_kw=dict(kind="padding")),
    "llama_packed_3_docs": dict(batch_kw=dict(kind="packed", seq=40)),
    "llama_packed_tiny_docs": dict(batch_kw=dict(kind="tiny_docs", seq=200)),
    "llama_odd_length": dict(batch_kw=dict(seq=29)),
    "mistral_window_packed_mixed_rows": dict(
        model_kw=dict(family="mistral", sliding_window=7), batch_kw=dict(kind="packed_mixed", seq=48)
    ),
    "llama_eager_padding": dict(model_kw=dict(attn="eager"), batch_kw=dict(kind="padding")),
    "llama_tied_embeddings": dict(model_kw=dict(tie=True), batch_kw=dict(kind="padding")),
    "llama_rank_without_labels": dict(batch_kw=dict(kind="labels_first_quarter")),
    "mistral_window_lt_shard_packed": dict(
        model_kw=dict(family="mistral", sliding_window=5, kv_heads=1), batch_kw=dict(kind="packed")
    ),
    "qwen2_bias_gqa_padding": dict(model_kw=dict(family="qwen2", kv_heads=2), batch_kw=dict(kind="padding")),
    "qwen3_head_norms_kv_lt_sp": dict(
        model_kw=dict(family="qwen3", heads=8, kv_heads=2), batch_kw=dict(kind="padding")
    ),
    "qwen3_head_norms_packed": dict(model_kw=dict(family="qwen3"), batch_kw=dict(kind="packed", seq=40)),
    "phi3_fused_gqa_odd_length": dict(model_kw=dict(family="phi3", heads=8, kv_heads=4), batch_kw=dict(seq=29)),
    "phi3_fused_padding": dict(model_kw=dict(family="phi3"), batch_kw=dict(kind="padding")),
    "qwen3_grad_checkpointing_packed": dict(
        checkpointing=True, model_kw=dict(family="qwen3", heads=8, kv_heads=2), batch_kw=dict(kind="packed")
    ),
    "phi3_eval_no_labels": dict(mode="eval", model_kw=dict(family="phi3"), batch_kw=dict(kind="no_labels", seq=27)),
}


def _check(results: list[dict]) -> None:
    assert all(r["dtensor_params"] > 0 for r in results), "no parameter was tensor-parallel"
    cases.check_parity(results)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_megatron_matches_unsharded(pools, world, case):
    _check(pools[world].run(megatron_cases.megatron_parity, **CASES[case]))


def test_dp2_x_tp2_matches_unsharded(pool4):
    """4 ranks as 2 data-parallel replicas of TP=2; gradients averaged over dp only."""
    _check(
        pool4.run(
            megatron_cases.megatron_parity,
            sp_size=2,
            model_kw=dict(family="qwen3", heads=4, kv_heads=1),
            batch_kw=dict(kind="padding"),
        )
    )


def test_user_mesh_sp_first_matches_unsharded(pool4):
    """A ("sp", "dp") mesh: TP groups {0, 2} and {1, 3}, gradients averaged over "dp" by name."""
    _check(
        pool4.run(
            megatron_cases.megatron_parity,
            mesh_dims=(("sp", 2), ("dp", 2)),
            model_kw=dict(heads=4, kv_heads=2),
            batch_kw=dict(kind="padding"),
        )
    )


def test_tp1_is_the_plain_model_with_dp2(pool2):
    """sp_size=1 (pure data parallel): nothing is split, the model stays plain and exact."""
    results = pool2.run(megatron_cases.megatron_parity, sp_size=1, batch_kw=dict(kind="packed"))
    assert all(r["dtensor_params"] == 0 for r in results)
    cases.check_parity(results)


def test_comm_per_layer_is_two_all_gathers_and_two_reduce_scatters(pool2, pool4):
    """Measured DTensor collectives: per layer forward, 2 all-gathers + 2 reduce-scatters of the
    local activations (B, S/T, h); the backward runs their adjoints; nothing else moves."""
    for pool in (pool2, pool4):
        for r in pool.run(megatron_cases.megatron_traffic):
            n = r["layers"]
            for key in ("fwd_ag", "fwd_rs", "bwd_ag", "bwd_rs"):
                assert r[key] == [r["theory_per_op"]] * n, (key, r)
            assert r["fwd_calls"] == {"tp_all_gather_into_tensor.fwd": 2 * n, "tp_reduce_scatter_tensor.fwd": 2 * n}, r
            assert r["fwd_other"] == {}, r
            assert set(r["calls"]) == {
                f"tp_{op}.{d}" for op in ("all_gather_into_tensor", "reduce_scatter_tensor") for d in ("fwd", "bwd")
            }, r


@pytest.mark.parametrize("family,kv_heads", [("phi3", None), ("llama", 1)])
def test_save_pretrained_reloads_without_hf_seqpar(pool2, tmp_path, family, kv_heads):
    """save_pretrained under Megatron-SP writes a plain full checkpoint (Phi-3's fused rows laid
    back out, replicated kv and tied embeddings included); disable restores plain parameters."""
    results = pool2.run(megatron_cases.save_reload, str(tmp_path / family), family, kv_heads)
    assert results[0]["reloaded_logits"] <= 1e-6, results[0]
    assert "model.safetensors" in results[0]["files"]
    for r in results:
        assert r["plain_after_disable"] and r["same_names"] and r["hooks_left"] == 0, r
        assert r["disabled_logits"] <= 1e-6 and r["reenabled_logits"] <= cases.LOGITS_TOL, r
        assert r["tied"] == (family == "llama"), r


EXPECTED_ERRORS = {
    "heads_not_divisible": ("HeadsNotDivisibleError", ["3 query heads", "sp_size=2", "[1, 3]", "ring"]),
    "unknown_family": ("ValueError", ["'gpt2'", "llama", "phi3", "qwen3", "ulysses", "hf_seqpar.patches"]),
    "phi3_kv_not_divisible": ("ValueError", ["num_key_value_heads=1", "sp_size=2", "ulysses"]),
    "unknown_option": ("ValueError", ["['tp']", "megatron"]),
    "intermediate_not_divisible": ("ValueError", ["intermediate size 63", "sp_size=2", "[1, 3, 7, 9, 21, 63]"]),
    "lora_wrapped": ("TypeError", ["model.layers.0.self_attn.q_proj", "peft", "ulysses", "merge_and_unload"]),
}


def test_forward_without_shard_batch_is_refused_before_any_layer(pool2):
    """A plain forward or generate() of a Megatron-SP model gives the same clear error as the
    other strategies (it used to fail inside rotary embedding on the sharded hidden states)."""
    for r in pool2.run(megatron_cases.forward_without_shard_batch):
        for call in ("forward", "generate"):
            assert r[call].startswith("RuntimeError:") and "no `seqpar=` batch structure" in r[call], r[call]
            assert "disable_sequence_parallel(model)" in r[call], r[call]
        assert r["logits_after"] <= cases.LOGITS_TOL, r


def test_bad_input_messages(pool2):
    for messages in pool2.run(megatron_cases.megatron_bad_inputs):
        assert messages["untouched_after_error"] is True
        assert messages["lora_untouched_after_error"] is True
        for case, (kind, words) in EXPECTED_ERRORS.items():
            msg = messages[case]
            assert msg.startswith(kind + ":"), msg
            for w in words:
                assert w in msg, f"{w!r} missing from: {msg}"


@pytest.mark.parametrize("family,kv_heads,sp_size", [("qwen3", 1, None), ("phi3", 2, 2)])
def test_optimizer_steps_match_unsharded(pool4, family, kv_heads, sp_size):
    """Three SGD-momentum steps with gradient clipping: torch's optimizer and clip_grad_norm_
    work on the DTensor parameters (Partial gradients of replicated ones included) and the
    parameters stay equal to the unsharded model's (Phi-3 as dp=2 x tp=2)."""
    for r in pool4.run(megatron_cases.megatron_training_steps, family=family, kv_heads=kv_heads, sp_size=sp_size):
        assert r["param"] <= cases.GRAD_TOL, r


def test_replicated_weights_follow_rank0(pool2):
    assert all(r["equal_rank0"] for r in pool2.run(megatron_cases.replicas_follow_rank0))


@pytest.mark.e2e
def test_demo_trains_with_megatron(tmp_path):
    """The CPU demo with strategy=megatron (AdamW on the DTensor parameters) lowers the loss."""
    import pathlib
    import re
    import subprocess
    import sys

    demo = pathlib.Path(__file__).resolve().parents[1] / "recipes" / "demo_cpu.py"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(demo),
        "--strategy",
        "megatron",
        "--steps",
        "4",
        "--seq-len",
        "256",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses


def test_rank_major_relayout_gives_each_rank_matching_blocks():
    """Phi-3's fused rows [q | k | v] re-laid out so that a plain column split hands rank r
    the r-th slice of every block."""
    from hf_seqpar.tp.apply import _rank_major

    perm = _rank_major([4, 2, 2], 2)  # q rows 0-3, k rows 4-5, v rows 6-7
    assert perm.tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    assert sorted(perm.tolist()) == list(range(8))


def test_plans_per_family():
    """Which projections are column-split, and when kv heads stay replicated (no ranks needed)."""
    from torch.distributed.tensor.parallel import ColwiseParallel

    from hf_seqpar import patches
    from hf_seqpar.tp.styles import HeadNorm, ReplicatedProjection

    llama = megatron_cases.family_model(heads=8, kv_heads=2, layers=1).config
    plan = patches.family("llama").megatron_plan(llama, 2)
    assert not plan.kv_replicated and isinstance(plan.layer_plan["self_attn.k_proj"], ColwiseParallel)
    plan = patches.family("llama").megatron_plan(llama, 4)
    assert plan.kv_replicated and isinstance(plan.layer_plan["self_attn.k_proj"], ReplicatedProjection)
    qwen3 = patches.family("qwen3").megatron_plan(megatron_cases.family_model("qwen3", layers=1).config, 2)
    assert isinstance(qwen3.layer_plan["self_attn.q_norm"], HeadNorm)
    phi3 = patches.family("phi3").megatron_plan(megatron_cases.family_model("phi3", layers=1).config, 2)
    assert set(phi3.fused) == {"self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"}
    assert patches.FAMILIES["mistral"] == patches.FAMILIES["qwen2"] == "llama"
