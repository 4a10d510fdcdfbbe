"""Per-rank peak memory of one training step, with every memory feature, per strategy.

The model follows one step of a Llama-style decoder through its phases and takes the largest
sum of what is live in each (bytes per rank; ``n = B S / P`` local tokens, ``e`` bytes per
activation element, ``h`` hidden, ``h_q``/``h_kv`` heads of ``d``, ``I`` MLP width, ``V`` vocabulary,
``L`` layers). Attention is O(S) (hf_seqpar's variable-length pieces: no ``S x S`` tensor):

- **saved per layer** (what autograd keeps for the backward): two RMSNorms (transformers': fp32
  input ``4h``, ``rsqrt`` 4 B, normalised and weighted outputs ``2 e h``; with ``lean_norms``,
  hf_seqpar's :mod:`hf_seqpar.core.norm`: the input in its own dtype ``e h``, fp32 ``rstd`` 4 B and
  the weighted output ``e h``, and in a checkpointed layer the first norm's input is the kept layer
  input itself); attention's q, k, v, output and fp32
  lse, and the output projection's input, which is a new tensor after the exchange
  (``e (3 h_q + 2 h_kv') d + 4 h_q``, ``h_kv'`` = kv heads after Ulysses' replication); the SwiGLU
  MLP's gate, up, silu(gate) and down input (``4 e I``; with ``mlp_tiles`` only the tile inputs,
  which are views of the norm output). Megatron-SP adds its two all-gathered inputs.
- **checkpointing** keeps only each layer's input (``e h``) and recomputes one layer at a time
  in the backward; **offload_checkpoints** moves everything saved outside the checkpointed
  layers to host memory (``save_on_cpu`` copies each saved tensor: the layer inputs, the final
  norm's tensors (with ``lean_norms`` its input, ``rstd`` and output), the plain loss's inputs and
  the ``lm_head`` weight it saves; the chunked loss keeps what it saves on the device, as its
  backward needs it first, and with ``lean_norms`` computes the final norm itself, per chunk).
- **backward working set of a layer** on top of its saved tensors and the residual gradients (the
  layer output's ``e h`` during the MLP's backward, with the residual sum's ``2 e h`` after): the
  MLP's ``2 e I`` (three ``n x I`` gradients while the down input is already released; per tile with
  ``mlp_tiles``, plus the tile's recomputed ``4 e I``, or the assembly of the tiles' gradients,
  ``3 e h``: :func:`_mlp_backward`); attention's (which starts once the MLP's and the second norm's
  saved tensors are released) output gradient and the kernel's gradients: on the variable-length
  path (Ulysses, Megatron-SP, one rank) of one document these are the result (fp32 accumulators only
  span positions several pieces write: :func:`hf_seqpar.kernels.varlen.pieces_gradients`), while the
  ring keeps fp32 dq/dk/dv accumulators over the local sequence beside the kernel's block gradients
  and adds the K/V block in flight (one pair at ``P = 2``, two beyond) and the fp32 dK/dV
  accumulators travelling with it; on a GPU the CUDA kernel's own buffers
  (:func:`cuda_kernel_backward_bytes`: expanded K/V where the kernel needs them, its expanded dk/dv
  and fp32 dq accumulator; from ``hf_seqpar.kernels.gqa``); the lean norm's backward holds its
  recomputed normalised input and the weight-gradient product (``2 e h``), transformers' norm its
  fp32 temporaries (:func:`hf_norm_backward_bytes`, less the ``2 e h`` it has released by then:
  the larger side in bf16); Ulysses' exchange of the
  q/k/v gradients holds gradients, packed input and output once the kernel's accumulators are
  released.
- **loss**: the plain loss keeps the fp32 log-softmax (``4 V``) and its backward holds two more
  ``n x V`` fp32 gradients; the chunked loss holds three ``chunk x V`` fp32 tensors (a chunk's
  logits and softmax while the next chunk's logits are computed) and fp32 ``lm_head`` weight
  gradients.
- **phases**: forward end and loss backward (everything kept, the loss's working set); the
  layers' backward from the last layer (all checkpoints kept) to the first (all layer gradients
  allocated, when gradients are not sharded); with offload the tensors come back to the device
  for their backward (the layer's input; the loss's hidden states, or the plain loss's two
  log-softmax copies). Forward transients of a layer (the ring's K/V in flight, one all-to-all)
  are smaller than its backward working set and are not a phase of their own (in a checkpoint's
  recomputation too: Ulysses' exchange of q/k/v there peaks 10 MiB below the step at 32K tokens on
  2 CPU ranks, BENCHMARKS.md, "The leaner recomputed layer").
- **model states** (the planner's part): parameters, gradients and optimizer states, sharded by
  FSDP/ZeRO (:func:`hf_seqpar.tools.plan.evaluate`), plus FSDP's all-gathered layers (current and
  prefetched) while they compute.

Everything that depends on the strategy is gathered in :func:`strategy_terms`. Validated on CPU
ranks (:mod:`hf_seqpar.tools.memcheck`, ``tests/test_memory_model.py``): fp32, Ulysses and ring, every
feature on and off (``lean_norms`` too), within 15% of the measured peak; the bf16 GPU terms are the same structure
with ``e = 2`` and have not been measured on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hf_seqpar.core.shape import (
    FP32,
    INDEX,
    ModelShape,
    attention_saved_bytes,
    lean_norm_bytes,
    mlp_saved_bytes,
    norm_bytes,
)
from hf_seqpar.kernels.gqa import GQA

__all__ = [
    "Features",
    "StrategyTerms",
    "MemoryModelInputs",
    "MemoryPeak",
    "strategy_terms",
    "peak_memory",
    "hf_norm_backward_bytes",
    "attention_flops",
    "trl_fused_head_terms",
    "TRL_TOKEN_TILE",
    "TRL_VOCAB_TILE",
    "cuda_kernel_backward_bytes",
    "GPU_KERNEL",
]

#: What ``strategy=None`` (one rank, no SP) is modelled as.
DEFAULT_STRATEGY = "ulysses"
#: The attention kernel GPU predictions assume (the planner, the GPU selftest): aten's flash kernel,
#: the first CUDA backend without flash-attn (``hf_seqpar.kernels.speed.FALLBACK``).
GPU_KERNEL = "cuda_flash"


@dataclass(frozen=True)
class Features:
    """The plugin's memory features (``SequenceParallelPlugin`` fields of the same names)."""

    checkpointing: bool = False
    """``gradient_checkpointing``: per-layer activation checkpointing."""
    offload_checkpoints: bool = False
    """``offload_checkpoints``: what autograd saves outside the checkpointed layers goes to host memory."""
    mlp_tiles: int | None = None
    """``mlp_tiles``: MLP sequence tiles, recomputed in backward (None or 1 = off)."""
    loss_chunk_size: int | None = None
    """``loss_chunk_size``: tokens per chunk of lm_head + cross-entropy (None = the plain loss)."""
    lean_norms: bool = True
    """``lean_norms``: RMSNorms save input and fp32 ``rstd``, not an fp32 copy (:mod:`hf_seqpar.core.norm`)."""

    def norm(self, m: ModelShape, e: int) -> float:
        """Bytes one RMSNorm saves per token with these features."""
        return lean_norm_bytes(m, e) if self.lean_norms else norm_bytes(m, e)

    @property
    def label(self) -> str:
        parts = [name for name, on in (("ckpt", self.checkpointing), ("offload", self.offload_checkpoints)) if on]
        if self.mlp_tiles and self.mlp_tiles > 1:
            parts.append(f"tiles{self.mlp_tiles}")
        if self.loss_chunk_size:
            parts.append(f"chunk{self.loss_chunk_size}")
        if not self.lean_norms:
            parts.append("hfnorms")
        return "+".join(parts) or "none"

    def plugin_fields(self) -> dict:
        """The ``SequenceParallelPlugin`` YAML keys for these features."""
        return {
            "gradient_checkpointing": self.checkpointing,
            "offload_checkpoints": self.offload_checkpoints,
            "mlp_tiles": self.mlp_tiles if self.mlp_tiles and self.mlp_tiles > 1 else None,
            "loss_chunk_size": self.loss_chunk_size,
            **({} if self.lean_norms else {"lean_norms": False}),  # the plugin's default: true
        }


