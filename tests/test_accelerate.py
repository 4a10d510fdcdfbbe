"""The Accelerate plugin and the Trainer on gloo ranks, each against an unsharded reference run
computed in the same case (same seed, same global batches).

SGD moves parameters by exactly ``lr x gradient``, so after a few steps the relative parameter
error is the accumulated gradient error: fp32 reduction-order noise (~1e-7); the bound is 1e-5.
"""

from __future__ import annotations

import os

import cases_accel
import pytest

import hf_seqpar
from hf_seqpar.integrations.accelerate import SP_CONFIG_ENV, SequenceParallelPlugin

PARAM_TOL, LOSS_TOL = 1e-5, 1e-5


def _check(results):
    for rank, r in enumerate(results):
        assert r["param"] <= PARAM_TOL, f"rank {rank}: parameters differ by {r['param']:.2e} (relative)"
        if "loss" in r:
            assert r["loss"] <= LOSS_TOL, f"rank {rank}: loss differs by {r['loss']:.2e}"


def test_sp2_matches_one_process_with_grad_accumulation(pool2):
    """2 ranks SP=2, 3 optimizer steps of 2 accumulated micro-batches vs the unsharded model."""
    results = pool2.run(cases_accel.accelerate_parity, steps=3, grad_accum=2)
    _check(results)
    assert all(r["steps"] == 3 for r in results)


def test_dp2_x_sp2_matches_two_replica_ddp(pool4):
    """4 ranks (dp=2 x sp=2) vs 2 data-parallel replicas of the unsharded model."""
    _check(pool4.run(cases_accel.accelerate_parity, sp_size=2, steps=2, grad_accum=1))


def test_dp2_x_sp2_streaming_dataset_matches_two_replica_ddp(pool4):
    """Issue 19 point 7: an IterableDataset loader is split per data-parallel replica (each SP group
    shares its replica's batches; accelerate's dispatcher would split them over all 4 ranks)."""
    results = pool4.run(cases_accel.accelerate_parity, sp_size=2, steps=2, grad_accum=1, stream=True)
    _check(results)
    assert all(r["steps"] == 2 for r in results), results


def test_memory_features_keep_gradients_exact(pool2):
    """Chunked loss + tiled MLP + checkpointing with CPU offload through the plugin, SP=2."""
    plugin_kw = dict(loss_chunk_size=5, mlp_tiles=3, gradient_checkpointing=True, offload_checkpoints=True)
    _check(pool2.run(cases_accel.accelerate_parity, steps=2, grad_accum=1, plugin_kw=plugin_kw))


@pytest.mark.parametrize("strategy", ["ulysses", "ring", "megatron"])
def test_accelerator_bf16_mixed_precision(pool2, strategy):
    """Accelerator(mixed_precision="bf16") (bf16 autocast over fp32 weights) through
    prepare_sequence_parallel: after 2 SGD steps the SP parameters are no further from the fp32
    unsharded training than 3x the unsharded bf16-autocast training is (see test_matrix.MP_FACTOR
    for why 3), plus a floor of 1e-6 relative (fp32 noise where autocast changes nothing)."""
    results = pool2.run(
        cases_accel.accelerate_parity, steps=2, grad_accum=1, mixed_precision="bf16", plugin_kw=dict(strategy=strategy)
    )
    for rank, r in enumerate(results):
        assert r["param_lowp"] > 1e-4, r  # autocast really ran (bf16 rounding is visible)
        assert r["param"] <= 3.0 * r["param_lowp"] + 1e-6, (rank, r)
        assert r["loss"] <= 3.0 * r["loss_lowp"] + 1e-4, (rank, r)


def test_hybrid_mixed_precision_on_4_ranks(pool4):
    """Hybrid (ulysses 2 x ring 2) under bf16 autocast and with bf16 weights (test_matrix criteria)."""
    from cases_matrix import mixed_precision_parity
    from test_matrix import check_mixed_precision

    for precision in ("autocast", "bf16"):
        check_mixed_precision(
            pool4.run(mixed_precision_parity, "hybrid", precision, ulysses_size=2, batch_kw=dict(kind="padding"))
        )


@pytest.mark.parametrize("offload", [False, True])
def test_fsdp2_sharded_sp_model_matches_unsharded(pool2, offload):
    """The SP model under torch's FSDP2 ``fully_shard`` (accelerate's FSDP2 path) stays exact, also
    with the states in host memory and every memory feature (what `plan --max-seq` recommends)."""
    _check(pool2.run(cases_accel.fsdp2_parity, offload=offload))


