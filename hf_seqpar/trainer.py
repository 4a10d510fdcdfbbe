"""The HF Trainer integration: :class:`SequenceParallelTrainer`, a ``Trainer`` with one extra argument.

::

    trainer = SequenceParallelTrainer(model=model, args=TrainingArguments(...), train_dataset=...,
                                      eval_dataset=..., sp_plugin=SequenceParallelPlugin.load(path))
    trainer.train(); trainer.evaluate(); trainer.save_model(out_dir)

What it changes, and why:

* **Data**: train/eval loaders are sharded over the data-parallel replicas only (every rank of an
  SP group gets the same full batches) with accelerate's ``prepare_data_loader``; the Trainer's
  own loader would give every rank different data.
* **num_items_in_batch**: ``get_batch_samples`` recounts the label tokens of the full batches of
  one optimizer step (all gradient-accumulation micro-batches, ``labels[..., 1:]``), summed over
  the data-parallel replicas when ``average_tokens_across_devices``; the stock count would
  include every SP rank (``sp_size`` times too many).
* **compute_loss** shards each full batch with :func:`hf_seqpar.shard_batch` (with that count),
  so the model's loss is ``sum / N`` over the whole SP group. With ``average_tokens_across_devices``
  it is multiplied by ``dp_size`` (the stock Trainer multiplies by the world size): DDP/FSDP's
  mean over all ranks then yields the token-weighted gradient of the global batch, and the
  logged loss (mean over ranks) is the true loss.
* **Evaluation** goes through the same sharded ``compute_loss`` (it never falls back to the
  unsharded model); logits are gathered only when ``compute_metrics`` needs them.
* Checkpoints are the model's own ``save_pretrained`` output (the SP attention name is not
  written to ``config.json``), loadable by plain transformers / PEFT.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from transformers import Trainer

from .accelerate import SequenceParallelPlugin, prepare_model, shard_dataloader
from .mesh import find_state
from .sharding import IGNORE_INDEX, gather_sequence, shard_batch

__all__ = ["SequenceParallelTrainer"]


class SequenceParallelTrainer(Trainer):
    """``transformers.Trainer`` with sequence parallelism.

    Args:
        *args, **kwargs: as for ``Trainer``. Launch with ``accelerate launch`` or ``torchrun``.
        sp_plugin: the SP settings (default: ``SequenceParallelPlugin.load()``, i.e. the file in
            ``$HF_SEQPAR_CONFIG`` or the defaults: Ulysses over all ranks).

    Raises:
        RuntimeError: torch.distributed is not initialised (not launched with a launcher).
        ValueError: invalid plugin / sizes (see ``enable_sequence_parallel``).
        NotImplementedError: ``strategy="megatron"`` (use ``prepare_sequence_parallel``).
    """

    def __init__(self, *args, sp_plugin: SequenceParallelPlugin | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sp_plugin = (sp_plugin or SequenceParallelPlugin.load()).validate()
        if self.sp_plugin.strategy == "megatron":
            raise NotImplementedError(
                "SequenceParallelTrainer does not support strategy='megatron' yet: the Trainer wraps the model in "
                "DDP, which cannot hold Megatron-SP's DTensor parameters. Use hf_seqpar.prepare_sequence_parallel "
                "(as recipes/finetune_long_context.py does) or another strategy (ulysses, ring, hybrid).")
        prepare_model(self.model, self.sp_plugin)
        self.sp_state = find_state(self.model)

    # ---- data: split over data-parallel replicas only -------------------------------------
    def _sp_loader(self, dataset, batch_size: int, shuffle: bool):
        generator = torch.Generator().manual_seed(self.args.data_seed or self.args.seed)
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=self.data_collator,
                            drop_last=self.args.dataloader_drop_last, num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.args.dataloader_pin_memory)
        return shard_dataloader(loader, self.model, device=self.args.device, shard=False)

    def get_train_dataloader(self):
        """Train loader over data-parallel replicas (full batches; ``compute_loss`` shards them)."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return self._sp_loader(self.train_dataset, self._train_batch_size, shuffle=True)

    def get_eval_dataloader(self, eval_dataset=None):
        """Eval loader over data-parallel replicas (full batches; ``compute_loss`` shards them)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        if dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        return self._sp_loader(dataset, self.args.eval_batch_size, shuffle=False)

    # ---- token counts and loss -------------------------------------------------------------
    def _label_tokens(self, batches: list) -> torch.Tensor | None:
        if not batches or "labels" not in batches[0]:
            return None
        n = sum((b["labels"][..., 1:] != IGNORE_INDEX).sum() for b in batches)
        n = torch.as_tensor(n, device=self.args.device)
        if self.args.average_tokens_across_devices and self.sp_state.mesh.size(0) > 1:
            n = n.clone()
            dist.all_reduce(n, group=self.sp_state.dp_group)
        return n

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step and their label-token count, counted once per
        SP group over the full batches (summed over data-parallel replicas when
        ``average_tokens_across_devices``)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        return batches, self._label_tokens(batches)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Shard the full batch by sequence and return the true (unsharded) loss."""
        if not model.training:  # eval: count this batch ourselves (the stock count includes SP ranks)
            num_items_in_batch = self._label_tokens([inputs])
        if num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        local = shard_batch(inputs, model)
        outputs = model(**local)
        loss = outputs.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.sp_state.mesh.size(0)
        if return_outputs and not model.training and self.compute_metrics is not None and outputs.logits is not None:
            outputs["logits"] = gather_sequence(outputs.logits, model)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """As ``Trainer.prediction_step``, loss only unless ``compute_metrics`` needs logits."""
        return super().prediction_step(model, inputs, prediction_loss_only or self.compute_metrics is None,
                                       ignore_keys=ignore_keys)
