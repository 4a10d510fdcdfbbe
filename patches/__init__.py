"""Model-family adaptations, installed as ``hf_seqpar.patches``.

Looked up by ``config.model_type``. Families whose attention goes through transformers'
``AttentionInterface`` (Llama, Mistral, Qwen2, Qwen3, ...) need nothing here for Ulysses;
this package is where tensor-parallel plans (Megatron-SP) and any unavoidable, reversible
patches for other families live, each with the reason it exists.
"""

#: model_type -> adaptation module; empty until a family needs one.
FAMILIES: dict[str, str] = {}
