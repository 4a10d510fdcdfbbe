"""``hf-seqpar launch`` / ``python -m hf_seqpar.launch``: a stock-Trainer script made sequence-parallel
without code changes. In-process: the patch is reversible, classes keep ``isinstance``, DPO is
refused, a script that builds no trainer gets the loud warning. End to end (``e2e``, 2 gloo ranks
under torchrun): the same script through the launch path equals the mixin trainer and the stock
one-process Trainer (loss per step, final weights)."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

TESTS = pathlib.Path(__file__).resolve().parent
RING = TESTS.parent / "recipes" / "sp" / "ring.yaml"
#: fp32 on CPU, 3 SGD steps of a 2-layer model: sums in another order (the Trainer tests' tolerances)
LOSS_TOL, PARAM_TOL = 1e-5, 1e-5

SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
import transformers
from transformers import Trainer

from cases import tiny_model
from cases_trainer import _args, _dataset, random_rows

out, mode = sys.argv[1], sys.argv[2]
if mode == "mixin":
    import hf_seqpar
    Trainer = hf_seqpar.SequenceParallelTrainer
trainer = Trainer(model=tiny_model(heads=4, kv_heads=2), args=_args(out, max_steps=3),
                  train_dataset=_dataset(random_rows(6, seq=19)))
trainer.train()
if trainer.args.process_index == 0:
    state = getattr(trainer, "sp_state", None)
    torch.save({{"losses": {{h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}},
                "params": {{n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model)
                           .named_parameters()}},
                "cls": type(trainer).__name__, "is_trainer": isinstance(trainer, transformers.Trainer),
                "sp_size": state.sp_size if state is not None else None}}, out + "/result.pt")
"""


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_patch_is_reversible_and_keeps_isinstance():
    import transformers
    import transformers.trainer
    import trl

    import hf_seqpar
    from hf_seqpar.launch import launch_hosts
    from hf_seqpar.patches.trainer_launch import sequence_parallel_trainers

    before = (transformers.Trainer, transformers.trainer.Trainer, trl.SFTTrainer, trl.DPOTrainer)
    with sequence_parallel_trainers(hf_seqpar.SequenceParallelPlugin(), launch_hosts()) as record:
        sp, sft = transformers.Trainer, trl.SFTTrainer
        assert sp is transformers.trainer.Trainer and sp.__name__ == "SequenceParallelTrainer"
        assert issubclass(sp, before[0]) and issubclass(sp, hf_seqpar.SequenceParallelTrainer)
        assert sft.__name__ == "SequenceParallelSFTTrainer" and issubclass(sft, before[2])
        assert issubclass(sft, hf_seqpar.SequenceParallelMixin) and trl.trainer.sft_trainer.SFTTrainer is sft

        class Mine(transformers.Trainer):  # a script's own subclass inherits the mixin
            pass

        assert hf_seqpar.SequenceParallelMixin in Mine.__mro__
        assert {"transformers.Trainer", "transformers.trainer.Trainer", "trl.SFTTrainer"} <= set(record.patched)
        assert issubclass(trl.GRPOTrainer, hf_seqpar.SequenceParallelMixin)  # GRPO runs sequence-parallel
        with pytest.raises(NotImplementedError, match="RLOOTrainer"):  # refused before the host's constructor
            trl.RLOOTrainer(model=None, reward_funcs=None)
    assert (transformers.Trainer, transformers.trainer.Trainer, trl.SFTTrainer, trl.DPOTrainer) == before
    assert record.constructed == []


def test_script_without_trainer_gets_the_loud_warning(tmp_path, capsys, monkeypatch):
    from hf_seqpar.launch import main

    monkeypatch.delenv("RANK", raising=False)
    script = _write(tmp_path, "import sys, transformers\nprint('ran', sys.argv[1:], transformers.Trainer.__name__)\n")
    assert main(["--sp-config", str(RING), script, "--x", "1"]) == 0
    out, err = capsys.readouterr()
    assert "ran ['--x', '1'] SequenceParallelTrainer" in out, out
    assert "SEQUENCE PARALLELISM WAS NEVER APPLIED" in err and "ring.yaml" in err, err
    assert "ONE PROCESS" in err, err
    import transformers

    assert transformers.Trainer.__name__ == "Trainer"


