"""The fused Triton lse merge equals the torch merge, under Triton's CPU interpreter.

Runs in a subprocess because ``TRITON_INTERPRET=1`` must be set before Triton is imported."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

SCRIPT = r"""
import torch
from hf_seqpar.kernels.merge import merge_into
from hf_seqpar.kernels.triton_merge import triton_merge_into
g = torch.Generator().manual_seed(0)
for d in (8, 24, 64):
    out = torch.randn(2, 3, 5, d, generator=g)
    lse = torch.randn(2, 3, 5, generator=g) * 50
    lse[0, 0, 0] = float("-inf"); out[0, 0, 0] = 0
    part = torch.randn(2, 3, 5, d, generator=g)
    plse = torch.randn(2, 3, 5, generator=g) * 50 + 900
    plse[0, 0, :2] = float("-inf"); part[0, 0, :2] = 0
    a, la = out.clone(), lse.clone()
    merge_into(a, la, part, plse)
    b, lb = out.clone(), lse.clone()
    triton_merge_into(b, lb, part, plse)
    assert torch.equal(torch.isneginf(la), torch.isneginf(lb)), (la, lb)
    fin = torch.isfinite(la)
    assert torch.allclose(la[fin], lb[fin], rtol=1e-6, atol=1e-4), (la - lb).abs().max()
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert torch.isfinite(b).all()
print("ok")
"""


def test_triton_merge_matches_torch_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]
