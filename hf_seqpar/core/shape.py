"""The numbers of a Llama-style model that the cost formulas need, and the per-layer activation
bytes those formulas share (the strategies' cost models and :mod:`hf_seqpar.tools.theory` use them).

Activation memory counts the tensors autograd saves for the backward (what
``torch.autograd.graph.saved_tensors_hooks`` sees), derived from the structure of a transformers
Llama decoder layer with ``sdpa``/flash attention (no ``S x S`` probabilities):

- each RMSNorm of transformers saves its input upcast to fp32 (``4h``), ``rsqrt`` (4 bytes), the
  normalised activations and the next linear's input (``2 e h``); hf_seqpar's lean norm
  (:mod:`hf_seqpar.core.norm`, the plugin's ``lean_norms``) saves its input in its own dtype, the fp32
  ``rstd`` and the next linear's input (``2 e h + 4``; :func:`lean_norm_bytes`);
- attention saves q, k, v, its output (``e (2 h_q + 2 h_kv) d``) and the fp32 lse (``4 h_q``);
  under SP the output projection's input is a new tensor after the exchange (``e h_q d`` more);
- the SwiGLU MLP saves gate, up, silu(gate) and the down projection's input (``4 e I``);
- outside the layers: token ids and labels (int64), RoPE cos/sin (``2 e d``), the final norm, and
  the fp32 log-softmax of the loss (``4 V``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ModelShape",
    "FP32",
    "INDEX",
    "norm_bytes",
    "lean_norm_bytes",
    "attention_saved_bytes",
    "mlp_saved_bytes",
    "layer_activation_bytes",
    "outside_activation_bytes",
]

#: Bytes of an fp32 element (the lse, norms' upcasts, accumulators): defined here only.
FP32 = 4
#: Bytes of an int64 element (token ids, labels).
INDEX = 8


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-style model that the formulas need."""

    layers: int
    """Decoder layers ``L``."""
    hidden: int
    """Hidden size ``h``."""
    heads: int
    """Query heads ``h_q``."""
    kv_heads: int
    """Key/value heads ``h_kv``."""
    head_dim: int
    """Head dimension ``d``."""
    intermediate: int
    """MLP intermediate size ``I``."""
    vocab: int
    """Vocabulary size ``V``."""

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a transformers config (Llama, Mistral, Qwen2/3 ...)."""
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )

    @property
    def params(self) -> int:
        """Parameter count (untied embeddings, no biases)."""
        h, d = self.hidden, self.head_dim
        attn = h * d * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * h * self.intermediate
        return self.layers * (attn + mlp + 2 * h) + 2 * self.vocab * h + h


def norm_bytes(m: ModelShape, elem: int) -> float:
    """Bytes one RMSNorm saves per token: fp32 input, ``rsqrt``, normalised output, next input."""
    return FP32 * m.hidden + FP32 + 2 * elem * m.hidden


def lean_norm_bytes(m: ModelShape, elem: int) -> float:
    """Bytes hf_seqpar's lean RMSNorm (:class:`hf_seqpar.core.norm.RMSNormFunction`) saves per token:
    its input in its own dtype, the fp32 ``rstd`` and the next linear's input (its output)."""
    return elem * m.hidden + FP32 + elem * m.hidden


def attention_saved_bytes(m: ModelShape, elem: int, kv_heads: int) -> float:
    """Bytes attention saves per local token: q, k, v, its output and the fp32 lse."""
    return elem * (2 * m.heads * m.head_dim + 2 * kv_heads * m.head_dim) + FP32 * m.heads


def mlp_saved_bytes(m: ModelShape, elem: int) -> float:
    """Bytes the SwiGLU MLP saves per token: gate, up, silu(gate) and the down projection's input."""
    return 4 * elem * m.intermediate


def layer_activation_bytes(m: ModelShape, elem: int, kv_heads: int, extra: float = 0.0) -> float:
    """Bytes one decoder layer saves per local token.

    Args:
        m: the model shape.
        elem: bytes per activation element.
        kv_heads: kv heads attention saves (after any replication).
        extra: strategy-specific bytes per token (see ``ActivationTerms.extra_per_token``).
    """
    return 2 * norm_bytes(m, elem) + attention_saved_bytes(m, elem, kv_heads) + mlp_saved_bytes(m, elem) + extra


def outside_activation_bytes(m: ModelShape, elem: int, chunked_loss: bool) -> float:
    """Bytes saved per token outside the decoder layers: ids and labels, RoPE, final norm, and the
    fp32 log-softmax of the loss unless the loss is chunked."""
    return INDEX + INDEX + 2 * elem * m.head_dim + norm_bytes(m, elem) + (0 if chunked_loss else FP32 * m.vocab)
