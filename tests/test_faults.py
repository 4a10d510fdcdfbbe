"""Reliability under faults: the fine-tuning recipe on 2 CPU ranks under ``accelerate launch`` and
``torchrun``; one rank is SIGKILLed mid-training, raises, or hangs. Every rank must be gone and the
launcher must exit non-zero within 60 s of the fault (not after the 30-minute default timeout).

What ends the run: gloo fails a collective as soon as a peer's connection closes (a killed or
crashed rank), the failing rank exits, and torchrun's elastic agent (which ``accelerate launch``
runs too) terminates the other ranks. A rank that *hangs* closes nothing: there the plugin's
``collective_timeout_s`` makes the waiting ranks' collectives fail after that many seconds.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

#: every case launches recipe ranks in subprocesses (torchrun / accelerate launch)
pytestmark = pytest.mark.e2e

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
DEADLINE = 60.0  # seconds from the fault to every rank gone


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _run_with_fault(launcher: str, fault: str, tmp_path, timeout_s: float | None = None) -> dict:
    sp_config = tmp_path / "sp.yaml"
    sp_config.write_text("strategy: ulysses\n" + (f"collective_timeout_s: {timeout_s}\n" if timeout_s else ""))
    recipe = [
        str(ROOT / "tests" / "fault_recipe.py"),
        "--fault",
        "none" if fault == "kill" else fault,
        "--fault-rank",
        "1",
        "--fault-step",
        "3",
        "--",
        "--sp-config",
        str(sp_config),
        "--max-steps",
        "100000",
        "--max-seq-len",
        "128",
        "--log-every",
        "1",
        "--output-dir",
        str(tmp_path / "out"),
    ]
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", _port(), *recipe]
    else:
        cmd = [
            str(BIN / "accelerate"),
            "launch",
            "--config_file",
            str(ROOT / "recipes/accelerate/cpu.yaml"),
            "--num_processes",
            "2",
            "--main_process_port",
            _port(),
            *recipe,
        ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    lines: list[str] = []
    pids: dict[int, int] = {}
    started = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            for m in re.finditer(r"fault_recipe rank=(\d+) pid=(\d+)", line):  # anywhere in the line
                pids[int(m.group(1))] = int(m.group(2))
            if re.search(
                r"step +2/\d+ +loss", line
            ):  # (after tqdm's carriage-return output)  # training runs on every rank (a step needs all of them)
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        start_deadline = time.monotonic() + 600
        while not started.wait(timeout=1) and proc.poll() is None and time.monotonic() < start_deadline:
            pass
        assert started.is_set(), f"training did not start (rc {proc.poll()}):\n" + "".join(lines[-40:])
        assert sorted(pids) == [0, 1], f"ranks' pid lines not seen: {pids}\n" + "".join(lines[-40:])
        fault_time = time.monotonic()  # raise/hang: fault at step 3, i.e. within one step from now
        if fault == "kill":
            os.kill(pids[1], signal.SIGKILL)
        try:
            rc = proc.wait(timeout=DEADLINE + 30)
        except subprocess.TimeoutExpired:
            rc = None
        elapsed = time.monotonic() - fault_time
        reader.join(timeout=5)
        return {
            "rc": rc,
            "elapsed": elapsed,
            "alive": [p for p in pids.values() if _alive(p)],
            "pids": pids,
            "log": "".join(lines[-40:]),
            "full_log": "".join(lines),
        }
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _check(r: dict) -> None:
    assert len(r["pids"]) == 2, r["log"]
    assert r["rc"] is not None, f"launcher still running {r['elapsed']:.0f} s after the fault:\n{r['log']}"
    assert r["rc"] != 0, r["log"]
    assert not r["alive"], f"ranks still alive: {r['alive']}\n{r['log']}"
    assert r["elapsed"] <= DEADLINE, f"took {r['elapsed']:.0f} s\n{r['log']}"


@pytest.mark.parametrize("launcher", ["accelerate", pytest.param("torchrun", marks=pytest.mark.slow)])
def test_sigkilled_rank_ends_every_rank(launcher, tmp_path):
    _check(_run_with_fault(launcher, "kill", tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_raising_rank_ends_every_rank(launcher, tmp_path):
    r = _run_with_fault(launcher, "raise", tmp_path)
    _check(r)
    assert "injected failure on rank 1" in r["full_log"], r["log"]


@pytest.mark.slow
def test_hanging_rank_ends_every_rank_after_the_collective_timeout(tmp_path):
    """A rank stuck in its step: its peers' next collective fails after collective_timeout_s
    (20 s here) instead of torch's 30-minute default; then torchrun stops the stuck rank."""
    r = _run_with_fault("accelerate", "hang", tmp_path, timeout_s=20)
    _check(r)
    assert r["elapsed"] >= 15, f"ended before the timeout could have fired ({r['elapsed']:.0f} s)\n{r['log']}"
