"""Rank-side cases of tests/test_generate.py: hf_seqpar.generate against the unsharded model's
generate (tokens, per-step logits, KV bytes), and the refusals."""

from __future__ import annotations

import cases
import torch
import torch.distributed as dist

#: Tokens the generated answers are compared on.
NEW_TOKENS = 32


def prompt(kind: str, seq: int, seed: int = 3) -> dict:
    """``doc``: one row of ``seq`` tokens; ``padded``: two rows, row 0 left-padded by a third."""
    g = torch.Generator().manual_seed(seed)
    if kind == "doc":
        return {"input_ids": torch.randint(3, cases.VOCAB, (1, seq), generator=g)}
    ids = torch.randint(3, cases.VOCAB, (2, seq), generator=g)
    mask = torch.ones(2, seq, dtype=torch.long)
    mask[0, : seq // 3] = 0
    ids[0, : seq // 3] = 0  # pad token 0
    return {"input_ids": ids, "attention_mask": mask}


def _model(model_kw: dict | None):
    model = cases.tiny_model(**(model_kw or {})).eval()
    model.config.max_position_embeddings = 1 << 20  # the RoPE tables do not depend on it
    model.generation_config.pad_token_id = 0
    model.generation_config.use_cache = True
    model.generation_config.eos_token_id = None  # every row runs the full NEW_TOKENS steps
    return model


def generate_parity(
    strategy: str,
    kind: str = "doc",
    seq: int = 2048,
    sample: bool = False,
    options: dict | None = None,
    model_kw: dict | None = None,
    new: int = NEW_TOKENS,
) -> dict:
    """Unsharded ``generate`` and ``hf_seqpar.generate`` of the same fp32 tiny model and prompt.

    Returns:
        per rank: ``same_tokens``, the worst per-step logit difference ``logit_err``, the number of
        steps, this rank's sequences (to compare across ranks) and the cache's byte report.
    """
    import hf_seqpar

    batch = prompt(kind, seq)
    kw = dict(
        max_new_tokens=new, do_sample=sample, return_dict_in_generate=True, output_logits=True, output_scores=True
    )
    if sample:
        kw.update(temperature=0.7, top_k=20)
    ref_model = _model(model_kw)
    torch.manual_seed(1234)
    ref = ref_model.generate(**batch, **kw)
    model = hf_seqpar.enable_sequence_parallel(_model(model_kw), strategy, **(options or {}))
    torch.manual_seed(1234)
    out = hf_seqpar.generate(model, **batch, **kw)
    errs = [float((a - b).abs().max()) for a, b in zip(ref.logits, out.logits)]
    report = out.cache.report()
    layout = model.hf_seqpar_state.last_layout  # None for a one-token prompt (nothing to prefill)
    report["padded_prompt_positions"] = layout.local_len if layout is not None else 0
    return {
        "same_tokens": torch.equal(ref.sequences, out.sequences),
        "logit_err": max(errs),
        "steps": len(out.logits),
        "ref_steps": len(ref.logits),
        "sequences": out.sequences,
        "scores_equal_shape": [tuple(s.shape) for s in out.scores] == [tuple(s.shape) for s in ref.scores],
        "report": report,
        "sp_size": dist.get_world_size(),
        "ref_kv_bytes": _dynamic_cache_bytes(ref.cache),
    }


def _dynamic_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def refusals() -> dict:
    """Each unsupported call raises before any forward ran: ``{case: (message, forwards)}``."""
    import hf_seqpar

    model = hf_seqpar.enable_sequence_parallel(_model(None), "ulysses")
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    batch = prompt("doc", 64)
    left_pad = {"input_ids": batch["input_ids"].repeat(2, 1), "attention_mask": torch.ones(2, 64, dtype=torch.long)}
    left_pad["attention_mask"][1, -3:] = 0
    bad = {
        "beams": dict(num_beams=2),
        "assisted": dict(prompt_lookup_num_tokens=3),
        "static": dict(cache_implementation="static"),
        "no_cache": dict(use_cache=False),
        "chunks": dict(prefill_chunk_size=16),
        "attentions": dict(output_attentions=True, return_dict_in_generate=True),
        "hidden": dict(output_hidden_states=True, return_dict_in_generate=True),
        "guidance": dict(guidance_scale=1.5),
    }
    out = {}
    for name, kw in bad.items():
        out[name] = (cases.expect_error(hf_seqpar.generate, model, **batch, max_new_tokens=2, **kw), len(calls))
    out["right_padding"] = (cases.expect_error(hf_seqpar.generate, model, **left_pad, max_new_tokens=2), len(calls))
    handle.remove()
    hf_seqpar.disable_sequence_parallel(model)
    megatron = hf_seqpar.enable_sequence_parallel(_model(None), "megatron")
    out["megatron"] = (cases.expect_error(hf_seqpar.generate, megatron, **batch, max_new_tokens=2), 0)
    return out
