"""Post-training under sequence parallelism on 2 gloo ranks: the log-prob primitive
(hf_seqpar.core.logprobs) against the unsharded computation, and TRL's DPOTrainer with
SequenceParallelMixin against the one-process DPOTrainer."""

from __future__ import annotations

import cases_post_training
import pytest

#: fp32 values: the same sums in another order (~1e-6 relative); gradients are sums over more
#: terms in another order (the project's SP gradient tolerance)
VALUE_TOL, GRAD_TOL = 1e-5, 1e-4


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_logprobs_sums_gather_and_gradients_match_unsharded(pool2, strategy):
    """Per-row sums, per-token log-probs and entropies gathered in original order, and every
    parameter gradient (DDP mean over the ranks) equal the unsharded full-logits computation."""
    for r in pool2.run(cases_post_training.logprob_parity, strategy):
        assert r["local_len"] < r["seq"], r  # the rows really are split
        for key in ("sums", "tokens", "entropy", "loss"):
            assert r[key] <= VALUE_TOL, (strategy, key, r)
        assert r["grads"] <= GRAD_TOL, (strategy, r)


# ---- TRL's DPOTrainer + SequenceParallelMixin vs the one-process DPOTrainer ---------------------


def _compare_dpo(pool, tmp_path, fsdp=False, **kw):
    ref = cases_post_training.dpo_run(False, str(tmp_path / "ref"), **kw)
    assert len(ref["logs"]) == 3, ref["logs"]
    assert any(h["rewards/margins"] != 0 for h in ref["logs"]), ref["logs"]  # the rewards mean something
    results = []
    for r in pool.run(cases_post_training.dpo_run, True, str(tmp_path / "sp"), fsdp=fsdp, **kw):
        assert r["split"] and all(local < full for local, full in r["split"]), r["split"]
        assert len(r["logs"]) == len(ref["logs"]), r["logs"]
        for step, (mine, want) in enumerate(zip(r["logs"], ref["logs"])):
            assert set(mine) == set(want), (sorted(mine), sorted(want))
            # the loss and rewards are functions of differences of log-prob sums of size |logps|: their fp32
            # error scales with those sums (times beta = 0.5), not with the (small) difference
            logps = 0.5 * max(abs(want["logps/chosen"]), abs(want["logps/rejected"]))
            for key, value in want.items():
                tol = GRAD_TOL if key == "grad_norm" else VALUE_TOL
                scale = max(abs(value), logps if key == "loss" or key.startswith("rewards/") else 1e-3)
                assert abs(mine[key] - value) <= tol * scale, (r["rank"], step, key, mine[key], value)
        for name, p in ref["params"].items():
            err = float((r["params"][name] - p).abs().max() / p.abs().max().clamp_min(1e-12))
            assert err <= VALUE_TOL, (r["rank"], name, err)
        results.append(r)
    return results


def test_dpo_sigmoid_with_reference_model_matches_one_process(pool2, tmp_path):
    """Loss, every TRL metric, grad norms and final weights (ulysses, explicit reference model)."""
    _compare_dpo(pool2, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,loss_type,ref,order",
    [
        ("ring", "sigmoid", "model", "mixin_first"),
        ("ulysses", "ipo", "precompute", "host_first"),
        ("ring", "ipo", "model", "host_first"),
        ("ring", "hinge", "precompute", "mixin_first"),
    ],
)
def test_dpo_matrix_matches_one_process(pool2, tmp_path, strategy, loss_type, ref, order):
    """The acceptance matrix: ulysses and ring, sigmoid/ipo/hinge, a reference model or
    precomputed reference log-probs, either MRO order."""
    _compare_dpo(pool2, tmp_path, strategy=strategy, loss_type=loss_type, ref=ref, order=order)


@pytest.mark.slow
def test_dpo_hybrid_on_four_ranks_matches_one_process(pool4, tmp_path):
    """Hybrid 2 x 2 (Ulysses inside pairs of ranks, ring across them), reference model."""
    _compare_dpo(pool4, tmp_path, strategy="hybrid", sp_options={"ulysses_size": 2})


