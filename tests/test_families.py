"""Model families against the unsharded model on 2 gloo ranks: exact, or refused at enable time.

- ``attention_mask`` with restarting ``position_ids`` is refused by ``shard_batch`` (ambiguous in
  transformers), and the fix it names is exact;
- GPT-OSS (attention sinks): Ulysses exact, ring and hybrid refused up front naming Ulysses;
- multi-head latent attention (DeepSeek-V3, ``v_head_dim != qk_head_dim``): Ulysses exact, ring
  refused up front;
- non-causal sliding windows (Gemma3 ``use_bidirectional_attention=True``): exact on Ulysses and ring;
- the family matrix: every causal-LM family of transformers is exact (plain and packed batch,
  Ulysses and ring: loss, logits, every gradient) or refused by ``enable_sequence_parallel``.
  A representative subset runs by default, every family with ``-m slow``.

Tolerances: ``cases.check_parity`` (fp32, a few ulps of reordered reductions).
"""

from __future__ import annotations

import cases
import family_cases as fc
import family_table
import pytest

#: The default run: one family of each kind (dense GQA, sliding window, softcap (ring refuses),
#: MoE with qk-norm, fused qkv, logit scalings, linear attention (refused)). GPT-OSS, DeepSeek-V3
#: and Gemma3 have tests of their own above.
SUBSET = ["llama", "mistral", "gemma2", "qwen3_moe", "phi3", "granite", "minimax"]


def _check_all(results: list[dict]) -> None:
    for r in results:
        cases.check_parity([r])


def test_mask_with_restarting_positions_is_refused_before_any_collective(pool2):
    for r in pool2.run(fc.mask_and_restarting_positions):
        for key in ("ones", "padding"):
            msg = r[key]
            assert msg.startswith("ValueError") and "restart" in msg and "drop `attention_mask`" in msg, msg
            assert "transformers ignores the documents" in msg, msg
        assert r["collectives_before_refusal"] == 0
        assert r["transformers_mask_vs_no_mask"] > 1e-3  # the two readings really differ
        for strategy in ("ulysses", "ring"):
            cases.check_parity([r[f"{strategy}_without_mask"], r[f"{strategy}_left_padding_cumsum_positions"]])


def test_gpt_oss_sinks_exact_on_ulysses_refused_up_front_by_ring(pool2):
    for r in pool2.run(fc.gpt_oss_sinks):
        for kv in (2, 1):
            _check_all(list(r[f"ulysses_kv{kv}"].values()))
        for strategy in ("ring", "hybrid"):
            assert "attention sinks" in r[strategy] and "strategy='ulysses'" in r[strategy], r[strategy]
        assert "gpt_oss builds its attention mask without position_ids" in r["packed"], r["packed"]


def test_mla_exact_on_ulysses_refused_up_front_by_ring(pool2):
    for r in pool2.run(fc.mla):
        assert r["dims"] == (16, 12)
        _check_all(list(r["ulysses"].values()))
        assert "value heads of another size (12)" in r["ring"] and "strategy='ulysses'" in r["ring"], r["ring"]


def test_gemma3_bidirectional_sliding_window_exact(pool2):
    for r in pool2.run(fc.gemma3_bidirectional):
        assert r["is_causal"] and not any(r["is_causal"]) and "sliding_attention" in r["layer_types"], r
        _check_all(list(r["ulysses"].values()) + list(r["ring"].values()))


def _family_matrix(pool, model_type: str) -> None:
    if not fc.through_registry(model_type):  # refused by enable_sequence_parallel, see test_bad_input
        pytest.skip(f"{model_type} bypasses the attention registry (refused at enable time)")
    result = pool.run(fc._family_check_quiet, model_type)[0]
    documented = family_table.doc_rows().get(model_type)
    assert family_table.row(model_type, result) == documented, (
        f"docs/model-families.md is out of date for {model_type}: run python tests/family_table.py --write {model_type}"
    )
    if "build_error" in result:
        pytest.skip(f"the tiny {model_type} config does not build: {result['build_error']}")
    for strategy in ("ulysses", "ring"):
        ok, text = fc.verdict(result[strategy])
        assert ok, f"{model_type} on {strategy}: {text}"


@pytest.mark.parametrize("model_type", SUBSET)
def test_family_exact_or_refused(pool2, model_type):
    _family_matrix(pool2, model_type)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [f for f in fc.causal_lm_families() if f not in SUBSET])
def test_every_family_exact_or_refused(pool2, model_type):
    _family_matrix(pool2, model_type)
