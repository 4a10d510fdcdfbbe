"""The leaner recomputed layer (issue 23): the lean RMSNorm and attention gradients without
whole-sequence fp32 accumulators compute the same numbers as before, bit for bit (fp32, bf16, fp64).

So the tolerances of SP against the unsharded model do not change: ``tests/test_matrix.py`` runs every
strategy through ``prepare_model`` (``lean_norms`` on by default, in fp32 and in bf16 with the bf16
tolerances of ``tests/cases.py``), and ``tests/test_memory.py`` the memory features with and without it."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from test_segments import KINDS, MASKS, structure

from hf_seqpar.core import norm as lean
from hf_seqpar.core.segments import TILE, build_segments, plan_pieces
from hf_seqpar.kernels.varlen import _shared_ranges, pieces_backward, pieces_forward, pieces_gradients, pieces_output


def _llama_norm(h=64, dtype=torch.float32, seed=0):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(seed)
    m = LlamaRMSNorm(h, eps=1e-5).to(dtype)
    m.weight.data.normal_()
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk", [7, 2048])
def test_lean_norm_is_bitwise_transformers_norm(monkeypatch, dtype, chunk):
    """Same forward, input gradient and weight gradient as LlamaRMSNorm, bit for bit (the backward
    applies autograd's own derivative formulas in the same order and dtypes, per token chunk)."""
    monkeypatch.setattr(lean, "BACKWARD_CHUNK", chunk)
    hf = _llama_norm(dtype=dtype)
    mine = copy.deepcopy(hf)
    assert lean.install_lean_norms(mine) == 1
    x = torch.randn(2, 33, 64, dtype=dtype) * 3
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = hf(xa), mine(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad) and torch.equal(hf.weight.grad, mine.weight.grad)
    lean.remove_lean_norms(mine)
    assert "forward" not in mine.__dict__


def test_lean_norm_saves_input_and_rstd_only():
    """What autograd keeps: transformers' norm an fp32 copy of a bf16 input (twice), rsqrt and the
    normalised input; the lean one the input itself and the fp32 rstd (plus the weight)."""
    saved = {}
    for name, m in (("hf", _llama_norm(dtype=torch.bfloat16)), ("lean", _llama_norm(dtype=torch.bfloat16))):
        if name == "lean":
            lean.install_lean_norms(m)
        x = torch.randn(1, 100, 64, dtype=torch.bfloat16, requires_grad=True)
        got: list = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, got=got: got.append(t) or t, lambda t: t):
            m(x)
        saved[name] = sum(t.numel() * t.element_size() for t in got if t is not m.weight)
    assert saved["lean"] == 100 * (64 * 2 + 4)  # x in bf16, rstd in fp32
    assert saved["hf"] >= 100 * (2 * 64 * 4 + 64 * 2 + 4)  # x32 (pow and mul), n, rsqrt


def test_norm_table_holds_only_llama_forwards():
    """Every class in the table has Llama's forward, line for line; Gemma's and Olmo2's are not in it."""
    import importlib
    import re

    def body(cls):
        return re.sub(r"\s+", " ", inspect.getsource(cls.forward).split(":", 1)[1].split('"""')[-1]).strip()

    modules = {
        "LlamaRMSNorm": "llama",
        "MistralRMSNorm": "mistral",
        "MixtralRMSNorm": "mixtral",
        "Qwen2RMSNorm": "qwen2",
        "Qwen2MoeRMSNorm": "qwen2_moe",
        "Qwen3RMSNorm": "qwen3",
        "Qwen3MoeRMSNorm": "qwen3_moe",
        "Phi3RMSNorm": "phi3",
        "GraniteRMSNorm": "granite",
    }
    assert set(modules) == set(lean.LLAMA_STYLE_NORMS)
    get = lambda name: getattr(
        importlib.import_module(f"transformers.models.{modules[name]}.modeling_{modules[name]}"), name
    )  # noqa: E731
    reference = body(get("LlamaRMSNorm"))
    for name in modules:
        assert body(get(name)) == reference, name
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    assert body(GemmaRMSNorm) != reference and body(Olmo2RMSNorm) != reference
    assert lean.install_lean_norms(torch.nn.Sequential(GemmaRMSNorm(8))) == 0  # left untouched