@pytest.mark.slow
def test_dpo_trl_recipe_runs_on_two_cpu_ranks(tmp_path):
    """recipes/dpo_trl.py under accelerate launch, offline default: trains and logs TRL's DPO metrics."""
    import re

    from test_recipes import launch_recipe

    stdout = launch_recipe(
        "dpo_trl.py",
        "--max-steps",
        "3",
        "--max-pairs",
        "12",
        "--lr",
        "1e-3",
        "--output-dir",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    assert "strategy=ulysses sp_size=2" in stdout, stdout
    steps = re.findall(
        r"^step +\d+/3 loss (\S+) grad_norm \S+ rewards/chosen \S+ rewards/rejected \S+ "
        r"rewards/margins (\S+) rewards/accuracies (\S+)",
        stdout,
        re.M,
    )
    assert len(steps) == 3, stdout
    assert float(steps[0][1]) == 0.0 and abs(float(steps[0][0]) - 0.693147) < 1e-4, steps  # ref = initial policy
    assert any(float(s[1]) != 0.0 for s in steps[1:]), steps  # the policy moved away from the reference


@pytest.mark.parametrize(
    "strategy,ref",
    [
        ("ulysses", "model"),
        pytest.param("ring", "model", marks=pytest.mark.slow),
        pytest.param("ulysses", "precompute", marks=pytest.mark.slow),
    ],
)
def test_dpo_under_accelerate_fsdp2_matches_one_process(pool2, tmp_path, strategy, ref):
    """DPO (sigmoid; reference model, or precomputed reference log-probs: under FSDP TRL loads the
    reference from the policy's path) under accelerate's FSDP2 with gpu-8.yaml's fsdp_config (the
    documented 8-GPU launch) against the one-process DPOTrainer: loss, every metric, grad norm, final
    weights. The policy is sharded layer by layer, the reference by TRL's root-only prepare_fsdp;
    save_model's checkpoint reloads to the trained weights on every rank."""
    for r in _compare_dpo(pool2, tmp_path, strategy=strategy, ref=ref, fsdp=True):
        where = r["placement"]
        assert where["distributed_type"] == "DistributedType.FSDP", where
        assert where["policy_root"] and all(where["policy_layers"]) and where["policy_sharded"], where
        if ref == "model":
            assert where["ref_root"] and not any(where["ref_layers"]) and where["ref_sharded"], where
        else:  # TRL loaded, sharded and freed its scoring reference in its constructor
            assert not where["ref_root"] and not where["ref_layers"], where
        assert r["saved"] <= 1e-6, (r["rank"], r["saved"])  # save_model's full state dict, reloaded


def test_dpo_refusals_name_what_works(pool2, tmp_path):
    """Untested DPO options and Megatron-SP are refused at construction with what works."""
    for r in pool2.run(cases_post_training.dpo_refusals, str(tmp_path)):
        for key in ("nca_pair", "sync_ref_model"):
            assert r[key] and key in r[key] and "sigmoid" in r[key] and "precompute_ref_log_probs" in r[key], r
        assert r["megatron"] and "egatron" in r["megatron"], r["megatron"]


@pytest.mark.parametrize(
    "version,offload,refused",
    [(1, False, "FSDP version 1"), (2, True, "FSDP CPU offload"), (2, False, None)],
)
def test_dpo_fsdp_refusal_names_what_works(version, offload, refused):
    """FSDP1 and FSDP2's CPU offload are refused (untested), FSDP2 without offload is accepted; the
    message names what works. (With gpu-8.yaml's keys at fsdp_version 1, accelerate's plugin itself
    raises "FSDP parameter initialization with `sync_module_states=True` is not supported on cpu" on
    CPU ranks, so the refusal is checked on the plugin here.)"""
    from types import SimpleNamespace

    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    from hf_seqpar.integrations.trl_dpo import DPOSupport

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=version,
        cpu_offload=offload,
        reshard_after_forward=True if version == 2 else "FULL_SHARD",
        sync_module_states=False,
        cpu_ram_efficient_loading=False,
    )
    trainer = SimpleNamespace(
        args=SimpleNamespace(loss_type="sigmoid", padding_free=False, sync_ref_model=False),
        model=torch.nn.Linear(2, 2),
        is_deepspeed_enabled=False,
        is_fsdp_enabled=True,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
    )
    if refused is None:
        DPOSupport().refuse(trainer)
        return
    with pytest.raises(ValueError, match=refused) as caught:
        DPOSupport().refuse(trainer)
    assert "accelerate's FSDP2 (fsdp_version: 2) without CPU offload" in str(caught.value), caught.value


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True])
def test_dpo_bf16_under_ddp_and_fsdp2_tracks_one_process(pool2, tmp_path, fsdp):
    """bf16 mixed precision (the GPU launch's): accelerate's autocast wrapper of the policy's forward
    under DDP (it hid the sharding forward's mark from the model's pre-hook) and FSDP2's
    MixedPrecisionPolicy. bf16 is not exact: loss and grad norm within 2% of one-process bf16."""
    ref = cases_post_training.dpo_run(False, str(tmp_path / "ref"), steps=2, bf16=True)
    for r in pool2.run(cases_post_training.dpo_run, True, str(tmp_path / "sp"), steps=2, fsdp=fsdp, bf16=True):
        assert r["split"] and all(local < full for local, full in r["split"]), r["split"]
        for mine, want in zip(r["logs"], ref["logs"], strict=True):
            for key in ("loss", "grad_norm"):
                assert abs(mine[key] - want[key]) <= 0.02 * abs(want[key]), (r["rank"], key, mine[key], want[key])


def test_require_batch_finds_the_sharding_forward_under_accelerate_mixed_precision():
    """accelerate's prepare_model under bf16 wraps the instance forward (autocast, then
    convert_outputs_to_fp32, whose outer function has no attributes of the inner one); the model's
    pre-hook must still let the sharding forward's full-batch call through, and only that call."""
    import types

    import torch
    from accelerate import Accelerator
    from cases_trainer import reset_accelerate

    from hf_seqpar.core.hooks import SHARDS_ITSELF, require_batch, shards_itself

    def forward(self, x=None, **kwargs):
        return x

    setattr(forward, SHARDS_ITSELF, True)
    module = torch.nn.Linear(2, 2)
    module.forward = types.MethodType(forward, module)
    reset_accelerate()
    try:
        Accelerator(mixed_precision="bf16", cpu=True).prepare_model(module, device_placement=False)
    finally:
        reset_accelerate()
    assert module.forward.__func__ is not forward and not getattr(module.forward, SHARDS_ITSELF, False)
    assert shards_itself(module.forward)
    module.hf_seqpar_state = object()
    require_batch(module, (), {"fused_lm_head": True})  # the sharding forward's own call: let through
    with pytest.raises(RuntimeError, match="seqpar="):
        require_batch(module, (), {})
