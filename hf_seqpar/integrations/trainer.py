"""The HF Trainer integration: :class:`SequenceParallelMixin` for any ``transformers.Trainer``
(TRL's ``SFTTrainer`` included), and :class:`SequenceParallelTrainer`, the ready-made class.

::

    trainer = SequenceParallelTrainer(model=model, args=TrainingArguments(...), train_dataset=...,
                                      eval_dataset=..., sp_plugin=SequenceParallelPlugin.load(path))
    trainer.train(); trainer.evaluate(); trainer.save_model(out_dir)

    class SPSFTTrainer(SequenceParallelMixin, SFTTrainer): ...   # or (SFTTrainer, SequenceParallelMixin)

What it changes, and why:

* **Data**: train/eval loaders are built as the stock Trainer builds them (same sampler, same
  columns, accelerate's seedable sampler reseeded per epoch, ``skip_first_batches`` on resume)
  but sharded over the data-parallel replicas only (every rank of an SP group gets the same full
  batches); the Trainer's own loader would give every rank different data.
* **num_items_in_batch**: ``get_batch_samples`` counts the tokens that count in the loss
  (:func:`hf_seqpar.core.sharding.count_label_tokens`, the rule ``shard_batch`` applies) over the full
  batches of one optimizer step, summed over the data-parallel replicas when
  ``average_tokens_across_devices``; the stock count would include every SP rank.
* **compute_loss** shards each full batch with :func:`hf_seqpar.shard_batch` and calls the host
  trainer's ``compute_loss`` (whichever class the MRO gives: Trainer's, SFTTrainer's, yours) on
  the local shard, with the global token count; the host's loss is then ``sum_local / N`` (times
  the factor the Trainer applies for ``average_tokens_across_devices``), and the mixin gives it the
  gradient scale that DDP's mean over all ranks needs and the value of the whole SP group's loss.
  The host's token metrics (TRL's ``mean_token_accuracy`` and ``entropy``: sums gathered over all
  processes, and the SP ranks hold disjoint tokens) are exact as they are; TRL's ``num_tokens`` is
  recounted on the full batches.
* **Evaluation** goes through the same sharded ``compute_loss``; logits are gathered only when
  ``compute_metrics`` needs them.
* Checkpoints are the model's own ``save_pretrained`` output, loadable by plain transformers / PEFT.
"""

from __future__ import annotations

import functools
import os
from functools import partial

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import seed_worker

from hf_seqpar.integrations.accelerate import SequenceParallelPlugin, prepare_model
from hf_seqpar.core.comm import all_reduce_sum
from hf_seqpar.core.mesh import find_state, unwrap_model
from hf_seqpar.core.sharding import count_label_tokens, gather_sequence, shard_batch
from hf_seqpar.strategies import AUTO, strategy_class

__all__ = ["SequenceParallelMixin", "SequenceParallelTrainer"]


