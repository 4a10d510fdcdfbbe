"""The Accelerate integration: a plugin config and one call that wires an ``Accelerator``.

The SP settings live in a YAML file passed to the script (``--sp-config path.yaml``) or named
by the environment variable ``HF_SEQPAR_CONFIG``: either the plugin's own file (keys = field
names) or the accelerate config file given to ``accelerate launch``, with the fields as
``hf_seqpar_*`` keys of its ``parallelism_config:`` section (see :mod:`hf_seqpar.integrations.parallelism`,
which also reads and checks accelerate's own ``ParallelismConfig``)::

    accelerator = Accelerator(gradient_accumulation_steps=4, mixed_precision="bf16")
    plugin = SequenceParallelPlugin.load(args.sp_config)      # or $HF_SEQPAR_CONFIG
    model, optimizer, loader, scheduler = prepare_sequence_parallel(
        accelerator, plugin, model, optimizer, loader, scheduler)
    for batch in loader:                                        # already sequence-sharded
        with accelerator.accumulate(model):
            loss = model(**batch).loss                          # the true (unsharded) loss
            accelerator.backward(loss)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()

The dataloader is sharded over the *data-parallel* replicas only (every rank of an SP group gets
the same batches; accelerate's ``prepare_data_loader`` with ``num_processes=dp_size``), then
each batch goes through :func:`hf_seqpar.shard_batch`. The model is prepared by accelerate as
usual (DDP, FSDP2, DeepSpeed): they average gradients over all ranks, which the SP loss is built
for (see :mod:`hf_seqpar.core.loss`). The scheduler steps once per optimizer step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from hf_seqpar.api import enable_sequence_parallel
from hf_seqpar.config import SequenceParallelConfig, resolve, unknown_keys_message
from hf_seqpar.core.memory import check_memory_features, install_memory_features
from hf_seqpar.core.mesh import build_mesh, check_positive_int, find_state, unwrap_model
from hf_seqpar.core.sharding import shard_batch
from hf_seqpar.integrations.parallelism import (
    ACCELERATE_PREFIX,
    apply_parallelism_config,
    current_parallelism_config,
    is_accelerate_config,
    plugin_section,
)

__all__ = [
    "SequenceParallelPlugin",
    "SP_CONFIG_ENV",
    "prepare_sequence_parallel",
    "prepare_model",
    "SequenceParallelDataLoader",
    "shard_dataloader",
]

#: Environment variable naming the plugin's YAML file (used when no path is given).
SP_CONFIG_ENV = "HF_SEQPAR_CONFIG"


@dataclass
class SequenceParallelPlugin(SequenceParallelConfig):
    """Everything about sequence parallelism that a training script needs, loadable from YAML: the
    :class:`~hf_seqpar.config.SequenceParallelConfig` (strategy, degrees, strategy options) plus the
    memory features and the collective timeout.

    Keys of the YAML file are the field names; unknown keys are rejected.
    """

    loss_chunk_size: int | None = None
    """Tokens per chunk of the chunked lm_head + cross-entropy (recomputed in backward); None =
    the model's own loss (full ``shard x vocab`` fp32 logits). 4096-16384 is typical at 128K."""
    gradient_checkpointing: bool = False
    """Call ``model.gradient_checkpointing_enable()`` (HF activation checkpointing per layer)."""
    offload_checkpoints: bool = False
    """Keep the checkpointed layer inputs in CPU memory (``torch.autograd.graph.save_on_cpu``, pinned
    on GPUs); needs ``gradient_checkpointing``."""
    mlp_tiles: int | None = None
    """Split the sequence into this many tiles inside every MLP, recomputed in backward; None = off."""
    lean_norms: bool = True
    """The model's Llama-style RMSNorms (``hf_seqpar.core.norm.LLAMA_STYLE_NORMS``: Llama, Mistral,
    Mixtral, Qwen2/3 (MoE), Phi-3, Granite) save their input and an fp32 per-token ``rstd`` for the
    backward instead of transformers' fp32 copy of the input and the normalised activations: the same
    forward and gradients, 16 KB less per token and norm at h=4096 in bf16 (with checkpointing,
    in the recomputed layer). Other families' norms are left as they are. false: transformers' norms."""
    collective_timeout_s: float | None = None
    """Seconds a collective may wait for the other ranks before it raises (the process groups'
    timeout); None keeps torch's default (30 min on gloo, 10 min on NCCL). A rank that dies or
    raises is noticed within seconds anyway (gloo fails on the closed connection; torchrun's agent,
    also under ``accelerate launch``, then stops every rank); this bounds the wait where neither
    happens: a rank that hangs, a node lost without closing its connections. Applied to the SP
    mesh by :func:`prepare_sequence_parallel` and to the default group through
    :meth:`accelerator_kwargs` (pass them to the ``Accelerator``). Keep it above the longest
    time one rank works alone (e.g. rank 0 saving a checkpoint while the others wait)."""

    @classmethod
    def from_dict(cls, data: dict, source: str = "the SP config") -> "SequenceParallelPlugin":
        """Build a plugin from a dict (building it checks every field).

        Args:
            data: field names to values.
            source: where the dict came from (for messages).

        Returns:
            The plugin.

        Raises:
            ValueError: unknown keys (with the closest valid key) or invalid values.
        """
        if not isinstance(data, dict):
            raise ValueError(f"{source} must be a mapping of option: value, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        if "options" in data:  # an earlier format of this file kept strategy options in a mapping
            raise ValueError(
                f"{source}: the key 'options' was removed (an earlier format of this file kept the "
                f"strategy options in it); write its entries as top-level keys instead (e.g. "
                f"'backend: reference'; valid keys: {', '.join(names)})"
            )
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(unknown_keys_message(source, unknown, names))
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "SequenceParallelPlugin":
        """Load a plugin from a YAML file: the plugin's own file (keys = field names), or an accelerate
        config file whose ``parallelism_config:`` section holds the fields as ``hf_seqpar_<field>`` keys
        (the same file ``accelerate launch --config_file`` reads; no such keys: the defaults).

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a mapping, unknown keys, invalid values.
        """
        import yaml

        if not os.path.isfile(path):
            raise FileNotFoundError(f"SP config file {str(path)!r} does not exist (see recipes/sp/*.yaml for examples)")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if is_accelerate_config(data):
            source = f"the parallelism_config section of the accelerate config {str(path)!r}"
            section = plugin_section(data, source)
            unknown = sorted(set(section) - {f.name for f in fields(cls)})
            if unknown:
                valid = [f.name for f in fields(cls)]
                raise ValueError(unknown_keys_message(source, unknown, valid, ACCELERATE_PREFIX))
            return cls.from_dict(section, source=source)
        return cls.from_dict(data, source=f"SP config {str(path)!r}")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "SequenceParallelPlugin":
        """The plugin from ``path``, else from the file named by ``$HF_SEQPAR_CONFIG``, else defaults.

        Returns:
            The plugin (checked when built).

        Raises:
            FileNotFoundError, ValueError: as :meth:`from_yaml`.
        """
        path = path or os.environ.get(SP_CONFIG_ENV)
        return cls.from_yaml(path) if path else cls()

    def __post_init__(self) -> None:
        """Check every field (the config's, then the memory features), once, when the plugin is built.

        Raises:
            ValueError: a field has the wrong type or value (the message names it and the fix).
        """
        super().__post_init__()
        for name in ("loss_chunk_size", "mlp_tiles"):
            check_positive_int(name, getattr(self, name))
        t = self.collective_timeout_s
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0):
            raise ValueError(f"collective_timeout_s: must be a positive number of seconds or null, got {t!r}")
        for name in ("gradient_checkpointing", "offload_checkpoints", "lean_norms"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: must be true or false, got {getattr(self, name)!r}")
        if self.offload_checkpoints and not self.gradient_checkpointing:
            raise ValueError(
                "offload_checkpoints: true needs gradient_checkpointing: true (it offloads the "
                "checkpointed layer inputs)"
            )

    def accelerator_kwargs(self) -> dict:
        """Keyword arguments for ``accelerate.Accelerator`` that apply :attr:`collective_timeout_s`
        to the default process group (``{}`` when it is None)::

            accelerator = Accelerator(mixed_precision="bf16", **plugin.accelerator_kwargs())
        """
        if self.collective_timeout_s is None:
            return {}
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        return {"kwargs_handlers": [InitProcessGroupKwargs(timeout=timedelta(seconds=self.collective_timeout_s))]}


def enable_checkpointing(model) -> None:
    """HF activation checkpointing of every decoder layer, non-reentrant (``activation_checkpointing_enable``
    where transformers has it, else ``gradient_checkpointing_enable``). transformers' own ``offload=``
    is not used: it pins memory, which CPU-only machines cannot; ``offload_checkpoints`` does it instead."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_model(model, plugin: SequenceParallelPlugin, mesh=None):
    """Apply the plugin to an unprepared model: checkpointing, SP, memory features (in place).

    Args:
        model: a transformers causal LM or a PEFT model of one.
        plugin: the plugin.
        mesh: a ``("dp", "sp")`` DeviceMesh; default :func:`hf_seqpar.build_mesh` over the world.
            Without a mesh (the HF Trainer's path) the ``ParallelismConfig`` of accelerate's current
            state is checked first: ``sp_size``/``cp_size``/``tp_size`` > 1 there are refused (the
            Trainer would split the sequence itself; see :mod:`hf_seqpar.integrations.parallelism`).

    Returns:
        The same ``model``.

    Raises:
        RuntimeError: ``torch.distributed`` not initialised.
        ValueError, NotImplementedError, TypeError: see ``enable_sequence_parallel``.
    """
    if mesh is None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        apply_parallelism_config(plugin, current_parallelism_config(), world, trainer=True)
    base = unwrap_model(model)
    check_memory_features(base, plugin.loss_chunk_size, plugin.mlp_tiles)  # refuse before changing the model
    if plugin.gradient_checkpointing:
        enable_checkpointing(model)
    enable_sequence_parallel(model, mesh=mesh, config=plugin)
    install_memory_features(
        base, plugin.loss_chunk_size, plugin.mlp_tiles, plugin.offload_checkpoints, lean_norms=plugin.lean_norms
    )
    return model


class SequenceParallelDataLoader:
    """Iterates a data-parallel-sharded loader and yields each batch ready for the model.

    Args:
        loader: a loader of full batches (already sharded over data-parallel replicas).
        model: the SP model (any wrapper); its state gives the SP group.
        shard: apply :func:`hf_seqpar.shard_batch` (False: yield full batches, e.g. for the Trainer,
            which counts label tokens before its ``compute_loss`` shards).
    """

    def __init__(self, loader, model, shard: bool = True):
        self.loader, self.model, self.shard = loader, model, shard

    def __iter__(self):
        for batch in self.loader:
            yield shard_batch(batch, self.model) if self.shard else batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):  # batch_size, dataset, set_epoch, ... of the wrapped loader
        if name in ("loader", "model", "shard"):
            raise AttributeError(name)
        return getattr(self.loader, name)


def shard_dataloader(
    dataloader,
    model,
    device=None,
    shard: bool = True,
    rng_types=None,
    use_seedable_sampler: bool = False,
    data_seed: int | None = None,
):
    """Shard a loader of full batches over the data-parallel replicas only, and (optionally) by sequence.

    Args:
        dataloader: a ``torch.utils.data.DataLoader`` of full batches.
        model: a model after ``enable_sequence_parallel`` (any wrapper).
        device: where batches go; default stays on the loader's device.
        shard: also apply ``shard_batch`` to every batch.
        rng_types, use_seedable_sampler, data_seed: as for accelerate's ``prepare_data_loader``.

    Returns:
        A :class:`SequenceParallelDataLoader` over accelerate's ``DataLoaderShard`` for replica
        ``dp_rank`` of ``dp_size`` (all SP ranks of a replica see the same batches).

    Raises:
        RuntimeError: the model has no SP.
    """
    from accelerate.data_loader import prepare_data_loader

    state = find_state(model)
    if state is None:
        raise RuntimeError("shard_dataloader needs a model after hf_seqpar.enable_sequence_parallel()")
    dp_size, dp_rank = state.dp_size, state.dp_rank
    # dispatch_batches=False: accelerate's dispatcher (its default for an IterableDataset placed on a
    # device) slices every batch over all processes; here every rank reads the stream and each
    # replica keeps its own batches (IterableDatasetShard, or datasets' file shards)
    loader = prepare_data_loader(
        dataloader,
        device=device,
        num_processes=dp_size,
        process_index=dp_rank,
        put_on_device=device is not None,
        rng_types=rng_types,
        dispatch_batches=False,
        use_seedable_sampler=use_seedable_sampler,
        data_seed=data_seed,
    )
    return SequenceParallelDataLoader(loader, model, shard=shard)


def ensure_process_group(accelerator) -> None:
    """Check that the launched processes and ``accelerator`` agree; for a script started without a
    launcher (one process), initialise a one-rank gloo group so that SP's code paths run unchanged
    (``sp_size=1``)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes but the Accelerator runs as {accelerator.num_processes} "
            f"(distributed_type={accelerator.distributed_type}); each process would train alone. On a machine "
            "without GPUs set ACCELERATE_USE_CPU=true before creating the Accelerator (accelerate then runs the "
            "ranks on gloo as MULTI_CPU), e.g. `ACCELERATE_USE_CPU=true accelerate launch ...`."
        )
    if dist.is_initialized():
        return
    if accelerator.num_processes != 1:
        raise RuntimeError(
            "torch.distributed is not initialised although accelerate launched "
            f"{accelerator.num_processes} processes; create the Accelerator before this call"
        )
    # a single process (python script.py): a one-rank group so SP code paths run unchanged
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())


