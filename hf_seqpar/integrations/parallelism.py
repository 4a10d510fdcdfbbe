"""accelerate's own parallelism settings, read and checked against hf_seqpar's.

Two things live here:

* **One config file.** accelerate's config file rejects unknown top-level keys, but its
  ``parallelism_config:`` section is a free mapping that ``accelerate launch`` copies onto its
  arguments without checking. The SP plugin's fields can sit there with the prefix
  ``hf_seqpar_`` (``hf_seqpar_strategy: ulysses``, ``hf_seqpar_loss_chunk_size: 1024``, ...), so
  the file given to ``accelerate launch --config_file`` is also the plugin's file
  (``--sp-config`` / ``$HF_SEQPAR_CONFIG`` accept it; see
  :meth:`hf_seqpar.SequenceParallelPlugin.from_yaml`).
* **accelerate's ``ParallelismConfig``** (``parallelism_config_*`` keys of that file, which
  ``accelerate launch`` exports as ``PARALLELISM_CONFIG_*``; ``Accelerator(parallelism_config=)``;
  ``TrainingArguments(parallelism_config=)``). What each field makes accelerate or the Trainer
  do (accelerate 1.15, transformers 5):

  - ``sp_size > 1`` (its only ``sp_backend`` is ``"deepspeed"``): under DeepSpeed, accelerate
    starts DeepSpeed's own Ulysses SP (``sequence_parallel_size``) and wraps the loaders in
    DeepSpeed's adapter; the HF Trainer, whatever the backend, wraps its train loader in that
    adapter, multiplies the loader length by ``sp_size``, divides batch sizes and token counts by
    it and computes the loss DeepSpeed's way. With DDP/FSDP2 in a custom loop accelerate only
    skips its device mesh. hf_seqpar reads ``sp_size`` there (it is the plugin's ``sp_size``)
    and refuses the other two cases with the fix.
  - ``cp_size > 1``: accelerate's torch context parallelism (ring attention under FSDP2) shards
    the sequence a second time: refused (use ``strategy: ring``).
  - ``tp_size > 1``: accelerate's tensor parallelism: refused (``strategy: megatron`` is tensor
    parallelism over the SP group with sequence-parallel norms).
  - ``dp_replicate_size``, ``dp_shard_size``: the data-parallel (DDP/HSDP/FSDP2) degrees over
    which accelerate shards the model states and averages gradients; with ``sp_size`` read from
    the same config their product must be ``world / sp_size`` (1 means "the rest").
"""

from __future__ import annotations

import dataclasses

__all__ = [
    "ACCELERATE_PREFIX",
    "plugin_section",
    "is_accelerate_config",
    "apply_parallelism_config",
    "current_parallelism_config",
]

#: Prefix of the plugin's fields inside the ``parallelism_config:`` section of an accelerate config file.
ACCELERATE_PREFIX = "hf_seqpar_"


def is_accelerate_config(data: dict) -> bool:
    """Whether a YAML mapping is an accelerate config file (it has ``distributed_type``)."""
    return isinstance(data, dict) and "distributed_type" in data


def plugin_section(data: dict, source: str) -> dict:
    """The plugin fields of an accelerate config file: the ``hf_seqpar_*`` keys of its
    ``parallelism_config:`` section, prefix removed.

    Args:
        data: the file's mapping (``is_accelerate_config(data)``).
        source: the file name (for messages).

    Returns:
        ``{field: value}`` (may be empty: then the plugin's defaults apply).

    Raises:
        ValueError: ``parallelism_config`` is not a mapping.
    """
    section = data.get("parallelism_config") or {}
    if not isinstance(section, dict):
        raise ValueError(f"{source}: parallelism_config must be a mapping, got {type(section).__name__}")
    return {k[len(ACCELERATE_PREFIX) :]: v for k, v in section.items() if k.startswith(ACCELERATE_PREFIX)}


