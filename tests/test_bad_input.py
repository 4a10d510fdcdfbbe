"""Bad input raises a clear exception that names the problem and the fix; nothing hangs."""

from __future__ import annotations

import cases
import pytest
import torch.distributed as dist

import hf_seqpar

EXPECTED = {
    # case: (exception type, words the message must contain)
    "sp_not_dividing_world": ("ValueError", ["world size 2", "sp_size=3", "[1, 2]"]),
    "heads_not_divisible": ("HeadsNotDivisibleError", ["3 query heads", "ring", "hybrid", "[1, 3]"]),
    "not_through_registry": ("TypeError", ["BloomForCausalLM", "AttentionInterface"]),
    "unknown_attn_impl": ("ValueError", ["my_custom_attention", "sdpa", "eager", "flash_attention_2"]),
    "unknown_strategy": ("ValueError", ["spiral", "ulysses", "ring", "hybrid", "megatron"]),
    "unknown_option": ("ValueError", ["ring_size", "ulysses"]),
    "shard_without_sp": ("RuntimeError", ["enable_sequence_parallel"]),
    "empty_sequence": ("ValueError", ["empty batch", "(2, 0)"]),
    "unknown_batch_key": ("ValueError", ["pixel_values"]),
    "forward_without_shard_batch": ("RuntimeError", ["shard_batch", "disable_sequence_parallel"]),
    "different_batches": ("BatchMismatchError", ["different batches", "SP ranks [1]", "DistributedSampler"]),
    "different_lengths": ("BatchMismatchError", ["[[2, 30], [2, 31]]"]),
    "enable_twice_differently": ("ValueError", ["already enabled", "disable_sequence_parallel"]),
    "first_mismatch": ("BatchMismatchError", ["different batches"]),
}


@pytest.fixture(scope="module")
def messages(pool2):
    return pool2.run(cases.bad_inputs)


@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_input_message(messages, case):
    kind, words = EXPECTED[case]
    for rank_messages in messages:  # every rank raises, so no rank waits in a collective
        msg = rank_messages[case]
        assert msg.startswith(kind + ":"), msg
        for w in words:
            assert w in msg, f"{w!r} missing from: {msg}"


def test_enable_is_idempotent_and_disable_restores(messages):
    for m in messages:
        assert m["enable_twice_same_is_noop"] is True
        assert m["disabled_restores"] is True


def test_not_initialised_names_the_fix():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        hf_seqpar.enable_sequence_parallel(cases.tiny_model())


def test_unknown_strategy_rejected_before_distributed():
    with pytest.raises(ValueError, match="valid strategies are: hybrid, megatron, ring, ulysses"):
        hf_seqpar.enable_sequence_parallel(cases.tiny_model(), strategy="zigzag")