def _fill_deepspeed_batch_size(accelerator, loaders) -> None:
    """DeepSpeed reads its micro-batch size from the loaders given to ``prepare``; ours are not
    (they are split over dp only), so fill an ``"auto"`` value from the first loader."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or not loaders:
        return
    cfg = plugin.deepspeed_config
    if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto" and loaders[0].batch_size:
        cfg["train_micro_batch_size_per_gpu"] = loaders[0].batch_size


def _repoint_optimizers(model, names: dict, objects) -> None:
    """Optimizers built before SP keep pointing at the model's parameters: Megatron-SP's tensor
    parallel plan replaces them (with DTensors), so point the optimizers at the new ones by name."""
    current = dict(model.named_parameters())
    for opt in (o for o in objects if isinstance(o, torch.optim.Optimizer)):
        for group in opt.param_groups:
            group["params"] = [current.get(names.get(id(p)), p) for p in group["params"]]


def _average_gradients_over_dp_by_hooks(model) -> None:
    """Average each gradient over the data-parallel replicas as it is accumulated (what DDP does;
    linear, so gradient accumulation is unaffected). Nothing to do with one replica."""
    state = find_state(model)
    if state.dp_size == 1:
        return
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(
                lambda param: state.strategy.average_gradient_over_dp(param, state.counter)
            )


def prepare_sequence_parallel(accelerator, plugin: SequenceParallelPlugin, model, *objects):
    """Wire an ``Accelerator`` for sequence parallelism, the way ``accelerator.prepare`` is used.

    Builds the ``dp x sp`` mesh over the launched ranks, applies :func:`prepare_model`, prepares
    the model, optimizers and schedulers with accelerate (DDP / FSDP2 / DeepSpeed as configured),
    and replaces every ``DataLoader`` by one sharded over data-parallel replicas whose batches
    are already sequence-sharded.

    Args:
        accelerator: an ``accelerate.Accelerator`` (created first: it initialises torch.distributed).
        plugin: the SP settings. ``sp_size`` may instead come from the accelerator's
            ``ParallelismConfig`` (DDP/FSDP2 only; see :mod:`hf_seqpar.integrations.parallelism`).
        model: an unprepared causal LM (or PEFT model).
        *objects: optimizers, LR schedulers and DataLoaders, in any order.

    Returns:
        ``(model, *objects)`` prepared, in the order given.

    Raises:
        ValueError: invalid plugin, the world size is not a multiple of ``sp_size``, or a
            ``ParallelismConfig`` that would make accelerate split the sequence or the model itself.
        RuntimeError: torch.distributed could not be set up.
    """
    from accelerate.scheduler import AcceleratedScheduler

    ensure_process_group(accelerator)
    plugin = apply_parallelism_config(
        plugin,
        getattr(accelerator, "parallelism_config", None),
        dist.get_world_size(),
        deepspeed=getattr(accelerator, "distributed_type", None) == "DEEPSPEED",
    )
    sp_size = resolve(plugin, dist.get_world_size()).sp_size  # clear message, no collective
    mesh = build_mesh(
        sp_size, device_type="cuda" if accelerator.device.type == "cuda" else "cpu", timeout=plugin.collective_timeout_s
    )
    names = {id(p): n for n, p in model.named_parameters()}
    model = prepare_model(model, plugin, mesh=mesh)
    _repoint_optimizers(model, names, objects)

    loaders = [i for i, o in enumerate(objects) if isinstance(o, torch.utils.data.DataLoader)]
    schedulers = [i for i, o in enumerate(objects) if isinstance(o, torch.optim.lr_scheduler.LRScheduler)]
    others = [i for i in range(len(objects)) if i not in loaders and i not in schedulers]
    _fill_deepspeed_batch_size(accelerator, [objects[i] for i in loaders])
    if find_state(model).strategy.shards_parameters:
        # tensor-parallel parameters (DTensors): DDP cannot wrap them; the dp average is done by hooks instead
        model = accelerator.prepare_model(model, evaluation_mode=True)
        _average_gradients_over_dp_by_hooks(model)
        prepared = (model, *(accelerator.prepare(objects[i]) for i in others))
    else:
        prepared = accelerator.prepare(model, *(objects[i] for i in others))
    prepared = prepared if isinstance(prepared, tuple) else (prepared,)
    out = list(objects)
    for i, obj in zip(others, prepared[1:]):
        out[i] = obj
    optimizers = [o for o in prepared[1:] if isinstance(o, torch.optim.Optimizer) or hasattr(o, "optimizer")]
    for i in schedulers:  # one scheduler step per optimizer step (the loader is split over dp only)
        out[i] = AcceleratedScheduler(
            objects[i], optimizers, step_with_optimizer=accelerator.step_scheduler_with_optimizer, split_batches=True
        )
    cfg = accelerator.dataloader_config
    for i in loaders:
        out[i] = shard_dataloader(
            objects[i],
            prepared[0],
            device=accelerator.device,
            rng_types=accelerator.rng_types,
            use_seedable_sampler=cfg.use_seedable_sampler,
            data_seed=cfg.data_seed,
        )
    return (prepared[0], *out)
