"""TRL's GRPOTrainer with SequenceParallelMixin against the one-process GRPOTrainer, on gloo ranks.

Both runs sample the same completions (SP rank 0 generates with the one-process run's RNG stream and
broadcasts), so the losses, every logged metric, the grad norms and the final weights must agree to
fp32 rounding: the SP run sums the same per-token terms in another order (gathered shards), and the
weights after 3 SGD steps carry those differences (the project's SP value/gradient tolerances).
"""

from __future__ import annotations

import cases_grpo

VALUE_TOL, GRAD_TOL = 1e-5, 1e-4


def _compare(pool, tmp_path, **kw):
    ref = cases_grpo.grpo_run(False, str(tmp_path / "ref"), **kw)
    assert len(ref["logs"]) == 3, ref["logs"]
    gen = [h for h in ref["logs"] if "reward_std" in h]
    assert len(gen) == 2 and all(h["reward_std"] > 0 for h in gen), gen  # two generations, advantages not all 0
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
