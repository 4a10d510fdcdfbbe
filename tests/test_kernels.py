"""Kernel backends against the float64 reference: out, lse, dq, dk, dv; and the lse merge.

Tolerances: fp32 kernels accumulate in fp32 over at most a few dozen keys, so results sit within
a few 1e-7 of float64; we allow 1e-5 (absolute, values are O(1)). fp64 kernels: 1e-10.
"""

from __future__ import annotations

import pytest
import torch

from hf_seqpar.kernels import (
    BACKENDS,
    block_backward,
    block_forward,
    merge_into,
    reference_backward,
    reference_forward,
    select_backend,
)

SHAPES = [  # (B, h_q, h_kv, S_q, S_k, D, causal, window, masked)
    (2, 4, 2, 9, 9, 8, True, None, False),
    (1, 4, 1, 7, 13, 8, False, None, True),
    (2, 2, 2, 13, 13, 4, True, 4, False),
    (2, 6, 3, 5, 8, 16, False, None, True),
    (1, 8, 2, 17, 17, 8, True, 3, True),
    (3, 1, 1, 1, 1, 8, True, None, False),
]


def _inputs(b, hq, hkv, sq, sk, d, masked, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=dtype) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    mask = None
    if masked:
        mask = torch.rand(b, 1, sq, sk, generator=g) > 0.4
        mask[0, 0, 0] = False  # a row with no key at all
    return q, k, v, mask


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + f"-c{int(s[6])}-w{s[7]}-m{int(s[8])}"
)
@pytest.mark.parametrize("backend", ["torch_cpu", None])
def test_backend_matches_float64_reference(backend, shape, dtype, tol):
    b, hq, hkv, sq, sk, d, causal, window, masked = shape
    q, k, v, mask = _inputs(b, hq, hkv, sq, sk, d, masked, dtype)
    kw = dict(scale=d**-0.5 * 1.3, causal=causal, window=window, mask=mask)
    out, lse = block_forward(q, k, v, backend=backend, **kw)
    ref_out, ref_lse = reference_forward(q, k, v, **kw)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))  # rows with no key: -inf, not 0
    fin = torch.isfinite(ref_lse)
    assert (out.double() - ref_out).abs().max() <= tol
    assert (lse.double()[fin] - ref_lse[fin]).abs().max() <= tol
    dout = torch.randn_like(out)
    grads = block_backward(dout, q, k, v, out, lse, backend=backend, **kw)
    ref_grads = reference_backward(dout, q, k, v, ref_out, ref_lse, **kw)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == (q, k, v)["qkv".index(name)].shape
        assert (g.double() - r).abs().max() <= tol * 10, f"d{name}"


