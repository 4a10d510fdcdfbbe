"""What a model's attention needs beyond plain softmax attention, read once at enable time.

``enable_sequence_parallel`` reads these features from the model (config and parameters) before
it changes anything, and hands them to the strategy's ``check_attention``, so a strategy that
cannot compute a feature exactly refuses the model up front instead of failing (or being silently
wrong) in the middle of the first forward.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass

import torch

__all__ = ["AttentionFeatures", "attention_features", "SequenceMixingError", "check_sequence_mixing"]

#: Module classes that mix tokens along the sequence outside the attention registry: state-space
#: (Mamba) layers, linear / lightning / delta-net attention, recurrent blocks, short convolutions.
SEQUENCE_MIXER = re.compile(r"Mamba|SSM|Mixer|Lightning|LinearAttention|DeltaNet|Recurrent|RGLRU|ShortConv|"
                            r"Conv1d|xLSTM|RWKV")


class SequenceMixingError(NotImplementedError):
    """The model mixes tokens outside attention, which sequence parallelism cannot split."""


@dataclass(frozen=True)
class AttentionFeatures:
    """The attention features of one model.

    Attributes:
        model_type: ``config.model_type`` (for messages).
        sinks: the attention modules carry a per-head ``sinks`` parameter (learned attention
            sinks, passed to attention as ``s_aux``: GPT-OSS and others).
        softcap: ``attn_logit_softcapping`` (Gemma2: ``tanh`` capping of the scores), or None.
        dropout: ``attention_dropout`` of the config (applied in training mode only).
        qk_head_dim: head size of queries and keys.
        v_head_dim: head size of values (differs from ``qk_head_dim`` in multi-head latent
            attention, e.g. DeepSeek-V2/V3).
        bidirectional: some attention module is not causal (``is_causal=False``, e.g. Gemma3 with
            ``use_bidirectional_attention=True``).
        sequence_mixers: class names of modules that mix tokens outside attention (see
            :data:`SEQUENCE_MIXER`); empty for attention-only models.
        separates_documents: transformers separates packed documents (restarting
            ``position_ids``) for this model; False where the modeling code builds its mask
            without ``position_ids`` (GPT-OSS, OPT, BERT-style models, ...), see
            :func:`mask_sees_position_ids`.
    """

    model_type: str
    sinks: bool
    softcap: float | None
    dropout: float
    qk_head_dim: int
    v_head_dim: int
    bidirectional: bool
    sequence_mixers: tuple[str, ...] = ()
    separates_documents: bool = True


def _bracketed(src: str, start: int) -> str:
    """The text from the bracket at ``start`` to its matching closing bracket."""
    depth = 0
    for i in range(start, len(src)):
        if src[i] in "({[":
            depth += 1
        elif src[i] in ")}]":
            depth -= 1
        if depth == 0:
            return src[start:i + 1]
    return src[start:]


def mask_sees_position_ids(model) -> bool:
    """Whether the model's modeling code hands ``position_ids`` to transformers' mask builders
    (``create_causal_mask`` and friends), the only way transformers detects packed documents.

    Read from the source of the model's modeling module: every ``create_*_mask(`` call and every
    ``mask_kwargs = {`` dict must mention ``position_ids``. A module with no such call (custom
    code) counts as seeing them.
    """
    try:
        src = inspect.getsource(sys.modules[type(model).__module__])
    except (OSError, TypeError, KeyError):
        return True
    calls = [_bracketed(src, m.end() - 1)
             for m in re.finditer(r"create_(?:causal|sliding_window_causal|chunked_causal)_mask\(", src)]
    dicts = [_bracketed(src, m.end() - 1) for m in re.finditer(r"mask_kwargs\s*=\s*\{", src)]
    calls_ok = all("position_ids" in c or "**" in c for c in calls)
    return calls_ok and all("position_ids" in d for d in dicts)


def attention_features(model) -> AttentionFeatures:
    """Read the :class:`AttentionFeatures` of a transformers model (no forward is run).

    Args:
        model: the unwrapped ``PreTrainedModel``.

    Returns:
        Its :class:`AttentionFeatures`.
    """
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    qk = getattr(config, "qk_head_dim", None)
    if qk is None and getattr(config, "qk_nope_head_dim", None) is not None:
        qk = config.qk_nope_head_dim + (getattr(config, "qk_rope_head_dim", None) or 0)
    qk = qk or head_dim
    v = getattr(config, "v_head_dim", None) or qk
    sinks = any(name.rsplit(".", 1)[-1] == "sinks" for name, _ in model.named_parameters())
    non_causal = any(getattr(m, "is_causal", None) is False for m in model.modules())
    mixers = sorted({type(m).__name__ for m in model.modules()
                     if isinstance(m, torch.nn.Conv1d) or SEQUENCE_MIXER.search(type(m).__name__)})
    return AttentionFeatures(
        model_type=getattr(config, "model_type", type(config).__name__),
        sinks=sinks,
        softcap=getattr(config, "attn_logit_softcapping", None),
        dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
        qk_head_dim=int(qk),
        v_head_dim=int(v),
        bidirectional=non_causal,
        sequence_mixers=tuple(mixers),
        separates_documents=mask_sees_position_ids(model),
    )


def check_sequence_mixing(features: AttentionFeatures) -> None:
    """Refuse a model whose layers mix tokens outside attention (every strategy shards the
    sequence, and such a layer would see only its rank's shard).

    Raises:
        SequenceMixingError: naming the layers and the alternative.
    """
    if features.sequence_mixers:
        raise SequenceMixingError(
            f"this {features.model_type} model mixes tokens outside attention, in {list(features.sequence_mixers)} "
            "(state-space, linear-attention, recurrent or convolution layers). Every hf_seqpar strategy splits the "
            "sequence over ranks and gives only attention the whole sequence, so these layers would see their "
            "rank's shard alone and the result would be wrong. Train this model without hf_seqpar (do not call "
            "enable_sequence_parallel on it).")