@dataclass(frozen=True)
class StrategyTerms:
    """What a strategy changes in the memory of a layer (per local token unless said otherwise)."""

    ulysses: int
    """Ulysses (all-to-all) degree."""
    ring: int
    """Ring degree."""
    tp: int
    """Tensor-parallel degree (Megatron-SP), 1 otherwise."""
    kv_heads: int
    """kv heads attention holds per query-head set (after Ulysses' replication)."""
    out_copy: bool
    """The output projection's input is a new tensor (after the exchange or a transposing copy)."""
    gathered_inputs: int
    """Full-sequence linear inputs saved per layer (Megatron-SP's all-gathers), in units of ``(T - 1) e h``."""
    exchange_elems: int
    """Elements per local token one Ulysses exchange holds twice (input and output), 0 without one."""
    ring_kv_in_flight: int
    """K/V pairs received beside the rank's own while the ring turns (0, 1 at ``P = 2``, else 2)."""
    params_over_sp: bool
    """Parameters are split over the SP ranks (tensor parallel)."""


def strategy_terms(strategy: str | None, shape: ModelShape, sp: int, ulysses_size: int | None = None) -> StrategyTerms:
    """Every strategy-specific memory fact, in one place, from the cost model
    (:mod:`hf_seqpar.tools.cost`, reading the facts the strategy declares: its Ulysses, ring and
    tensor-parallel degrees, its activation terms, whether it copies the attention output and
    gathers linear inputs).

    Args:
        strategy: a strategy name, or None (one rank, no SP: the default strategy at degree 1,
            which is what ``sp_size=1`` runs).
        shape: the model.
        sp: SP degree.
        ulysses_size: hybrid's Ulysses degree (default: the largest the heads allow).

    Raises:
        ValueError: an unknown strategy.
    """
    from hf_seqpar.strategies import strategy_class

    from . import cost
    from .theory import strategy_options

    name = strategy or DEFAULT_STRATEGY
    cls = strategy_class(name)
    opts = strategy_options(name, ulysses_size=ulysses_size)
    u, r, tp = cost.degrees(cls, sp, opts, shape.heads)
    act = cost.activation_terms(cls, shape, sp, 1, opts)  # bytes per element 1: extra terms in elements
    exchange = (shape.heads + 2 * act.kv_heads) * shape.head_dim if u > 1 else 0
    # tensor parallel (tp > 1): heads split, full-sequence linear inputs gathered, parameters split
    return StrategyTerms(
        u,
        r,
        tp,
        act.kv_heads,
        out_copy=cls.cost.out_copy,
        gathered_inputs=cls.cost.gathered_inputs if tp > 1 else 0,
        exchange_elems=exchange,
        ring_kv_in_flight=0 if r == 1 else (1 if r == 2 else 2),
        params_over_sp=tp > 1,
    )


