"""GPU-only checks (marked ``gpu``; skipped without CUDA or flash-attn).

The flash-attention path of the Ulysses core runs varlen flash attention over the document
segments of the gathered sequence; here it is compared with transformers' own flash attention on
the unsharded model, on one GPU (SP group of one rank over NCCL), for packed and padded batches.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def nccl_world_of_one():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
@pytest.mark.parametrize("kind", ["packed", "padding", "plain"])
def test_flash_attention_path_matches_unsharded(nccl_world_of_one, kind):
    import copy

    import cases

    import hf_seqpar

    model = cases.tiny_model(attn="flash_attention_2", heads=4, kv_heads=2).cuda().to(torch.bfloat16)
    batch = {k: v.cuda() for k, v in cases.make_batch(kind, seq=256).items()}
    reference = copy.deepcopy(model)
    ref = reference(**batch, use_cache=False)
    hf_seqpar.enable_sequence_parallel(model, "ulysses", 1)
    out = model(**hf_seqpar.shard_batch(batch, model))
    logits = hf_seqpar.gather_sequence(out.logits, model)
    valid = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    # bf16: both runs use the same flash kernel on the same segments; allow bf16 rounding
    torch.testing.assert_close(logits[valid].float(), ref.logits[valid].float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.loss.float(), ref.loss.float(), atol=1e-2, rtol=1e-2)


def _grad_error(model, ref32) -> float:
    """The largest relative gradient error over the parameters, ``|g - g32| / |g32|`` (norms)."""
    ref = dict(ref32.named_parameters())
    errs = [
        float((p.grad.float() - ref[n].grad).norm() / ref[n].grad.norm().clamp_min(1e-12))
        for n, p in model.named_parameters()
        if p.grad is not None
    ]
    return max(errs)


def _gpu_pair(strategy: str, kind: str, mode: str, features: dict | None = None, model_kw: dict | None = None):
    """One batch on one GPU (world of one), the SP model against the fp32 and the bf16 unsharded
    models: ``{"loss", "loss32", "loss16", "grad", "grad16"}`` (gradient errors by :func:`_grad_error`
    against the fp32 model), plus ``"logits"``/``"logits16"`` (max abs error against the fp32
    logits) when the SP model returns logits."""
    import copy

    import cases

    import hf_seqpar
    from hf_seqpar.integrations.accelerate import SequenceParallelPlugin, prepare_model

    base = cases.tiny_model(**{"heads": 4, "kv_heads": 2, **(model_kw or {})}).cuda()
    batch = {k: v.cuda() for k, v in cases.make_batch(kind, seq=256).items()}
    valid = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    ref32 = copy.deepcopy(base)
    out32 = ref32(**batch, use_cache=False)
    weights = torch.bfloat16 if mode == "bf16-weights" else torch.float32
    ref16, model = copy.deepcopy(base).to(weights), copy.deepcopy(base).to(weights)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "autocast"):
        out16 = ref16(**batch, use_cache=False)
        if features:
            prepare_model(model, SequenceParallelPlugin(strategy=strategy, sp_size=1, **features))
        else:
            hf_seqpar.enable_sequence_parallel(model, strategy, 1)
        out = model(**hf_seqpar.shard_batch(batch, model))
    out.loss.backward()  # the backward runs too (kernels' backward paths), and must be finite
    out16.loss.backward()
    out32.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    result = {
        "loss": float(out.loss),
        "loss32": float(out32.loss),
        "loss16": float(out16.loss),
        "grad": _grad_error(model, ref32),
        "grad16": _grad_error(ref16, ref32),
    }
    if out.logits is not None:
        logits = hf_seqpar.gather_sequence(out.logits, model)
        result["logits"] = float((logits[valid].float() - out32.logits[valid]).abs().max())
        result["logits16"] = float((out16.logits[valid].float() - out32.logits[valid]).abs().max())
    return result


def _assert_within_bf16_model(r: dict) -> None:
    """The SP model's errors against the fp32 model bounded by the unsharded bf16 model's own: loss
    within 2x (+ 1% of the loss), logits within 2x (+ 2e-2, a bf16 ulp at their scale), every
    parameter's gradient within 2x (+ 2e-2, a few bf16 steps)."""
    assert abs(r["loss"] - r["loss32"]) <= 2 * abs(r["loss16"] - r["loss32"]) + 1e-2 * abs(r["loss32"])
    if "logits" in r:
        assert r["logits"] <= 2 * r["logits16"] + 2e-2
    assert r["grad"] <= 2 * r["grad16"] + 2e-2, f"gradient error {r['grad']:.3g} vs the bf16 model's {r['grad16']:.3g}"


