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
#: (Mamba) layers, linear / lightning / delta-net attention, recurrent blocks, short convolutions,
#: and the key indexers / KV compressors of sparse attention (DeepSeek-V3.2/V4 style), which pick
#: or pool keys from the tokens the layer sees.
SEQUENCE_MIXER = re.compile(
    r"Mamba|SSM|Mixer|Lightning|LinearAttention|DeltaNet|Recurrent|RGLRU|ShortConv|"
    r"Conv1d|xLSTM|RWKV|Indexer|Compressor"
)


class SequenceMixingError(NotImplementedError):
    """The model mixes tokens outside attention (or builds attention masks of its own), which
    sequence parallelism cannot split."""


@dataclass(frozen=True)
class AttentionFeatures:
    """The attention features of one model.

    Attributes:
        model_type: ``config.model_type`` (for messages).
        sinks: the attention modules carry a per-head ``sinks`` parameter (learned attention
            sinks, passed to attention as ``s_aux``: GPT-OSS and others).
        softcap: ``attn_logit_softcapping`` (Gemma2: ``tanh`` capping of the scores), or None.
        dropout: attention dropout of the config (``attention_dropout``,
            ``attention_probs_dropout_prob`` or ``attn_pdrop``; applied in training mode only).
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
        own_masks: attention classes that pass the attention function a mask of their own
            (see :func:`own_attention_masks`); hf_seqpar builds the mask of the whole sequence
            itself and cannot honour such a mask.
        kwargs_dropped: calls that do not pass keyword arguments on to attention (see
            :func:`kwargs_not_forwarded`).
        chunk_size: ``attention_chunk_size`` of chunked local attention (Llama4), or None.
        derived_positions: module classes that derive position ids from ``input_ids`` when
            none are given (RoBERTa-style ``padding_idx + 1 + index``).
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
    own_masks: tuple[str, ...] = ()
    kwargs_dropped: tuple[str, ...] = ()
    chunk_size: int | None = None
    derived_positions: tuple[str, ...] = ()


def _bracketed(src: str, start: int) -> str:
    """The text from the bracket at ``start`` to its matching closing bracket."""
    depth = 0
    for i in range(start, len(src)):
        if src[i] in "({[":
            depth += 1
        elif src[i] in ")}]":
            depth -= 1
        if depth == 0:
            return src[start : i + 1]
    return src[start:]


def _call_arguments(call: str) -> tuple[list[str], dict[str, str]]:
    """Positional and keyword argument texts of a bracketed call ``(a, b, k=v, **kw)``."""
    args, depth, cur = [], 0, ""
    for ch in call[1:-1]:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
        else:
            cur += ch
    args = [a for a in args + [cur.strip()] if a and not a.startswith("*")]
    is_kw = [re.match(r"^\w+\s*=[^=]", a) is not None for a in args]
    positional = [a for a, k in zip(args, is_kw) if not k]
    keywords = dict(tuple(t.strip() for t in a.split("=", 1)) for a, k in zip(args, is_kw) if k)
    return positional, keywords


def _forward_source(cls) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def own_attention_masks(model) -> tuple[str, ...]:
    """Attention classes that hand the attention function a mask they build themselves (e.g.
    Doge's dynamic mask) instead of the ``attention_mask`` transformers' mask builders made.

    Read from the source of each module class's ``forward``: the mask argument of its
    ``attention_interface(...)`` call must be ``attention_mask`` or ``None``.
    """
    found = set()
    for cls in {type(m) for m in model.modules()}:
        src = _forward_source(cls)
        for m in re.finditer(r"attention_interface\(", src):
            positional, keywords = _call_arguments(_bracketed(src, m.end() - 1))
            mask = keywords.get("attention_mask", positional[4] if len(positional) > 4 else "attention_mask")
            if mask not in ("attention_mask", "None"):
                found.add(f"{cls.__name__} ({mask})")
    return tuple(sorted(found))


_ATTENTION_CALL = re.compile(r"(?<![\w.])(self\.(?:self_attn|attention|attn|self_attention)|decoder_layer)\(")


def kwargs_not_forwarded(model) -> tuple[str, ...]:
    """Module classes whose ``forward`` calls its attention (or a decoder layer) without passing
    ``**kwargs`` on: the ``seqpar=`` structure from ``shard_batch`` cannot reach attention there."""
    found = set()
    for cls in {type(m) for m in model.modules()}:
        src = _forward_source(cls)
        for m in _ATTENTION_CALL.finditer(src):
            if "**" not in _bracketed(src, m.end() - 1):
                found.add(f"{cls.__name__} -> {m.group(1)}")
    return tuple(sorted(found))


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
    calls = [
        _bracketed(src, m.end() - 1)
        for m in re.finditer(r"create_(?:causal|sliding_window_causal|chunked_causal)_mask\(", src)
    ]
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
    mixers = sorted(
        {
            type(m).__name__
            for m in model.modules()
            if isinstance(m, torch.nn.Conv1d) or SEQUENCE_MIXER.search(type(m).__name__)
        }
    )
    return AttentionFeatures(
        model_type=getattr(config, "model_type", type(config).__name__),
        sinks=sinks,
        softcap=getattr(config, "attn_logit_softcapping", None),
        dropout=max(
            float(getattr(config, k, 0.0) or 0.0)
            for k in ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop")
        ),
        qk_head_dim=int(qk),
        v_head_dim=int(v),
        bidirectional=non_causal,
        sequence_mixers=tuple(mixers),
        separates_documents=mask_sees_position_ids(model),
        own_masks=own_attention_masks(model),
        kwargs_dropped=kwargs_not_forwarded(model),
        chunk_size=getattr(config, "attention_chunk_size", None),
        derived_positions=tuple(
            sorted(
                {
                    type(m).__name__
                    for m in model.modules()
                    if "create_position_ids_from_input_ids" in _forward_source(type(m))
                }
            )
        ),
    )


def check_sequence_mixing(features: AttentionFeatures) -> None:
    """Refuse a model whose layers mix tokens outside attention (every strategy shards the
    sequence, and such a layer would see only its rank's shard), whose attention layers build
    masks of their own or use chunked attention, or that do not pass ``seqpar=`` on to attention.

    Raises:
        SequenceMixingError: naming the layers and the alternative.
    """
    if features.kwargs_dropped:
        raise SequenceMixingError(
            f"this {features.model_type} model does not pass keyword arguments on to its attention "
            f"({list(features.kwargs_dropped)}), so the batch structure from shard_batch (the seqpar= keyword) "
            "cannot reach the attention layers. Train this model without hf_seqpar (do not call "
            "enable_sequence_parallel on it)."
        )
    if features.chunk_size is not None:
        raise SequenceMixingError(
            f"this {features.model_type} model uses chunked local attention (attention_chunk_size="
            f"{features.chunk_size}), which no hf_seqpar strategy implements (its masks know causality, sliding "
            "windows, padding and documents). Train this model without hf_seqpar (do not call "
            "enable_sequence_parallel on it)."
        )
    if features.derived_positions:
        raise SequenceMixingError(
            f"this {features.model_type} model derives position ids from input_ids in "
            f"{list(features.derived_positions)} (RoBERTa-style: padding_idx + 1 + index), while shard_batch gives "
            "every rank global position ids counted from 0, so the position embeddings would differ from the "
            "unsharded model. Train this model without hf_seqpar (do not call enable_sequence_parallel on it)."
        )
    if features.own_masks:
        raise SequenceMixingError(
            f"this {features.model_type} model builds attention masks of its own inside {list(features.own_masks)} "
            "and hands them to the attention function; hf_seqpar builds the mask of the whole sequence from the "
            "batch structure and cannot honour them (they are computed from one rank's shard). Train this model "
            "without hf_seqpar (do not call enable_sequence_parallel on it)."
        )
    if features.sequence_mixers:
        raise SequenceMixingError(
            f"this {features.model_type} model mixes tokens outside attention, in {list(features.sequence_mixers)} "
            "(state-space, linear-attention, recurrent, convolution, or sparse-attention indexer/compressor "
            "layers). Every hf_seqpar strategy splits the "
            "sequence over ranks and gives only attention the whole sequence, so these layers would see their "
            "rank's shard alone and the result would be wrong. Train this model without hf_seqpar (do not call "
            "enable_sequence_parallel on it)."
        )