@dataclass(frozen=True)
class MemoryModelInputs:
    """One prediction's inputs."""

    shape: ModelShape
    seq_len: int
    """Padded tokens per row ``S``."""
    strategy: str | None = "ulysses"
    sp: int = 1
    features: Features = field(default_factory=Features)
    batch: int = 1
    """Rows per micro-batch ``B``."""
    elem: int = 2
    """Bytes per activation element (2: bf16 compute and residual stream, as under FSDP2's bf16 ``param_dtype``)."""
    param_elem: int = 2
    """Bytes per element of the parameters the step computes with (and of their gradients)."""
    ulysses_size: int | None = None
    grads_in_peak: bool = True
    """Whether the step's parameter gradients count in the peak (a step without gradient sharding);
    False when the caller counts them with the model states (the planner, under FSDP/ZeRO)."""
    fused_head: bool = False
    """TRL's fused LM head (``DPOTrainer``/``GRPOTrainer``'s per-token log-probs, through
    hf_seqpar's sharded call) instead of hf_seqpar's loss: :func:`trl_fused_head_terms` replaces the
    loss terms (``features.loss_chunk_size`` is then ignored)."""
    fused_head_triton: bool = True
    """With ``fused_head``: TRL's Triton kernels (GPUs); False: its torch fallback (CPU ranks, for the
    measured validation: :func:`trl_fused_head_terms` with ``triton=False``)."""
    kernel: str | None = None
    """The CUDA attention kernel the backward runs (a backend of ``hf_seqpar.kernels.gqa.GQA``, e.g.
    :data:`GPU_KERNEL`), whose own buffers add to the working set (:func:`cuda_kernel_backward_bytes`);
    None: the CPU kernel, as the CPU validation measures it."""


