"""The arguments hf_seqpar hands the CUDA attention kernels, built and checked on CPU.

A wrong dtype, layout or index handed to a CUDA kernel is an error at best and an illegal memory
access at worst (which takes the whole process's CUDA context down). The backends therefore build
their aten arguments in device-free static methods, tested here against the conventions of the
aten schemas (``torch.ops.aten.<op>.default._schema``) and of torch's own context-parallel ring
(``torch.distributed.tensor.experimental._context_parallel``).
"""

from __future__ import annotations

import pytest
import torch

from hf_seqpar.kernels import BACKENDS, block_forward, compute_dtype, select_backend
from hf_seqpar.kernels.backends import (
    BIAS_ALIGN,
    EFFICIENT_LSE_ALIGN,
    CudaEfficientBackend,
    CudaFlashBackend,
    CudnnBackend,
    aligned_bias,
    bshd_layout,
    cudnn_lse_for_backward,
    efficient_lse_for_backward,
)

aten = torch.ops.aten


def _qkv(b=2, h=4, s=13, d=8, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, s, d, generator=g).to(dtype) for _ in range(3)]


def _names(op):
    return [a.name for a in op.default._schema.arguments if not a.kwarg_only]


@pytest.mark.parametrize("s", [1, 7, 13, 32, 33, 100])
def test_efficient_lse_has_aligned_strides_and_the_values(s):
    lse = torch.randn(3, 5, s)
    out = efficient_lse_for_backward(lse)
    assert out.shape == lse.shape and out.dtype == torch.float32
    # the kernel checks lse_strideH % 8 == 0 and lse_strideB % 8 == 0 ("LSE is not correctly aligned")
    assert out.stride(1) % 8 == 0 and out.stride(0) % 8 == 0 and out.stride(2) == 1
    assert out.stride(1) == -(-s // EFFICIENT_LSE_ALIGN) * EFFICIENT_LSE_ALIGN
    assert torch.equal(out, lse)


@pytest.mark.parametrize("sk", [1, 9, 16, 17])
def test_aligned_bias_rows_are_aligned_and_match_the_mask(sk):
    mask = torch.rand(2, 1, 5, sk, generator=torch.Generator().manual_seed(1)) > 0.3
    bias = aligned_bias(mask, 2, 4, 5, sk, torch.bfloat16)
    assert bias.shape == (2, 4, 5, sk) and bias.dtype == torch.bfloat16
    assert bias.stride(2) % BIAS_ALIGN == 0 and bias.stride(3) == 1 and bias.stride(1) == 0
    assert torch.equal(torch.isneginf(bias), ~mask.expand(2, 4, 5, sk))
    assert torch.equal(bias[~torch.isneginf(bias)], torch.zeros_like(bias[~torch.isneginf(bias)]))
    assert aligned_bias(None, 2, 4, 5, sk, torch.float32) is None


@pytest.mark.parametrize("shape", [(2, 1, 5, 8), (1, 2, 5, 9), (3, 1, 5, 9), (5, 9)])
def test_a_mask_of_the_wrong_shape_is_an_exception_not_a_fault(shape):
    with pytest.raises(ValueError, match="mask has shape"):
        aligned_bias(torch.ones(shape, dtype=torch.bool), 2, 4, 5, 9, torch.float16)
    q, k, v = _qkv(b=2, s=5, dtype=torch.float32)
    k, v = k[:, :, :4].repeat(1, 1, 3, 1)[:, :, :9], v[:, :, :4].repeat(1, 1, 3, 1)[:, :, :9]
    with pytest.raises(ValueError, match="mask has shape"):
        block_forward(q, k, v, scale=1.0, mask=torch.ones(shape, dtype=torch.bool))


def test_flash_backward_args_follow_the_dense_schema():
    q, k, v = _qkv()
    out, dout = torch.randn_like(q), torch.randn(q.shape)  # dout arrives fp32 from the ring
    lse = torch.randn(2, 13, 4).transpose(1, 2)  # (B, h, S), not contiguous (a slice of the ring's lse)
    args, kwargs = CudaFlashBackend.backward_args(dout, q, k, v, out, lse, scale=0.3, causal=True)
    named = dict(zip(_names(aten._scaled_dot_product_flash_attention_backward), args))
    assert len(args) == len(_names(aten._scaled_dot_product_flash_attention_backward))
    # undefined cum_seq_* select the dense kernel; a defined tensor selects varlen (int32 offsets)
    assert named["cum_seq_q"] is None and named["cum_seq_k"] is None
    assert (named["max_q"], named["max_k"]) == (13, 13)
    assert named["grad_out"].dtype == q.dtype and named["out"].dtype == q.dtype
    assert named["logsumexp"].dtype == torch.float32 and named["logsumexp"].is_contiguous()
    for seed in (named["philox_seed"], named["philox_offset"]):
        assert seed.dtype == torch.int64 and seed.dim() == 0
    assert named["dropout_p"] == 0.0 and named["is_causal"] is True and kwargs == {"scale": 0.3}


def test_efficient_backward_args_follow_the_schema():
    q, k, v = _qkv(s=9)
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    args, kwargs = CudaEfficientBackend.backward_args(
        torch.randn(q.shape), q, k, v, q, torch.randn(2, 4, 9), scale=0.5, causal=False, mask=mask
    )
    names = _names(aten._scaled_dot_product_efficient_attention_backward)
    assert len(args) == len(names)
    named = dict(zip(names, args))
    assert named["attn_bias"].shape == (2, 4, 9, 9) and named["attn_bias"].stride(2) % BIAS_ALIGN == 0
    assert named["logsumexp"].stride(1) % 8 == 0 and named["logsumexp"].shape == (2, 4, 9)
    assert named["grad_input_mask"] == [True, True, True, False] and named["grad_out_"].dtype == q.dtype
    # the kernel reads out with o_strideM = h * D (kernel_backward.h), whatever its strides say
    for t in (named["out"], named["grad_out_"]):
        assert t.shape == q.shape and t.stride(2) == q.shape[1] * q.shape[3] and t.stride(3) == 1
    assert torch.equal(named["out"], q) and torch.equal(bshd_layout(q), q)


def test_cudnn_backward_args_follow_the_schema():
    q, k, v = _qkv(s=9)
    args, _ = CudnnBackend.backward_args(
        torch.randn(q.shape), q, k, v, q, torch.randn(2, 4, 9), scale=0.5, causal=True, mask=None
    )
    names = _names(aten._scaled_dot_product_cudnn_attention_backward)
    assert len(args) == len(names)
    named = dict(zip(names, args))
    assert named["cum_seq_q"] is None and named["cum_seq_k"] is None  # a defined one: nested (3-D) path
    assert named["attn_bias"] is None
    assert named["logsumexp"].shape == (2, 4, 9, 1) and named["logsumexp"].is_contiguous()
    assert (named["max_q"], named["max_k"]) == (9, 9)
    # the backward checks every tensor is on the query's device (aten's forward: zeros({1}) there)
    for seed in (named["philox_seed"], named["philox_offset"]):
        assert seed.device == q.device and seed.dtype == torch.int64 and seed.shape == (1,)
    assert cudnn_lse_for_backward(torch.randn(1, 2, 3)).dtype == torch.float32


def test_compute_dtype_follows_autocast_and_promotion():
    f32, bf16 = torch.ones(1), torch.ones(1, dtype=torch.bfloat16)
    assert compute_dtype(f32, f32, bf16) == torch.float32
    assert compute_dtype(bf16, bf16) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(f32, f32, bf16) == torch.bfloat16  # RoPE'd fp32 q/k, bf16 v
        assert compute_dtype(torch.ones(1, dtype=torch.float64)) == torch.float64


def test_mixed_dtypes_under_autocast_compute_in_bf16_on_cpu():
    q, k = _qkv(dtype=torch.float32)[:2]
    v = _qkv(dtype=torch.bfloat16)[2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = block_forward(q, k, v, scale=0.3, causal=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref, _ = block_forward(q.bfloat16(), k.bfloat16(), v, scale=0.3, causal=True)
    assert torch.equal(out, ref)


def test_cuda_backend_selection_by_dtype_and_mask():
    cuda = torch.device("cuda")
    # fp32 without autocast: the CUDA flash and cuDNN kernels take only fp16/bf16
    assert select_backend(cuda, False, dtype=torch.float32).name == "cuda_efficient"
    assert select_backend(cuda, True, dtype=torch.bfloat16).name == "cuda_efficient"
    expected = "flash_attn" if BACKENDS["flash_attn"].available() else "cuda_flash"
    assert select_backend(cuda, False, dtype=torch.bfloat16).name == expected
    with pytest.raises(ValueError, match="computes in"):
        select_backend(cuda, False, "cuda_cudnn", torch.float32)


def test_flash_segments_offsets_are_checked_int32_and_in_range():
    from hf_seqpar.core.masks import check_cu_seqlens, document_ids, flash_segments

    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 7:] = False
    docs = document_ids(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4], list(range(10))]))
    cu, longest = flash_segments(valid, docs)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 10, 17, 20] and longest == 7
    for bad, total in (
        (torch.tensor([0, 5, 10]), 10),
        (torch.tensor([0, 5, 12], dtype=torch.int32), 10),
        (torch.tensor([0, 5, 5, 10], dtype=torch.int32), 10),
        (torch.tensor([1, 10], dtype=torch.int32), 10),
    ):
        with pytest.raises(ValueError, match="cu_seqlens"):
            check_cu_seqlens(bad, total)


