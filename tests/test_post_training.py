"""Post-training under sequence parallelism on 2 gloo ranks: the log-prob primitive
(hf_seqpar.core.logprobs) against the unsharded computation, and TRL's DPOTrainer with
SequenceParallelMixin against the one-process DPOTrainer."""

from __future__ import annotations

import pytest

import cases_post_training

#: fp32 values: the same sums in another order (~1e-6 relative); gradients are sums over more
#: terms in another order (the project's SP gradient tolerance)
VALUE_TOL, GRAD_TOL = 1e-5, 1e-4


@pytest.mark.parametrize("strategy", ["ulysses", "ring"])
def test_logprobs_sums_gather_and_gradients_match_unsharded(pool2, strategy):
    """Per-row sums, per-token log-probs and entropies gathered in original order, and every
    parameter gradient (DDP mean over the ranks) equal the unsharded full-logits computation."""
    for r in pool2.run(cases_post_training.logprob_parity, strategy):
        assert r["local_len"] < r["seq"], r  # the rows really are split
        for key in ("sums", "tokens", "entropy", "loss"):
            assert r[key] <= VALUE_TOL, (strategy, key, r)
        assert r["grads"] <= GRAD_TOL, (strategy, r)
