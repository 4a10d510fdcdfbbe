"""``hf-seqpar plan --inference``: per-GPU memory of :func:`hf_seqpar.generate` and the longest prompt
a cluster can prefill, per strategy and degree split (predictions, not measurements).

Per GPU of an SP group of ``P`` ranks holding ``T = B S / P`` prompt tokens:

- weights: every rank holds the whole model (``params x elem``);
- KV cache: ``2 L h_kv d elem`` bytes per token, ``1/P`` of the prompt plus ``1/P`` of the new
  tokens (:mod:`hf_seqpar.generation.cache`);
- prefill working set of one layer (layers run one after the other, nothing is kept for a backward):
  the residual and the normed input ``2 T H``, the local q/k/v ``T (h + 2 h_kv) d``, the MLP's gate,
  up and product ``3 T I``, the attention output before and after the exchange ``2 T h d`` (all in
  ``elem``); Ulysses adds its all-to-all send and receive buffers of q/k/v ``2 T (h + 2 h_kv') d``;
  the ring adds two K/V blocks in flight ``2 T' 2 h_kv' d / U`` and the fp32 accumulator
  ``T h d x 4``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hf_seqpar.core.shape import FP32, ModelShape
from hf_seqpar.strategies import STRATEGIES
from hf_seqpar.strategies.ulysses import kv_replication
from hf_seqpar.tools import cost

__all__ = [
    "kv_bytes_per_rank",
    "InferenceRow",
    "inference_rows",
    "longest_prompt",
    "format_inference",
    "GENERATION_STRATEGIES",
]

GiB = 2**30
#: Strategies hf_seqpar.generate runs (Megatron-SP splits the parameters and is refused).
GENERATION_STRATEGIES = tuple(name for name, cls in STRATEGIES.items() if not cls.shards_parameters)


@dataclass(frozen=True)
class InferenceRow:
    """One candidate's predicted per-GPU memory for a prompt."""

    label: str
    """Strategy and degrees, e.g. ``"ulysses 8"``."""
    sp: int
    """Ranks per prompt."""
    weights_gib: float
    """The whole model's weights (every rank holds them)."""
    kv_gib: float
    """This rank's share of the KV cache (prompt and new tokens)."""
    prefill_gib: float
    """The prefill's working set of one layer."""
    total_gib: float
    """Sum of the three."""
    fits: bool
    """``total_gib`` within the budget."""
    longest_prompt: int
    """Longest prompt (tokens per row) this candidate fits in the budget."""


def _per_token_bytes(m: ModelShape, sp: int, u: int, r: int, elem: int) -> tuple[float, float]:
    """(KV bytes, prefill working-set bytes) per local token on one rank."""
    kv = 2 * m.layers * m.kv_heads * m.head_dim * elem
    kv_eff = m.kv_heads * kv_replication(m.heads, m.kv_heads, u) if u > 1 else m.kv_heads
    work = elem * (
        2 * m.hidden + (m.heads + 2 * m.kv_heads) * m.head_dim + 3 * m.intermediate + 2 * m.heads * m.head_dim
    )
    if u > 1:
        work += 2 * elem * (m.heads + 2 * kv_eff) * m.head_dim
    if r > 1:
        work += elem * 4 * kv_eff * m.head_dim + FP32 * m.heads * m.head_dim
    return kv, work


def kv_bytes_per_rank(m: ModelShape, seq: int, sp: int, new: int = 32, batch: int = 1, elem: int = 2) -> int:
    """Bytes of the sharded KV cache on the fullest rank after ``new`` tokens: ``ceil(S / P)`` prompt
    positions and ``ceil(new / P)`` generated ones per row (positions are dealt round robin), times
    ``2 L h_kv d elem``. Exact for prompts that are a multiple of the layout's shard multiple (a
    padded or packed prompt under ring's balanced layout may be padded by up to ``16 P`` positions more)."""
    return 2 * m.layers * m.kv_heads * m.head_dim * elem * batch * (-(-seq // sp) + -(-new // sp))


def _row(
    m: ModelShape, name: str, options, sp: int, seq: int, new: int, batch: int, elem: int, budget_gib: float
) -> InferenceRow:
    cls = STRATEGIES[name]
    u, r = cost.split(cls, sp, options, m.heads)
    kv_tok, work_tok = _per_token_bytes(m, sp, u, r, elem)
    weights = m.params * elem
    local = batch * -(-seq // sp)
    kv = kv_bytes_per_rank(m, seq, sp, new, batch, elem)
    work = work_tok * local
    total = weights + kv + work
    per_row = (kv_tok + work_tok) * batch / sp  # bytes per prompt token of one row
    longest = max(0, int((budget_gib * GiB - weights - kv_tok * batch * -(-new // sp)) / per_row))
    longest -= longest % sp  # whole shards: ceil(S / P) positions per rank stay within the budget
    return InferenceRow(
        cost.label(cls, sp, options),
        sp,
        weights / GiB,
        kv / GiB,
        work / GiB,
        total / GiB,
        total <= budget_gib * GiB,
        longest,
    )


def inference_rows(
    m: ModelShape,
    seq: int,
    gpus: int,
    *,
    new: int = 32,
    batch: int = 1,
    elem: int = 2,
    budget_gib: float = 76.0,
    gpus_per_node: int = 8,
) -> list[InferenceRow]:
    """Every generation strategy and split on SP degrees dividing ``gpus``, for a prompt of ``seq``."""
    rows = []
    for sp in (d for d in range(1, gpus + 1) if gpus % d == 0):
        for name in GENERATION_STRATEGIES:
            for options in cost.plan_options(STRATEGIES[name], m.heads, sp, gpus_per_node):
                rows.append(_row(m, name, options, sp, seq, new, batch, elem, budget_gib))
    return rows


def longest_prompt(rows: list[InferenceRow]) -> InferenceRow | None:
    """The candidate that fits the longest prompt."""
    return max(rows, key=lambda r: r.longest_prompt, default=None)


def format_inference(rows: list[InferenceRow], seq: int, budget_gib: float) -> str:
    """The table ``hf-seqpar plan --inference`` prints."""
    lines = [
        f"hf_seqpar.generate, prompt of {seq} tokens, per-GPU memory (predicted; budget {budget_gib:.1f} GiB)",
        f"{'candidate':<22}{'weights':>9}{'KV':>9}{'prefill':>9}{'total':>9}  fits  longest prompt",
    ]
    for r in sorted(rows, key=lambda r: (r.sp, r.label)):
        lines.append(
            f"{r.label:<22}{r.weights_gib:>8.1f}G{r.kv_gib:>8.1f}G{r.prefill_gib:>8.1f}G"
            f"{r.total_gib:>8.1f}G  {'yes' if r.fits else 'no ':<4}  {r.longest_prompt:>12,}"
        )
    best = longest_prompt(rows)
    if best is not None:
        lines.append(f"longest prompt on this cluster: {best.longest_prompt:,} tokens with {best.label}")
    return "\n".join(lines)


def plan_inference(args) -> int:
    """The ``hf-seqpar plan --inference`` command (arguments of ``hf-seqpar plan``)."""
    import json

    from hf_seqpar.tools.presets import load_config

    try:
        m = ModelShape.from_config(load_config(args.model))
    except ValueError as e:
        args.parser.error(str(e))
    budget = args.gpu_mem - args.reserve
    rows = inference_rows(
        m,
        args.seq_len,
        args.gpus,
        new=args.new_tokens,
        batch=args.batch,
        budget_gib=budget,
        gpus_per_node=args.gpus_per_node,
    )
    print(format_inference(rows, args.seq_len, budget))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0
