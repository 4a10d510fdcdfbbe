"""Model-family adaptations, installed as ``hf_seqpar.patches``.

Looked up by ``config.model_type``. Families whose attention goes through transformers'
``AttentionInterface`` (Llama, Mistral, Qwen2, Qwen3, ...) need nothing here for Ulysses;
this package is where tensor-parallel plans (Megatron-SP) and any unavoidable, reversible
patches for other families live, each with the reason it exists.
"""

from __future__ import annotations

import importlib

from .plan import MegatronPlan

__all__ = ["FAMILIES", "MegatronPlan", "family"]

#: model_type -> adaptation module of this package (Mistral and Qwen2 share Llama's layer names).
FAMILIES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "qwen3",
    "phi3": "phi3",
}


def family(model_type: str):
    """The adaptation module for ``model_type``.

    Raises:
        ValueError: no adaptation for this family (the message lists the supported ones).
    """
    if model_type not in FAMILIES:
        raise ValueError(
            f"hf_seqpar has no Megatron-SP plan for model_type {model_type!r}; supported families: "
            f"{sorted(FAMILIES)}. Use strategy='ulysses' (any family that uses transformers' attention "
            "registry), or add a plan for this family in hf_seqpar.patches."
        )
    return importlib.import_module(f"{__name__}.{FAMILIES[model_type]}")
