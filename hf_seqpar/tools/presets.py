"""Model shapes by name, and loading a config from a preset, a file, a folder or the Hub."""

from __future__ import annotations

import difflib
import json
import pathlib

__all__ = ["PRESETS", "load_config"]

#: Llama-style shapes (transformers config fields) usable without any download.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=344,
        vocab_size=4096,
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "llama-3.1-70b": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
    "llama-3.1-405b": dict(
        hidden_size=16384,
        num_hidden_layers=126,
        num_attention_heads=128,
        num_key_value_heads=8,
        intermediate_size=53248,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}


def load_config(spec: str, **overrides):
    """A transformers config from a preset name, a ``config.json`` path, a model folder, or a
    Hub model name (config only; nothing else is downloaded).

    Args:
        spec: preset (see ``PRESETS``), file, folder or Hub name.
        **overrides: config fields to replace (e.g. ``num_hidden_layers``); None values ignored.

    Returns:
        A ``PretrainedConfig`` (``LlamaConfig`` for presets).

    Raises:
        ValueError: ``spec`` is none of these (the message lists the presets and a close match),
            or a ``config.json`` that is not a JSON object.
    """
    from transformers import AutoConfig, LlamaConfig

    overrides = {k: v for k, v in overrides.items() if v is not None}
    path = pathlib.Path(spec)
    if spec in PRESETS:
        return LlamaConfig(**{**PRESETS[spec], **overrides})
    if path.is_file():
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{spec}: a config.json must hold a JSON object, got {type(data).__name__}")
        model_type = data.pop("model_type", "llama")  # for_model takes it positionally
        return AutoConfig.for_model(model_type, **{**data, **overrides})
    presets = ", ".join(PRESETS)
    close = difflib.get_close_matches(spec, PRESETS, n=1, cutoff=0.75)
    if close and not path.exists():  # a typo of a preset: do not send it to the Hub
        raise ValueError(
            f"unknown model {spec!r}: did you mean the preset {close[0]!r}? Presets: {presets}; or give "
            "a config.json, a model folder or a Hub name"
        )
    try:
        return AutoConfig.from_pretrained(spec, **overrides)  # a folder or a Hub name
    except (OSError, ValueError) as e:
        raise ValueError(
            f"cannot load a config for model {spec!r} ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"Use a preset ({presets}), a config.json file, a model folder, or a Hub model name "
            "(with access to the Hub)"
        ) from e
