"""The HF Trainer integration: :class:`SequenceParallelMixin` for any ``transformers.Trainer``
(TRL's ``SFTTrainer`` included), and :class:`SequenceParallelTrainer`, the ready-made class.

::

    trainer = SequenceParallelTrainer(model=model, args=TrainingArguments(...), train_dataset=...,
                                      eval_dataset=..., sp_plugin=SequenceParallelPlugin.load(path))
    trainer.train(); trainer.evaluate(); trainer.save_model(out_dir)

    class SPSFTTrainer(SequenceParallelMixin, SFTTrainer): ...   # or (SFTTrainer, SequenceParallelMixin)

What it changes, and why:

* **Data**: every loader (train, eval, test, a host's own built the stock way) comes from one
  construction, ``_get_dataloader``, as the stock Trainer builds it (same sampler, same columns,
  accelerate's seedable sampler reseeded per epoch, ``skip_first_batches`` on resume) but sharded
  over the data-parallel replicas only (every rank of an SP group gets the same full batches;
  iterable/streaming datasets are read per replica, not dispatched over all processes). Every
  batch is checked to be the same on the SP ranks. Throughput metrics count each sequence once.
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
* **Evaluation** goes through the same sharded ``compute_loss``; logits are gathered over the
  sequence only when returned, and predictions/labels/losses over the data-parallel replicas only
  (``compute_metrics`` sees each row once). The host's outputs are asked for only when the caller
  wants them (no extra TRL forward). TRL's DPOTrainer and GRPOTrainer are made exact by
  :mod:`hf_seqpar.integrations.trl_dpo` and :mod:`hf_seqpar.integrations.trl_grpo`; unsupported
  hosts (RLOO, ...) are refused at construction (:mod:`hf_seqpar.integrations.hosts`).
* Checkpoints are the model's own ``save_pretrained`` output, loadable by plain transformers / PEFT.
"""

from __future__ import annotations

import functools
import math
import os
from functools import partial

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import seed_worker

