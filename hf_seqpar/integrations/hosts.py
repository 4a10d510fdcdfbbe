"""Which host trainers :class:`hf_seqpar.SequenceParallelMixin` drives: the one table to edit.

The mixin shards each batch by sequence and hands the host's ``compute_loss`` the local shard. That
is exact for a token-level LM loss (``transformers.Trainer``, TRL's ``SFTTrainer``, subclasses of
them). TRL trainers that score whole sequences or generate inside the step have their own support
class (:data:`HOST_SUPPORT`): TRL's DPOTrainer (:mod:`hf_seqpar.integrations.trl_dpo`) and
GRPOTrainer (:mod:`hf_seqpar.integrations.trl_grpo`). TRL's other trainers (RLOO, KTO, ...) are
refused when the trainer is constructed, before the host's constructor runs.

To support another TRL trainer, write its support class (``refuse``, ``setup``, ``compute_loss``,
as :class:`~hf_seqpar.integrations.trl_dpo.DPOSupport`), add it to :data:`HOST_SUPPORT` (and
remove the trainer's entry from :data:`WHY_NOT_YET`).
"""

from __future__ import annotations

import importlib

__all__ = ["HOST_SUPPORT", "SUPPORTED_TRL_TRAINERS", "WHY_NOT_YET", "host_refusal", "host_support"]

#: TRL trainer class name -> ``"module:Class"`` of the support object the mixin consults
#: (``refuse(trainer)``, ``setup(trainer, prepare)``, ``compute_loss(trainer, model, inputs, ...)``)
HOST_SUPPORT = {
    "DPOTrainer": "hf_seqpar.integrations.trl_dpo:DPOSupport",
    "GRPOTrainer": "hf_seqpar.integrations.trl_grpo:GRPOSupport",
}

#: TRL trainer classes (by name, in the ``trl`` package) the mixin runs exactly. A trainer whose most
#: derived TRL base class is not one of them is refused.
SUPPORTED_TRL_TRAINERS = frozenset({"SFTTrainer", *HOST_SUPPORT})

#: Why a TRL trainer is not supported yet (for the message; others get the generic reason).
WHY_NOT_YET = {
    "RLOOTrainer": "its leave-one-out baseline, generation and loss are not yet made exact (GRPOTrainer is)",
}


def _is_trl(cls: type) -> bool:
    return (cls.__module__ or "").split(".")[0] == "trl"


def _trl_base(cls: type) -> type | None:
    """The most derived TRL class in ``cls``'s MRO (it decides), or None."""
    return next((b for b in cls.__mro__ if _is_trl(b)), None)


def host_refusal(cls: type) -> str | None:
    """The reason ``cls`` (a trainer class with the mixin) cannot run under SP, or None.

    Args:
        cls: the trainer class (``type(trainer)``).

    Returns:
        A message naming the unsupported TRL trainer, why, and what works; None when the most
        derived TRL class in ``cls``'s MRO is in :data:`SUPPORTED_TRL_TRAINERS`.
    """
    base = _trl_base(cls)
    if base is None or base.__name__ in SUPPORTED_TRL_TRAINERS:
        return None
    why = WHY_NOT_YET.get(base.__name__, "its loss or its step is not a token-level LM loss over one batch")
    return (
        f"{cls.__name__} is built on TRL's {base.__name__}, which is not yet supported with sequence "
        f"parallelism (TRL's trainers other than SFT, DPO and GRPO are not, yet): {why}. What works: "
        "SequenceParallelTrainer (transformers.Trainer) and TRL's SFTTrainer, DPOTrainer and GRPOTrainer with "
        "SequenceParallelMixin (class T(SequenceParallelMixin, SFTTrainer)); or train this one without sequence "
        "parallelism."
    )


def host_support(trainer):
    """The support object for ``trainer``'s most derived TRL class (:data:`HOST_SUPPORT`), or None
    (``transformers.Trainer`` / TRL's SFTTrainer: token-level LM loss, the mixin's own path)."""
    base = _trl_base(type(trainer))
    target = HOST_SUPPORT.get(base.__name__) if base is not None else None
    if target is None:
        return None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)()
