"""Ulysses on 2 and 4 gloo ranks against the unsharded HF model, in the same test
(tolerances: see ``cases.check_parity``)."""

from __future__ import annotations

import cases
import pytest

CASES = cases.PARITY_CASES
_check = cases.check_parity


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_ulysses_matches_unsharded(pools, world, case):
    _check(pools[world].run(cases.parity, "ulysses", **CASES[case]))


def test_dp2_x_sp2_matches_unsharded(pool4):
    """4 ranks as 2 data-parallel replicas of SP=2 (same batch on both replicas)."""
    _check(pool4.run(cases.parity, "ulysses", sp_size=2, batch_kw=dict(kind="padding")))


@pytest.mark.parametrize(
    "strategy,dims,options",
    [
        ("ulysses", (("sp", 2), ("dp", 2)), {}),  # sp first: SP groups {0, 2} and {1, 3}
        ("ring", (("sp", 2), ("pp", 2)), {}),  # a dimension hf_seqpar leaves alone, no dp
        ("hybrid", (("pp", 1), ("dp", 1), ("sp", 4)), dict(ulysses_size=2)),
    ],
)
def test_user_mesh_sizes_are_read_by_name(pool4, strategy, dims, options):
    """A user mesh whose dimensions are not ("dp", "sp") in that order: sizes and groups come from
    the names, and every strategy stays exact (every rank gets the same full batch)."""
    results = pool4.run(cases.parity, strategy, mesh_dims=dims, options=options, batch_kw=dict(kind="packed"))
    _check(results)


def test_user_mesh_without_sp_is_refused(pool2):
    messages = pool2.run(cases.mesh_without_sp)
    assert all("needs a dimension named 'sp'" in m and "('cp',)" in m for m in messages), messages


def test_sp_changes_to_a_shared_config_stay_on_the_sp_model(pool2):
    """m2 = LlamaForCausalLM(m1.config); SP on m1 used to rewrite the shared config (m2's plain
    forward raised, and the advice `disable_sequence_parallel(m2)` did nothing)."""
    for r in pool2.run(cases.shared_config):
        assert r["shared_impl"] == r["m2_impl"] == "sdpa", r
        assert r["m2_plain"] == 0.0 and r["m1_sp"] <= cases.LOGITS_TOL and r["m1_after"] <= cases.LOGITS_TOL, r
        assert "disable_sequence_parallel(model)" in r["m3_error"] and r["m3_fixed"] == (2, 16, cases.VOCAB), r
        assert r.get("saved_seqpar_names", []) == [], r
        assert r["restored"] is True and r["impl_after"] == "sdpa", r


def test_sp1_is_the_plain_model(pool2):
    """sp_size=1 (pure data parallel) still goes through the hooks and stays exact."""
    _check(pool2.run(cases.parity, "ulysses", sp_size=1, batch_kw=dict(kind="packed")))


def test_comm_bytes_match_theory(pool2, pool4):
    """The byte counter sees exactly the Ulysses all-to-all volume per layer."""
    for pool in (pool2, pool4):
        for r in pool.run(cases.ulysses_traffic):
            assert r["measured"] == r["theory"], r
            assert r["per_layer_equal"], r


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_unsharded_context_generates_as_the_plain_model_and_training_resumes_unchanged(pool2, strategy):
    """``with hf_seqpar.unsharded(model)``: generate/logits/loss inside equal an unsharded copy bit for
    bit; after it the same SP state is back and a second step equals a model that never left SP."""
    for r in pool2.run(cases.unsharded_generation, strategy):
        assert r["generate_equal"] and r["loss_equal"] and r["logits_equal"], r
        assert r["attn_inside"] == "sdpa" and r["attn_after"] == "hf_seqpar_sdpa", r
        assert "shard_batch" in r["shard_batch_inside"] and "enable_sequence_parallel" in r["shard_batch_inside"], r
        assert r["same_state_after"] and r["params_equal_after"], r
        assert r["not_enabled"].startswith("ValueError") and "not enabled" in r["not_enabled"], r


def test_unsharded_context_refuses_sharded_parameters(pool2):
    for msg in pool2.run(cases.unsharded_refuses_megatron):
        assert msg.startswith("NotImplementedError") and "'megatron'" in msg and "disable_sequence_parallel" in msg


@pytest.mark.parametrize("strategy", ["ulysses"])
def test_gather_of_an_earlier_batch_uses_its_own_layout_or_raises(pool2, strategy):
    """A 31-token batch's logits gathered after a 32-token batch (same shard size)."""
    cases.check_gather_earlier_batch(pool2.run(cases.gather_earlier_batch, strategy))
