"""TRL's ``GRPOTrainer`` under sequence parallelism (a host of :class:`hf_seqpar.SequenceParallelMixin`).

A GRPO step generates ``num_generations`` completions per prompt, scores them with the reward
functions, normalises the rewards per prompt group into advantages and trains on per-token
log-probs (policy, old policy, reference) through TRL's fused LM head. Under SP the ranks of an SP
group must behave as *one* process of the one-process (or data-parallel) TRL run:

* **Data**: GRPO's ``RepeatSampler`` loader is built by the mixin's ``_get_dataloader``, split over
  the data-parallel replicas only (the SP ranks of a replica get the same prompts), and TRL's
  ``generation_batch_size`` is recomputed with the replicas as the processes
  (``per_device_train_batch_size x dp x steps_per_generation``; TRL counts every rank), and every
  rank of replica ``d`` is seeded as TRL seeds its process ``d`` (``seed + d``).
* **Generation** runs once per SP group: SP rank 0 calls TRL's ``_generate_single_turn`` on the
  unsharded model (:func:`hf_seqpar.unsharded`; HF ``generate``) and broadcasts the completions
  and its random-number state over the SP group, so the group trains on identical completions and
  shuffles its generation batch identically afterwards (TRL's ``shuffle_sequence_dict``).
* **The collectives TRL's step runs** (``accelerator.gather``/``reduce``/``pad_across_processes``,
  ``process_index``, ``num_processes``: rewards, advantages' slice, token counts, DAPO's
  ``num_items_in_batch``, every metric) see the data-parallel replicas as the processes
  (:class:`ReplicaAccelerator`, installed only while TRL scores completions and computes the
  loss), so SP duplicates are never counted twice (an unbiased ``std`` over duplicated rewards,
  DAPO's token count). The one world-wide ``gather`` TRL calls directly (the rewards) is
  de-duplicated to one copy per replica.
* **The training forward** (policy, old-policy and reference log-probs and entropies) is the
  sharded fused head of :mod:`hf_seqpar.integrations.trl_fused`; every SP rank computes TRL's own
  loss (ratio, clipping, KL, entropy mask, each ``loss_type``'s normalisation) on identical full
  per-token tensors, with the gradient convention of :mod:`hf_seqpar.core.logprobs`.

Options this module has not made exact or not tested are refused at construction.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.distributed as dist
from accelerate.utils import set_seed

from hf_seqpar.core.comm import all_gather_concat
from hf_seqpar.core.mesh import find_state, unwrap_model
from hf_seqpar.integrations.trl_fused import install_sharded_fused_forward

__all__ = ["GRPOSupport", "ReplicaAccelerator", "replica_view"]


class ReplicaAccelerator:
    """The Trainer's Accelerator as GRPO's step code sees it under SP: the data-parallel replicas
    are the processes. ``gather``, ``reduce``, ``pad_across_processes``, ``gather_for_metrics``,
    ``process_index`` and ``num_processes`` act over the replicas (the data-parallel group); every
    other attribute is the real Accelerator's. With one replica, they return their input as
    accelerate does in a one-process run."""

    def __init__(self, accelerator, state):
        self._accelerator = accelerator
        self._state = state

    def __getattr__(self, name):
        return getattr(self._accelerator, name)

    @property
    def process_index(self) -> int:
        return self._state.dp_rank

    @property
    def num_processes(self) -> int:
        return self._state.dp_size

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenation over the replicas along dim 0 (a scalar becomes one row per replica)."""
        if self._state.dp_size == 1:
            return tensor
        x = tensor[None] if tensor.dim() == 0 else tensor
        as_bool = x.dtype == torch.bool
        out = all_gather_concat((x.to(torch.uint8) if as_bool else x).contiguous(), 0, self._state.dp_group)
        return out.bool() if as_bool else out

    def gather_for_metrics(self, input_data, use_gather_object: bool = False):
        return self.gather(input_data)

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum", scale: float = 1.0) -> torch.Tensor:
        """Sum (or mean) over the replicas, times ``scale`` (accelerate's ``reduce``)."""
        out = tensor.clone()
        if self._state.dp_size > 1:
            dist.all_reduce(out, group=self._state.dp_group)
            if reduction == "mean":
                out = out / self._state.dp_size
        return out * scale if scale != 1.0 else out

    def pad_across_processes(self, tensor: torch.Tensor, dim: int = 0, pad_index=0, pad_first: bool = False):
        """Pad ``dim`` to the longest size over the replicas (accelerate's ``pad_across_processes``)."""
        if self._state.dp_size == 1:
            return tensor
        size = torch.tensor([tensor.shape[dim]], device=tensor.device)
        dist.all_reduce(size, op=dist.ReduceOp.MAX, group=self._state.dp_group)
        extra = int(size) - tensor.shape[dim]
        if extra == 0:
            return tensor
        pad_shape = list(tensor.shape)
        pad_shape[dim] = extra
        pad = tensor.new_full(pad_shape, pad_index)
        return torch.cat([pad, tensor] if pad_first else [tensor, pad], dim=dim)


