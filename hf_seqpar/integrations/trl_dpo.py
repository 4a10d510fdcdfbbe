"""TRL's ``DPOTrainer`` under sequence parallelism (a host of :class:`hf_seqpar.SequenceParallelMixin`).

TRL 1.x computes DPO from one concatenated forward (chosen rows, then rejected rows) through its
fused LM head, ``model(input_ids, attention_mask, labels, fused_lm_head=True)``, which returns
per-token ``log_probs`` (and the entropy, mean logits and top-1 flags it logs) of shape
``(2B, S - 1)``; everything after that (the loss types, ``ld_alpha``, WPO weighting, the metrics)
is arithmetic on those per-token tensors. So the exact SP version changes only that call:

* the model's forward (the instance ``forward`` TRL installed) is wrapped by
  :func:`hf_seqpar.integrations.trl_fused.install_sharded_fused_forward` (shared with GRPO): a
  ``fused_lm_head=True`` call with the *full* batch is sharded, TRL's fused head scores the local
  shard, and every per-token field is gathered back into ``(2B, S - 1)`` in the original order;
* every rank of an SP group then computes TRL's own loss and metrics on identical full per-token
  tensors; the gather's backward sums the ranks' gradients, so each rank's gradient is ``sp`` times
  its share and DDP's mean over ``dp x sp`` ranks is the one-process gradient.

The reference model (``ref_model=``) gets SP on the policy's mesh and the same wrapper (under
accelerate's FSDP2 after TRL's root-only ``prepare_fsdp``: FSDP2 keeps the module object and TRL's
instance ``forward``, so the wrapper goes on the sharded module; the policy is sharded later, by the
Trainer, on the same object);
``precompute_ref_log_probs`` runs in TRL's constructor, before SP is applied, with TRL's own
data split over all processes (exact; each rank scores whole rows, so that pass is not sequence
parallel). Options this module has not made exact are refused at construction.
"""

from __future__ import annotations

import dataclasses

from hf_seqpar.core.mesh import find_state, unwrap_model
from hf_seqpar.integrations.trl_fused import install_sharded_fused_forward

__all__ = ["DPOSupport"]


class DPOSupport:
    """What :class:`hf_seqpar.SequenceParallelMixin` does differently for a ``trl.DPOTrainer`` host."""

    #: loss types the acceptance tests compare against one-process TRL; every other TRL loss type
    #: is arithmetic on the same gathered per-token tensors, but untested here, so refused
    LOSS_TYPES = ("sigmoid", "ipo", "hinge")

    def refuse(self, trainer) -> None:
        """Refuse the DPO options that are not exact (or not tested) under SP, naming what works."""
        args = trainer.args
        works = (
            f"DPO under sequence parallelism supports loss_type in {list(self.LOSS_TYPES)} (one or a list), "
            "an explicit ref_model or precompute_ref_log_probs=True, padded text rows, full fine-tuning, "
            "DDP or accelerate's FSDP2 (fsdp_version: 2) without CPU offload"
        )
        losses = args.loss_type if isinstance(args.loss_type, (list, tuple)) else [args.loss_type]
        bad = [
            (f"loss_type={args.loss_type!r}", any(t not in self.LOSS_TYPES for t in losses)),
            ("padding_free=True", bool(getattr(args, "padding_free", False))),
            ("a vision dataset", bool(getattr(trainer, "_is_vision_dataset", False))),
            ("a MoE router aux loss (router_aux_loss_coef)", bool(getattr(trainer, "aux_loss_enabled", False))),
            ("sync_ref_model=True", bool(getattr(args, "sync_ref_model", False))),
            ("a PEFT model", hasattr(unwrap_model(trainer.model), "get_base_model")),
            ("DeepSpeed", bool(trainer.is_deepspeed_enabled)),
            *self._fsdp_refusals(trainer),
        ]
        found = [name for name, on in bad if on]
        if found:
            raise ValueError(f"{', '.join(found)}: not supported by DPOTrainer under sequence parallelism. {works}.")

    @staticmethod
    def _fsdp_refusals(trainer) -> list:
        """FSDP2 is tested (policy sharded by accelerate, reference by TRL's root-only ``prepare_fsdp``,
        SP applied to the sharded reference afterwards: FSDP2 keeps the module object and TRL's
        instance ``forward``); FSDP1's wrapper class and FSDP2's CPU offload are not."""
        if not trainer.is_fsdp_enabled:
            return []
        from torch.distributed.fsdp import CPUOffloadPolicy

        plugin = trainer.accelerator.state.fsdp_plugin
        version = getattr(plugin, "fsdp_version", 1)
        offload = isinstance(getattr(plugin, "cpu_offload", None), CPUOffloadPolicy)
        return [
            (f"FSDP version {version} (fsdp_version: 1)", version != 2),
            ("FSDP CPU offload (fsdp_offload_params: true)", version == 2 and offload),
        ]

    def setup(self, trainer, prepare) -> None:
        """SP on the reference model (policy's mesh, no checkpointing) and the sharding forward on both."""
        state = find_state(trainer.model)
        install_sharded_fused_forward(unwrap_model(trainer.model), "the DPOTrainer")
        if trainer.ref_model is not None:
            ref = unwrap_model(trainer.ref_model)
            plugin = dataclasses.replace(trainer.sp_plugin, gradient_checkpointing=False, offload_checkpoints=False)
            prepare(ref, plugin, mesh=state.mesh)
            install_sharded_fused_forward(ref, "the DPOTrainer")

    def compute_loss(self, trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's DPO loss on the full batch (the model call shards); ``num_tokens`` counted once per SP group."""
        before = trainer._total_train_tokens
        out = type(trainer).compute_loss(
            trainer, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if model.training:
            trainer._sp_recount_tokens(inputs, before)
        return out
