"""Which host trainers :class:`hf_seqpar.SequenceParallelMixin` drives: the one table to edit.

The mixin shards each batch by sequence and hands the host's ``compute_loss`` the local shard. That
is exact for a token-level LM loss (``transformers.Trainer``, TRL's ``SFTTrainer``, subclasses of
them). TRL's DPOTrainer scores whole sequences; it is made exact by
:mod:`hf_seqpar.integrations.trl_dpo` (the model call shards and gathers). TRL's other trainers
generate completions inside the step (GRPO, RLOO) or score sequences in other ways, which the mixin
does not make exact yet: they are refused when the trainer is constructed, before the host's
constructor runs.

To support another TRL trainer, add its class name to :data:`SUPPORTED_TRL_TRAINERS` (and remove
its entry from :data:`WHY_NOT_YET`).
"""

from __future__ import annotations

__all__ = ["SUPPORTED_TRL_TRAINERS", "WHY_NOT_YET", "host_refusal"]

#: TRL trainer classes (by name, in the ``trl`` package) the mixin runs exactly. A trainer whose most
#: derived TRL base class is not one of them is refused.
SUPPORTED_TRL_TRAINERS = frozenset({"SFTTrainer", "DPOTrainer"})

#: Why a TRL trainer is not supported yet (for the message; others get the generic reason).
WHY_NOT_YET = {
    "GRPOTrainer": "each step generates completions with the model (generate() on sequence shards) and scores "
    "them with per-sequence advantages",
}


def _is_trl(cls: type) -> bool:
    return (cls.__module__ or "").split(".")[0] == "trl"


def host_refusal(cls: type) -> str | None:
    """The reason ``cls`` (a trainer class with the mixin) cannot run under SP, or None.

    Args:
        cls: the trainer class (``type(trainer)``).

    Returns:
        A message naming the unsupported TRL trainer, why, and what works; None when every TRL
        class in ``cls``'s MRO is in :data:`SUPPORTED_TRL_TRAINERS`.
    """
    base = next((b for b in cls.__mro__ if _is_trl(b)), None)  # the most derived TRL class decides
    if base is None or base.__name__ in SUPPORTED_TRL_TRAINERS:
        return None
    why = WHY_NOT_YET.get(base.__name__, "its loss or its step is not a token-level LM loss over one batch")
    return (
        f"{cls.__name__} is built on TRL's {base.__name__}, which is not yet supported with sequence "
        f"parallelism (GRPO and TRL's other RL/preference trainers but DPO are not, yet): {why}. What works: "
        "SequenceParallelTrainer (transformers.Trainer) and TRL's SFTTrainer and DPOTrainer with "
        "SequenceParallelMixin (class T(SequenceParallelMixin, SFTTrainer)); or train this one without sequence "
        "parallelism."
    )