@contextlib.contextmanager
def replica_view(trainer):
    """``trainer.accelerator`` is a :class:`ReplicaAccelerator` inside the block (re-entrant)."""
    real = trainer.accelerator
    if isinstance(real, ReplicaAccelerator):
        yield real
        return
    trainer.accelerator = ReplicaAccelerator(real, trainer.sp_state)
    try:
        yield trainer.accelerator
    finally:
        trainer.accelerator = real


def _rng_states() -> dict:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


class GRPOSupport:
    """What :class:`hf_seqpar.SequenceParallelMixin` does differently for a ``trl.GRPOTrainer`` host."""

    #: loss types the acceptance tests compare against one-process TRL (TRL's others are refused)
    LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

    WORKS = (
        "GRPO under sequence parallelism supports loss_type in {loss_types}, beta = 0 or > 0 (reference model), "
        "num_iterations and steps_per_generation >= 1 (old-policy ratio and clipping), top_entropy_quantile, "
        "text prompts with callable (rule-based) reward functions, generation with transformers' generate "
        "(use_vllm=False), full fine-tuning without an eval dataset"
    )

    def refuse(self, trainer) -> None:
        """Refuse the GRPO options that are not exact (or not tested) under SP, naming what works."""
        import torch.nn as nn
        from datasets import IterableDataset

        args = trainer.args
        level, aggregation = args.importance_sampling_level, args.multi_objective_aggregation
        bad = [
            (f"loss_type={args.loss_type!r}", args.loss_type not in self.LOSS_TYPES),
            ("use_vllm=True", bool(trainer.use_vllm)),
            ("use_transformers_continuous_batching=True", bool(trainer.use_transformers_continuous_batching)),
            ("tools or environment_factory", bool(trainer.tools) or trainer.environment_factories is not None),
            ("rollout_func", trainer.rollout_func is not None),
            ("a vision-language model", bool(trainer._is_vlm)),
            ("a reward model (nn.Module reward function)", any(isinstance(f, nn.Module) for f in trainer.reward_funcs)),
            ("a MoE router aux loss (router_aux_loss_coef)", bool(trainer.aux_loss_enabled)),
            ("an entropy bonus (entropy_coef, use_adaptive_entropy)", bool(trainer._entropy_bonus_enabled)),
            ("off_policy_mask_threshold", trainer.off_policy_mask_threshold is not None),
            (f"importance_sampling_level={level!r}", level != "token"),
            (f"multi_objective_aggregation={aggregation!r}", aggregation != "sum_then_normalize"),
            ("delta (two-sided clipping)", args.delta is not None),
            ("mask_truncated_completions=True", bool(args.mask_truncated_completions)),
            ("sync_ref_model=True", bool(args.sync_ref_model)),
            ("log_completions=True", bool(args.log_completions)),
            ("an eval dataset", trainer.eval_dataset is not None),
            ("an iterable train dataset", isinstance(trainer.train_dataset, IterableDataset)),
            ("a PEFT model", hasattr(unwrap_model(trainer.model), "get_base_model")),
            ("DeepSpeed/FSDP", bool(trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled)),
        ]
        found = [name for name, on in bad if on]
        if found:
            works = self.WORKS.format(loss_types=list(self.LOSS_TYPES))
            raise ValueError(f"{', '.join(found)}: not supported by GRPOTrainer under sequence parallelism. {works}.")

    def setup(self, trainer, prepare) -> None:
        """The replicas' generation batch; SP on the reference model (policy's mesh); the sharding
        forward on both; generation once per SP group; TRL's step collectives over the replicas."""
        state = find_state(trainer.model)
        args = trainer.args
        # TRL's formula with the data-parallel replicas as the processes (TRL's __post_init__ counted every rank)
        gen_batch = args.per_device_train_batch_size * state.dp_size * args.steps_per_generation
        if gen_batch % trainer.num_generations:
            raise ValueError(
                "under sequence parallelism a generation batch holds per_device_train_batch_size "
                f"({args.per_device_train_batch_size}) x data-parallel replicas ({state.dp_size}) x "
                f"steps_per_generation ({args.steps_per_generation}) = {gen_batch} completions, not a multiple of "
                f"num_generations ({trainer.num_generations}): the SP ranks of a replica share one batch. Raise "
                "per_device_train_batch_size or steps_per_generation (gradient_accumulation_steps) to make it one."
            )
        args.generation_batch_size = gen_batch
        # TRL seeds each process with seed + process index (distinct completions per process): the SP
        # group is data-parallel process dp_rank of TRL's run, so each of its ranks takes that seed
        set_seed(args.seed + state.dp_rank)
        install_sharded_fused_forward(unwrap_model(trainer.model), "the GRPOTrainer")
        if trainer.ref_model is not None:
            ref = unwrap_model(trainer.ref_model)
            plugin = dataclasses.replace(trainer.sp_plugin, gradient_checkpointing=False, offload_checkpoints=False)
            prepare(ref, plugin, mesh=state.mesh)
            install_sharded_fused_forward(ref, "the GRPOTrainer")
        # instance attributes come first whatever the MRO order; each calls the class's method
        host = type(trainer)
        trainer._generate_single_turn = lambda *a, **k: self._generate_once(trainer, host, *a, **k)
        trainer._calculate_rewards = lambda *a, **k: self._replica_rewards(trainer, host, *a, **k)

        def score(*a, **k):
            with replica_view(trainer):
                return host._generate_and_score_completions(trainer, *a, **k)

        trainer._generate_and_score_completions = score

    @staticmethod
    def _generate_once(trainer, host, *args, **kwargs):
        """TRL's generation on SP rank 0 (unsharded model); completions and RNG state broadcast
        over the SP group, so every rank continues as rank 0 (one process of TRL's run) does."""
        from hf_seqpar.api import unsharded

        state = trainer.sp_state
        payload = [None]
        if state.sp_rank == 0:
            with unsharded(trainer.model):
                result = host._generate_single_turn(trainer, *args, **kwargs)
            payload = [(result, _rng_states())]
        if state.sp_size > 1:
            dist.broadcast_object_list(payload, group=state.sp_group, group_src=0)
        result, rng = payload[0]
        if state.sp_rank != 0:
            _set_rng_states(rng)
        return result

    @staticmethod
    def _replica_rewards(trainer, host, *args, **kwargs):
        """TRL's rewards, gathered by TRL over every rank ``(world x n, F)``, cut to one copy per
        data-parallel replica (SP rank 0's rows, in replica order): ``(dp x n, F)``."""
        full = host._calculate_rewards(trainer, *args, **kwargs)
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world == 1:
            return full
        firsts = trainer.sp_state.mesh.mesh[:, 0].tolist()  # global rank of SP rank 0 in each replica
        per_rank = full.view(world, full.shape[0] // world, *full.shape[1:])  # (world, n, F)
        return per_rank[firsts].reshape(-1, *full.shape[1:])  # (dp * n, F)

    def compute_loss(self, trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's GRPO loss on the full micro-batch (the model call shards), its collectives over the replicas."""
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)  # (B, P + C)
        trainer._sp_check_batch({"input_ids": ids})
        with replica_view(trainer):
            return type(trainer).compute_loss(
                trainer, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
