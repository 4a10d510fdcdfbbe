"""TRL's GRPOTrainer with SequenceParallelMixin against the one-process GRPOTrainer, on gloo ranks.

Both runs sample the same completions (SP rank 0 generates with the one-process run's RNG stream and
broadcasts), so the losses, every logged metric, the grad norms and the final weights must agree to
fp32 rounding: the SP run sums the same per-token terms in another order (gathered shards), and the
weights after 3 SGD steps carry those differences (the project's SP value/gradient tolerances).
"""

from __future__ import annotations

import cases_grpo
import pytest

VALUE_TOL, GRAD_TOL = 1e-5, 1e-4


def _compare(pool, tmp_path, **kw):
    ref = cases_grpo.grpo_run(False, str(tmp_path / "ref"), **kw)
    assert len(ref["logs"]) == 3, ref["logs"]
    gen = [h for h in ref["logs"] if "reward_std" in h]
    # a generation every 2 optimizer steps (every 4 with num_iterations 2); advantages not all 0
    assert len(gen) == (1 if kw.get("num_iterations", 1) > 1 else 2) and all(h["reward_std"] > 0 for h in gen), gen
    assert any(h["completions/min_length"] < h["completions/max_length"] for h in gen), gen
    for r in pool.run(cases_grpo.grpo_run, True, str(tmp_path / "sp"), **kw):
        assert r["split"] and all(local < full for local, full in r["split"]), r["split"]
        assert len(r["logs"]) == len(ref["logs"]), r["logs"]
        for step, (mine, want) in enumerate(zip(r["logs"], ref["logs"])):
            assert set(mine) == set(want), (sorted(mine), sorted(want))
            for key, value in want.items():
                tol = GRAD_TOL if key == "grad_norm" else VALUE_TOL
                assert abs(mine[key] - value) <= tol * max(abs(value), 1.0), (r["rank"], step, key, mine[key], value)
        for name, p in ref["params"].items():
            err = float((r["params"][name] - p).abs().max() / p.abs().max().clamp_min(1e-12))
            assert err <= VALUE_TOL, (r["rank"], name, err)
    return ref


def test_grpo_with_reference_model_matches_one_process(pool2, tmp_path):
    """Ulysses, loss_type grpo, beta > 0 (reference model with SP), old-policy ratio and clipping."""
    ref = _compare(pool2, tmp_path, loss_type="grpo", beta=0.04)
    assert any(h["kl"] > 0 for h in ref["logs"]), ref["logs"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,loss_type,beta,order,extra",
    [
        ("ring", "grpo", 0.04, "host_first", {}),
        ("ulysses", "grpo", 0.0, "host_first", {}),
        ("ulysses", "dapo", 0.0, "mixin_first", {"sp_options": {"gradient_checkpointing": True}}),
        ("ring", "dapo", 0.04, "mixin_first", {}),
        ("ulysses", "bnpo", 0.0, "host_first", {"num_iterations": 2}),
        ("ring", "dr_grpo", 0.04, "mixin_first", {"top_entropy_quantile": 0.5}),
        ("ring", "grpo", 0.0, "mixin_first", {}),
        ("ring", "dapo", 0.0, "host_first", {}),
        ("ulysses", "dapo", 0.04, "host_first", {}),
    ],
)
def test_grpo_matrix_matches_one_process(pool2, tmp_path, strategy, loss_type, beta, order, extra):
    """The acceptance matrix: ulysses and ring, each loss type, beta 0 and > 0, either MRO order,
    several iterations per generation, entropy masking, activation checkpointing (which TRL turns
    off and on around generation, on SP rank 0 only)."""
    ref = _compare(pool2, tmp_path, strategy=strategy, loss_type=loss_type, beta=beta, order=order, **extra)
    assert ("kl" in ref["logs"][0]) == (beta > 0), ref["logs"][0]


@pytest.mark.slow
def test_grpo_hybrid_on_four_ranks_matches_one_process(pool4, tmp_path):
    """Hybrid 2 x 2 (Ulysses inside pairs of ranks, ring across them), dapo, reference model."""
    _compare(pool4, tmp_path, strategy="hybrid", sp_options={"ulysses_size": 2}, loss_type="dapo", beta=0.04)


@pytest.mark.slow
def test_grpo_two_replicas_of_two_sp_ranks_match_trl_data_parallel(pool2, pool4, tmp_path):
    """sp_size 2 x 2 data-parallel replicas on 4 ranks against TRL's own 2-process data-parallel run:
    the replicas get different completions (each prompt group of 4 is split over the 2 replicas: a
    generation batch of 2 per replica), the rewards, advantages, DAPO's token count and every metric
    are over the replicas (the SP duplicates counted once)."""
    kw = dict(loss_type="dapo", beta=0.04, steps_per_generation=1, gradient_accumulation_steps=1)
    ref = pool2.run(cases_grpo.grpo_run, False, str(tmp_path / "ref"), **kw)
    for r in pool4.run(cases_grpo.grpo_run, True, str(tmp_path / "sp"), sp_options={"sp_size": 2}, **kw):
        want = ref[0]
        assert r["split"] and all(local < full for local, full in r["split"]), r["split"]
        for step, (mine, theirs) in enumerate(zip(r["logs"], want["logs"], strict=True)):
            assert set(mine) == set(theirs), (sorted(mine), sorted(theirs))
            for key, value in theirs.items():
                tol = GRAD_TOL if key == "grad_norm" else VALUE_TOL
                assert abs(mine[key] - value) <= tol * max(abs(value), 1.0), (r["rank"], step, key, mine[key], value)
        for name, p in want["params"].items():
            err = float((r["params"][name] - p).abs().max() / p.abs().max().clamp_min(1e-12))
            assert err <= VALUE_TOL, (r["rank"], name, err)


def test_grpo_refusals_name_what_works(pool2, tmp_path):
    """Untested GRPO options, a generation batch the replicas cannot split into whole prompt groups,
    and Megatron-SP are refused at construction with what works."""
    for r in pool2.run(cases_grpo.grpo_refusals, str(tmp_path)):
        assert r["cispo"] and "cispo" in r["cispo"] and "'grpo'" in r["cispo"] and "use_vllm=False" in r["cispo"], r
        assert r["batch"] and "num_generations" in r["batch"] and "steps_per_generation" in r["batch"], r["batch"]
        assert r["megatron"] and "megatron" in r["megatron"] and "ulysses" in r["megatron"], r["megatron"]