from hf_seqpar.core.comm import all_gather_concat, all_reduce_sum
from hf_seqpar.core.mesh import find_state, unwrap_model
from hf_seqpar.core.sharding import _check_same_batch, count_label_tokens, gather_sequence, shard_batch
from hf_seqpar.integrations.accelerate import SequenceParallelPlugin, ensure_process_group, prepare_model
from hf_seqpar.integrations.hosts import host_refusal, host_support
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
        self._sp_host = host_support(self)  # TRL's DPO/GRPO trainers: their own support (hosts.HOST_SUPPORT)
        if self._sp_host is not None:
            self._sp_host.refuse(self)
        self._sp_refuse_unsupported()
        ensure_process_group(self.accelerator)  # a script run without a launcher: one rank, sp_size=1
        prepare_model(self.model, self.sp_plugin)
        self.sp_state = find_state(self.model)
        if self._sp_host is not None:
            self._sp_host.setup(self, prepare_model)
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
                "as gloo MULTI_CPU."
            )
        if self.sp_plugin.strategy != AUTO:  # auto picks ulysses, hybrid or ring, which the Trainer drives
            strategy_class(self.sp_plugin.strategy).check_trainer()
        if getattr(self.args, "train_sampling_strategy", None) == "batch_rebalance":
            raise ValueError(
                "train_sampling_strategy='batch_rebalance' is not supported with sequence parallelism: its sampler "
                "deals batches to every process, while the ranks of an SP group must share each batch. Use "
                "train_sampling_strategy='random' (the default) or 'group_by_length'."
            )
        if not hasattr(Trainer, "_get_dataloader"):  # the one loader construction overrides it
            raise NotImplementedError(
                f"this transformers version ({__import__('transformers').__version__}) builds its data loaders "
                "without Trainer._get_dataloader, which SequenceParallelMixin replaces to give every rank of an "
                "SP group the same batches; use the transformers version in hf_seqpar's requirements."
            )
        if self.args.label_smoothing_factor:
            raise ValueError(
                f"label_smoothing_factor={self.args.label_smoothing_factor} is not supported with sequence "
                "parallelism: the Trainer's label smoother shifts the labels itself and would score the sharded, "
                "already shifted labels wrongly. Train with label_smoothing_factor=0."
            )
        if self.compute_loss_func is not None:
            raise ValueError(
                "compute_loss_func is not supported with sequence parallelism: it would see one rank's sequence "
                "shard as if it were the batch. Leave it unset (the model's loss is exact under SP), or subclass "
                "and override compute_loss, which receives the local batch of hf_seqpar.shard_batch "
                "(labels already shifted in `shift_labels`, num_items_in_batch = the full batch's count)."
            )
        if not self.model_accepts_loss_kwargs and self._sp_host is None:
            raise ValueError(
                f"{type(unwrap_model(self.model)).__name__}.forward takes no loss kwargs (num_items_in_batch), so "
                "the Trainer would not hand it the full batch's token count and each rank's loss would be a local "
                "mean. Use a transformers causal LM (their forward takes **kwargs)."
            )
        base = unwrap_model(self.model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        if self.sp_plugin.loss_chunk_size and "forward" in vars(base):
            raise ValueError(
                f"loss_chunk_size={self.sp_plugin.loss_chunk_size}: the host trainer already replaced the model's "
                "forward (TRL's SFTTrainer installs its fused, chunked LM head, which never builds the full logits); "
                "set loss_chunk_size: null in the SP config."
            )

    # ---- data: every loader as the stock Trainer builds it, split over data-parallel replicas only ----
    def _get_dataloader(
        self, dataset, description, batch_size, sampler_fn=None, is_training=False, dataloader_key=None
    ):
        """The one loader construction: ``Trainer.get_train/eval/test_dataloader`` (and a host's own
        loaders built through this method) all come here. As the stock Trainer's (same sampler,
        columns, collator, accelerate's per-epoch seeded sampler, ``skip_first_batches`` on resume,
        persistent eval loaders kept) but split over the data-parallel replicas only: every rank of
        an SP group gets the same full batches, ``compute_loss`` shards them.

        Iterable datasets (torch ``IterableDataset``, ``datasets`` streaming) are read by every rank,
        each data-parallel replica keeping its own batches (accelerate's ``IterableDatasetShard``, or
        ``datasets``' file shards when there are enough): accelerate's ``dispatch_batches`` would
        split each batch over *all* processes. The stream must give every rank the same items (a
        seeded shuffle does); ``compute_loss`` checks every batch."""
        dataloader = self._sp_dataloader(
            dataset, batch_size, description, sampler_fn=sampler_fn, is_training=is_training
        )
        if dataloader_key is not None and self.args.dataloader_persistent_workers:
            self.__dict__.setdefault("_eval_dataloaders", {})[dataloader_key] = dataloader
        return dataloader

    def get_train_dataloader(self):
        return self._sp_own(super().get_train_dataloader(), "get_train_dataloader")

    def get_eval_dataloader(self, eval_dataset=None):
        return self._sp_own(super().get_eval_dataloader(eval_dataset), "get_eval_dataloader")

    def get_test_dataloader(self, test_dataset):
        return self._sp_own(super().get_test_dataloader(test_dataset), "get_test_dataloader")

    def _sp_own(self, loader, method: str):
        """``loader`` if :meth:`_get_dataloader` built it; a host class that builds its own (e.g. with
        ``accelerator.prepare(DataLoader(...))``) would give the SP ranks different batches."""
        if not getattr(loader, "_hf_seqpar_replica_loader", False):
            raise NotImplementedError(
                f"{type(self).__name__}.{method} returned a loader that SequenceParallelMixin did not build "
                f"({type(loader).__name__}): it would split the batches over all processes, while the ranks of an SP "
                "group must share each batch. Build it with self._get_dataloader(dataset, description, batch_size, "
                "sampler_fn) (the stock Trainer's loader construction, which the mixin makes SP-aware)."
            )
        return loader

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
        else:
            collator = self._get_collator_with_removed_columns(collator, description=description)
        args = self.args
        params = {
            "batch_size": batch_size,
            "collate_fn": collator,
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
            "persistent_workers": args.dataloader_persistent_workers,
            "prefetch_factor": args.dataloader_prefetch_factor,
        }
        for name in ("multiprocessing_context", "in_order"):  # DataLoader options of newer transformers
            if hasattr(args, f"dataloader_{name}"):
                params[name] = getattr(args, f"dataloader_{name}")
        if not isinstance(dataset, torch.utils.data.IterableDataset):
            if sampler_fn is not None:
                params["sampler"] = sampler_fn(dataset)
            params["drop_last"] = args.dataloader_drop_last
            if is_training:
                # the data-parallel replica, not the process: SP ranks of a replica draw the same augmentations
                params["worker_init_fn"] = partial(
                    seed_worker, num_workers=args.dataloader_num_workers, rank=self.sp_state.dp_rank
                )
        acc, state = self.accelerator, self.sp_state
        # what Accelerator.prepare_data_loader does, with the data-parallel replicas as the processes;
        # dispatch_batches=False: accelerate's dispatcher slices every batch over all processes
        loader = prepare_data_loader(
            DataLoader(dataset, **params),
            acc.device,
            num_processes=state.dp_size,
            process_index=state.dp_rank,
            split_batches=acc.split_batches,
            put_on_device=acc.device_placement,
            rng_types=acc.rng_types.copy(),
            dispatch_batches=False,
            even_batches=acc.even_batches,
            use_seedable_sampler=acc.use_seedable_sampler,
            data_seed=acc.dataloader_config.data_seed,
            non_blocking=acc.non_blocking,
        )
        loader._hf_seqpar_replica_loader = True  # see _sp_own
        return loader

    def get_total_train_batch_size(self, args) -> int:
        """Sequences per optimizer step: ``micro-batch x accumulation x data-parallel replicas`` (the
        stock count takes every process as a replica, so samples/s came out ``sp_size`` times too high)."""
        return self._train_batch_size * args.gradient_accumulation_steps * self.sp_state.dp_size

    def _track_num_input_tokens(self, inputs):
        """``num_input_tokens_seen`` counting each sequence once: the stock count sums the batch of
        every process, and the SP ranks of a replica hold the same full batch."""
        before = self.state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)
        self.state.num_input_tokens_seen = before + (self.state.num_input_tokens_seen - before) // self.sp_state.sp_size

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
        if self._sp_host is not None:  # the host's model call shards (trl_dpo / trl_grpo)
            return self._sp_host.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        host = type(self).compute_loss
        if "seqpar" in inputs:  # already sharded (a host that calls back into compute_loss)
            return host(self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        training = model.training
        if (
            training
            and self.sp_state.mesh.size() > 1
            and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)
            and not isinstance(model, torch.nn.parallel.DistributedDataParallel)
        ):
            raise RuntimeError(
                "the Trainer is training a model that is not wrapped for data parallelism (DDP/FSDP/DeepSpeed): "
                "each rank would step on its own gradients. This happens when evaluate() runs before the first "
                "train() (accelerate then marks the model as prepared for evaluation, and train() does not wrap it); "
                "call train() first (evaluation during and after training is fine), or build a new trainer for "
                "training."
            )
        if not training or num_items_in_batch is None:  # eval: the stock count would include SP ranks
            num_items_in_batch = self._label_tokens([inputs])
        full = inputs if num_items_in_batch is None else {**inputs, "num_items_in_batch": num_items_in_batch}
        self._sp_check_batch(full)
        local = shard_batch(full, model)
        local["seqpar"].local_loss = True  # the host gets sum_local / N; the SP sum is done below
        tokens_before = getattr(self, "_total_train_tokens", None)
        # the outputs only when the caller wants them: TRL's SFTTrainer runs one more (full-logits)
        # forward for return_outputs=True, and its metrics come from the loss forward anyway
        result = host(self, model, local, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        loss = self._sp_combine(loss, num_items_in_batch)
        if tokens_before is not None and training:
            self._sp_recount_tokens(inputs, tokens_before)
        if return_outputs and self.__dict__.get("_sp_want_logits") and getattr(outputs, "logits", None) is not None:
            outputs["logits"] = gather_sequence(outputs.logits, model, batch=local)
        return (loss, outputs) if return_outputs else loss

    def _sp_check_batch(self, batch) -> None:
        """Every batch the Trainer computes on is checked to be the same on all ranks of the SP
        group (one all-gather of 7 integers; the forward then runs several collectives per layer):
        loaders come and go (train, eval, predict, a host's own), so a check of the first batch
        only would let a later loader's mismatch through. ``check_batch="always"`` is left to
        ``shard_batch``; ``"never"`` turns it off."""
        state = self.sp_state
        if state.config.check_batch != "first" or state.sp_size == 1:
            return
        main = batch.get("input_ids", batch.get("inputs_embeds"))
        if main is None or main.dim() < 2:
            return  # shard_batch names the problem
        _check_same_batch(state, batch, main.shape[0], main.shape[1])

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

    def evaluation_loop(self, *args, **kwargs):
        """As the host's, with predictions, labels and losses gathered over the data-parallel
        replicas only (the SP ranks of a replica hold the same full rows): ``compute_metrics`` sees
        each row once, in the stock Trainer's order. (The Trainer resets ``gather_function`` at the
        end of every loop, so it is set at the start of each.)"""
        self.gather_function = partial(self._sp_gather_for_metrics, use_gather_object=self.args.eval_use_gather_object)
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        self.__dict__.setdefault("_sp_loop_samples", {})[prefix] = output.num_samples
        return output

    def _sp_fix_steps_per_second(self, metrics: dict) -> None:
        """``{eval,test}_steps_per_second`` counting each batch once: the stock count divides the
        rows by ``eval_batch_size x world_size``, but only the ``dp_size`` replicas split the rows
        (the SP ranks of a replica run the same batches), so it came out ``sp_size`` times too low.
        Recomputed in place from the loop's row count and the reported runtime."""
        for prefix, rows in self.__dict__.get("_sp_loop_samples", {}).items():
            key, runtime = f"{prefix}_steps_per_second", metrics.get(f"{prefix}_runtime")
            if key in metrics and runtime:
                steps = math.ceil(rows / (self.args.eval_batch_size * self.sp_state.dp_size))
                metrics[key] = round(steps / runtime, 3)

    def log(self, logs: dict, *args, **kwargs) -> None:
        """As the host's, with the evaluation's steps/s corrected (see :meth:`_sp_fix_steps_per_second`;
        ``evaluate()`` logs its metrics dict and returns the same dict)."""
        self._sp_fix_steps_per_second(logs)
        return super().log(logs, *args, **kwargs)

    def predict(self, *args, **kwargs):
        """As the host's, with ``test_steps_per_second`` corrected (:meth:`_sp_fix_steps_per_second`)."""
        output = super().predict(*args, **kwargs)
        self._sp_fix_steps_per_second(output.metrics)
        return output

    def _sp_gather_for_metrics(self, data, use_gather_object: bool = False):
        """``Accelerator.gather_for_metrics`` over the data-parallel group: gathered along dim 0 in
        replica order, the last batch cut to the loader's remainder (the rows ``even_batches`` repeated)."""
        from accelerate.utils import recursively_apply

        state, gradient_state = self.sp_state, self.accelerator.gradient_state
        tensors = True
        try:
            recursively_apply(lambda x: x, data, error_on_other_type=True)
        except TypeError:
            tensors = False
        if use_gather_object or not tensors:
            parts = [None] * state.dp_size
            dist.all_gather_object(parts, data, group=state.dp_group)
            data = [x for part in parts for x in (part if isinstance(part, list) else [part])]
        elif state.dp_size > 1:
            data = recursively_apply(
                lambda t: all_gather_concat(t.contiguous() if t.dim() else t[None], 0, state.dp_group), data
            )
        if gradient_state.end_of_dataloader and gradient_state.remainder > 0:
            cut = gradient_state.remainder
            return data[:cut] if isinstance(data, list) else recursively_apply(lambda t: t[:cut], data)
        return data

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """As the host's ``prediction_step``; the logits are gathered over the sequence only when
        they are returned (the stock step asks ``compute_loss`` for the outputs even for the loss)."""
        self._sp_want_logits = not prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            self._sp_want_logits = False


def _sp_constructor(init):
    """``init`` taking ``sp_plugin=`` and running ``_sp_setup`` after the outermost constructor."""

    @functools.wraps(init)
    def __init__(self, *args, sp_plugin: SequenceParallelPlugin | None = None, **kwargs):
        depth = self.__dict__.get("_sp_init_depth", 0)
        refusal = host_refusal(type(self)) if depth == 0 else None
        if refusal:  # before the host's constructor (RLOO's would load reward models, start generation)
            raise NotImplementedError(refusal)
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