class SequenceParallelMixin(Trainer):
    """Sequence parallelism for a ``transformers.Trainer`` subclass whose loss is a token-level LM loss.

    It derives from ``Trainer`` so that in either order its methods come before ``Trainer``'s in
    the MRO (a plain mixin listed after ``SFTTrainer`` would come after ``Trainer`` too).

    Use it as ``class T(SequenceParallelMixin, Host)`` or ``class T(Host, SequenceParallelMixin)``
    with ``Host`` = ``transformers.Trainer``, TRL's ``SFTTrainer`` or a subclass of them. The host's
    ``compute_loss`` (and any override of yours) receives the *local* batch of ``shard_batch``.

    Args:
        *args, **kwargs: as for the host trainer. Launch with ``accelerate launch`` or ``torchrun``
            (on CPU-only machines with ``TrainingArguments(use_cpu=True)``).
        sp_plugin: the SP settings (default: ``SequenceParallelPlugin.load()``, i.e. the file in
            ``$HF_SEQPAR_CONFIG`` or the defaults: Ulysses over all ranks).

    Raises:
        RuntimeError: the launched ranks do not form one distributed Accelerator (e.g. CPU ranks
            without ``use_cpu``): each rank would train alone.
        ValueError: invalid plugin / sizes, or options SP cannot make exact (label smoothing,
            ``compute_loss_func``, ``loss_chunk_size`` under TRL's fused LM head).
        NotImplementedError: a strategy the Trainer cannot drive (``Strategy.check_trainer``: Megatron-SP).
    """

    def __init_subclass__(cls, **kwargs):
        # The constructor a user calls may be the host's (class T(SFTTrainer, SequenceParallelMixin)),
        # which knows no `sp_plugin`: wrap the class's constructor, whichever it is, so that it takes
        # `sp_plugin` and sets SP up once the outermost constructor has finished.
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__ or not getattr(cls.__init__, "_hf_seqpar_entry", False):
            cls.__init__ = _sp_constructor(cls.__init__)

    def _sp_setup(self) -> None:
        """Validate the set-up and apply SP to the model (after the host trainer's constructor)."""
        self.sp_plugin = self.__dict__.pop("_sp_plugin_arg", None) or SequenceParallelPlugin.load()
        self._sp_refuse_unsupported()
        prepare_model(self.model, self.sp_plugin)
        self.sp_state = find_state(self.model)
        # an instance attribute comes first whatever the MRO order; it calls the class's compute_loss
        self.compute_loss = self._sp_compute_loss

    # ---- what cannot be made exact, refused before anything runs ------------------------------
    def _sp_refuse_unsupported(self) -> None:
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        acc = self.accelerator
        if world > 1 and (acc.num_processes != world or str(acc.distributed_type) in ("NO", "DistributedType.NO")):
            raise RuntimeError(
                f"the launcher started {world} processes but the Trainer's Accelerator runs as {acc.num_processes} "
                f"process(es) (distributed_type={acc.distributed_type}): the model would not be wrapped in DDP and "
                "every rank would step on its own gradients. On a machine without GPUs pass "
                "TrainingArguments(use_cpu=True) (or set ACCELERATE_USE_CPU=true) so that accelerate runs the ranks "
                "as gloo MULTI_CPU.")
        if self.sp_plugin.strategy != AUTO:  # auto picks ulysses, hybrid or ring, which the Trainer drives
            strategy_class(self.sp_plugin.strategy).check_trainer()
        if self.args.label_smoothing_factor:
            raise ValueError(
                f"label_smoothing_factor={self.args.label_smoothing_factor} is not supported with sequence "
                "parallelism: the Trainer's label smoother shifts the labels itself and would score the sharded, "
                "already shifted labels wrongly. Train with label_smoothing_factor=0.")
        if self.compute_loss_func is not None:
            raise ValueError(
                "compute_loss_func is not supported with sequence parallelism: it would see one rank's sequence "
                "shard as if it were the batch. Leave it unset (the model's loss is exact under SP), or subclass "
                "and override compute_loss, which receives the local batch of hf_seqpar.shard_batch "
                "(labels already shifted in `shift_labels`, num_items_in_batch = the full batch's count).")
        if not self.model_accepts_loss_kwargs:
            raise ValueError(
                f"{type(unwrap_model(self.model)).__name__}.forward takes no loss kwargs (num_items_in_batch), so "
                "the Trainer would not hand it the full batch's token count and each rank's loss would be a local "
                "mean. Use a transformers causal LM (their forward takes **kwargs).")
        base = unwrap_model(self.model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        if self.sp_plugin.loss_chunk_size and "forward" in vars(base):
            raise ValueError(
                f"loss_chunk_size={self.sp_plugin.loss_chunk_size}: the host trainer already replaced the model's "
                "forward (TRL's SFTTrainer installs its fused, chunked LM head, which never builds the full logits); "
                "set loss_chunk_size: null in the SP config.")

    # ---- data: as the stock Trainer, split over data-parallel replicas only -----------------
    def _sp_dataloader(self, dataset, batch_size: int, description: str, sampler_fn=None, is_training=False):
        from accelerate.data_loader import prepare_data_loader
        from transformers.utils import is_datasets_available

        collator = self.data_collator
        if is_datasets_available():
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description=description)
            else:
                collator = self._get_collator_with_removed_columns(collator, description=description)
        params = {"batch_size": batch_size, "collate_fn": collator, "num_workers": self.args.dataloader_num_workers,
                  "pin_memory": self.args.dataloader_pin_memory,
                  "persistent_workers": self.args.dataloader_persistent_workers,
                  "prefetch_factor": self.args.dataloader_prefetch_factor}
        if not isinstance(dataset, torch.utils.data.IterableDataset):
            if sampler_fn is not None:
                params["sampler"] = sampler_fn(dataset)
            params["drop_last"] = self.args.dataloader_drop_last
            if is_training:
                params["worker_init_fn"] = partial(seed_worker, num_workers=self.args.dataloader_num_workers,
                                                   rank=self.args.process_index)
        acc, state = self.accelerator, self.sp_state
        # what Accelerator.prepare_data_loader does, with the data-parallel replicas as the processes
        return prepare_data_loader(
            DataLoader(dataset, **params), acc.device, num_processes=state.dp_size,
            process_index=state.dp_rank, split_batches=acc.split_batches,
            put_on_device=acc.device_placement, rng_types=acc.rng_types.copy(), dispatch_batches=acc.dispatch_batches,
            even_batches=acc.even_batches, use_seedable_sampler=acc.use_seedable_sampler,
            data_seed=acc.dataloader_config.data_seed, non_blocking=acc.non_blocking)

    def get_train_dataloader(self):
        """The stock train loader (per-epoch seeded order, resumable), split over data-parallel
        replicas only; batches are full, ``compute_loss`` shards them."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return self._sp_dataloader(self.train_dataset, self._train_batch_size, "Training",
                                   sampler_fn=self._get_train_sampler, is_training=True)

    def get_eval_dataloader(self, eval_dataset=None):
        """The stock eval loader, split over data-parallel replicas only (full batches)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        if dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        return self._sp_dataloader(dataset, self.args.eval_batch_size, "Evaluation", sampler_fn=self._get_eval_sampler)

    # ---- token counts and loss -------------------------------------------------------------
    def _label_tokens(self, batches: list) -> torch.Tensor | None:
        if not batches or "labels" not in batches[0]:
            return None
        n = torch.as_tensor(sum(count_label_tokens(b) for b in batches), device=self.args.device)
        if self.args.average_tokens_across_devices and self.sp_state.dp_size > 1:
            n = n.clone()
            dist.all_reduce(n, group=self.sp_state.dp_group)
        return n

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The micro-batches of one optimizer step and their loss-token count, counted once per
        SP group over the full batches (summed over data-parallel replicas when
        ``average_tokens_across_devices``)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        return batches, self._label_tokens(batches)

    def _host_loss_scale(self, num_items_in_batch) -> int:
        """The factor ``Trainer.compute_loss`` (and TRL's) multiplies the loss by: the number of
        processes under ``average_tokens_across_devices`` with a token count, else 1."""
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return self.accelerator.num_processes
        return 1

    def _sp_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Shard the full batch by sequence, run the host's ``compute_loss`` on this rank's shard,
        and return the loss of the whole SP group with the gradient scale DDP's mean needs."""
        host = type(self).compute_loss
        if "seqpar" in inputs:  # already sharded (a host that calls back into compute_loss)
            return host(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        training = model.training
        if training and self.sp_state.mesh.size() > 1 and not (self.is_fsdp_enabled or self.is_deepspeed_enabled) \
                and not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise RuntimeError(
                "the Trainer is training a model that is not wrapped for data parallelism (DDP/FSDP/DeepSpeed): "
                "each rank would step on its own gradients. This happens when evaluate() runs before the first "
                "train() (accelerate then marks the model as prepared for evaluation, and train() does not wrap it); "
                "call train() first (evaluation during and after training is fine), or build a new trainer for "
                "training.")
        if not training or num_items_in_batch is None:  # eval: the stock count would include SP ranks
            num_items_in_batch = self._label_tokens([inputs])
        full = inputs if num_items_in_batch is None else {**inputs, "num_items_in_batch": num_items_in_batch}
        local = shard_batch(full, model)
        local["seqpar"].local_loss = True  # the host gets sum_local / N; the SP sum is done below
        tokens_before = getattr(self, "_total_train_tokens", None)
        loss, outputs = host(self, model, local, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = self._sp_combine(loss, num_items_in_batch)
        if tokens_before is not None and training:
            self._sp_recount_tokens(inputs, tokens_before)
        if return_outputs and not training and self.compute_metrics is not None and outputs.logits is not None:
            outputs["logits"] = gather_sequence(outputs.logits, model)
        return (loss, outputs) if return_outputs else loss

    def _sp_combine(self, loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """``loss = c * sum_local / N`` from the host (``c`` = :meth:`_host_loss_scale`). DDP averages
        gradients over all ``dp x sp`` ranks, so each rank's gradient must be ``sp`` (and ``dp`` when
        ``N`` counts every replica) times its own share; the value is the SP group's loss (times
        ``dp``, as the stock Trainer logs it under ``average_tokens_across_devices``)."""
        sp, dp = self.sp_state.sp_size, self.sp_state.dp_size
        c = self._host_loss_scale(num_items_in_batch)
        across = self.args.average_tokens_across_devices and num_items_in_batch is not None
        grad_scale, value_scale = (sp * dp, dp) if across else (sp, 1)
        scaled = loss * (grad_scale / c)
        group = all_reduce_sum(loss.detach(), self.sp_state.sp_group, self.sp_state.counter) / c
        return scaled - scaled.detach() + value_scale * group

    def _sp_recount_tokens(self, inputs, before: int) -> None:
        """TRL's ``num_tokens``: its rule (``attention_mask.sum()``, else the row length of
        ``position_ids``) on the full batch, summed over data-parallel replicas."""
        if "attention_mask" in inputs:
            n = inputs["attention_mask"].sum()
        elif "position_ids" in inputs:
            n = torch.tensor(inputs["position_ids"].size(1))
        else:
            return
        n = n.to(self.args.device).clone()
        if self.sp_state.dp_size > 1:
            dist.all_reduce(n, group=self.sp_state.dp_group)
        self._total_train_tokens = before + int(n)
        if hasattr(self, "_metrics"):
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """As the host's ``prediction_step``, loss only unless ``compute_metrics`` needs logits."""
        return super().prediction_step(model, inputs, prediction_loss_only or self.compute_metrics is None,
                                       ignore_keys=ignore_keys)


def _sp_constructor(init):
    """``init`` taking ``sp_plugin=`` and running ``_sp_setup`` after the outermost constructor."""

    @functools.wraps(init)
    def __init__(self, *args, sp_plugin: SequenceParallelPlugin | None = None, **kwargs):
        depth = self.__dict__.get("_sp_init_depth", 0)
        if sp_plugin is not None:
            self._sp_plugin_arg = sp_plugin
        self._sp_init_depth = depth + 1
        try:
            init(self, *args, **kwargs)
        finally:
            self._sp_init_depth = depth
        if depth == 0:
            self._sp_setup()

    __init__._hf_seqpar_entry = True
    return __init__


class SequenceParallelTrainer(SequenceParallelMixin, Trainer):
    """``transformers.Trainer`` with sequence parallelism (:class:`SequenceParallelMixin` over ``Trainer``).

    Args:
        *args, **kwargs: as for ``Trainer``. Launch with ``accelerate launch`` or ``torchrun``
            (on CPU-only machines with ``TrainingArguments(use_cpu=True)``).
        sp_plugin: the SP settings (default: ``SequenceParallelPlugin.load()``).

    Raises:
        RuntimeError, ValueError, NotImplementedError: see :class:`SequenceParallelMixin`.
    """