def _run(cmd, cwd, env=None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=cwd, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.e2e
def test_launch_makes_a_stock_trainer_script_exact(tmp_path):
    """Issue 19 point 10 / issue 25: the stock-Trainer script, unchanged, run by
    ``torchrun -m hf_seqpar.launch --sp-config ring.yaml`` on 2 gloo ranks, trains with SP (ring,
    sp_size 2) and equals the script with SequenceParallelTrainer and the one-process stock Trainer."""
    script = _write(tmp_path, SCRIPT.format(tests=str(TESTS)))
    dist = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    results = {}
    for mode, cmd, env in [
        ("stock", [sys.executable, script], None),
        ("launch", dist + ["-m", "hf_seqpar.launch", "--sp-config", str(RING), script], None),
        ("mixin", dist + [script], {"HF_SEQPAR_CONFIG": str(RING)}),
    ]:
        out = tmp_path / mode
        out.mkdir()
        proc = _run(cmd + [str(out), mode], tmp_path, env)
        if mode == "launch":
            assert "NEVER APPLIED" not in proc.stderr, proc.stderr[-3000:]
        results[mode] = torch.load(out / "result.pt", weights_only=True)
    stock, launch, mixin = results["stock"], results["launch"], results["mixin"]
    assert stock["cls"] == "Trainer" and stock["sp_size"] is None
    assert launch["cls"] == "SequenceParallelTrainer" and launch["is_trainer"] and launch["sp_size"] == 2, launch
    assert mixin["sp_size"] == 2
    assert sorted(stock["losses"]) == sorted(launch["losses"]) == [1, 2, 3], (stock["losses"], launch["losses"])
    for step, loss in stock["losses"].items():
        assert abs(launch["losses"][step] - loss) <= LOSS_TOL * abs(loss), (step, launch["losses"], stock["losses"])
        assert launch["losses"][step] == mixin["losses"][step], (step, launch["losses"], mixin["losses"])
    for name, ref in stock["params"].items():
        err = float((launch["params"][name] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        assert err <= PARAM_TOL, (name, err)
        assert torch.equal(launch["params"][name], mixin["params"][name]), name


SFT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch

import cases_trl

result = cases_trl.sft_run("bfd", sp=False, out_dir=sys.argv[1])  # builds trl.SFTTrainer, the stock class
if result["rank"] == 0:
    torch.save(result, sys.argv[1] + "/result.pt")
"""


@pytest.mark.e2e
@pytest.mark.slow
def test_launch_makes_a_stock_sft_script_exact(tmp_path):
    """A stock TRL SFTTrainer script (packed bfd rows) through the launch path on 2 gloo ranks
    (ulysses, sp 2) equals the same code in one process: loss and TRL's metrics per step, weights."""
    import cases_trl
    from test_trainer import GRAD_TOL

    script = tmp_path / "sft.py"
    script.write_text(textwrap.dedent(SFT_SCRIPT.format(tests=str(TESTS))))
    config = tmp_path / "sp.yaml"
    config.write_text("strategy: ulysses\n")  # TRL's fused LM head: no loss_chunk_size
    out = tmp_path / "launch"
    out.mkdir()
    proc = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "hf_seqpar.launch",
            "--sp-config",
            str(config),
            str(script),
            str(out),
        ],
        tmp_path,
    )
    assert "NEVER APPLIED" not in proc.stderr, proc.stderr[-3000:]
    got = torch.load(out / "result.pt", weights_only=True)
    ref = cases_trl.sft_run("bfd", sp=False, out_dir=str(tmp_path / "ref"))
    assert len(got["logs"]) == len(ref["logs"]) == 3 and got["shape"] == ref["shape"], (got["logs"], ref["logs"])
    for step, (mine, want) in enumerate(zip(got["logs"], ref["logs"], strict=True)):
        for key, tol in (("loss", LOSS_TOL), ("entropy", LOSS_TOL), ("grad_norm", GRAD_TOL)):
            assert abs(mine[key] - want[key]) <= tol * abs(want[key]), (step, key, mine, want)
        assert mine["num_tokens"] == want["num_tokens"], (step, mine, want)
    for name, p in ref["params"].items():
        err = float((got["params"][name] - p).abs().max() / p.abs().max().clamp_min(1e-12))
        assert err <= PARAM_TOL, (name, err)
