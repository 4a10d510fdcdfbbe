"""Post-training under sequence parallelism on 2 gloo ranks: the log-prob primitive
(hf_seqpar.core.logprobs) against the unsharded computation, and TRL's DPOTrainer with
SequenceParallelMixin against the one-process DPOTrainer."""

from __future__ import annotations

import pytest

import cases_post_training

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

def _compare_dpo(pool2, tmp_path, **kw):
    ref = cases_post_training.dpo_run(False, str(tmp_path / "ref"), **kw)
    assert len(ref["logs"]) == 3, ref["logs"]
    assert any(h["rewards/margins"] != 0 for h in ref["logs"]), ref["logs"]  # the rewards mean something
    for r in pool2.run(cases_post_training.dpo_run, True, str(tmp_path / "sp"), **kw):
        assert r["split"] and all(local < full for local, full in r["split"]), r["split"]
        assert len(r["logs"]) == len(ref["logs"]), r["logs"]
        for step, (mine, want) in enumerate(zip(r["logs"], ref["logs"])):
            assert set(mine) == set(want), (sorted(mine), sorted(want))
            for key, value in want.items():
                tol = GRAD_TOL if key == "grad_norm" else VALUE_TOL
                assert abs(mine[key] - value) <= tol * max(abs(value), 1e-3), (r["rank"], step, key, mine[key], value)
        for name, p in ref["params"].items():
            err = float((r["params"][name] - p).abs().max() / p.abs().max().clamp_min(1e-12))
            assert err <= VALUE_TOL, (r["rank"], name, err)
    return ref


def test_dpo_sigmoid_with_reference_model_matches_one_process(pool2, tmp_path):
    """Loss, every TRL metric, grad norms and final weights (ulysses, explicit reference model)."""
    _compare_dpo(pool2, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("strategy,loss_type,ref,order", [
    ("ring", "sigmoid", "model", "mixin_first"),
    ("ulysses", "ipo", "precompute", "host_first"),
    ("ring", "ipo", "model", "host_first"),
    ("ring", "hinge", "precompute", "mixin_first"),
])
def test_dpo_matrix_matches_one_process(pool2, tmp_path, strategy, loss_type, ref, order):
    """The acceptance matrix: ulysses and ring, sigmoid/ipo/hinge, a reference model or
    precomputed reference log-probs, either MRO order."""
    _compare_dpo(pool2, tmp_path, strategy=strategy, loss_type=loss_type, ref=ref, order=order)


def test_dpo_refusals_name_what_works(pool2, tmp_path):
    """Untested DPO options and Megatron-SP are refused at construction with what works."""
    for r in pool2.run(cases_post_training.dpo_refusals, str(tmp_path)):
        assert r["ok"] is None, r["ok"]
        for key in ("nca_pair", "sync_ref_model"):
            assert r[key] and key in r[key] and "sigmoid" in r[key] and "precompute_ref_log_probs" in r[key], r
        assert r["megatron"] and "egatron" in r["megatron"], r["megatron"]