@dataclass
class MemoryPeak:
    """Per-rank memory of one step (bytes)."""

    activation_peak: float
    """Largest live activation memory on the device over the step's phases (no model states)."""
    peak_phase: str
    """The phase where it occurs: ``forward``, ``loss backward``, ``last layer backward`` (every earlier
    layer's checkpoint still kept), ``first layer backward`` (every layer's gradient allocated, when
    gradients count) or ``end``."""
    phases: dict
    """Activation bytes live at each phase's peak (the step's gradients as far as they exist there
    are in :attr:`grad_at_phase`)."""
    grad_at_phase: dict
    """Parameter-gradient bytes allocated by each phase (full, unsharded: what a step without
    gradient sharding holds)."""
    host_bytes: float
    """Host memory the offloaded tensors take (0 without offload)."""
    kept_bytes: float
    """Activations kept across the whole forward (layer inputs with checkpointing, else all saved)."""
    components: dict
    """Named terms (bytes) behind the phases, for reports."""

    @property
    def grad_bytes(self) -> float:
        """Gradient bytes at the peak phase."""
        return self.grad_at_phase[self.peak_phase]

    @property
    def total(self) -> float:
        """Activations and gradients at the peak phase."""
        return self.activation_peak + self.grad_bytes


def _layer_saved(m: ModelShape, t: StrategyTerms, f: Features, e: int, batch: int) -> dict:
    """Bytes per local token one layer saves for its backward (when not checkpointed)."""
    h, d, hq = m.hidden, m.head_dim, m.heads
    norm = f.norm(m, e)
    attention = attention_saved_bytes(m, e, t.kv_heads) + (e * hq * d if t.out_copy else 0)
    tiled = bool(f.mlp_tiles and f.mlp_tiles > 1)
    mlp = (e * h if batch > 1 else 0) if tiled else mlp_saved_bytes(m, e)
    gathered = t.gathered_inputs * (t.tp - 1) * e * h
    return {"norms": 2 * norm, "attention": attention, "mlp": mlp, "gathered": gathered}


