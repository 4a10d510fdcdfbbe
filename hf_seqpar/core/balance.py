"""Causal attention work per rank, and the work-balanced layout of packed rows.

The zigzag layout balances the causal work of ONE document: chunks ``r`` and ``2P - 1 - r`` of a
causal triangle sum to the same work. A packed row breaks that: the chunks holding a long
document's late tokens carry most of the work (2 ranks, a row whose first 3/4 is one document
and the rest S/32-token documents: max/mean 1.75). The ``balanced`` layout cuts the padded
sequence into ``k`` equal chunks per rank and gives them to the ranks by a greedy min-max of
their work (longest-processing-time first, each rank taking exactly ``k`` chunks so every rank
holds the same tokens), as MagiAttention assigns its chunks (Zewei et al. 2025,
https://github.com/SandAI-org/MagiAttention); for one document and ``k = 2`` that is exactly
zigzag. Chunks of one rank that are neighbours are merged into one span, so a block keeps few
attention pieces. The layout is one permutation for the whole batch (every row of a batch is
sharded alike), so rows of different structures are balanced on their summed work.

The work model: a valid query token costs the number of keys it sees, i.e. the valid tokens of
its document up to itself (causal attention, no window: a window only lowers the late tokens'
cost, which makes the estimate conservative). Everything here is O(B S) tensor work plus
O(C log C) for the ``C`` chunks, once per batch in ``shard_batch``, with no communication.

These are standalone functions (no strategy, no model): ``shard_batch`` (through the ring and
hybrid strategies), ``hf-seqpar plan`` and ``hf-seqpar bench`` call them.
"""

from __future__ import annotations

import heapq

import torch
import torch.nn.functional as F

from hf_seqpar.core.layout import Layout

__all__ = [
    "token_work",
    "rank_work",
    "imbalance",
    "balanced_layout",
    "choose_layout",
    "layout_report",
    "AUTO_TOLERANCE",
    "CHUNKS_PER_RANK",
    "MIN_CHUNK",
]

#: ``layout="auto"`` keeps zigzag while its per-rank work max/mean stays within this.
AUTO_TOLERANCE = 1.05
#: Chunks per rank the balanced layout tries, fewest first (fewer chunks: fewer attention pieces).
CHUNKS_PER_RANK = (2, 4, 8, 16)
#: The balanced layout stops at the first chunk count whose max/mean is within this.
TARGET = 1.02
#: Shortest chunk (tokens) the balanced layout cuts.
MIN_CHUNK = 4


