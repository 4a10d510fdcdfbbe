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
