"""What a causal LM does to its logits after ``lm_head``, read from its ``forward`` source.

The chunked loss (:mod:`hf_seqpar.core.memory`) computes ``lm_head`` itself, so it must apply every
transformation the model's own ``forward`` applies between the base model and the loss:
Granite's ``logits / config.logits_scaling``, Cohere's ``logits * self.logit_scale``, Gemma's
``final_logit_softcapping``, MiniCPM3's ``hidden_states / config.logits_scaling``, Falcon-H1's
``lm_head_multiplier``, HyperCLOVA X's ``* config.logits_scaling``. Instead of a list of config
names (which silently misses a family that adds a new one), :func:`logit_transform` parses the
class ``forward`` and recognises each statement that assigns ``logits`` or ``hidden_states``;
any statement it does not know makes it refuse, naming the statement.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from dataclasses import dataclass

__all__ = ["LogitTransform", "logit_transform"]


@dataclass(frozen=True)
class LogitTransform:
    """``logits = softcap * tanh(scale * (h @ W.T + b) / softcap)`` (no tanh when ``softcap`` is None)."""

    scale: float = 1.0
    """Multiplier of the ``lm_head`` output (``1 / logits_scaling`` for Granite)."""
    softcap: float | None = None
    """Soft-capping value (Gemma's ``final_logit_softcapping``), or None."""


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# statements that assign logits / hidden_states without changing the arithmetic
_PLAIN = [
    r"hidden_states = outputs(\.last_hidden_state|\[0\])",
    r"hidden_states = slice_logits_to_keep\(hidden_states, logits_to_keep\)",
    r"logits = self\.lm_head\(hidden_states(\[:, slice_indices, :\])?\)(\.float\(\))?",
    r"logits = logits\.float\(\)",  # the chunked loss computes in fp32 anyway
]
_LM_HEAD = r"self\.lm_head\(hidden_states(\[:, slice_indices, :\])?\)"
# statement pattern -> (kind, value(model)); kind "scale" multiplies, "softcap" caps
_KNOWN = [
    (r"logits = logits / self\.config\.logits_scaling", "scale", lambda m: 1.0 / m.config.logits_scaling),
    (r"logits = logits \* self\.logit_scale", "scale", lambda m: m.logit_scale),
    (rf"logits = {_LM_HEAD} \* self\.config\.logits_scaling", "scale", lambda m: m.config.logits_scaling),
    (rf"logits = {_LM_HEAD} \* self\.model\.lm_head_multiplier", "scale", lambda m: m.model.lm_head_multiplier),
    (
        r"hidden_states = hidden_states / self\.config\.logits_scaling",
        "scale_hidden",
        lambda m: 1.0 / m.config.logits_scaling,
    ),
]
_SOFTCAP_TEST = "self.config.final_logit_softcapping is not None"
_SOFTCAP_BODY = [
    r"logits = logits(\.float\(\))? / self\.config\.final_logit_softcapping",
    r"logits = torch\.tanh\(logits\)",
    r"logits = logits \* self\.config\.final_logit_softcapping",
]


def _assigned(node) -> set:
    names = set()
    for sub in ast.walk(node):
        targets = (
            sub.targets
            if isinstance(sub, ast.Assign)
            else [sub.target]
            if isinstance(sub, (ast.AugAssign, ast.AnnAssign))
            else []
        )
        for t in targets:
            names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def logit_transform(model) -> LogitTransform:
    """The logit transformation of ``type(model).forward``, recognised statement by statement.

    Args:
        model: a ``*ForCausalLM`` model (not a wrapper).

    Returns:
        The :class:`LogitTransform` to apply to ``lm_head``'s output (identity for Llama-style models).

    Raises:
        ValueError: a statement that assigns ``logits``/``hidden_states`` is not one the chunked loss
            can reproduce (the message quotes it), or the ``lm_head`` call was not found.
    """
    cls = type(model).__name__
    refuse = (
        f"; the chunked loss computes lm_head itself and cannot reproduce it. Set loss_chunk_size: null "
        f"(the model's own loss) for {cls}."
    )
    try:
        src = textwrap.dedent(inspect.getsource(type(model).forward))
    except (OSError, TypeError) as e:
        raise ValueError(f"cannot read {cls}.forward ({e}) to check how it computes its logits" + refuse) from e
    fn = ast.parse(src).body[0]
    scale, softcap, seen_head = 1.0, None, False
    for stmt in fn.body:
        if not (_assigned(stmt) & {"logits", "hidden_states"}):
            continue
        text = _norm(ast.get_source_segment(src, stmt) or "")
        if isinstance(stmt, ast.If) and _norm(ast.get_source_segment(src, stmt.test)) == _SOFTCAP_TEST:
            body = [_norm(ast.get_source_segment(src, s)) for s in stmt.body]
            if len(body) != 3 or not all(re.fullmatch(p, b) for p, b in zip(_SOFTCAP_BODY, body)) or stmt.orelse:
                raise ValueError(f"{cls}.forward soft-caps its logits as `{text}`" + refuse)
            softcap = model.config.final_logit_softcapping
            continue
        if (
            isinstance(stmt, ast.If)
            and not stmt.orelse
            and all(any(re.fullmatch(p, _norm(ast.get_source_segment(src, s))) for p in _PLAIN) for s in stmt.body)
        ):
            continue  # e.g. Gemma 4: `if ...: hidden_states = slice_logits_to_keep(...)`
        seen_head |= bool(re.search(_LM_HEAD, text))
        if any(re.fullmatch(p, text) for p in _PLAIN):
            continue
        for pattern, kind, value in _KNOWN:
            if re.fullmatch(pattern, text):
                if softcap is not None:
                    raise ValueError(f"{cls}.forward scales its logits after soft-capping them (`{text}`)" + refuse)
                if kind == "scale_hidden" and getattr(model.get_output_embeddings(), "bias", None) is not None:
                    raise ValueError(
                        f"{cls}.forward scales the hidden states before a biased lm_head (`{text}`)" + refuse
                    )
                scale *= float(value(model))
                break
        else:
            raise ValueError(
                f"{cls}.forward computes its logits with `{text}`, a step hf_seqpar does not know" + refuse
            )
    if not seen_head:
        raise ValueError(f"{cls}.forward has no `logits = self.lm_head(hidden_states...)` statement" + refuse)
    return LogitTransform(scale=scale, softcap=softcap)
