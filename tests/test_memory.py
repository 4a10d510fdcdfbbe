"""Chunked lm_head + cross-entropy, tiled MLP and checkpoint offload against the plain model
(single process; the SP versions run in test_accelerate.py), and the per-rank peak-memory benchmark."""

from __future__ import annotations

import copy
import pathlib
import re
import subprocess
import sys

import cases
import cases_matrix
import pytest
import torch

from hf_seqpar.core.logits import LogitTransform, logit_transform
from hf_seqpar.core.memory import ChunkedLMHeadCrossEntropy, install_memory_features, remove_memory_features

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_function_matches_plain_cross_entropy(chunk, bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, 50, (37,), generator=g)
    y[::5] = -100
    n = torch.tensor(41.0, dtype=torch.float64)  # a global count larger than the local one (SP)
    ref = (
        torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), y, ignore_index=-100, reduction="sum")
        / n
    )
    ref_grads = torch.autograd.grad(ref, [t for t in (h, w, b) if t is not None])
    got = ChunkedLMHeadCrossEntropy.apply(h, w, b, y, chunk, n)
    got_grads = torch.autograd.grad(got, [t for t in (h, w, b) if t is not None])
    assert abs(float(got - ref)) <= 1e-12 * abs(float(ref))
    for a, r in zip(got_grads, ref_grads):
        assert _rel(a, r) <= 1e-12


def test_chunked_function_all_ignored_is_zero_not_nan():
    h = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    loss = ChunkedLMHeadCrossEntropy.apply(h, w, None, torch.full((6,), -100), 2, 10)
    loss.backward()
    assert float(loss) == 0.0 and float(h.grad.abs().sum()) == 0.0


def _check_features_match_plain(model, batch, checkpointing=None, **features):
    """Install ``features`` (and optionally checkpointing) on ``model`` and compare loss (1e-6
    relative) and every gradient (1e-5 relative) with a plain copy taken before."""
    reference = copy.deepcopy(model)
    ref = reference(**batch, use_cache=False)
    ref.loss.backward()
    if checkpointing:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
    install_memory_features(model, **features)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-6 * float(ref.loss)
    ref_params = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        assert _rel(p.grad, ref_params[name].grad) <= 1e-5, name


@pytest.mark.parametrize(
    "features",
    [
        dict(loss_chunk_size=5),
        dict(mlp_tiles=4),
        dict(loss_chunk_size=3, mlp_tiles=2, offload_checkpoints=True),
        dict(lean_norms=True),
        dict(loss_chunk_size=3, mlp_tiles=2, offload_checkpoints=True, lean_norms=True),
    ],
)
@pytest.mark.parametrize("checkpointing", [None, "non_reentrant", "reentrant"])
def test_memory_features_match_plain_model(features, checkpointing):
    model = cases.tiny_model(heads=4, kv_heads=2)
    batch = cases.make_batch("padding")
    _check_features_match_plain(model, batch, checkpointing, **features)
    remove_memory_features(model)
    assert "forward" not in model.__dict__ and all("forward" not in m.__dict__ for m in model.modules())
    assert model(**batch, use_cache=False).logits is not None  # the class forward again


