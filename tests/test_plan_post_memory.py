"""``hf-seqpar plan --post-training dpo``'s memory prediction against a measured DPO step on 2 CPU ranks.

Measured (hf_seqpar.tools.memcheck_post): the peak resident memory of one DPO step as TRL's
DPOTrainer runs it under hf_seqpar (policy forward of the 2B concatenated rows through TRL's fused
head and hf_seqpar's sharded call, the reference forward under no_grad, the sigmoid loss, the
backward) minus the resident memory before it. Predicted: the planner's phases for the same step
(fp32, TRL's torch fallback of the fused head, the step's gradients in the peak); no constant is
fitted. Within 15%, as the SFT memory model (tests/test_memory_model.py). Slow (about 20 s a
case on 2 shared cores, plus its own ranks' start-up).
"""

from __future__ import annotations

import pytest

from hf_seqpar.tools.memcheck_post import DPOCase, measure_dpo, predict_dpo

#: measure_dpo sets the ranks' allocator and measures their resident memory: ranks of its own
PRIVATE_POOLS = True
TOL = 0.15


def _ratio(pool, case):
    measured = max(r["peak_bytes"] for r in pool.run(measure_dpo, case))
    pred = predict_dpo(case)
    return pred["device_bytes"] / measured, measured, pred


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [DPOCase("ulysses", 2048), DPOCase("ulysses", 2048, checkpointing=True), DPOCase("ring", 2048)],
    ids=lambda c: c.label,
)
def test_dpo_step_peak_within_15_percent(pool2, case):
    ratio, measured, pred = _ratio(pool2, case)
    assert abs(ratio - 1) <= TOL, (case.label, measured, pred)