# ---- attention gradients without whole-sequence fp32 accumulators ---------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal,window", MASKS, ids=lambda x: str(x))
@pytest.mark.parametrize("kind", KINDS)
def test_piece_gradients_equal_fp32_accumulation(kind, causal, window, dtype):
    """pieces_gradients gives exactly what fp32 accumulators over the whole sequence cast at the end gave."""
    s = 48
    valid, docs = structure(kind, s)
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, h, s, 8, generator=g).to(dtype) for h in (4, 2, 2, 4))
    pieces = plan_pieces(build_segments(valid, docs), [(0, s)], [(0, s)], causal, window)
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full(q.shape[:3], float("-inf"))
    pieces_forward(q, k, v, pieces, out, lse, scale=0.3)
    out = out.to(dtype)
    accs = [torch.zeros(t.shape, dtype=torch.float32) for t in (q, k, v)]
    pieces_backward(dout, q, k, v, out, lse, pieces, *accs, scale=0.3)
    got = pieces_gradients(dout, q, k, v, out, lse, pieces, scale=0.3)
    for name, a, b in zip("qkv", accs, got):
        assert b.dtype == dtype and torch.equal(a.to(dtype), b), f"d{name}"


def _whole_sequence_output(q, k, v, pieces):
    """The attention output as before pieces_output: fp32 out/lse accumulators over the whole sequence."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    lse = torch.full(q.shape[:3], float("-inf"))
    pieces_forward(q, k, v, pieces, out, lse, scale=0.3)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal,window", MASKS, ids=lambda x: str(x))
@pytest.mark.parametrize("kind", KINDS)
def test_piece_output_equals_fp32_accumulation(kind, causal, window, dtype):
    """pieces_output gives exactly what the fp32 accumulators over the whole sequence, cast at the
    end, gave: the output bit for bit in the compute dtype, the fp32 lse bit for bit."""
    s = 48
    valid, docs = structure(kind, s)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, s, 8, generator=g).to(dtype) for h in (4, 2, 2))
    pieces = plan_pieces(build_segments(valid, docs), [(0, s)], [(0, s)], causal, window)
    out, lse = _whole_sequence_output(q, k, v, pieces)
    got_out, got_lse = pieces_output(q, k, v, pieces, scale=0.3)
    assert got_out.dtype == dtype and torch.equal(out.to(dtype), got_out)
    assert got_lse.dtype == torch.float32 and torch.equal(lse, got_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_piece_output_merges_shared_queries_in_fp32(dtype):
    """Where several pieces write the same queries (a window over two tiles: the second tile's band
    and diagonal; the zigzag shard's second chunk: its full and causal pieces) the merge runs in
    fp32 accumulators over just those: still the whole-sequence accumulation's numbers, bit for bit."""
    g = torch.Generator().manual_seed(1)
    n = 1024
    for chunks, window in (([(0, n)], 5), ([(0, n // 4), (3 * n // 4, n)], None)):
        s = sum(b - a for a, b in chunks)
        q, k, v = (torch.randn(1, h, s, 8, generator=g).to(dtype) for h in (4, 2, 2))
        pieces = plan_pieces(build_segments(torch.ones(1, n, dtype=torch.bool), None), chunks, chunks, True, window)
        assert _shared_ranges(pieces, False), "no shared query ranges: the case tests nothing"
        out, lse = _whole_sequence_output(q, k, v, pieces)
        got_out, got_lse = pieces_output(q, k, v, pieces, scale=0.3)
        assert torch.equal(out.to(dtype), got_out) and torch.equal(lse, got_lse)


def test_one_document_needs_no_fp32_accumulator():
    s = 64
    one = plan_pieces(build_segments(torch.ones(2, s, dtype=torch.bool), None), [(0, s)], [(0, s)], True, None)
    assert len(one) == 1 and _shared_ranges(one, False) == [] and _shared_ranges(one, True) == []
    valid, docs = structure("short_docs", s)
    packed = plan_pieces(build_segments(valid, docs), [(0, s)], [(0, s)], True, None)
    n = 4 * TILE
    windowed = plan_pieces(build_segments(torch.ones(1, n, dtype=torch.bool), None), [(0, n)], [(0, n)], True, 5)
    assert len(windowed) > 1 and _shared_ranges(windowed, True)  # band tiles share keys: those are summed in fp32
    assert all(b - a < s for _, (a, b) in _shared_ranges(packed, False))  # only where small docs share a tile


def test_plugin_field_is_checked_and_can_turn_it_off():
    from hf_seqpar.core.memory import install_memory_features, remove_memory_features
    from hf_seqpar.integrations.accelerate import SequenceParallelPlugin

    assert SequenceParallelPlugin().lean_norms is True
    with pytest.raises(ValueError, match="lean_norms: must be true or false"):
        SequenceParallelPlugin(lean_norms="yes")
    model = torch.nn.Sequential(_llama_norm(), _llama_norm())
    install_memory_features(model, lean_norms=False)
    assert all("forward" not in m.__dict__ for m in model)
    install_memory_features(model, lean_norms=True)
    assert all(m.__dict__["forward"].__func__ is lean.lean_forward for m in model)
    remove_memory_features(model)
    assert all("forward" not in m.__dict__ for m in model)