def token_work(valid: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """Causal attention work of every position, summed over the rows of a batch.

    Args:
        valid: bool ``(B, S)``, False at padding.
        doc_ids: ``(B, S)`` document index (non-decreasing along a row), or None (one document per row).

    Returns:
        float64 ``(S,)``: per position, the keys its queries see over all rows (the valid tokens
        of the query's document up to and including it); 0 where every row is padding.
    """
    v = valid.long()
    seen = v.cumsum(-1)  # (B, S): valid tokens up to here
    bsz, seq = v.shape
    starts = torch.ones(bsz, seq, dtype=torch.bool, device=v.device)
    if doc_ids is not None:
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    else:
        starts[:, 1:] = False
    idx = torch.where(starts, torch.arange(seq, device=v.device).expand(bsz, seq), 0).cummax(-1).values
    before = (seen - v).gather(-1, idx)  # (B, S): valid tokens before the document's start
    return ((seen - before) * v).sum(0).double()


def rank_work(layout: Layout, work: torch.Tensor) -> list[float]:
    """The work of each outer rank (ring rank) of ``layout``: the sum of :func:`token_work` over
    its spans (shard padding costs nothing). O(S + spans)."""
    cum = F.pad(work.double().cumsum(0), (1, 0))  # cum[i]: work of positions < i
    end = cum.shape[0] - 1

    def span_sum(g0, g1):
        return float(cum[min(g1, end)] - cum[min(g0, end)])

    return [sum(span_sum(g0, g1) for g0, g1 in layout.outer_chunks(r)) for r in range(layout.outer)]


def imbalance(works) -> float:
    """``max / mean`` of per-rank work (1.0 for no work): the step time over the balanced one."""
    works = list(works)
    mean = sum(works) / len(works)
    return max(works) / mean if mean > 0 else 1.0


def _assign(chunk_work: list[float], ranks: int) -> list[list[int]]:
    """Greedy min-max with equal counts: chunks by work, largest first, each to the least loaded
    rank that still has room (ties: the lower rank, then the earlier chunk)."""
    per = len(chunk_work) // ranks
    order = sorted(range(len(chunk_work)), key=lambda c: (-chunk_work[c], c))
    heap = [(0.0, r) for r in range(ranks)]
    owned: list[list[int]] = [[] for _ in range(ranks)]
    for c in order:
        load, r = heapq.heappop(heap)
        owned[r].append(c)
        if len(owned[r]) < per:
            heapq.heappush(heap, (load + chunk_work[c], r))
    return owned


def _spans(chunks: list[int], size: int) -> tuple:
    """Sorted chunk ids -> merged global ranges ``((g0, g1), ...)``."""
    spans: list[list[int]] = []
    for c in sorted(chunks):
        if spans and spans[-1][1] == c * size:
            spans[-1][1] = (c + 1) * size
        else:
            spans.append([c * size, (c + 1) * size])
    return tuple((a, b) for a, b in spans)


def balanced_layout(
    seq_len: int, sp_size: int, work: torch.Tensor, inner: int = 1, chunks_per_rank: int | None = None
) -> Layout:
    """The work-balanced layout of a batch (see the module docstring).

    Args:
        seq_len: unpadded sequence length ``S``.
        sp_size: ranks ``P`` (``inner`` x ring ranks).
        work: ``(S,)`` :func:`token_work` of the batch.
        inner: Ulysses ranks per ring rank (hybrid); the balance is over the ring ranks.
        chunks_per_rank: the chunk count ``k``; None tries :data:`CHUNKS_PER_RANK` and keeps the
            first within :data:`TARGET` (else the most balanced), skipping counts whose chunks
            would be shorter than :data:`MIN_CHUNK` or whose padding would exceed ``S / 16``
            tokens beyond what ``k = 2`` needs. The padding is below ``k * P`` tokens.

    Returns:
        A ``"balanced"`` :class:`~hf_seqpar.core.layout.Layout`.
    """
    outer = sp_size // inner
    layouts = []
    for k in (chunks_per_rank,) if chunks_per_rank else _chunk_counts(seq_len, sp_size):
        multiple = sp_size * k
        padded = -(-seq_len // multiple) * multiple
        size = padded // (outer * k)
        chunk_work = F.pad(work.double(), (0, padded - seq_len)).view(outer * k, size).sum(1).tolist()
        spans = tuple(_spans(c, size) for c in _assign(chunk_work, outer))
        lay = Layout("balanced", seq_len, sp_size, multiple, inner=inner, spans=spans)
        layouts.append((imbalance(rank_work(lay, work)), lay))
        if layouts[-1][0] <= TARGET:
            return lay
    return min(layouts, key=lambda x: x[0])[1]  # min keeps the first (fewest chunks) of equals


def _chunk_counts(seq_len: int, sp_size: int) -> list[int]:
    def pad(k):
        return -(-seq_len // (sp_size * k)) * sp_size * k - seq_len

    ok = [
        k
        for k in CHUNKS_PER_RANK
        if (seq_len + pad(k)) // (sp_size * k) >= MIN_CHUNK and pad(k) <= max(pad(2), seq_len // 16)
    ]
    return ok or [2]


def choose_layout(
    kind: str,
    seq_len: int,
    sp_size: int,
    multiple: int,
    inner: int = 1,
    valid: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
) -> Layout:
    """The layout a ring-based strategy applies to one batch.

    Args:
        kind: ``"auto"``, ``"zigzag"``, ``"contiguous"`` or ``"balanced"``.
        seq_len: unpadded ``S``.
        sp_size: ranks ``P``.
        multiple: the padding multiple of ``zigzag``/``contiguous`` (the strategy's).
        inner: Ulysses ranks per ring rank (hybrid).
        valid: bool ``(B, S)`` (None: every token valid).
        doc_ids: ``(B, S)`` document ids (None: one document per row).

    Returns:
        ``zigzag``/``contiguous``/``balanced`` as asked; ``auto`` gives zigzag for rows without
        documents and padding, and otherwise zigzag while its work max/mean is within
        :data:`AUTO_TOLERANCE`, else the balanced layout (when it is more balanced).
    """
    if kind in ("zigzag", "contiguous"):
        return Layout(kind, seq_len, sp_size, multiple, inner=inner)
    if valid is None:
        valid = torch.ones(1, seq_len, dtype=torch.bool)
    if kind == "auto" and doc_ids is None and bool(valid.all()):
        return Layout("zigzag", seq_len, sp_size, multiple, inner=inner)
    work = token_work(valid, doc_ids)
    if kind == "balanced":
        return balanced_layout(seq_len, sp_size, work, inner)
    zigzag = Layout("zigzag", seq_len, sp_size, multiple, inner=inner)
    zig = imbalance(rank_work(zigzag, work))
    if zig <= AUTO_TOLERANCE:
        return zigzag
    balanced = balanced_layout(seq_len, sp_size, work, inner)
    return balanced if imbalance(rank_work(balanced, work)) < zig else zigzag


def layout_report(layout: Layout, valid: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None) -> dict:
    """What ``plan`` and ``bench`` print about a batch's layout: its kind, the per-ring-rank causal
    work (:func:`token_work` units), its ``max / mean``, spans per rank and the shard padding."""
    if valid is None:
        valid = torch.ones(1, layout.seq_len, dtype=torch.bool)
    works = rank_work(layout, token_work(valid, doc_ids))
    return dict(
        layout=layout.kind,
        work_per_rank=works,
        work_max_over_mean=imbalance(works),
        spans_per_rank=max(len(layout.outer_chunks(r)) for r in range(layout.outer)),
        pad=layout.pad,
    )
