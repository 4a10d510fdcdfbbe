"""recipes/: the fine-tuning recipe under `accelerate launch` on 2 CPU ranks for every available
strategy (loss goes down, the checkpoint loads with plain transformers / PEFT), and the configs."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest
import torch

from hf_seqpar.strategies import STRATEGIES

ROOT = pathlib.Path(__file__).resolve().parents[1]
ACCELERATE = str(pathlib.Path(sys.executable).parent / "accelerate")
AVAILABLE = [name for name, s in STRATEGIES.items() if s.available]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(strategy: str, out_dir, *extra) -> list[float]:
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "recipes/accelerate/cpu.yaml"), "--num_processes", "2",
           "--main_process_port", _port(), str(ROOT / "recipes/finetune_long_context.py"),
           "--sp-config", str(ROOT / f"recipes/sp/{strategy}.yaml"), "--max-steps", "6", "--output-dir", str(out_dir),
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out_dir.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"strategy={strategy} sp_size=2" in proc.stdout, proc.stdout
    losses = [float(x) for x in re.findall(r"^step +\d+/6 +loss (\d+\.\d+)", proc.stdout, re.M)]
    assert len(losses) == 6, proc.stdout
    assert re.search(r"peak memory MiB per rank \[\d+, \d+\]", proc.stdout), proc.stdout
    return losses


def _loss_of(model) -> float:
    ids = torch.tensor([list(b"def main():\n    return 0\n" * 4)])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("strategy", AVAILABLE)
def test_recipe_full_finetune(strategy, tmp_path):
    from transformers import AutoModelForCausalLM

    losses = _launch(strategy, tmp_path / "out")
    assert losses[-1] < losses[0] - 0.3, losses
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config._attn_implementation == "sdpa"
    assert _loss_of(model) < 5.0  # trained: random init scores ~ln(256) = 5.5


def test_recipe_lora(tmp_path):
    from peft import AutoPeftModelForCausalLM

    losses = _launch("ulysses", tmp_path / "out", "--lora")
    assert losses[-1] < losses[0], losses
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)  # trained (B starts at zero)
    with model.disable_adapter():
        base_loss = _loss_of(model)
    assert _loss_of(model) < base_loss  # the adapter improves on the saved base model


def test_recipe_help_lists_the_flags():
    out = subprocess.run([sys.executable, str(ROOT / "recipes/finetune_long_context.py"), "--help"],
                         capture_output=True, text=True, timeout=120).stdout
    for flag in ("--sp-config", "--model", "--dataset", "--max-seq-len", "--max-steps", "--output-dir", "--lora"):
        assert flag in out, flag


@pytest.mark.parametrize("name", ["cpu", "gpu-8", "gpu-multinode"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / f"recipes/accelerate/{name}.yaml"))
    assert cfg.num_processes == {"cpu": 2, "gpu-8": 8, "gpu-multinode": 32}[name]
    if name != "cpu":
        assert cfg.distributed_type == "FSDP" and cfg.fsdp_config["fsdp_version"] == 2
        assert cfg.num_processes == 8 * cfg.num_machines
