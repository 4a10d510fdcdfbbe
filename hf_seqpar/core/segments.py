"""A batch's attention structure as segments, and the attention pieces derived from them in O(S).

``shard_batch`` describes a batch once, without any ``S x S`` tensor: per row, the runs of valid
tokens with their document (like ``cu_seqlens``: :class:`Segments`). Which keys a block of
queries may see is then derived analytically, run against run (:func:`plan_pieces`): inside one
document a query block either sees a whole key range (keys entirely before it), its causal
diagonal, or nothing, and only sliding-window bands need a mask, built per small tile; runs of
tiny documents are packed into a few tiles with a small block-diagonal mask
(:func:`~hf_seqpar.kernels.varlen.pack_pieces`), so a row costs its attention work, not one
kernel call per document. The pieces
are executed by :mod:`hf_seqpar.kernels.varlen`. Ulysses (the full sequence after the
all-to-all), ring and hybrid (one block pair per ring step) and Megatron-SP use the same planner.

Semantics follow transformers: documents are runs of ``position_ids`` increasing by one,
padding (``attention_mask == 0``) is never attended to, causality is ``k <= q`` and a window
keeps ``k > q - window`` (bidirectional windows: ``|q - k| < window``, as Gemma3 builds them; one
rule for every path: :func:`hf_seqpar.core.masks.window_visible`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, replace

import torch

from hf_seqpar.kernels.varlen import CAUSAL, FULL, MASKED, Piece, pack_pieces

__all__ = ["Segments", "build_segments", "plan_pieces", "TILE"]

#: Query rows per tile of a sliding-window band (a band tile's mask is TILE x (TILE + window)).
TILE = 512


@dataclass(frozen=True)
class Segments:
    """Runs of valid tokens per group of identical rows.

    Attributes:
        groups: ``((b0, b1, runs), ...)``: rows ``b0 <= b < b1`` share ``runs``, a tuple of
            ``(start, end, doc)`` over the padded global sequence (valid tokens only, in order).
        length: the padded sequence length.
    """

    groups: tuple
    length: int

    @property
    def num_runs(self) -> int:
        """Total runs over all row groups (the planner's cost is linear in it)."""
        return sum(len(runs) for _, _, runs in self.groups)


def build_segments(valid: torch.Tensor, doc_ids: torch.Tensor | None) -> Segments:
    """The runs of ``(B, S)`` validity and document ids, in O(B S) time and O(#runs) output.

    Args:
        valid: bool ``(B, S)``, False at padding (user padding and shard padding).
        doc_ids: ``(B, S)`` document index per token, or None (one document per row).

    Returns:
        :class:`Segments` (consecutive rows with identical runs share one group).
    """
    bsz, seq = valid.shape
    key = valid.long() if doc_ids is None else doc_ids.long() * 2 + valid.long()
    change = torch.ones(bsz, seq, dtype=torch.bool, device=valid.device)
    change[:, 1:] = key[:, 1:] != key[:, :-1]
    rows = []
    for b in range(bsz):
        starts = change[b].nonzero().flatten()
        ends = torch.cat([starts[1:], starts.new_tensor([seq])])
        keep = valid[b, starts]
        docs = doc_ids[b, starts] if doc_ids is not None else torch.zeros_like(starts)
        runs = tuple(zip(starts[keep].tolist(), ends[keep].tolist(), docs[keep].tolist()))
        if rows and rows[-1][2] == runs:
            rows[-1][1] = b + 1
        else:
            rows.append([b, b + 1, runs])
    return Segments(tuple(tuple(r) for r in rows), seq)


def _relate(qs, qe, ks, ke, causal, window):
    """How queries ``[qs, qe)`` see keys ``[ks, ke)`` (global, same document): None (nothing),
    or ``(ks, ke, kind)`` with the key range trimmed to what anyone sees."""
    if causal:
        ke = min(ke, qe)  # no query sees a key after the last query
        if window is not None:
            ks = max(ks, qs - window + 1)  # ... nor one outside the first query's window
        if ke <= ks:
            return None
        in_window = window is None or ks > qe - 1 - window  # the last query sees the first key
        if in_window and ke - 1 <= qs:
            return ks, ke, FULL
        if in_window and (qs, qe) == (ks, ke):
            return ks, ke, CAUSAL
        return ks, ke, MASKED
    if window is not None:  # |q - k| < window (masks.window_visible)
        reach = window - 1
        ks, ke = max(ks, qs - reach), min(ke, qe + reach)
        if ke <= ks:
            return None
        if ks >= qe - 1 - reach and ke - 1 <= qs + reach:
            return ks, ke, FULL
        return ks, ke, MASKED
    return ks, ke, FULL


def _pair(qs, qe, ks, ke, causal, window, emit):
    """Emit the (global) pieces of queries ``[qs, qe)`` against keys ``[ks, ke)``; masked
    relations are tiled so that no mask exceeds ``TILE x (TILE + window)``."""
    rel = _relate(qs, qe, ks, ke, causal, window)
    if rel is None:
        return
    if rel[2] != MASKED or qe - qs <= TILE and (window is None or rel[1] - rel[0] <= TILE + 2 * window):
        emit(qs, qe, *rel)
        return
    for a in range(qs, qe, TILE):
        b = min(qe, a + TILE)
        if causal and ks <= a < ke:
            # split at the tile's diagonal: keys before it (a band) and the diagonal itself
            for lo, hi in ((ks, a), (a, ke)):
                sub = _relate(a, b, lo, hi, causal, window)
                if sub is not None:
                    emit(a, b, *sub)
        else:
            sub = _relate(a, b, ks, ke, causal, window)
            if sub is not None:
                emit(a, b, *sub)


def _clip(runs, ends, lo, hi):
    """The runs (sorted, disjoint; ``ends`` their ends) cut to ``[lo, hi)``: O(log #runs + output),
    so a layout of many chunks (the balanced layout) plans in time linear in its pieces."""
    for i in range(bisect.bisect_right(ends, lo), len(runs)):
        s, e, d = runs[i]
        if s >= hi:
            return
        s, e = max(s, lo), min(e, hi)
        if s < e:
            yield s, e, d


def plan_pieces(
    segments: Segments, q_chunks, k_chunks, causal: bool, window: int | None, pack: bool = True
) -> list[Piece]:
    """Attention pieces of a query block against a key block, derived from the segments.

    Args:
        segments: the batch's :class:`Segments`.
        q_chunks: ``[(g0, g1), ...]``: the global ranges the local queries hold, in storage order
            (local position of ``g0`` is the summed length of the chunks before it).
        k_chunks: the same for the keys.
        causal: causal attention.
        window: sliding window, or None.
        pack: pack runs of small pieces into tiles (:func:`~hf_seqpar.kernels.varlen.pack_pieces`).

    Returns:
        :class:`~hf_seqpar.kernels.varlen.Piece` list in local coordinates, small pieces packed
        (:func:`~hf_seqpar.kernels.varlen.pack_pieces`); empty when no query sees any key.
    """
    if window is not None and window >= segments.length:
        window = None  # the window covers the whole sequence
    q_off = _offsets(q_chunks)
    k_off = _offsets(k_chunks)
    pieces: list[Piece] = []
    for b0, b1, runs in segments.groups:
        by_doc: dict[int, list] = {}
        for run in runs:
            by_doc.setdefault(run[2], []).append(run)
        ends = [e for _, e, _ in runs]
        doc_ends = {d: [e for _, e, _ in rs] for d, rs in by_doc.items()}
        for (qg0, qg1), qo in zip(q_chunks, q_off):
            for (kg0, kg1), ko in zip(k_chunks, k_off):
                if causal and kg0 >= qg1:
                    continue  # the key chunk lies entirely after the query chunk
                for qs, qe, doc in _clip(runs, ends, qg0, qg1):
                    for ks, ke, _ in _clip(by_doc[doc], doc_ends[doc], kg0, kg1):

                        def emit(a, b, c, d, kind, qo=qo, ko=ko, qg0=qg0, kg0=kg0, b0=b0, b1=b1):
                            pieces.append(
                                Piece(
                                    (b0, b1),
                                    (a - qg0 + qo, b - qg0 + qo),
                                    (c - kg0 + ko, d - kg0 + ko),
                                    kind,
                                    a,
                                    c,
                                    causal,
                                    window,
                                )
                            )

                        _pair(qs, qe, ks, ke, causal, window, emit)
    pieces = _merge_full(pieces)
    return pack_pieces(pieces) if pack else pieces


def _merge_full(pieces: list[Piece]) -> list[Piece]:
    """Join ``full`` pieces that are neighbours in local coordinates: the same rows and queries
    with adjacent keys (a query span before several key chunks of one document, which a rank
    stores one after the other), then the same rows and keys with adjacent queries. Every query
    of a full piece sees every key, so the union is one full piece: fewer, larger kernel calls
    for layouts of many chunks, the same scores."""
    full = [p for p in pieces if p.kind == FULL]
    if len(full) < 2:
        return pieces
    for axis, other in (("k", "q"), ("q", "k")):
        groups: dict = {}
        for p in full:
            groups.setdefault((p.rows, getattr(p, other)), []).append(p)
        full = []
        for group in groups.values():
            group.sort(key=lambda p: getattr(p, axis))
            cur = group[0]
            for p in group[1:]:
                (a, b), (c, d) = getattr(cur, axis), getattr(p, axis)
                if c == b:
                    cur = replace(cur, **{axis: (a, d)})
                else:
                    full.append(cur)
                    cur = p
            full.append(cur)
    return [p for p in pieces if p.kind != FULL] + full


def _offsets(chunks) -> list[int]:
    out, total = [], 0
    for g0, g1 in chunks:
        out.append(total)
        total += g1 - g0
    return out
