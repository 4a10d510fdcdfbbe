"""Measure a DPO step on CPU ranks against ``hf-seqpar plan --post-training dpo``'s prediction.

One step as TRL 1.16's ``DPOTrainer`` runs it under hf_seqpar (:mod:`hf_seqpar.integrations.trl_dpo`):
the policy's concatenated forward of ``2B`` rows (chosen, then rejected) through TRL's fused LM head
and hf_seqpar's sharded call, the reference model's forward under ``no_grad`` (SP on the policy's mesh,
no checkpointing), the sigmoid DPO loss of the gathered per-token log-probs, the backward. Measured as
:mod:`hf_seqpar.tools.memcheck` measures an SFT step (peak resident memory minus the resident memory
before the step, second step, gradients set to None before it, glibc serving every large allocation
with its own mapping), so both models and the batch are in the baseline and the step's activations,
the reference forward's transients and the gradients are in the peak.

Predicted: :func:`predict_dpo` (fp32, TRL's torch fallback of the fused head, the step's gradients
in the peak, no optimizer): the larger of the policy's training-step peak
(:func:`hf_seqpar.tools.memmodel.peak_memory` with ``2B`` rows and the fused head) and the
reference-forward phase of :mod:`hf_seqpar.tools.plan_post`. The reference model's weights are in
the baseline, so they are not part of this comparison (their planner term is exact arithmetic:
``params x bytes``).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from .bench import _PeakRSS, malloc_follows_tensors, status_bytes

__all__ = ["DPOCase", "dpo_config", "measure_dpo", "predict_dpo"]


@dataclass(frozen=True)
class DPOCase:
    """One measured DPO step (the model: :func:`dpo_config`)."""

    strategy: str
    """``ulysses`` or ``ring`` (the SP degree is the world size)."""
    seq_len: int
    """Tokens per row (chosen and rejected rows are padded to one length by TRL)."""
    pairs: int = 1
    """Pairs per micro-batch (``2 x pairs`` rows)."""
    checkpointing: bool = False
    """Per-layer activation checkpointing of the policy (the reference runs without)."""

    @property
    def label(self) -> str:
        return f"dpo {self.strategy} S={self.seq_len} pairs={self.pairs}{' ckpt' if self.checkpointing else ''}"


def dpo_config(layers: int = 4):
    """:func:`hf_seqpar.tools.memcheck.tiny_shape_config` with a 256-token (byte) vocabulary."""
    from .memcheck import tiny_shape_config

    return tiny_shape_config(layers, vocab_size=256)


def _model(case: DPOCase, mesh, train: bool):
    import hf_seqpar
    from hf_seqpar.integrations.trl_dpo import install_sharded_fused_forward

    torch.manual_seed(0)
    from transformers import LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    model = LlamaForCausalLM(dpo_config())
    model.train(train)
    if train and case.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not train:
        model.requires_grad_(False)
    # TRL's DPOTrainer asks for these fields (the WPO weights' log_sum_sq_probs only with use_weighting)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1") if train else ("log_probs",))
    import torch.distributed as dist

    hf_seqpar.enable_sequence_parallel(model, case.strategy, dist.get_world_size(), mesh=mesh)
    install_sharded_fused_forward(model)
    return model


def measure_dpo(case: DPOCase) -> dict:
    """Measure ``case`` on this rank (every rank of the default gloo group calls it).

    Returns:
        ``{"peak_bytes", "rank"}``.
    """
    import torch.distributed as dist
    import torch.nn.functional as F

    from hf_seqpar.core.mesh import find_state

    malloc_follows_tensors()
    policy = _model(case, None, True)
    ref = _model(case, find_state(policy).mesh, False)
    rows = 2 * case.pairs
    ids = torch.randint(0, 256, (rows, case.seq_len), generator=torch.Generator().manual_seed(1))
    world = dist.get_world_size()
    warm = ids[:, : 64 * world].contiguous()
    peak = 0
    for batch in (warm, ids):
        call = dict(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch, fused_lm_head=True)
        policy.zero_grad(set_to_none=True)
        gc.collect()
        before = status_bytes("VmRSS")
        _PeakRSS.reset()
        logps = policy(**call).log_probs.sum(1)
        with torch.no_grad():
            ref_logps = ref(**call).log_probs.sum(1)
        chosen, rejected = (logps - ref_logps).chunk(2)
        loss = -F.logsigmoid(0.1 * (chosen - rejected)).mean()
        loss.backward()
        peak = status_bytes("VmHWM") - before
        del logps, ref_logps, chosen, rejected, loss
    import hf_seqpar

    for m in (policy, ref):
        hf_seqpar.disable_sequence_parallel(m)
    del policy, ref
    gc.collect()
    return {"peak_bytes": peak, "rank": dist.get_rank()}


def predict_dpo(case: DPOCase, world: int = 2) -> dict:
    """The planner's prediction for ``case`` on ``world`` ranks (fp32, TRL's torch fallback of the
    fused head, gradients in the peak): ``{"device_bytes", "phase", "phases"}``."""
    from hf_seqpar.core.shape import ModelShape
    from hf_seqpar.tools.memmodel import Features, MemoryModelInputs, peak_memory, trl_fused_head_terms
    from hf_seqpar.tools.plan import Candidate
    from hf_seqpar.tools.plan_post import no_grad_forward_bytes

    from . import cost

    shape = ModelShape.from_config(dpo_config())
    rows = 2 * case.pairs
    mem = peak_memory(
        MemoryModelInputs(
            shape,
            case.seq_len,
            case.strategy,
            world,
            Features(case.checkpointing),
            rows,
            elem=4,
            param_elem=4,
            fused_head=True,
            fused_head_triton=False,
        )
    )
    cand = Candidate(case.strategy, world, 1, 1)
    u, r = cost.split(cand.cls, world, cand.opts, shape.heads)
    cand = Candidate(case.strategy, world, u, r)
    local = rows * case.seq_len / world
    head = trl_fused_head_terms(shape, local, 4, world, triton=False)
    kept = mem.phases["forward"] - mem.components["loss_fwd"] + head["outputs_per_token"] * local
    phases = {
        "training step": mem.total,
        "reference forward": kept + no_grad_forward_bytes(shape, cand, local, 4, triton=False),
    }
    phase = max(phases, key=phases.get)
    return {"device_bytes": phases[phase], "phase": phase, "phases": phases, "step_phase": mem.peak_phase}
