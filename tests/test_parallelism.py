"""Issue 12, points 5 and 6: ``strategy: auto`` on every path (YAML, Accelerate, Trainer), and
accelerate's own ``ParallelismConfig`` (read where it is safe, refused where accelerate or the HF
Trainer would split the sequence themselves), and the SP settings inside the accelerate config file."""

from __future__ import annotations

import pathlib

import cases_accel
import pytest

import hf_seqpar
from hf_seqpar.integrations.accelerate import SequenceParallelPlugin, prepare_model
from hf_seqpar.integrations.parallelism import apply_parallelism_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-5  # fp32 on CPU, SGD: see test_accelerate.py


# ---- point 5: strategy auto ---------------------------------------------------------------


def test_auto_is_accepted_in_the_plugin_yaml(tmp_path):
    path = tmp_path / "sp.yaml"
    path.write_text("strategy: auto\nloss_chunk_size: 64\n")
    assert SequenceParallelPlugin.from_yaml(path).strategy == "auto"
    assert SequenceParallelPlugin.from_yaml(ROOT / "recipes/sp/auto.yaml").strategy == "auto"


def test_auto_through_prepare_sequence_parallel(pool2):
    """4 heads on 2 ranks: auto picks Ulysses and trains exactly like the unsharded model."""
    for r in pool2.run(cases_accel.accelerate_parity, steps=2, grad_accum=1, plugin_kw={"strategy": "auto"}):
        assert r["strategy"] == "ulysses" and r["param"] <= TOL and r["loss"] <= TOL, r


def test_auto_through_the_trainer(pool2):
    for r in pool2.run(cases_accel.trainer_parity, steps=2, grad_accum=1, strategy="auto"):
        assert r["strategy"] == "ulysses" and r["param"] <= TOL, r
        assert r["logged"] is not None and max(r["logged"]) <= 1e-4, r  # the Trainer logs 4 digits


# ---- point 6: accelerate's ParallelismConfig ----------------------------------------------


def _pc(**kw):
    from accelerate.parallelism_config import ParallelismConfig

    return ParallelismConfig(**kw)


@pytest.mark.parametrize(
    "pc, kw, words",
    [
        (dict(cp_size=2), {}, ["cp_size=2", "context parallelism", "strategy: ring"]),
        (dict(tp_size=2, dp_shard_size=2), {}, ["tp_size=2", "strategy: megatron"]),
        (dict(sp_size=2), dict(deepspeed=True), ["sp_size=2", "DeepSpeed's own Ulysses", "hf_seqpar_sp_size: 2"]),
        (dict(sp_size=2), dict(trainer=True), ["sp_size=2", "Trainer", "multiplied by 2", "sp_size: 2 instead"]),
        (dict(sp_size=4), dict(plugin_sp=2), ["sp_size=4", "plugin has sp_size=2"]),
        (dict(sp_size=2, dp_shard_size=3), {}, ["1 x 3 x 2 = 6 ranks but 4", "dp_shard_size=2 with sp_size=2"]),
        (dict(sp_size=3), {}, ["sp_size=3", "does not divide the 4"]),
    ],
)
def test_parallelism_config_that_would_split_twice_is_refused(pc, kw, words):
    plugin = SequenceParallelPlugin(sp_size=kw.pop("plugin_sp", None))
    with pytest.raises(ValueError) as err:
        apply_parallelism_config(plugin, _pc(**pc), 4, **kw)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_parallelism_config_sizes_are_read():
    plugin = SequenceParallelPlugin(strategy="ring", loss_chunk_size=8)
    assert apply_parallelism_config(plugin, None, 4) is plugin
    got = apply_parallelism_config(plugin, _pc(sp_size=2), 4)  # dp sizes left at 1: the rest of the world
    assert (got.sp_size, got.strategy, got.loss_chunk_size) == (2, "ring", 8)
    assert apply_parallelism_config(plugin, _pc(sp_size=2, dp_shard_size=2), 4).sp_size == 2
    # data-parallel sizes only (accelerate's FSDP2/HSDP over all ranks): the plugin is unchanged
    assert apply_parallelism_config(plugin, _pc(dp_shard_size=4), 4, trainer=True) is plugin


def test_parallelism_config_from_the_accelerate_launch_environment(monkeypatch):
    """``parallelism_config_sp_size: 2`` in an accelerate config file reaches the processes as
    PARALLELISM_CONFIG_SP_SIZE=2 (accelerate.utils.launch); ParallelismConfig() reads it."""
    monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "2")
    with pytest.raises(ValueError, match="Trainer"):
        apply_parallelism_config(SequenceParallelPlugin(), _pc(), 2, trainer=True)


def test_trainer_path_refuses_accelerate_sp_before_touching_the_model():
    """The Trainer calls prepare_model without a mesh: the current Accelerator's parallelism config
    (TrainingArguments(parallelism_config=...)) is checked before SP is enabled."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    accelerator = Accelerator(cpu=True)
    try:
        # what a GPU run gets from TrainingArguments(parallelism_config=ParallelismConfig(sp_size=2))
        # (on CPU accelerate itself refuses it for MULTI_CPU at construction)
        accelerator.state.parallelism_config = _pc(sp_size=2)
        with pytest.raises(ValueError, match="DeepSpeed-Ulysses code paths"):
            prepare_model(object(), SequenceParallelPlugin())
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_accelerate_path_reads_sp_size_from_the_parallelism_config(pool2):
    """A custom loop (DDP) with ParallelismConfig(sp_size=2) and no plugin sp_size: SP over 2 ranks,
    exact; a plugin that says otherwise is refused before anything is set up."""
    results = pool2.run(cases_accel.accelerate_parity, steps=2, grad_accum=1, parallelism_config={"sp_size": 2})
    for r in results:
        assert r.get("sp_size") == 2 and r["param"] <= TOL and r["loss"] <= TOL, r
    results = pool2.run(
        cases_accel.accelerate_parity,
        steps=1,
        grad_accum=1,
        parallelism_config={"sp_size": 2},
        plugin_kw={"sp_size": 1},
    )
    assert all("plugin has sp_size=1" in r.get("error", "") for r in results), results


# ---- the SP settings in the accelerate config file ----------------------------------------

ONE_FILE = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: false
parallelism_config:
  hf_seqpar_strategy: ring
  hf_seqpar_layout: zigzag
  hf_seqpar_loss_chunk_size: 256
"""


def test_plugin_reads_its_section_of_an_accelerate_config_file(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    path = tmp_path / "run.yaml"
    path.write_text(ONE_FILE)
    assert load_config_from_file(str(path)).num_processes == 2  # accelerate accepts the file
    plugin = SequenceParallelPlugin.from_yaml(path)
    assert (plugin.strategy, plugin.layout, plugin.loss_chunk_size, plugin.sp_size) == ("ring", "zigzag", 256, None)
    path.write_text(ONE_FILE + "  hf_seqpar_loss_chunk: 3\n")
    with pytest.raises(ValueError, match="hf_seqpar_loss_chunk'.*hf_seqpar_loss_chunk_size"):
        SequenceParallelPlugin.from_yaml(path)
    path.write_text(ONE_FILE.replace("strategy: ring", "strategy: spiral"))
    with pytest.raises(ValueError, match="spiral"):
        SequenceParallelPlugin.from_yaml(path)
    shipped = ROOT / "recipes/accelerate/cpu-sp.yaml"  # the README's one-file example
    assert load_config_from_file(str(shipped)).num_processes == 2
    assert SequenceParallelPlugin.from_yaml(shipped).strategy in (*hf_seqpar.STRATEGIES, "auto")
