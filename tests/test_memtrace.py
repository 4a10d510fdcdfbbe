"""hf_seqpar.tools.memtrace: the peak while each autograd node runs, observed without changing it."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import pytest
import torch

from hf_seqpar.tools.bench import _PeakRSS, malloc_follows_tensors, status_bytes
from hf_seqpar.tools.memtrace import FORWARD, NodePeaks

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")

ROWS, H = 16384, 128  # one (ROWS, H) fp32 gradient: 8 MiB
MIB = 2**20


def _tiled_step(trace: bool) -> tuple[int, dict]:
    """A row cut into 32 tiles (views), each used once: the backward assembles their gradients
    (``SliceBackward0``); the peak above the memory before the step, and the node peaks."""
    x = torch.randn(ROWS, H, requires_grad=True)
    gc.collect()
    before = status_bytes("VmRSS")
    _PeakRSS.reset()
    y = x * 1.0
    loss = sum((t * 2).sum() for t in torch.tensor_split(y, 32))
    nodes = NodePeaks(loss.grad_fn) if trace else None
    loss.backward()
    if nodes is None:
        return status_bytes("VmHWM") - before, {}
    peaks = {k: v - before for k, v in nodes.close().items()}  # the hooks reset VmHWM: the peak is theirs
    return max(peaks.values()), peaks


def _measure() -> tuple[int, int, dict]:
    """The plain and the traced step's peaks and the node peaks, after one step that builds what
    later ones reuse."""
    malloc_follows_tensors()
    _tiled_step(False)
    plain, _ = _tiled_step(False)
    traced, nodes = _tiled_step(True)
    return plain, traced, nodes


def test_node_peaks_observe_only_and_name_the_assembly():
    """With the hooks the step peaks as without them (within 1 MiB); the peak is in the tile
    gradients' assembly: the tiles' gradients, the running sum and the padded tile (3 x 8 MiB).
    Measured in a fresh interpreter: in pytest's own process the heap left by earlier tests moved
    the resident peak by 1.5-3.9 MiB between two identical steps."""
    code = f"import json, runpy; print(json.dumps(runpy.run_path({__file__!r})['_measure']()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, traced, nodes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert abs(traced - plain) < MIB, (plain, traced)
    assert max(nodes, key=nodes.get) == "SliceBackward0", nodes
    assert 2.5 * 8 * MIB < nodes["SliceBackward0"] <= traced + MIB
    assert nodes[FORWARD] < nodes["SliceBackward0"] and nodes["torch::autograd::AccumulateGrad"] > 0


def test_hooks_are_removed():
    x = torch.randn(8, requires_grad=True)
    loss = (x.exp() * 2).sum()
    nodes = NodePeaks(loss.grad_fn)
    loss.backward(retain_graph=True)
    first = nodes.close()
    assert {"ExpBackward0", "MulBackward0", "SumBackward0"} <= set(first) and nodes.site in first
    loss.backward()  # no hook left: nothing more is recorded
    assert nodes.peaks is first and set(first) == set(nodes.peaks)
