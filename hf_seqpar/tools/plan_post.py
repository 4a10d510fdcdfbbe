"""``hf-seqpar plan --post-training {dpo,grpo}``: the memory TRL's DPO and GRPO add to a training step.

:func:`hf_seqpar.tools.plan.evaluate` calls :func:`post_memory` when ``Setup.post_training`` is set.
Per GPU, with ``B`` = ``--batch``, ``S`` the row length, ``P`` the SP degree, ``N`` GPUs, ``Q`` the
parameters, ``r`` bytes per reference weight (``--ref-bytes``) and ``e`` bytes per activation element
(predictions, not measurements; what TRL 1.16 and hf_seqpar do, read from their sources):

- **rows**: a DPO micro-batch of ``B`` pairs is TRL's concatenated forward of ``2B`` rows of ``S``
  (chosen, then rejected), so every per-token term of the policy's step is that of ``--batch 2B``;
  a GRPO micro-batch is ``B`` completion rows of ``S`` = prompt + completion tokens. Both score
  tokens with TRL's fused LM head through hf_seqpar's sharded call
  (:func:`hf_seqpar.tools.memmodel.trl_fused_head_terms` replaces hf_seqpar's loss terms).
- **reference weights** (``--ref-model same``: DPO's ``ref_model``, GRPO with ``beta > 0``): a frozen
  copy, ``Q r`` bytes. Placement as TRL does it: under FSDP TRL's ``prepare_fsdp`` shards it over all
  ``N`` GPUs (``Q r / N`` at rest; host memory with ``fsdp_offload``), otherwise
  ``accelerator.prepare_model(evaluation_mode=True)`` (DDP) or DeepSpeed stage 0 (ZeRO-1/2 are
  turned off for it) replicate it (``Q r``). hf_seqpar's DPO support prepares it for SP on the
  policy's mesh without checkpointing, after TRL's ``prepare_fsdp`` (the placement is TRL's), and runs
  under accelerate's FSDP2 (``--sharding fsdp``) or DDP (``none``); it refuses FSDP's CPU offload
  (``fsdp_offload``), FSDP1 and DeepSpeed (``zero1``/``zero2``) today.
- **reference forward** (no gradients: one layer's working set at a time, nothing saved): per local
  token the prefill working set of :mod:`hf_seqpar.tools.plan_infer` (residual and normed input, q/k/v,
  the MLP's three ``I``-wide tensors, attention output before and after the exchange, Ulysses'
  buffers, the ring's blocks in flight) over ``2B S / P`` (DPO) or ``B S / P`` (GRPO) tokens, plus
  the fused head's forward. Under FSDP, TRL's ``prepare_fsdp`` (FSDP2) calls ``fully_shard`` on the
  root module only, so the forward all-gathers the whole reference model: ``+ 2 Q`` bytes
  (bf16 ``param_dtype``) while it runs.
- **DPO phases**: TRL runs the policy's forward first, then the reference forward, then the
  backward: ``reference forward`` = states + the policy's forward-end activations without its
  loss working set (kept checkpoints, saved tensors outside the layers, the head's outputs) + the
  reference forward; ``training step`` = states + the policy's peak
  (:func:`hf_seqpar.tools.memmodel.peak_memory` with ``2B`` rows). ``--ref-model precompute``:
  TRL scores the data in its constructor, before SP and before the optimizer exists: ``reference
  precompute`` = the scoring model's whole weights ``Q r`` + an unsharded (``P = 1``) no-grad
  forward of ``2B`` rows; no reference during training.
- **GRPO phases**: ``generation`` (``--generation hf``: HF ``generate`` on the training GPUs, one
  rank per SP group generating the group's ``B x --steps-per-generation`` rows, not sequence
  parallel) = states + the KV cache ``rows x S x 2 L h_kv d e`` + one layer's prefill working set
  over ``rows x --prompt-len`` tokens + the last position's fp32 logits ``rows x V x 4``;
  ``scoring`` (reference log-probs with ``beta > 0``, old-policy log-probs when
  ``--steps-per-generation > 1``; TRL computes both after generation in micro-batches of ``B``) =
  states + the reference forward above; ``training step`` = states + the policy's peak with ``B``
  rows. vLLM (``--generation external``: a server on other GPUs) adds nothing here; vLLM's
  colocate mode is not modelled. ``--num-generations`` ``G`` (completions per prompt) sets no memory
  term: the rows per micro-batch are completions, ``B / G`` prompts' worth.

The per-GPU total is the largest phase. Not modelled: a PEFT/LoRA reference (the adapter disabled),
checkpoint offload, FSDP1's per-layer wrapping of the reference, the policy's own weights beside a
separately loaded reference during the FSDP precompute, generation's decode temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass

from hf_seqpar.core.shape import FP32, ModelShape
from hf_seqpar.tools.memmodel import trl_fused_head_terms
from hf_seqpar.tools.plan_infer import _per_token_bytes as _infer_per_token  # (KV, prefill working set) per token

__all__ = [
    "POST_KINDS",
    "REF_MODES",
    "GENERATION_MODES",
    "PostTraining",
    "post_strategies_ok",
    "ref_weight_bytes",
    "no_grad_forward_bytes",
    "generation_bytes",
    "post_memory",
    "post_assumptions",
]

POST_KINDS = ("dpo", "grpo")
REF_MODES = ("none", "same", "precompute")
GENERATION_MODES = ("hf", "external")
#: Shardings under which TRL's ``prepare_fsdp`` shards the reference model.
_FSDP = ("fsdp", "fsdp_offload")


@dataclass(frozen=True)
class PostTraining:
    """What ``hf-seqpar plan --post-training`` plans for (TRL's DPOTrainer or GRPOTrainer)."""

    kind: str
    """``dpo`` (``--batch`` pairs: 2 x ``--batch`` rows) or ``grpo`` (``--batch`` completion rows)."""
    ref_model: str = "same"
    """``same``: a frozen copy of the model as the reference (DPO's ``ref_model``; GRPO ``beta > 0``);
    ``none``: no reference (GRPO ``beta = 0``; DPO only with PEFT, refused); ``precompute``: DPO's
    ``precompute_ref_log_probs``."""
    ref_elem: int = 2
    """Bytes per reference weight at rest (2: bf16; 4: an fp32 copy, as ``copy.deepcopy`` of an fp32 policy)."""
    num_generations: int = 8
    """GRPO: completions per prompt (TRL's ``num_generations``; at least 2)."""
    prompt_len: int | None = None
    """GRPO: prompt tokens of each row (the rest of the row is the completion)."""
    steps_per_generation: int = 1
    """GRPO: micro-batches one generation serves (TRL's ``steps_per_generation``)."""
    generation: str = "hf"
    """GRPO: ``hf`` (HF ``generate`` on the training GPUs, modelled) or ``external`` (a vLLM server elsewhere)."""

    def check(self, seq_len: int) -> None:
        """Refuse what TRL cannot run or this model does not describe, naming what works.

        Raises:
            ValueError: an unknown kind or mode, or a combination that does not exist.
        """
        if self.kind not in POST_KINDS:
            raise ValueError(f"post-training kind {self.kind!r}: valid kinds are {list(POST_KINDS)}")
        if self.ref_model not in REF_MODES:
            raise ValueError(f"--ref-model {self.ref_model!r}: valid modes are {list(REF_MODES)}")
        if self.ref_elem not in (2, 4):
            raise ValueError(f"--ref-bytes {self.ref_elem}: 2 (bf16) or 4 (fp32)")
        if self.kind == "dpo":
            if self.ref_model == "none":
                raise ValueError(
                    "--post-training dpo --ref-model none: full-parameter DPO needs a reference; use --ref-model "
                    "same (a frozen copy) or precompute (TRL's precompute_ref_log_probs)"
                )
            return
        if self.ref_model == "precompute":
            raise ValueError(
                "--post-training grpo --ref-model precompute: TRL's GRPOTrainer has no precomputed reference; use "
                "--ref-model same (beta > 0) or none (beta = 0)"
            )
        if self.num_generations < 2:
            raise ValueError(f"--num-generations {self.num_generations}: TRL's GRPO needs at least 2")
        if self.steps_per_generation < 1:
            raise ValueError(f"--steps-per-generation {self.steps_per_generation}: at least 1")
        if self.generation not in GENERATION_MODES:
            raise ValueError(f"--generation {self.generation!r}: valid modes are {list(GENERATION_MODES)}")
        if self.prompt_len is None or not 0 < self.prompt_len < seq_len:
            raise ValueError(
                f"--post-training grpo needs --prompt-len in (0, --seq-len {seq_len}) (prompt tokens of each "
                f"row; the rest is the completion), got {self.prompt_len}"
            )

    def rows(self, batch: int) -> int:
        """Rows of one training micro-batch of ``batch``: DPO's pairs are two rows each."""
        return 2 * batch if self.kind == "dpo" else batch

    @property
    def has_ref_model(self) -> bool:
        """A reference model's weights are on the GPUs during training."""
        return self.ref_model == "same"


def post_strategies_ok(cls) -> bool:
    """Strategies hf_seqpar's TRL support runs (Megatron-SP, which splits the parameters, is refused by the mixin)."""
    return not cls.shards_parameters


def ref_weight_bytes(shape: ModelShape, gpus: int, sharding: str, post: PostTraining) -> tuple[float, float]:
    """``(device, host)`` bytes of the reference weights at rest on one GPU / its share of the host:
    ``Q r / N`` under FSDP (host memory with ``fsdp_offload``), ``Q r`` replicated otherwise, 0
    without a reference model."""
    if not post.has_ref_model:
        return 0.0, 0.0
    full = shape.params * post.ref_elem
    if sharding == "fsdp_offload":
        return 0.0, full / gpus
    return (full / gpus if sharding in _FSDP else full), 0.0


def no_grad_forward_bytes(shape: ModelShape, cand, tokens: float, elem: int, triton: bool = True) -> float:
    """Transient bytes of a no-grad forward over ``tokens`` tokens of a rank (one layer's working set at
    a time: :mod:`hf_seqpar.tools.plan_infer`'s prefill working set, under the candidate's Ulysses and
    ring degrees) plus TRL's fused head forward on them (``triton``: see
    :func:`~hf_seqpar.tools.memmodel.trl_fused_head_terms`)."""
    _, work = _infer_per_token(shape, cand.sp, cand.ulysses, cand.ring, elem)
    return work * tokens + trl_fused_head_terms(shape, tokens, elem, cand.sp, triton)["forward"]


def generation_bytes(shape: ModelShape, seq: int, post: PostTraining, batch: int, elem: int) -> float:
    """HF ``generate`` of one SP group's rows on one rank: KV cache ``rows S 2 L h_kv d e``, one layer's
    prefill working set over ``rows x prompt`` tokens, the last position's fp32 logits ``rows V 4``."""
    rows = batch * post.steps_per_generation
    kv_tok, work_tok = _infer_per_token(shape, 1, 1, 1, elem)
    return rows * seq * kv_tok + rows * post.prompt_len * work_tok + rows * shape.vocab * FP32


def post_memory(shape: ModelShape, seq: int, cand, cluster, setup, mem, base: float) -> dict:
    """The DPO/GRPO phases of one candidate (module doc). ``mem``: the policy's
    :class:`~hf_seqpar.tools.memmodel.MemoryPeak` with the post-training rows and TRL's fused head;
    ``base``: the policy's device states and FSDP's gathered layers.

    Returns:
        ``{"ref_device", "ref_host", "phases": {name: per-GPU bytes}, "peak_phase"}``.
    """
    post = setup.post_training
    e = setup.elem
    ref_dev, ref_host = ref_weight_bytes(shape, cluster.gpus, setup.sharding, post)
    rows = post.rows(setup.batch)
    local = rows * seq / cand.sp
    gather_ref = shape.params * setup.state_bytes()[0] if setup.sharding in _FSDP else 0.0
    base = base + ref_dev
    ref_fwd = gather_ref + no_grad_forward_bytes(shape, cand, local, e)
    phases = {"training step": base + mem.activation_peak}
    if post.kind == "dpo":
        if post.has_ref_model:
            head = trl_fused_head_terms(shape, local, e, cand.sp)
            kept = mem.phases["forward"] - mem.components["loss_fwd"] + head["outputs_per_token"] * local
            phases["reference forward"] = base + kept + ref_fwd
        if post.ref_model == "precompute":
            unsharded = rows * seq  # whole rows on one GPU, before SP is applied
            _, work = _infer_per_token(shape, 1, 1, 1, e)
            phases["reference precompute"] = (
                shape.params * post.ref_elem
                + work * unsharded
                + trl_fused_head_terms(shape, unsharded, e, 1)["forward"]
            )
    else:
        if post.generation == "hf":
            phases["generation"] = base + generation_bytes(shape, seq, post, setup.batch, e)
        if post.has_ref_model or post.steps_per_generation > 1:
            phases["scoring"] = base + (ref_fwd if post.has_ref_model else no_grad_forward_bytes(shape, cand, local, e))
    peak = max(phases, key=phases.get)
    return {"ref_device": ref_dev, "ref_host": ref_host, "phases": phases, "peak_phase": peak}


def post_assumptions(shape: ModelShape, cluster, setup) -> list[str]:
    """The ``assumes:`` lines of a post-training plan."""
    post = setup.post_training
    b = setup.batch
    ref = {
        "same": f"a frozen reference copy ({post.ref_elem} B/weight, --ref-bytes; "
        + (
            f"sharded over {cluster.gpus} GPUs by TRL's prepare_fsdp, its forward gathers the whole model"
            if setup.sharding in _FSDP
            else "replicated on every GPU"
        )
        + ") with a no-grad forward (one layer's working set)",
        "none": "no reference model",
        "precompute": "reference log-probs precomputed before training (TRL's precompute_ref_log_probs: whole "
        "rows per GPU, not sequence-parallel, the model's weights + an unsharded no-grad forward)",
    }[post.ref_model]
    lines = [f"TRL's fused LM head (tiles of 4,096 tokens x 32,768 vocabulary; --loss-chunk does not apply); {ref}"]
    if post.kind == "dpo":
        lines.insert(0, f"DPO: {b} pair(s) per micro-batch = {2 * b} rows of the sequence length (chosen + rejected)")
        if setup.sharding not in ("none", "fsdp"):
            refused = "FSDP's CPU offload" if setup.sharding == "fsdp_offload" else "DeepSpeed"
            lines.append(
                f"hf_seqpar's DPOTrainer support refuses {refused} today (trl_dpo.py): --sharding "
                f"{setup.sharding} predicts TRL's own placement; --sharding fsdp (accelerate's FSDP2) or none "
                "is what runs now"
            )
    else:
        gen = (
            f"HF generate on the training GPUs: {b * post.steps_per_generation} row(s) per SP group on one rank, "
            f"KV cache of whole rows (not sequence-parallel) + prefill of {post.prompt_len:,} prompt tokens"
            if post.generation == "hf"
            else "generation off the training GPUs (vLLM server); vLLM colocate is not modelled"
        )
        lines.insert(
            0,
            f"GRPO: {b} completion row(s) per micro-batch (each {post.prompt_len:,} prompt tokens + the "
            f"completion, --seq-len in all), {post.num_generations} generations per prompt; {gen}",
        )
    return lines