def test_reference_backward_is_autograd():
    """The written-out float64 backward equals autograd through the float64 forward."""
    q, k, v, mask = _inputs(2, 4, 2, 6, 9, 8, True, torch.float64, seed=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask[0, 0, 0] = True  # autograd of a row with no key is NaN; keep every row alive here
    out, lse = reference_forward(q, k, v, scale=0.4, mask=mask)
    dout = torch.randn_like(out)
    auto = torch.autograd.grad(out, (q, k, v), dout)
    mine = reference_backward(dout, q, k, v, out.detach(), lse.detach(), scale=0.4, mask=mask)
    for a, m in zip(auto, mine):
        assert torch.allclose(a, m, atol=1e-12)


def test_split_keys_merge_to_full_attention():
    """Attention over two key blocks merged by lse == attention over all keys, forward and
    backward (the block backward with the final out/lse gives each block's exact share)."""
    q, k, v, _ = _inputs(2, 4, 2, 10, 10, 8, False, torch.float32, seed=1)
    kw = dict(scale=0.3)
    full_out, full_lse = block_forward(q, k, v, causal=True, **kw)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    out = torch.zeros(q.shape)
    lse = torch.full(q.shape[:3], float("-inf"))
    for cols in (slice(0, 4), slice(4, 10)):
        o, block_lse = block_forward(q, k[:, :, cols], v[:, :, cols], mask=causal[..., cols], **kw)
        merge_into(out, lse, o, block_lse)
    assert torch.allclose(out, full_out, atol=1e-6) and torch.allclose(lse, full_lse, atol=1e-6)
    dout = torch.randn_like(out)
    dq_full, dk_full, dv_full = block_backward(dout, q, k, v, full_out, full_lse, causal=True, **kw)
    dq = torch.zeros_like(q)
    for cols in (slice(0, 4), slice(4, 10)):
        dq_b, dk_b, dv_b = block_backward(dout, q, k[:, :, cols], v[:, :, cols], out, lse, mask=causal[..., cols], **kw)
        dq += dq_b
        assert torch.allclose(dk_b, dk_full[:, :, cols], atol=1e-5) and torch.allclose(
            dv_b, dv_full[:, :, cols], atol=1e-5
        )
    assert torch.allclose(dq, dq_full, atol=1e-5)


def test_merge_is_overflow_safe_and_handles_empty_rows():
    out = torch.zeros(1, 1, 3, 2)
    lse = torch.full((1, 1, 3), float("-inf"))
    big = torch.tensor([[[1000.0, float("-inf"), 90.0]]])
    merge_into(out, lse, torch.ones(1, 1, 3, 2), big)
    merge_into(out, lse, 3 * torch.ones(1, 1, 3, 2), torch.tensor([[[1000.0, float("-inf"), 90.0 + 1e4]]]))
    assert torch.isfinite(out).all()
    # equal weights; lse ~ 1000 in fp32 has a spacing of 6e-5, hence the tolerance
    assert torch.allclose(out[0, 0, 0], torch.full((2,), 2.0), atol=1e-3)
    assert torch.equal(out[0, 0, 1], torch.zeros(2)) and torch.isneginf(lse[0, 0, 1])  # nothing attended
    assert torch.allclose(out[0, 0, 2], torch.full((2,), 3.0))  # the second part dominates completely
    assert torch.allclose(lse[0, 0, 0], torch.tensor(1000.0 + torch.log(torch.tensor(2.0)).item()))


def test_backend_selection():
    assert select_backend(torch.device("cpu"), needs_mask=True).name == "torch_cpu"
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        select_backend(torch.device("cpu"), False, "nope")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        select_backend(torch.device("cpu"), False, "cuda_flash")
    with pytest.raises(ValueError, match="causal blocks must be square"):
        block_forward(*_inputs(1, 2, 2, 3, 5, 4, False, torch.float32)[:3], scale=1.0, causal=True)
    assert set(BACKENDS) == {"reference", "torch_cpu", "cuda_flash", "cuda_efficient", "cuda_cudnn", "flash_attn"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["bf16", "fp16", "fp32-autocast", "fp32"])
@pytest.mark.parametrize("backend", ["cuda_flash", "cuda_efficient", "cuda_cudnn", "flash_attn"])
def test_cuda_backends_match_reference(backend, mode):
    """Every CUDA backend against the float64 reference: forward (out, lse) and the backward from
    the final out/lse, for odd lengths (the lse and bias alignment paths), GQA, causal and not,
    windows and masks. Tolerances: bf16 has 8 mantissa bits (relative step 2^-8 = 4e-3); over
    O(1) values and a few dozen keys the kernels' outputs sit within ~1e-2 of float64 and the
    gradients within a few 1e-2 of their scale; fp16 (11 bits) is 8x tighter, checked at the same
    bound."""
    impl = BACKENDS[backend]
    if not impl.available():
        pytest.skip(f"{backend} not installed")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode, torch.float32)
    compute = torch.bfloat16 if mode == "fp32-autocast" else dtype
    if compute not in impl.dtypes:
        with pytest.raises(ValueError, match="computes in"):
            select_backend(torch.device("cuda"), False, backend, compute)
        return
    for b, hq, hkv, sq, sk, _d, causal, window, masked in SHAPES:
        needs_mask = masked or (window is not None and not impl.native_window)
        if needs_mask and not impl.supports_mask or sq != sk and causal:
            continue
        q, k, v, mask = (t.cuda() if t is not None else None for t in _inputs(b, hq, hkv, sq, sk, 64, masked, dtype))
        kw = dict(scale=0.125, causal=causal, window=window, mask=mask)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "fp32-autocast"):
            out, lse = block_forward(q, k, v, backend=backend, **kw)
        assert out.dtype == compute and lse.dtype == torch.float32
        ref_out, ref_lse = reference_forward(q, k, v, **kw)
        fin = torch.isfinite(ref_lse)
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
        assert (out.double() - ref_out).abs().max() < 3e-2
        assert (lse.double()[fin] - ref_lse[fin]).abs().max() < 3e-2
        dout = torch.randn_like(out)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "fp32-autocast"):
            # the compute dtype comes from the autocast state, in the backward as in the forward
            grads = block_backward(dout, q, k, v, out, lse, backend=backend, **kw)
        for t, g, r in zip((q, k, v), grads, reference_backward(dout, q, k, v, ref_out, ref_lse, **kw)):
            assert g.dtype == t.dtype and g.shape == t.shape
            assert (g.double() - r).abs().max() < 5e-2 * max(1.0, r.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flash_attn_varlen_matches_block_diagonal_reference():
    if not BACKENDS["flash_attn"].available():
        pytest.skip("flash-attn not installed")
    fa = BACKENDS["flash_attn"]
    lengths = [5, 17, 42]
    total, h, d = sum(lengths), 4, 64
    cu = torch.tensor([0, 5, 22, 64], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    doc = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)).cuda()
    mask = (doc[:, None] == doc[None, :])[None, None]
    # (total, h, d) -> (1, h, total, d) for the dense reference
    dense = [t.transpose(0, 1)[None] for t in (q, k, v)]
    ref_out, ref_lse = reference_forward(*dense, scale=0.125, causal=True, mask=mask)
    out, lse = fa.varlen_forward(q, k, v, cu, max(lengths), scale=0.125)
    assert (out.transpose(0, 1)[None].double() - ref_out).abs().max() < 3e-2
    assert (lse[None].double() - ref_lse).abs().max() < 1e-2
    dout = torch.randn_like(out)
    grads = fa.varlen_backward(dout, q, k, v, out, lse, cu, max(lengths), scale=0.125)
    ref = reference_backward(dout.transpose(0, 1)[None], *dense, ref_out, ref_lse, scale=0.125, causal=True, mask=mask)
    for g, r in zip(grads, ref):
        assert (g.transpose(0, 1)[None].double() - r).abs().max() < 5e-2 * max(1.0, r.abs().max().item())
