"""The README's promises: its two Quick start commands, CI running the same test command, and
the demo training for real (loss going down on 2 ranks)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_quick_start_commands():
    cmds = _quick_start_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c and c.startswith("python3 -m venv .venv") for c in cmds)
    assert all("pip install torch==2.13.0 && pip install -e " in c for c in cmds)  # torch first
    assert "accelerate launch --config_file recipes/accelerate/cpu.yaml --num_processes 2 " in cmds[0]
    assert "recipes/finetune_long_context.py" in cmds[0] and "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _quick_start_commands()[1] in ci.splitlines()


def test_readme_demo_command_runs(tmp_path):
    """The launch part of the README's first command, verbatim but for a free port and the output dir."""
    import shlex
    import socket

    launch = _quick_start_commands()[0].split(" && ")[-1]
    args = shlex.split(launch)
    assert args[:2] == ["accelerate", "launch"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    args[args.index("--output-dir") + 1] = str(tmp_path / "demo")
    cmd = [str(pathlib.Path(sys.executable).parent / "accelerate"), "launch", "--main_process_port", port] + args[2:]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"^step +\d+/\d+ +loss (\d+\.\d+)", proc.stdout, re.M)]
    assert len(losses) == int(args[args.index("--max-steps") + 1]), proc.stdout
    assert losses[-1] < losses[0] - 0.3, losses
    assert (tmp_path / "demo" / "config.json").exists()


def test_demo_trains_on_two_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "recipes" / "demo_cpu.py"), "--steps", "5", "--seq-len", "512"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", proc.stdout)]
    assert len(losses) == 5, proc.stdout
    assert losses[-1] < losses[0] - 0.3, losses