def current_parallelism_config():
    """accelerate's ``ParallelismConfig`` of the current ``AcceleratorState`` (set by an
    ``Accelerator``, the HF Trainer's included), or None when there is none."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return None
    if not AcceleratorState._shared_state:
        return None
    return getattr(AcceleratorState(), "parallelism_config", None)


def _where(trainer: bool) -> str:
    return (
        "TrainingArguments(parallelism_config=...) or the accelerate config's parallelism_config section"
        if trainer
        else "the Accelerator's parallelism_config (Accelerator(parallelism_config=...) or the "
        "accelerate config's parallelism_config section)"
    )


def apply_parallelism_config(
    plugin, parallelism_config, world_size: int, *, deepspeed: bool = False, trainer: bool = False
):
    """Check accelerate's ``ParallelismConfig`` against the SP plugin and read its ``sp_size``.

    Args:
        plugin: a validated :class:`hf_seqpar.SequenceParallelPlugin`.
        parallelism_config: accelerate's ``ParallelismConfig`` or None.
        world_size: launched ranks.
        deepspeed: the Accelerator runs DeepSpeed.
        trainer: the HF Trainer drives the run (it takes DeepSpeed-SP code paths when
            ``sp_size > 1``).

    Returns:
        The plugin, or a copy whose ``sp_size`` comes from ``parallelism_config.sp_size``.

    Raises:
        ValueError: a setting that would make accelerate or the Trainer split the sequence (or the
            model) themselves, an ``sp_size`` that disagrees with the plugin's, or sizes that do not
            cover the launched ranks; the message names the setting and the fix.
    """
    pc = parallelism_config
    if pc is None:
        return plugin
    where = _where(trainer)
    sp, cp, tp = pc.sp_size or 1, pc.cp_size or 1, pc.tp_size or 1
    if cp > 1:
        raise ValueError(
            f"{where} has cp_size={cp}: accelerate would run its own context parallelism (torch ring attention "
            "under FSDP2) and split every sequence a second time. Set cp_size to 1 (remove "
            f"parallelism_config_cp_size) and let hf_seqpar split the sequence: strategy: ring (zigzag) is ring "
            f"attention, with sp_size: {cp}."
        )
    if tp > 1:
        raise ValueError(
            f"{where} has tp_size={tp}: accelerate would apply its own tensor parallelism to the model, which "
            "hf_seqpar's sequence parallelism does not compose with. Set tp_size to 1; strategy: megatron is "
            f"tensor parallelism over the SP group with sequence-parallel norms (sp_size: {tp})."
        )
    if sp == 1:
        return plugin  # data-parallel sizes only: accelerate's DDP/FSDP2/HSDP over all ranks, as without SP
    fix = (
        f"remove sp_size from the parallelism config (parallelism_config_sp_size in the accelerate config "
        f"file, ParallelismConfig(sp_size=...)) and set the hf_seqpar plugin's sp_size: {sp} instead "
        f"(hf_seqpar_sp_size: {sp} in the same file's parallelism_config section)"
    )
    if deepspeed:
        raise ValueError(
            f"{where} has sp_size={sp} under DeepSpeed: accelerate would start DeepSpeed's own Ulysses sequence "
            f"parallelism (sequence_parallel_size={sp}) and wrap the data loaders for it, on top of hf_seqpar's. "
            f"To use hf_seqpar, {fix}."
        )
    if trainer:
        raise ValueError(
            f"{where} has sp_size={sp}: the HF Trainer then takes its DeepSpeed-Ulysses code paths (the train "
            f"loader wrapped in DeepSpeed's adapter, its length multiplied by {sp}, batch sizes and token counts "
            f"divided by {sp}, DeepSpeed's loss), which would handle the sequence split a second time. To use "
            f"hf_seqpar's Trainer, {fix}."
        )
    if plugin.sp_size is not None and plugin.sp_size != sp:
        raise ValueError(
            f"{where} has sp_size={sp} but the hf_seqpar plugin has sp_size={plugin.sp_size}; they name the same "
            "thing. Set one of them (or both to the same value)."
        )
    if world_size % sp:
        raise ValueError(
            f"{where} has sp_size={sp}, which does not divide the {world_size} launched ranks; use a "
            f"divisor of {world_size} or launch a multiple of {sp} ranks."
        )
    dp = (pc.dp_replicate_size or 1) * (pc.dp_shard_size or 1)
    if dp > 1 and dp * sp != world_size:
        raise ValueError(
            f"{where} has dp_replicate_size x dp_shard_size x sp_size = {pc.dp_replicate_size} x {pc.dp_shard_size} "
            f"x {sp} = {dp * sp} ranks but {world_size} were launched. Use sizes whose product is {world_size} "
            f"(e.g. dp_shard_size={world_size // sp} with sp_size={sp}), or leave the dp sizes at 1."
        )
    return dataclasses.replace(plugin, sp_size=sp)