@pytest.mark.parametrize("lora", [False, True])
def test_trainer_train_evaluate_save_match_unsharded(pool2, lora):
    results = pool2.run(cases_accel.trainer_parity, steps=3, grad_accum=2, lora=lora)
    for rank, r in enumerate(results):
        assert r["param"] <= PARAM_TOL, (rank, r)
        assert r["logged"] is not None and max(r["logged"]) <= 1e-4, (rank, r)  # Trainer rounds logs to 4 digits
        assert r["eval"] <= LOSS_TOL, (rank, r)
    assert results[0]["reload"] <= PARAM_TOL, results[0]


def test_trainer_accepts_strategy_auto(pool2):
    """``strategy: auto`` works on the Trainer path too (it picks from the head counts)."""
    results = pool2.run(cases_accel.trainer_parity, steps=2, grad_accum=1, strategy="auto")
    for rank, r in enumerate(results):
        assert r["param"] <= PARAM_TOL, (rank, r)
        assert r["eval"] <= LOSS_TOL, (rank, r)


def test_trainer_dp2_x_sp2_matches_two_replica_trainer_semantics(pool4):
    results = pool4.run(cases_accel.trainer_parity, steps=2, grad_accum=2, sp_size=2)
    for rank, r in enumerate(results):
        assert r["param"] <= PARAM_TOL, (rank, r)
        assert r["logged"] is not None and max(r["logged"]) <= 1e-4, (rank, r)
        assert r["eval"] <= LOSS_TOL, (rank, r)
    assert results[0]["reload"] <= PARAM_TOL, results[0]


# ---- the plugin's config file -------------------------------------------------------------


def test_plugin_yaml_round_trip_and_env(tmp_path, monkeypatch):
    path = tmp_path / "sp.yaml"
    path.write_text("strategy: ulysses\nsp_size: 2\nloss_chunk_size: 4096\ngradient_checkpointing: true\n")
    plugin = SequenceParallelPlugin.from_yaml(path)
    assert (plugin.sp_size, plugin.loss_chunk_size, plugin.gradient_checkpointing) == (2, 4096, True)
    monkeypatch.setenv(SP_CONFIG_ENV, str(path))
    assert SequenceParallelPlugin.load() == plugin
    monkeypatch.delenv(SP_CONFIG_ENV)
    assert SequenceParallelPlugin.load() == SequenceParallelPlugin()


@pytest.mark.parametrize(
    "text, words",
    [
        ("strategy: ulysses\nsp_sise: 2\n", ["unknown key", "sp_sise", "sp_size"]),
        ("strategy: spiral\n", ["spiral", "ulysses"]),
        ("sp_size: 0\n", ["sp_size", "positive"]),
        ("loss_chunk_size: many\n", ["loss_chunk_size"]),
        ("layout: diagonal\n", ["layout", "zigzag"]),
        ("offload_checkpoints: true\n", ["gradient_checkpointing"]),
        ("sp_size: 4\nulysses_size: 3\n", ["ulysses_size=3", "sp_size=4"]),
        ("collective_timeout_s: 0\n", ["collective_timeout_s", "positive"]),
        ("options:\n  backend: reference\n", ["'options' was removed", "top-level", "backend"]),
        ("strategy: ulysses\nlayout: zigzag\n", ["strategy 'ulysses' does not take", "layout"]),
        ("strategy: ring\nbackend: magic\n", ["backend='magic'", "reference"]),
        ("- 1\n- 2\n", ["mapping"]),
    ],
)
def test_plugin_rejects_bad_config(tmp_path, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        SequenceParallelPlugin.from_yaml(path)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_plugin_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        SequenceParallelPlugin.from_yaml(tmp_path / "nope.yaml")


def test_recipe_sp_configs_are_valid():
    root = os.path.join(os.path.dirname(__file__), "..", "recipes", "sp")
    names = sorted(f[:-5] for f in os.listdir(root) if f.endswith(".yaml"))
    assert {"ulysses", "ring", "hybrid", "megatron"} <= set(names), names
    for name in names:
        plugin = SequenceParallelPlugin.from_yaml(os.path.join(root, f"{name}.yaml"))
        assert plugin.strategy in (*hf_seqpar.STRATEGIES, "auto")


def test_accelerator_running_ranks_as_single_processes_is_refused(monkeypatch):
    """`accelerate launch` started 2 processes but each Accelerator thinks it is alone (CPU-only
    machine without ACCELERATE_USE_CPU): refuse before anything trains, and say the fix."""
    from types import SimpleNamespace

    monkeypatch.setenv("WORLD_SIZE", "2")
    fake = SimpleNamespace(num_processes=1, distributed_type="NO")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU=true"):
        hf_seqpar.prepare_sequence_parallel(fake, SequenceParallelPlugin(), object())