@pytest.mark.parametrize("reentrant", [False, True])
def test_offload_sends_the_checkpointed_layer_inputs_through_save_on_cpu(reentrant):
    """With checkpointing and offload, every decoder layer's input (B, S, hidden) is packed by
    save_on_cpu's hook (so on a GPU it lives in host memory until backward)."""
    model = cases.tiny_model(layers=3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    install_memory_features(model, offload_checkpoints=True)
    batch = cases.make_batch()
    seen = []
    orig = torch.autograd.graph.save_on_cpu.__init__

    def spy(self, pin_memory=False, device_type="cuda"):
        orig(self, pin_memory, device_type)
        pack = self.pack_hook
        self.pack_hook = lambda t: (seen.append(tuple(t.shape)), pack(t))[1]

    torch.autograd.graph.save_on_cpu.__init__ = spy
    try:
        model(**batch).loss.backward()
    finally:
        torch.autograd.graph.save_on_cpu.__init__ = orig
    hidden_shape = (*batch["input_ids"].shape, model.config.hidden_size)
    assert seen.count(hidden_shape) >= 3, seen


def test_bad_memory_options():
    model = cases.tiny_model()
    with pytest.raises(ValueError, match="loss_chunk_size"):
        install_memory_features(model, loss_chunk_size=0)


@pytest.mark.e2e
@pytest.mark.slow  # 21 s; test_memory_model QUICK measures loss-chunk peaks
def test_chunked_loss_lowers_peak_memory_per_rank():
    """The benchmark: 2 gloo ranks, 128K vocabulary, 2048 tokens (1024 per rank), peak RSS per rank
    with the plain loss and with the chunked loss. The plain loss holds 1024 x 128256 fp32 logits
    (0.5 GiB) and their gradient; the chunked one 512 x 128256 at a time."""
    cmd = [
        sys.executable,
        str(ROOT / "recipes" / "bench_memory.py"),
        "--nproc",
        "2",
        "--seq-len",
        "2048",
        "--vocab",
        "128256",
        "--chunk",
        "512",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = {
        m.group(1): [float(x) for x in m.group(2).split(",")]
        for m in re.finditer(r"^(plain|chunked) peak_rss_mib_per_rank=([\d.,]+) loss=", proc.stdout, re.M)
    }
    losses = dict(re.findall(r"^(plain|chunked) .* loss=([\d.]+)", proc.stdout, re.M))
    assert set(got) == {"plain", "chunked"}, proc.stdout
    assert abs(float(losses["plain"]) - float(losses["chunked"])) <= 1e-4 * float(losses["plain"]), losses
    logits_mib = 1024 * 128256 * 4 / 2**20  # one rank's fp32 logits
    for rank in range(2):
        assert got["plain"][rank] - got["chunked"][rank] >= logits_mib, (got, logits_mib)


@pytest.mark.parametrize("scale, softcap", [(1 / 3, None), (0.3, 2.0), (1.0, 1.5)])
def test_chunked_function_with_logit_transformation(scale, softcap):
    """scale and soft-capping in the chunked function match the transformed plain logits (fp64)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(23, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 40, (23,), generator=g)
    y[::4] = -100
    z = torch.nn.functional.linear(h, w) * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    ref = torch.nn.functional.cross_entropy(z, y, ignore_index=-100, reduction="sum") / 30.0
    ref_grads = torch.autograd.grad(ref, [h, w])
    got = ChunkedLMHeadCrossEntropy.apply(h, w, None, y, 6, 30.0, scale, softcap)
    got_grads = torch.autograd.grad(got, [h, w])
    assert abs(float(got - ref)) <= 1e-12 * abs(float(ref))
    for a, r in zip(got_grads, ref_grads):
        assert _rel(a, r) <= 1e-12


@pytest.mark.parametrize(
    "family, expected",
    [
        ("llama", LogitTransform()),
        ("granite", LogitTransform(scale=1 / 3.0)),
        ("cohere", LogitTransform(scale=0.3)),
        ("gemma2", LogitTransform(softcap=2.0)),
    ],
)
def test_logit_transform_is_read_from_the_forward(family, expected):
    got = logit_transform(cases_matrix.matrix_model(family))
    assert got.softcap == expected.softcap and abs(got.scale - expected.scale) <= 1e-12, got


@pytest.mark.parametrize("family", ["granite", "cohere", "gemma2", "mixtral", "qwen3_moe"])
def test_memory_features_match_plain_model_across_families(family):
    """Chunked loss (with the family's logit transformation, and the MoE aux loss), tiled MLP
    with B = 2 (MoE blocks `.view` their input) and the lean norms (Granite's, Mixtral's and
    Qwen3-MoE's are Llama-style; Cohere's and Gemma2's are left alone) against the family's own forward."""
    _check_features_match_plain(
        cases_matrix.matrix_model(family),
        cases.make_batch("padding", bsz=2),
        loss_chunk_size=5,
        mlp_tiles=3,
        lean_norms=True,
    )


def test_unknown_logit_transformation_is_refused_naming_the_statement():
    model = cases_matrix.matrix_model("biased_logits")
    with pytest.raises(ValueError, match=r"`logits = logits \+ 0.5`.*loss_chunk_size: null"):
        install_memory_features(model, loss_chunk_size=5)
    assert "forward" not in model.__dict__