def test_cudnn_sends_one_by_one_blocks_to_the_efficient_backward(monkeypatch):
    """cuDNN rejects s_q = s_kv = 1 ("cuDNN Frontend error", and on the H200 a later cuDNN call in
    the same process crashed): such a block's gradients come from the memory-efficient kernel,
    exact since they depend only on the final out/lse."""
    seen = []
    monkeypatch.setattr(CudaEfficientBackend, "backward", lambda self, *a, **kw: seen.append(a[1].shape) or a[1:4])
    q, k, v = _qkv(s=1)
    grads = CudnnBackend().backward(q, q, k, v, q, torch.zeros(2, 4, 1), scale=1.0, causal=True, window=None, mask=None)
    assert seen == [q.shape] and grads[0] is q


# ---- grouped-query attention: K/V with their own heads where the kernel takes them --------------


def _gqa(b=1, hq=8, hkv=2, s=9, d=8, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, hq, s, d, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, s, d, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def test_the_gqa_table_covers_every_backend_and_matches_the_kernels_checks():
    from hf_seqpar.kernels.gqa import GQA

    assert set(GQA) == set(BACKENDS)
    for name, row in GQA.items():
        # a kernel that takes grouped K/V returns kv-head gradients; one that needs expanded K/V
        # returns query-head gradients (summed per group by the backend)
        assert row.dkv_heads == ("kv" if row.native else "q"), name
        assert row.source
    # the memory-efficient kernel checks query.size(2) == key.size(2) (one num_heads in its Params)
    assert not GQA["cuda_efficient"].native
    assert GQA["cuda_flash"].native and GQA["cuda_cudnn"].native and GQA["flash_attn"].native


def test_kv_for_kernel_passes_kv_heads_as_they_are_or_expands_them():
    from hf_seqpar.kernels.gqa import kv_for_kernel

    q, k, v = _gqa()
    for name in ("cuda_flash", "cuda_cudnn"):
        ke, ve = kv_for_kernel(name, q, k, v)
        assert ke is k and ve is v  # no copy: the 2 x h_q x D bytes per token are never allocated
    ke, ve = kv_for_kernel("cuda_efficient", q, k, v)
    assert ke.shape == q.shape and ve.shape == q.shape
    # query head i reads kv head i // (h_q / h_kv), as transformers' repeat_kv
    for i in range(q.shape[1]):
        assert torch.equal(ke[:, i], k[:, i // 4]) and torch.equal(ve[:, i], v[:, i // 4])


def test_dkv_from_kernel_sums_groups_only_for_expanding_kernels():
    from hf_seqpar.kernels.gqa import dkv_from_kernel

    g = torch.Generator().manual_seed(4)
    dk_q, dv_q = torch.randn(1, 8, 5, 4, generator=g), torch.randn(1, 8, 5, 4, generator=g)
    dk, dv = dkv_from_kernel("cuda_efficient", dk_q, dv_q, 2)
    assert torch.equal(dk[:, 0], dk_q[:, 0:4].sum(1)) and torch.equal(dv[:, 1], dv_q[:, 4:8].sum(1))
    dk_kv = torch.randn(1, 2, 5, 4, generator=g)
    same = dkv_from_kernel("cuda_flash", dk_kv, dk_kv, 2)
    assert same[0] is dk_kv and same[1] is dk_kv
    with pytest.raises(ValueError, match="kernels/gqa.py"):
        dkv_from_kernel("cuda_flash", dk_q, dv_q, 2)


def test_flash_and_cudnn_backward_args_carry_kv_heads():
    q, k, v = _gqa()
    out, lse = torch.randn_like(q), torch.randn(1, 8, 9)
    args, _ = CudaFlashBackend.backward_args(q, q, k, v, out, lse, scale=0.3, causal=True)
    named = dict(zip(_names(aten._scaled_dot_product_flash_attention_backward), args))
    assert named["key"].shape[1] == 2 and named["value"].shape[1] == 2 and named["query"].shape[1] == 8
    args, _ = CudnnBackend.backward_args(
        q, q, k, v, out, lse, scale=0.3, causal=False, mask=torch.ones(1, 1, 9, 9).bool()
    )
    named = dict(zip(_names(aten._scaled_dot_product_cudnn_attention_backward), args))
    assert named["key"].shape[1] == 2 and named["attn_bias"].shape == (1, 8, 9, 9)


class _FakeAten:
    """The three CUDA SDPA ops computed by the float64 reference on CPU, with the head checks of the
    real kernels (flash/cuDNN: ``h_q % h_kv == 0``, kv-head gradients; memory-efficient: equal
    heads), so the backends' whole forward/backward logic runs here; the calls are recorded."""

    def __init__(self):
        self.calls = []

    def _fwd(self, name, q, k, v, causal, scale, bias=None, need_equal=False):
        self.calls.append((name, q.shape[1], k.shape[1]))
        assert (k.shape[1] == q.shape[1]) if need_equal else (q.shape[1] % k.shape[1] == 0)
        mask = None if bias is None else ~torch.isneginf(bias[:, :1])
        from hf_seqpar.kernels import reference_forward

        out, lse = reference_forward(q, k, v, scale=scale, causal=causal, mask=mask)
        return out.to(q.dtype), lse.float()

    def _bwd(self, name, dout, q, k, v, out, lse, causal, scale, bias=None, need_equal=False):
        self.calls.append((name, q.shape[1], k.shape[1]))
        assert (k.shape[1] == q.shape[1]) if need_equal else (q.shape[1] % k.shape[1] == 0)
        mask = None if bias is None else ~torch.isneginf(bias[:, :1])
        from hf_seqpar.kernels import reference_backward

        grads = reference_backward(dout, q, k, v, out, lse.reshape(q.shape[:3]), scale=scale, causal=causal, mask=mask)
        return tuple(g.to(q.dtype) for g in grads)  # dk/dv with k's heads, as the kernels return

    @property
    def _scaled_dot_product_flash_attention(self):
        return lambda q, k, v, p, causal, debug, scale: (*self._fwd("flash", q, k, v, causal, scale), None)

    @property
    def _scaled_dot_product_flash_attention_backward(self):
        return lambda do, q, k, v, o, lse, *rest, scale: self._bwd("flash_bwd", do, q, k, v, o, lse, rest[5], scale)

    @property
    def _scaled_dot_product_efficient_attention(self):
        def f(q, k, v, bias, lse_flag, p, causal, scale):
            out, lse = self._fwd("efficient", q, k, v, causal, scale, bias, need_equal=True)
            return out, lse, None, None

        return f

    @property
    def _scaled_dot_product_efficient_attention_backward(self):
        def f(do, q, k, v, bias, o, lse, s1, s2, p, mask, causal, scale):
            return (*self._bwd("efficient_bwd", do, q, k, v, o, lse, causal, scale, bias, need_equal=True), None)

        return f

    @property
    def _scaled_dot_product_cudnn_attention(self):
        return lambda q, k, v, bias, lse_flag, p, causal, debug, scale: (
            self._fwd("cudnn", q, k, v, causal, scale, bias) + (None,)
        )

    @property
    def _scaled_dot_product_cudnn_attention_backward(self):
        def f(do, q, k, v, o, lse, s1, s2, bias, cq, ck, mq, mk, p, causal, scale):
            return self._bwd("cudnn_bwd", do, q, k, v, o, lse.squeeze(-1), causal, scale, bias)

        return f


@pytest.mark.parametrize("name", ["cuda_flash", "cuda_cudnn", "cuda_efficient"])
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_backends_pass_kv_heads_and_return_exact_kv_gradients(monkeypatch, name, masked):
    """Each CUDA backend's forward and backward on grouped heads, against the float64 reference:
    flash and cuDNN get K/V with their 2 kv heads, the memory-efficient kernel 8 expanded heads;
    every backend returns kv-head dk/dv equal to the reference's."""
    import hf_seqpar.kernels.backends as backends
    from hf_seqpar.kernels import reference_backward, reference_forward

    if masked and name == "cuda_flash":
        pytest.skip("flash takes no masks")
    fake = _FakeAten()
    monkeypatch.setattr(backends, "aten", fake)
    q, k, v = _gqa(dtype=torch.float32)
    mask = (torch.rand(1, 1, 9, 9, generator=torch.Generator().manual_seed(5)) > 0.3) | torch.eye(9, dtype=torch.bool)
    mask = mask if masked else None
    impl = BACKENDS[name]
    out, lse = impl.forward(q, k, v, scale=0.4, causal=not masked, window=None, mask=mask)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
    dq, dk, dv = impl.backward(dout, q, k, v, out, lse, scale=0.4, causal=not masked, window=None, mask=mask)
    heads_seen = {h_kv for _, _, h_kv in fake.calls}
    assert heads_seen == ({8} if name == "cuda_efficient" else {2})
    ref_out, ref_lse = reference_forward(q, k, v, scale=0.4, causal=not masked, mask=mask)
    ref = reference_backward(dout, q, k, v, ref_out, ref_lse, scale=0.4, causal=not masked, mask=mask)
    assert dk.shape == k.shape and dv.shape == v.shape
    for got, want in zip((out, dq, dk, dv), (ref_out, *ref)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# ---- the default CUDA backend order from the per-device speed table ------------------------------

FAKE_TABLE = {
    "NVIDIA H200": {
        "causal": {"cuda_cudnn": 520.0, "cuda_flash": 410.0},  # flash_attn not measured there
        "packed": {"cuda_efficient": 150.0, "cuda_cudnn": 240.0},
    }
}


def test_the_order_follows_the_measured_speed_then_the_fallback():
    from hf_seqpar.kernels.speed import FALLBACK, order_from_table

    assert order_from_table("NVIDIA H200", False, FAKE_TABLE) == (
        "cuda_cudnn",
        "cuda_flash",
        "flash_attn",
        "cuda_efficient",
    )
    assert order_from_table("NVIDIA H200", True, FAKE_TABLE)[:2] == ("cuda_cudnn", "cuda_efficient")
    # a device without a row keeps the order of before the table
    assert order_from_table("NVIDIA A100-SXM4-80GB", False, FAKE_TABLE) == FALLBACK
    assert FALLBACK == ("flash_attn", "cuda_flash", "cuda_efficient")


def test_select_backend_uses_the_device_order_and_a_named_backend_overrides_it(monkeypatch):
    import hf_seqpar.kernels as kernels
    from hf_seqpar.kernels.speed import order_from_table

    monkeypatch.setattr(
        kernels, "device_order", lambda device, needs_mask: order_from_table("NVIDIA H200", needs_mask, FAKE_TABLE)
    )
    cuda = torch.device("cuda", 0)
    assert select_backend(cuda, False, dtype=torch.bfloat16).name == "cuda_cudnn"
    assert select_backend(cuda, True, dtype=torch.bfloat16).name == "cuda_cudnn"
    # fp32: cuDNN and flash take only half precision, so the first fp32-capable one in the order
    assert select_backend(cuda, True, dtype=torch.float32).name == "cuda_efficient"
    assert select_backend(cuda, False, "cuda_flash", torch.bfloat16).name == "cuda_flash"


def test_table_entry_is_the_geometric_mean_of_correct_complete_backends():
    from hf_seqpar.kernels.speed import table_entry

    rows = [
        {"backend": "cuda_flash", "case": "causal", "seq_len": 8192, "tflops": 100.0, "correct": True},
        {"backend": "cuda_flash", "case": "causal", "seq_len": 32768, "tflops": 400.0, "correct": True},
        # wrong at one length: not ranked
        {"backend": "cuda_cudnn", "case": "causal", "seq_len": 8192, "tflops": 900.0, "correct": True},
        {"backend": "cuda_cudnn", "case": "causal", "seq_len": 32768, "tflops": 900.0, "correct": False},
        # ran at one length only (e.g. out of memory at the other): not ranked on it alone
        {"backend": "cuda_efficient", "case": "causal", "seq_len": 8192, "tflops": 50.0, "correct": True},
        {"backend": "cuda_efficient", "case": "packed", "seq_len": 8192, "tflops": 30.0, "correct": True},
    ]
    entry = table_entry(rows)
    # sqrt(100 * 400) = 200
    assert entry["causal"] == {"cuda_flash": pytest.approx(200.0)}
    assert entry["packed"] == {"cuda_efficient": pytest.approx(30.0)}


def test_cuda_kernel_backward_bytes_by_hand():
    """The memory model's CUDA attention term at the Llama-3.1-8B shape (h_q 32, h_kv 8, d 128, bf16),
    per local token: aten's flash keeps dk/dv expanded to 32 heads while it sums the groups
    (2 x 2 x 32 x 128 = 16,384 B) and its fp32 dq accumulator (4 x 32 x 128 = 16,384 B); the
    memory-efficient kernel gets K/V expanded (16,384 B) and returns 32-head dk/dv, 24 heads beyond
    the kv ones (2 x 2 x 24 x 128 = 12,288 B). Flash as it was called before (K/V expanded) held
    16,384 + 12,288 + 16,384: passing the kv heads saves 12,288 B per token."""
    from hf_seqpar.core.shape import ModelShape
    from hf_seqpar.tools.memmodel import cuda_kernel_backward_bytes

    m = ModelShape(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)
    assert cuda_kernel_backward_bytes(m, 8, 2, None) == 0
    assert cuda_kernel_backward_bytes(m, 8, 2, "cuda_flash") == 16384 + 16384
    assert cuda_kernel_backward_bytes(m, 8, 2, "cuda_efficient") == 16384 + 12288
    assert cuda_kernel_backward_bytes(m, 32, 2, "cuda_flash") == 16384  # no GQA: only the accumulator
    expanded_flash = 16384 + 12288 + 16384
    assert expanded_flash - cuda_kernel_backward_bytes(m, 8, 2, "cuda_flash") == 12288


# ---- the kernel speed table command ---------------------------------------------------------------


def test_kernel_bench_rows_pieces_and_work():
    from hf_seqpar.tools.kernelbench import DOC_LENGTHS, pieces_for, work_of

    pieces, lengths = pieces_for("causal", 1000, "cpu")
    assert lengths == [1000] and len(pieces) == 1 and pieces[0].kind == "causal"
    pieces, lengths = pieces_for("packed", 10000, "cpu")
    assert sum(lengths) == 10000 and lengths[:3] == list(DOC_LENGTHS[:3])
    assert any(p.kind == "packed" for p in pieces)  # the tiny documents are packed into masked tiles
    # every query sees exactly its document's causal prefix: the pieces' work is the documents'
    assert sum(p.work if p.kind != "packed" else sum(a.work for a in p.parts) for p in pieces) == work_of(lengths)
    assert work_of([3, 2]) == 6 + 3


def test_kernel_bench_on_cpu_measures_checks_and_writes_the_table(tmp_path):
    import json

    from hf_seqpar.tools.kernelbench import KernelBenchSpec, format_kernel_table, run_kernel_bench

    spec = KernelBenchSpec(
        lengths=[64, 128], heads=4, kv_heads=2, head_dim=16, steps=1, warmup=0, check_len=96, device="cpu"
    )
    out = tmp_path / "speed.json"
    report = run_kernel_bench(spec, str(out), echo=lambda line: None)
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["device"] == "cpu" and len(saved["rows"]) == 4
    assert all(r["correct"] and r["tflops"] > 0 for r in saved["rows"])
    assert set(saved["table_entry"]) == {"causal", "packed"} and "torch_cpu" in saved["table_entry"]["causal"]
    text = format_kernel_table(report)
    assert "default order for dense blocks" in text and "MEASURED" in text


def test_kernel_bench_without_cuda_says_so_and_exits_nonzero(capsys):
    from hf_seqpar.tools import cli

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert cli.main(["bench", "--kernels"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_fullshape_plans_the_longest_row_within_memory_and_time():
    """The GPU check's `longest` part on an 80 GB GPU with 128 GiB of host memory (no GPU needed):
    the longest row fits the device and host fractions, one more step of 4096 tokens does not,
    and the row it runs is the longest whose predicted step fits the time limit."""
    from hf_seqpar.tools.fullshape import (
        DEVICE_FRACTION,
        HOST_FRACTION,
        LONGEST_FEATURES,
        plan_longest,
        predicted_bytes,
        predicted_step_s,
    )

    dev, host = 80 * 2**30, 128 * 2**30
    plan = plan_longest(dev, host, 989.0, 1e9)
    n = plan["longest"]
    assert n > 0 and n % 4096 == 0 and plan["run"] == n
    fits = lambda s: all(
        a <= f * b
        for a, f, b in zip(predicted_bytes(s, LONGEST_FEATURES), (DEVICE_FRACTION, HOST_FRACTION), (dev, host))
    )  # noqa: E731
    assert fits(n) and not fits(n + 4096)
    limited = plan_longest(dev, host, 989.0, 60.0)
    assert limited["longest"] == n and limited["run"] < n
    assert predicted_step_s(limited["run"], 989.0) <= 60.0 < predicted_step_s(limited["run"] + 4096, 989.0)