@pytest.mark.parametrize("mode", ["bf16-weights", "autocast"])
@pytest.mark.parametrize("kind", ["plain", "padding", "packed"])
@pytest.mark.parametrize("strategy", ["ulysses", "ring", "hybrid"])
def test_strategies_match_unsharded_in_bf16_on_one_gpu(nccl_world_of_one, strategy, kind, mode):
    """Each strategy at sp_size=1 on the GPU kernels, in bf16 weights and under bf16 autocast, for
    one-document, padded and packed rows. The SP model's error against the fp32 model is bounded
    by the unsharded model's own bf16 error (x2 + a bf16 ulp at the logits' scale): the same
    precision, different kernels and summation orders. Every parameter's gradient likewise: its
    relative error against the fp32 model within 2x the bf16 model's (+ 2e-2, a few bf16 steps)."""
    r = _gpu_pair(strategy, kind, mode)
    assert "logits" in r
    _assert_within_bf16_model(r)


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_memory_features_on_one_gpu(nccl_world_of_one, strategy):
    """Chunked loss, MLP tiles and checkpointing (offloaded) with each strategy on the GPU, bf16."""
    features = dict(loss_chunk_size=64, mlp_tiles=2, gradient_checkpointing=True, offload_checkpoints=True)
    _assert_within_bf16_model(_gpu_pair(strategy, "packed", "bf16-weights", features))


@pytest.mark.parametrize("kind", ["plain", "packed"])
@pytest.mark.parametrize("strategy", ["ulysses", "ring", "hybrid"])
def test_sliding_window_on_one_gpu(nccl_world_of_one, strategy, kind):
    """A sliding-window model (Mistral, window 37 over 256 tokens): ring and hybrid plan window-band
    tiles with masks, which run on the memory-efficient kernel (forward and backward), the one
    path the unwindowed cases above leave to the kernel sweep. Same bounds as above."""
    r = _gpu_pair(strategy, kind, "bf16-weights", model_kw=dict(family="mistral", sliding_window=37))
    assert "logits" in r
    _assert_within_bf16_model(r)


# ---- grouped K/V heads passed to the CUDA kernels as they are (kernels/gqa.py) --------------------


@pytest.mark.parametrize("name", ["cuda_flash", "cuda_cudnn", "cuda_efficient"])
@pytest.mark.parametrize("masked", [False, True])
def test_gqa_kernels_take_kv_heads_and_match_the_expanded_call(name, masked):
    """Each CUDA backend on 32 query / 8 kv heads (the Llama-3.1-8B grouping), forward and backward,
    against the float64 reference and against the same backend given K/V expanded to 32 heads; a
    kernel whose native grouped call fails here on this torch is a row to change in kernels/gqa.py."""
    from hf_seqpar.kernels import BACKENDS, block_backward, block_forward, reference_backward, reference_forward
    from hf_seqpar.kernels.gqa import GQA, expand_kv, fold_kv

    if masked and not BACKENDS[name].supports_mask:
        pytest.skip("takes no masks")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, 384, 128, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(1, 8, 384, 128, device="cuda", generator=g).bfloat16() for _ in range(2))
    mask = (torch.rand(1, 1, 384, 384, device="cuda", generator=g) > 0.3) if masked else None
    kw = dict(scale=128**-0.5, causal=not masked, mask=mask)
    out, lse = block_forward(q, k, v, backend=name, **kw)
    dout = torch.randn_like(out)
    dq, dk, dv = block_backward(dout, q, k, v, out, lse, backend=name, **kw)
    assert dk.shape == k.shape and dv.shape == v.shape
    ref, ref_lse = reference_forward(q, k, v, **kw)
    rq, rk, rv = reference_backward(dout, q, k, v, ref, ref_lse, **kw)
    assert float((out.double() - ref).abs().max()) < 3e-2
    for a, b in ((dq, rq), (dk, rk), (dv, rv)):
        assert float((a.double() - b).abs().max() / b.abs().max()) < 5e-2
    ke, ve = expand_kv(q, k, v)
    out_e, lse_e = block_forward(q, ke, ve, backend=name, **kw)
    _, dke, dve = block_backward(dout, q, ke, ve, out_e, lse_e, backend=name, **kw)
    torch.testing.assert_close(out, out_e, atol=2e-2, rtol=2e-2)
    for a, b in ((dk, fold_kv(dke, 8)), (dv, fold_kv(dve, 8))):
        assert float((a.float() - b.float()).abs().max() / b.float().abs().max()) < 2e-2
    assert GQA[name].native == (name != "cuda_efficient")


def test_gqa_native_flash_backward_holds_less_than_the_expanded_one():
    """Peak memory of aten's flash backward on grouped heads, native against expanded K/V: the
    expanded call holds the two expanded K/V copies (2 x 2 x 32 x 128 B per token) where the native
    one holds the kv-head dk/dv beside the kernel's expanded ones (2 x 2 x 8 x 128): 12,288 B per
    token less, as the memory model's cuda_kernel_backward_bytes says (kernels/gqa.py)."""
    from hf_seqpar.kernels import block_backward, block_forward
    from hf_seqpar.kernels.gqa import expand_kv

    s = 16384
    q = torch.randn(1, 32, s, 128, device="cuda").bfloat16()
    k, v = (torch.randn(1, 8, s, 128, device="cuda").bfloat16() for _ in range(2))
    out, lse = block_forward(q, k, v, scale=0.088, causal=True, backend="cuda_flash")
    dout = torch.randn_like(out)

    def peak(fn):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    native = peak(lambda: block_backward(dout, q, k, v, out, lse, scale=0.088, causal=True, backend="cuda_flash"))

    def expanded():
        ke, ve = expand_kv(q, k, v)
        return block_backward(dout, q, ke, ve, out, lse, scale=0.088, causal=True, backend="cuda_flash")

    saving = peak(expanded) - native
    assert 0.9 * 12288 * s < saving < 1.1 * 12288 * s, saving / s
