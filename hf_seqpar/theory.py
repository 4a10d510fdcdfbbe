"""What SP costs, in closed form: communication bytes and activation memory per rank.

Shared by ``hf-seqpar bench`` (theory column next to the measured one) and ``hf-seqpar plan``
(predictions for clusters we cannot run here). Conventions match :mod:`hf_seqpar.comm`: bytes a
rank *sends*, per optimizer step of one micro-batch (forward + backward).

Activation memory counts the tensors autograd saves for the backward (what
``torch.autograd.graph.saved_tensors_hooks`` sees), derived from the structure of a transformers
Llama decoder layer with ``sdpa``/flash attention (no ``S x S`` probabilities):

- each RMSNorm saves its input upcast to fp32 (``4h``), ``rsqrt`` (4 bytes), the normalised
  activations and the next linear's input (``2 e h``);
- attention saves q, k, v, its output (``e (2 h_q + 2 h_kv) d``) and the fp32 lse (``4 h_q``);
  under SP the output projection's input is a new tensor after the exchange (``e h_q d`` more);
- the SwiGLU MLP saves gate, up, silu(gate) and the down projection's input (``4 e I``);
- outside the layers: token ids and labels (int64), RoPE cos/sin (``2 e d``), the final norm, and
  the fp32 log-softmax of the loss (``4 V``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelShape", "comm_bytes", "activation_bytes", "kv_heads_after_replication"]

FP32 = 4


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


def kv_heads_after_replication(heads: int, kv_heads: int, ulysses: int) -> int:
    """kv heads after the replication a Ulysses degree needs (see ``kv_replication``)."""
    if ulysses == 1:
        return kv_heads
    from .strategies.ulysses import kv_replication

    return kv_heads * kv_replication(heads, kv_heads, ulysses)


def _split(strategy: str, sp: int, ulysses_size: int | None, heads: int) -> tuple[int, int]:
    """(ulysses degree, ring degree) of a strategy on ``sp`` ranks."""
    if strategy == "ulysses":
        return sp, 1
    if strategy == "ring":
        return 1, sp
    if strategy == "hybrid":
        from .strategies.hybrid import largest_ulysses_size

        u = ulysses_size or largest_ulysses_size(heads, sp)
        return u, sp // u
    raise ValueError(f"no ulysses/ring split for strategy {strategy!r}")


def comm_bytes(strategy: str, m: ModelShape, seq_len: int, sp: int, batch: int = 1, elem: int = 4,
               ulysses_size: int | None = None, backward: bool = True, loss_allreduce: bool = True) -> dict:
    """Bytes one rank sends per step (forward, and backward when ``backward``).

    Args:
        strategy: ``ulysses``, ``ring``, ``hybrid`` or ``megatron``.
        m: the model shape.
        seq_len: padded sequence length ``N`` (a multiple of what the layout needs).
        sp: SP (or TP) degree ``P``.
        batch: micro-batch rows ``B``.
        elem: bytes per activation element.
        ulysses_size: hybrid's Ulysses degree (default: the largest the heads allow).
        backward: include the backward pass.
        loss_allreduce: include the fp32 scalar all-reduce of the exact loss.

    Returns:
        ``{"forward": bytes, "backward": bytes, "total": bytes, "all_to_all": bytes}``; the last is
        the Ulysses all-to-all share of the total (the rest is ring, TP or loss traffic).

    Formulas (per layer, elements): Ulysses ``(2 h_q + 2 h_kv') B N/P d (P-1)/P`` each way;
    ring ``(R-1) 2 B h_kv N/R d`` forward, the same plus ``R`` fp32 dK/dV hops backward;
    Megatron-SP ``4 (T-1) B N/T h`` forward (2 all-gathers + 2 reduce-scatters), the same backward.
    """
    n = seq_len // sp
    d, L = m.head_dim, m.layers
    fwd = bwd = a2a_total = 0.0
    if strategy == "megatron":
        per = 4 * (sp - 1) * batch * n * m.hidden * elem
        fwd, bwd = L * per, L * per
    else:
        u, r = _split(strategy, sp, ulysses_size, m.heads)
        kv_eff = kv_heads_after_replication(m.heads, m.kv_heads, u)
        if u > 1:
            a2a = (2 * m.heads + 2 * kv_eff) * batch * n * d * elem * (u - 1) / u
            fwd += L * a2a
            bwd += L * a2a
            a2a_total = 2 * L * a2a if backward else L * a2a
        if r > 1:
            kv = 2 * batch * (kv_eff // u) * (n * u) * d  # elements of this rank's ring-shard K and V
            fwd += L * (r - 1) * kv * elem
            bwd += L * ((r - 1) * kv * elem + r * kv * FP32)
    if loss_allreduce and sp > 1:
        ar = 2 * FP32 * (sp - 1) / sp
        fwd += ar
        if strategy != "megatron":  # TP ranks share one graph: the loss sum's backward is the identity
            bwd += ar
    if not backward:
        bwd = 0.0
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "all_to_all": a2a_total}


def activation_bytes(strategy: str | None, m: ModelShape, seq_len: int, sp: int = 1, batch: int = 1, elem: int = 4,
                     ulysses_size: int | None = None, checkpointing: bool = False, chunked_loss: bool = False) -> float:
    """Bytes autograd saves for the backward on one rank (one micro-batch).

    Args:
        strategy: None for the plain model, else ``ulysses``/``ring``/``hybrid``/``megatron``.
        m: the model shape.
        seq_len: padded sequence length ``N``.
        sp: SP degree ``P`` (local tokens ``n = N / P``).
        batch: micro-batch rows.
        elem: bytes per activation element (4 fp32, 2 bf16).
        ulysses_size: hybrid's Ulysses degree.
        checkpointing: per-layer activation checkpointing (only each layer's input is kept, plus
            one layer's activations while it is recomputed).
        chunked_loss: lm_head + cross-entropy in chunks (no fp32 ``n x V`` log-softmax kept).

    Returns:
        Bytes (a float: exact for the structure described in the module docstring).
    """
    n = batch * seq_len / sp
    h, d, hq = m.hidden, m.head_dim, m.heads
    norm = 4 * h + FP32 + 2 * elem * h
    if strategy in (None, "megatron"):
        kv_eff, o_in = m.kv_heads, 0
    else:
        u, _ = _split(strategy, sp, ulysses_size, hq)
        kv_eff, o_in = kv_heads_after_replication(hq, m.kv_heads, u), elem * hq * d
    attention = elem * (2 * hq * d + 2 * kv_eff * d) + FP32 * hq + o_in
    layer = 2 * norm + attention + 4 * elem * m.intermediate
    if strategy == "megatron" and sp > 1:
        # heads and MLP columns split over T ranks on the full sequence (same bytes per local
        # token), but the two all-gathered linear inputs are full-sequence: T x e h per local token
        layer += 2 * (sp - 1) * elem * h
    outside = 8 + 8 + 2 * elem * d + norm + (0 if chunked_loss else FP32 * m.vocab)
    if checkpointing:
        return n * (m.layers * elem * h + layer + outside)
    return n * (m.layers * layer + outside)