def cuda_kernel_backward_bytes(m: ModelShape, kv: int, e: int, kernel: str | None) -> float:
    """Bytes per local token a CUDA attention kernel's backward holds beyond the block gradients it
    returns (the facts: ``hf_seqpar.kernels.gqa.GQA``; ``kv``: kv heads after Ulysses' replication).

    - a kernel that needs K/V expanded to the query heads (memory-efficient): the expanded K and V
      (``2 e h_q d``) and its query-head dk/dv before they are summed per group (``2 e (h_q - h_kv) d``
      beyond the kv-head ones);
    - a grouped-head kernel that reduces groups itself after computing expanded gradients (aten's
      flash, flash-attn: ``dk_expanded``/``dv_expanded``): ``2 e h_q d`` while it runs;
    - a kernel with its own fp32 dq accumulator (flash: ``(B, S_q, h_q, d)`` with ``d`` rounded up
      to 32; cuDNN counted alike, its workspace unread): ``4 h_q round32(d)``.

    Without GQA (``kv == h_q``) only the accumulator remains. None (CPU) -> 0.
    """
    if kernel is None:
        return 0.0
    row, d, hq = GQA[kernel], m.head_dim, m.heads
    extra = 0.0
    if kv < hq and not row.native:
        extra += 2 * e * hq * d + 2 * e * (hq - kv) * d
    if kv < hq and row.native and row.kernel_expanded_dkv:
        extra += 2 * e * hq * d
    if row.fp32_dq_accum:
        extra += FP32 * hq * (-(-d // 32) * 32)
    return extra


def _mlp_backward(m: ModelShape, e: int, tiles: int) -> float:
    """Bytes per local token of the MLP's backward working set beyond its saved tensors.

    Untiled: three ``n x I`` gradients (``2 e I`` once the down input is released). With ``T`` tiles,
    the larger of one tile's recomputed ``4 e I`` and gradients ``2 e I`` (over ``T``) beside the
    gradients of the tiles already done (up to ``e h``: the engine runs every tile's backward before
    the tiles' ``SliceBackward0``, created earlier), and the assembly of those tile gradients into
    the input's gradient: each ``SliceBackward0`` pads its tile's gradient with zeros to the whole
    local sequence and the engine adds it to the running sum (in place), so the sum and the padded
    tile gradient (``2 e h``) live beside the tile gradients not yet added (measured:
    ``hf_seqpar.tools.memtrace``, BENCHMARKS.md).
    """
    h, I = m.hidden, m.intermediate  # noqa: E741 (I: the MLP width)
    if tiles == 1:
        return 2 * e * I
    return max(6 * e * I / tiles + e * h, 3 * e * h)


def hf_norm_backward_bytes(m: ModelShape, e: int) -> float:
    """Bytes per token transformers' RMSNorm backward holds at its peak beyond its saved tensors and
    the incoming gradient, run on its own (``PowBackward0``, the gradient of ``x32.pow(2)``): four
    fp32 ``n x h`` (the gradient of ``x32`` accumulated from the ``x32 * rstd`` branch, the mean's
    expanded gradient, pow's temporaries), and in a lower dtype one ``e h`` more (measured:
    ``tests/test_memory_model.py::test_transformers_norm_backward_working_set``)."""
    return 4 * FP32 * m.hidden + (e * m.hidden if e < FP32 else 0)


def _hf_norm_in_layer(m: ModelShape, e: int) -> float:
    """The same inside a layer's backward, where the norm's normalised output and output (``2 e h``)
    are released before that peak (the weight's product and the next module's backward have run).
    In fp32 this ties the tiled MLP's side; in bf16 it is larger: the Ulysses step's peak is the
    last layer's second norm's ``PowBackward0`` (CPU traces, BENCHMARKS.md, "The leaner recomputed
    layer")."""
    return hf_norm_backward_bytes(m, e) - 2 * e * m.hidden


def _attention_backward(m: ModelShape, t: StrategyTerms, e: int, kernel: str | None = None) -> float:
    """Bytes per local token of attention's backward working set beyond its saved tensors."""
    d, hq, kv = m.head_dim, m.heads, t.kv_heads
    ws = e * hq * d  # the output's gradient
    ws += e * (hq + 2 * kv) * d  # the kernel's dq/dk/dv (one document: the result itself)
    ws += cuda_kernel_backward_bytes(m, kv, e, kernel)  # a CUDA kernel's own buffers (0 on CPU)
    if t.ring > 1:
        ws += FP32 * (hq + 2 * kv) * d  # the ring's fp32 dq/dk/dv accumulators over the local sequence
        ws += t.ring_kv_in_flight * 2 * e * kv * d  # K/V blocks in flight
        ws += 2 * FP32 * kv * d  # the dK/dV accumulators arriving with them
        if kernel is None and e < FP32:
            # on CPU the block's dq is copied to fp32 for its add into the accumulator (CUDA casts
            # inside the add: no copy); dk and dv are added one after the other, each smaller
            ws += FP32 * hq * d
    if t.exchange_elems:
        # Ulysses: after the kernel's backward (its accumulators and attention's saved q, k, v, out and
        # lse released) the gradients of q, k, v go back through one all-to-all: the gradients, the
        # packed input and the output live together
        saved = attention_saved_bytes(m, e, kv)
        ws = max(ws, 3 * e * t.exchange_elems - saved)
    return ws


def peak_memory(x: MemoryModelInputs) -> MemoryPeak:
    """Predict one step's per-rank activation peak and host memory.

    Args:
        x: the model, sequence, strategy, degree, features and dtypes.

    Returns:
        A :class:`MemoryPeak`.

    Raises:
        ValueError: unknown strategy, or ``offload_checkpoints`` without checkpointing.
    """
    m, f, e = x.shape, x.features, x.elem
    if f.offload_checkpoints and not f.checkpointing:
        raise ValueError("offload_checkpoints needs checkpointing (it offloads the checkpointed layer inputs)")
    t = strategy_terms(x.strategy, m, x.sp, x.ulysses_size)
    n = x.batch * x.seq_len / x.sp
    h, V, L = m.hidden, m.vocab, m.layers
    pe = x.param_elem
    tiles = f.mlp_tiles if f.mlp_tiles and f.mlp_tiles > 1 else 1
    chunk = min(f.loss_chunk_size, n) if f.loss_chunk_size else None

    saved = _layer_saved(m, t, f, e, x.batch)
    layer = sum(saved.values())
    rope = 2 * e * m.head_dim
    # with lean norms the chunked loss computes the final norm per chunk: only its input is saved
    final_norm = e * h if (f.lean_norms and chunk) else f.norm(m, e)
    loss_saved = INDEX if chunk else FP32 * V  # chunked: the labels; plain: the fp32 log-softmax
    head = trl_fused_head_terms(m, n, e, x.sp, x.fused_head_triton) if x.fused_head else None
    if head is not None:
        if f.offload_checkpoints:
            raise ValueError("offload_checkpoints with TRL's fused LM head is not modelled")
        loss_saved = head["saved_per_token"]
    outside = INDEX + rope + final_norm + loss_saved  # token ids, cos/sin, final norm, loss

    # what is kept through the forward (device) and what offload moves (host)
    if f.checkpointing:
        kept = L * e * h * n
    else:
        kept = L * layer * n
    host = 0.0
    if f.offload_checkpoints:
        # save_on_cpu copies every saved tensor on its own: the layer inputs; the final norm's x and
        # rsqrt twice (pow and mul save them), its output; the loss's inputs; lm_head's weight
        # loss: the chunked one saves the labels; the plain one's log-softmax output is saved twice
        # (by log_softmax and by nll_loss) and its target once
        # (the lean norm saves its input, rstd and output once each)
        # the chunked loss keeps what it saves (hidden states, labels) on the device: with lean norms
        # the final norm is computed inside it (nothing of it goes to the host), else its output stays
        if chunk:
            norm_host = 0.0 if f.lean_norms else 2 * (FP32 * h + FP32) + e * h
        else:
            norm_host = 2 * e * h + FP32 if f.lean_norms else 2 * (FP32 * h + FP32) + 2 * e * h
        host = n * (L * e * h + INDEX + norm_host + (0 if chunk else 2 * FP32 * V + INDEX))
        # the weights saved: lm_head's (by the plain loss; the chunked one keeps its own on the device)
        # and the final norm's (unless the chunked loss computes that norm)
        host += (0 if chunk else V * h * pe) + (0 if chunk and f.lean_norms else h * pe)
    device_kept = 0.0 if f.offload_checkpoints else kept
    device_outside = 0.0 if f.offload_checkpoints else outside * n
    rope_live = rope * n  # cos/sin stay referenced by the layers' closures either way

    # the loss
    lm_grad = V * h * pe
    if chunk:
        # a chunk's fp32 logits and softmax (or log-softmax); from the second chunk on, the previous
        # chunk's pair is still referenced while the next logits are computed: three chunk x V at once
        held = (3 if n > chunk else 2) * FP32 * chunk * V
        loss_fwd = held
        loss_bwd = e * h * n + held + FP32 * V * h  # grad_h, the chunks, g^T h before it is added
        loss_grad = FP32 * V * h if pe < FP32 else lm_grad  # the fp32 accumulator, cast at the end
    else:
        loss_fwd = e * V * n + (FP32 * V * n if e < FP32 else 0)  # logits (and their fp32 copy)
        loss_bwd = 2 * FP32 * V * n + (e * V * n if e < FP32 else 0)  # nll and log-softmax gradients
        loss_grad = lm_grad
    if head is not None:
        loss_fwd, loss_bwd = head["forward"], head["backward"]
        loss_grad = FP32 * V * h if pe < FP32 else lm_grad  # the kernel's fp32 weight-gradient accumulator
    loss_outside = device_outside if f.offload_checkpoints else outside * n
    # with offload the loss's backward brings its saved tensors back to the device: the hidden states
    # and labels (chunked), or the two copies of the log-softmax output (plain)
    unpacked_loss = n * (e * h + INDEX if chunk else 2 * FP32 * V) if f.offload_checkpoints else 0.0
    # (the chunked loss's hidden states and labels are not offloaded: on the device from the forward on)
    loss_kept = n * (e * h + INDEX) if (f.offload_checkpoints and chunk) else 0.0
    phases = {
        "forward": device_kept + loss_outside + rope_live * f.offload_checkpoints + loss_fwd + loss_kept,
        "loss backward": device_kept + loss_outside + rope_live * f.offload_checkpoints + loss_bwd + unpacked_loss,
    }

    # the layers' backward, from the last (every earlier layer's activations still kept, one layer's
    # gradients) to the first (one layer's kept, every layer's gradients): linear in between
    mlp_ws = _mlp_backward(m, e, tiles)
    # attention's backward starts once the MLP's and the second norm's have run: their saved tensors are released
    attn_ws = (
        _attention_backward(m, t, e, x.kernel)
        - saved["mlp"]
        - (e * m.heads * m.head_dim if t.out_copy else 0)
        - saved["norms"] / 2
    )
    # a norm's backward: the lean norm's recomputed n and the weight-gradient product; transformers'
    # norm's fp32 temporaries (the second norm's, once the MLP's saved tensors are released)
    norm_ws = 2 * e * h if f.lean_norms else _hf_norm_in_layer(m, e) - saved["mlp"]
    # the residual gradients: during the MLP's backward only the layer output's (e h); from the second
    # norm's backward on, also the residual sum's (2 e h)
    layer_ws = max(e * h + mlp_ws, 2 * e * h + max(attn_ws, norm_ws))
    # by the layers' backward the loss and the final norm have run theirs: ids and cos/sin remain
    outside_no_loss = (INDEX + rope) * n if not f.offload_checkpoints else rope_live
    if f.checkpointing:
        # in fp32 the first norm's saved fp32 input is the kept layer input itself (in bf16 a copy);
        # the lean norm saves its input as it is: the kept layer input (or, with offload, the copy
        # that comes back to the device for the layer's recomputation)
        if f.lean_norms:
            shared = e * h * n
        else:
            shared = FP32 * h * n if e == FP32 and not f.offload_checkpoints else 0.0
        unpacked = e * h * n if f.offload_checkpoints else 0.0
        layer_at = lambda i: (
            device_kept * i / L
            + outside_no_loss
            + n * (layer + layer_ws)  # noqa: E731
            + unpacked
            - shared
        )
    else:
        layer_at = lambda i: kept * i / L + outside_no_loss + n * layer_ws  # noqa: E731
    phases["last layer backward"] = layer_at(L)
    phases["first layer backward"] = layer_at(1)
    phases["end"] = 0.0
    layer_params = (m.params - 2 * V * h - h) / L
    if t.params_over_sp:
        layer_params /= t.tp
    grads = {
        "forward": 0.0,
        "loss backward": loss_grad,
        "last layer backward": lm_grad + h * pe + layer_params * pe,
        "first layer backward": lm_grad + h * pe + L * layer_params * pe,
        "end": (m.params / (t.tp if t.params_over_sp else 1)) * pe,
    }
    total = {k: phases[k] + (grads[k] if x.grads_in_peak else 0) for k in phases}
    peak_phase = max(total, key=total.get)
    comps = {
        "kept": kept,
        "outside": outside * n,
        "layer_saved": layer * n,
        "layer_ws": layer_ws * n,
        # each part's working set (with the residual gradients, the largest sets layer_ws)
        **{f"ws.{k}": v * n for k, v in (("mlp", mlp_ws), ("attention", attn_ws), ("norm", norm_ws))},
        "loss_fwd": loss_fwd,
        "loss_bwd": loss_bwd,
        **{f"layer.{k}": v * n for k, v in saved.items()},
    }
    return MemoryPeak(
        activation_peak=phases[peak_phase],
        peak_phase=peak_phase,
        phases=phases,
        grad_at_phase=grads,
        host_bytes=host,
        kept_bytes=kept,
        components=comps,
    )


#: TRL's fused LM head (``trl/kernels/chunked_logprob.py``, TRL 1.16): a projection tile of
#: ``TOKEN_CHUNK_SIZE`` tokens x ``_CHUNKED_LOGPROB_CHUNK_SIZE`` vocabulary entries (``trl/trainer/utils.py``).
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768


def trl_fused_head_terms(m: ModelShape, n: float, e: int, sp: int, triton: bool = True) -> dict:
    """Bytes of TRL's fused LM head (``add_fused_lm_head``, ``ChunkedLogProbFunction``) on ``n`` local
    tokens under hf_seqpar's sharded call (:mod:`hf_seqpar.integrations.trl_dpo`), replacing the loss
    terms of :func:`peak_memory`:

    - ``saved_per_token``: what the kernel saves for its backward beyond the final norm's output:
      the targets (int64), ``log_z`` and the entropy slot (fp32): ``8 + 2 x 4``; with ``triton``
      (only labelled positions are scored) also the gathered ``hidden[mask]`` copy ``e h``.
    - ``outputs_per_token``: the per-token fields it returns (log-probs, entropy, mean logits fp32 and
      the top-1 flag, ``3 x 4 + 1`` bytes), their ``masked_scatter`` copies, and hf_seqpar's gather of
      each into whole rows (``B S = n P`` tokens on every rank): ``13 (2 + P)``.
    - ``forward``: the projection tile ``min(n, 4096) x 32768 x e`` (allocated whole, whatever the
      vocabulary), the seven fp32 running statistics per token (``7 x 4 n``) and the outputs.
    - ``backward``: the tile again, the fp32 hidden-gradient accumulator and its cast to the
      activation dtype (``(4 + e) h n``), the fp32 ``lm_head`` weight-gradient accumulator
      (``4 V h``), the fp32 copy of the log-prob gradient (``4 n``) and the outputs.
    - ``triton=False`` (TRL's torch fallback, CPU ranks): the tile's untouched columns are never
      resident (``min(n, 4096) x min(V, 32768) x e``), and the fallback's whole-tile fp32
      temporaries add 3 tiles in the forward (the transformed logits, their shifted copy, its
      exponential) and 8.25 in the backward (``y``, ``z``, ``log p``, ``p``, the gradient, the
      target one-hot in fp32 and in bool, ``1[target] - p`` and its product with the incoming gradient).
    """
    h, V = m.hidden, m.vocab
    rows = min(n, TRL_TOKEN_TILE)
    outputs = (3 * FP32 + 1) * (2 + sp) * n
    if triton:
        tile, fwd_tmp, bwd_tmp = rows * TRL_VOCAB_TILE * e, 0.0, 0.0
    else:
        tile = rows * min(V, TRL_VOCAB_TILE) * e
        fwd_tmp, bwd_tmp = 3 * rows * min(V, TRL_VOCAB_TILE) * FP32, 8.25 * rows * min(V, TRL_VOCAB_TILE) * FP32
    return {
        "saved_per_token": INDEX + 2 * FP32 + (e * h if triton else 0),
        "outputs_per_token": (3 * FP32 + 1) * (2 + sp),
        "forward": tile + fwd_tmp + 7 * FP32 * n + outputs,
        "backward": tile + bwd_tmp + (FP32 + e) * h * n + FP32 * V * h + FP32 * n + outputs,
    }


def attention_flops(
    shape: ModelShape, seq_len: int, sp: int, batch: int = 1, checkpointing: bool = True, backward: float = 2.5
) -> float:
    """Attention FLOPs per rank per step of causal full-sequence attention (the ``S^2`` part):
    ``2 x 2 S^2 / 2 h_q d`` per layer forward (scores and values, half the square), the backward
    ``backward`` times that (2.5: flash's backward recomputes the scores, the hardware's work; 2: the
    model's FLOPs, as MFU counts them), plus a recomputed forward with checkpointing; split evenly
    over the ranks."""
    fwd = 2 * 2 * batch * seq_len * seq_len / 2 * shape.heads * shape.head_dim
    return shape.layers * fwd * (1 + backward + (1 if checkpointing else 0)) / sp
