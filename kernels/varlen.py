"""Variable-length attention: a list of rectangular *pieces*, each run by the block interface.

A batch's attention structure (documents, padding, causality, windows) is described by pieces:
``(rows, query range, key range, kind)`` in the local coordinates of the q and k tensors. A
piece is one kernel call on views of q/k/v: ``full`` (every query sees every key), ``causal``
(square, top-left aligned: the diagonal block of one document) or ``masked`` (a small band
tile, with a mask built from global indices for that tile only) or ``packed`` (several small
full/causal pieces of one tile, e.g. the diagonals of many tiny packed documents, run as one call
with a small block-diagonal mask: :func:`pack_pieces`). Pieces touching the same query
rows are merged by their log-sum-exp (:func:`~hf_seqpar.kernels.merge.merge_into`), so nothing
of size ``S_q x S_k`` is ever allocated outside the kernels' own tiles: memory is O(S) plus the
largest band tile.

The backward of each piece is the flash backward with the rows' *final* out/lse, which gives
the piece's exact share of dq and its exact dk/dv (as for ring attention).

Who builds pieces: :mod:`hf_seqpar.core.segments` (from the batch's segments and the sequence
layout). This module knows nothing of transformers or process groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .reference import window_visible

__all__ = [
    "Piece",
    "band_mask",
    "packed_mask",
    "pack_pieces",
    "check_pieces",
    "pieces_forward",
    "pieces_backward",
    "pieces_gradients",
    "pieces_output",
    "unpack_pieces",
    "varlen_attention",
    "PACK_SPAN",
    "CALL_COST",
]

FULL, CAUSAL, MASKED, PACKED = "full", "causal", "masked", "packed"

#: Largest query (and key) span of a ``packed`` tile: its mask is at most PACK_SPAN x PACK_SPAN.
PACK_SPAN = 128
#: What one kernel call costs, in score entries per row and head (launch, views, lse merge): small
#: pieces are packed into one tile while the tile's area stays below their work plus this per piece.
CALL_COST = 2048


@dataclass(frozen=True)
class Piece:
    """One kernel call of variable-length attention.

    Attributes:
        rows: ``(b0, b1)``: batch rows ``b0 <= b < b1``.
        q: ``(q0, q1)``: local query positions.
        k: ``(k0, k1)``: local key positions.
        kind: ``"full"``, ``"causal"`` (``q1 - q0 == k1 - k0``, query ``i`` sees keys ``<= i``)
            or ``"masked"`` (mask from :func:`band_mask`).
        q_global: global index of local query ``q0`` (``masked`` only).
        k_global: global index of local key ``k0`` (``masked`` only).
        causal: the attention is causal (``masked`` only).
        window: the sliding window (``masked`` only; None = none).
        parts: ``packed`` only: the ``full``/``causal`` pieces the tile runs in one call (same rows,
            inside the tile's ranges, pairwise disjoint entries).
    """

    rows: tuple[int, int]
    q: tuple[int, int]
    k: tuple[int, int]
    kind: str
    q_global: int = 0
    k_global: int = 0
    causal: bool = True
    window: int | None = None
    parts: tuple = ()
    _masks: dict = field(default_factory=dict, compare=False, repr=False)  # packed: mask per device

    @property
    def work(self) -> int:
        """Score entries per row and head the kernel computes (half the square when causal)."""
        nq, nk = self.q[1] - self.q[0], self.k[1] - self.k[0]
        return nq * (nq + 1) // 2 if self.kind == CAUSAL else nq * nk


def packed_mask(p: Piece, device=None) -> torch.Tensor:
    """Bool ``(1, 1, nq, nk)`` of a ``packed`` tile: the union of its parts (a ``full`` part is its
    rectangle, a ``causal`` part its top-left aligned lower triangle); built once per device."""
    key = str(device)
    if key not in p._masks:
        q0, k0 = p.q[0], p.k[0]
        nq, nk = p.q[1] - q0, p.k[1] - k0
        # (n, 5): each part's tile-relative q0, q1, k0, k1 and whether it is causal
        parts = torch.tensor([(a.q[0] - q0, a.q[1] - q0, a.k[0] - k0, a.k[1] - k0, a.kind == CAUSAL) for a in p.parts])
        qa, qb, ka, kb, causal = (parts[:, i].view(-1, 1, 1) for i in range(5))
        qi, ki = torch.arange(nq).view(1, nq, 1), torch.arange(nk).view(1, 1, nk)
        inside = (qi >= qa) & (qi < qb) & (ki >= ka) & (ki < kb)  # (n, nq, nk)
        inside &= (causal == 0) | (ki - ka <= qi - qa)
        p._masks[key] = inside.any(0)[None, None].to(device)
    return p._masks[key]


def pack_pieces(pieces, span: int = PACK_SPAN, call_cost: int = CALL_COST) -> list[Piece]:
    """Group consecutive small ``full``/``causal`` pieces of the same rows into ``packed`` tiles.

    A row of many tiny documents otherwise costs one kernel call per document, so its time follows
    its document count rather than its attention work. A tile spans at most ``span`` queries and
    ``span`` keys, and grows only while its area stays below the summed work of its parts plus
    ``call_cost`` per part, so packing never does much more arithmetic than it saves in calls.
    The result is exact: the parts' entries are disjoint, so one softmax over their union equals
    their lse merge.
    """
    out: list[Piece] = []
    group: list[Piece] = []
    box = [0, 0, 0, 0, 0]  # q0, q1, k0, k1, budget of the open group

    def close():
        if len(group) == 1:
            out.append(group[0])
        elif group:
            out.append(Piece(group[0].rows, (box[0], box[1]), (box[2], box[3]), PACKED, parts=tuple(group)))
        group.clear()

    for p in pieces:
        small = p.kind in (FULL, CAUSAL) and p.q[1] - p.q[0] <= span and p.k[1] - p.k[0] <= span
        if not small:
            close()
            out.append(p)
            continue
        if group and p.rows == group[0].rows:
            q0, q1, k0, k1 = min(box[0], p.q[0]), max(box[1], p.q[1]), min(box[2], p.k[0]), max(box[3], p.k[1])
            budget = box[4] + p.work + call_cost
            if q1 - q0 <= span and k1 - k0 <= span and (q1 - q0) * (k1 - k0) <= budget:
                group.append(p)
                box[:] = [q0, q1, k0, k1, budget]
                continue
        close()
        group.append(p)
        box[:] = [p.q[0], p.q[1], p.k[0], p.k[1], p.work + call_cost]
    close()
    return out


def unpack_pieces(pieces) -> list[Piece]:
    """The pieces with every ``packed`` tile replaced by its parts (for kernels without masks)."""
    return [part for p in pieces for part in (p.parts if p.kind == PACKED else (p,))]


def band_mask(
    q_global: int, nq: int, k_global: int, nk: int, causal: bool, window: int | None, device=None
) -> torch.Tensor:
    """Bool ``(1, 1, nq, nk)``: which keys each query of a tile may see, from global indices.

    The rule is the one of every path, :func:`hf_seqpar.kernels.reference.window_visible`: causal ``k <= q``
    and, with a window, ``k > q - window``; bidirectional windows ``|q - k| < window``.
    """
    q = torch.arange(q_global, q_global + nq, device=device)[:, None]
    k = torch.arange(k_global, k_global + nk, device=device)[None, :]
    allowed = window_visible(q, k, causal, window).expand(nq, nk)
    return allowed[None, None]


def check_pieces(pieces, batch: int, sq: int, sk: int) -> None:
    """Raise if a piece reaches outside ``(batch, sq, sk)`` or is malformed.

    Views outside a tensor are an exception on CPU but can become an illegal memory access in a
    CUDA kernel (which loses the process's CUDA context), so every piece is checked before the
    first kernel runs; the cost is a few integer comparisons per piece.

    Raises:
        ValueError: naming the piece and the bounds.
    """
    for p in pieces:
        (b0, b1), (q0, q1), (k0, k1) = p.rows, p.q, p.k
        ok = (
            0 <= b0 < b1 <= batch
            and 0 <= q0 < q1 <= sq
            and 0 <= k0 < k1 <= sk
            and p.kind in (FULL, CAUSAL, MASKED, PACKED)
            and (p.kind != CAUSAL or q1 - q0 == k1 - k0)
            and all(
                q0 <= a.q[0] and a.q[1] <= q1 and k0 <= a.k[0] and a.k[1] <= k1 and a.rows == p.rows for a in p.parts
            )
        )
        if not ok:
            raise ValueError(
                f"attention piece {p} does not fit q/k of (B, S_q, S_k) = ({batch}, {sq}, {sk}); "
                "this is a bug in the piece planner: please report it"
            )


def _views(p: Piece, *tensors, dim: int = 2, keys: bool = False):
    lo, hi = p.k if keys else p.q
    return [t[p.rows[0] : p.rows[1]].narrow(dim, lo, hi - lo) for t in tensors]


def _mask(p: Piece, device):
    if p.kind == PACKED:
        return packed_mask(p, device)
    if p.kind != MASKED:
        return None
    return band_mask(p.q_global, p.q[1] - p.q[0], p.k_global, p.k[1] - p.k[0], p.causal, p.window, device)


def _runnable(pieces, backend: str | None):
    """A forced backend that takes no masks runs the parts of packed tiles one by one."""
    from . import BACKENDS

    if backend is not None and backend in BACKENDS and not BACKENDS[backend].supports_mask:
        return unpack_pieces(pieces)
    return pieces


def pieces_forward(q, k, v, pieces, out, lse, *, scale: float, backend: str | None = None) -> None:
    """Accumulate the attention of every piece into ``out``/``lse`` (in place, lse-merged).

    Args:
        q: ``(B, h_q, S_q, D)``; k, v: ``(B, h_kv, S_k, D)``, all in one compute dtype.
        pieces: :class:`Piece` list (checked with :func:`check_pieces`).
        out: fp32 ``(B, h_q, S_q, D)`` accumulator; lse: fp32 ``(B, h_q, S_q)`` accumulator
            (``-inf`` where nothing was attended yet).
        scale: softmax scale.
        backend: force a kernel backend by name.
    """
    from . import merge_into

    check_pieces(pieces, q.shape[0], q.shape[2], k.shape[2])
    pieces = _runnable(pieces, backend)
    for p in pieces:
        o_b, l_b = _piece_forward(p, q, k, v, scale, backend)
        (o_acc,) = _views(p, out)
        (l_acc,) = _views(p, lse)
        merge_into(o_acc, l_acc, o_b, l_b)


def _piece_forward(p, q, k, v, scale: float, backend):
    """``(out, lse)`` of one piece: :func:`~hf_seqpar.kernels.block_forward` on the piece's views."""
    from . import block_forward

    (qs,) = _views(p, q)
    ks, vs = _views(p, k, v, keys=True)
    return block_forward(qs, ks, vs, scale=scale, causal=p.kind == CAUSAL, mask=_mask(p, q.device), backend=backend)


def _piece_backward(p, dout, q, k, v, out, lse, scale: float, backend):
    """``(dq, dk, dv)`` of one piece: :func:`~hf_seqpar.kernels.block_backward` on the piece's views."""
    from . import block_backward

    dos, qs, os_ = _views(p, dout, q, out)
    (ls,) = _views(p, lse)
    ks, vs = _views(p, k, v, keys=True)
    return block_backward(
        dos,
        qs,
        ks,
        vs,
        os_,
        ls.contiguous(),
        scale=scale,
        causal=p.kind == CAUSAL,
        mask=_mask(p, q.device),
        backend=backend,
    )


def pieces_backward(dout, q, k, v, out, lse, pieces, dq, dk, dv, *, scale: float, backend: str | None = None) -> None:
    """Accumulate every piece's gradients into fp32 ``dq``/``dk``/``dv`` (in place).

    Args:
        dout: ``(B, h_q, S_q, D)`` gradient of the final output.
        q, k, v: as for :func:`pieces_forward`.
        out: the final output; lse: the final fp32 lse (``-inf`` rows get no gradient).
        pieces: the pieces of the forward.
        dq, dk, dv: fp32 accumulators shaped like q, k, v.
        scale, backend: as for :func:`pieces_forward`.
    """

    check_pieces(pieces, q.shape[0], q.shape[2], k.shape[2])
    pieces = _runnable(pieces, backend)
    for p in pieces:
        g_q, g_k, g_v = _piece_backward(p, dout, q, k, v, out, lse, scale, backend)
        for acc, grad, keys in ((dq, g_q, False), (dk, g_k, True), (dv, g_v, True)):
            (view,) = _views(p, acc, keys=keys)
            # fp32 += the block's gradient in its own dtype: the numbers of adding grad.float(); CUDA
            # casts inside the add, CPU's TensorIterator still makes the fp32 copy first
            view.add_(grad)


def _shared_ranges(pieces, keys: bool) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``[(rows, (lo, hi)), ...]``: the positions (along q, or k with ``keys``) of the rows that more
    than one piece writes, merged into disjoint ranges per group of rows.

    Pieces of disjoint rows never share; if two different row ranges intersect (no planner makes
    such pieces), every piece is taken as one group of all their rows, which only ever asks for more
    fp32 accumulation than needed, never less.
    """
    groups: dict[tuple[int, int], list] = {}
    for p in pieces:
        groups.setdefault(p.rows, []).append(p.k if keys else p.q)
    rows = sorted(groups)
    if any(r1[0] < r0[1] for r0, r1 in zip(rows, rows[1:])):
        groups = {(rows[0][0], max(r[1] for r in rows)): [span for spans in groups.values() for span in spans]}
    shared = []
    for r, spans in sorted(groups.items()):
        merged: list[list[int]] = []
        end = None  # the furthest end seen so far
        for lo, hi in sorted(spans):
            if end is not None and lo < end:
                a, b = lo, min(hi, end)
                if merged and a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            end = hi if end is None else max(end, hi)
        shared += [(r, (a, b)) for a, b in merged]
    return shared


def pieces_gradients(dout, q, k, v, out, lse, pieces, *, scale: float, backend: str | None = None):
    """``(dq, dk, dv)`` of every piece, in the dtype of q/k/v, with fp32 accumulators only where pieces overlap.

    The same numbers as :func:`pieces_backward` into fp32 accumulators cast at the end: a position one
    piece writes gets that piece's gradient (``fp32(g)`` cast back to its dtype is ``g``); positions
    several pieces write (window bands, pieces of several key chunks) are summed in fp32, in the
    same order, in accumulators that span only those positions. So one document (one causal piece)
    needs no accumulator at all: the kernel's gradients are the result. Memory: the three gradients
    in the compute dtype plus fp32 over the shared ranges, instead of fp32 over the whole sequence.

    Args:
        dout, q, k, v, out, lse, pieces, scale, backend: as for :func:`pieces_backward`.

    Returns:
        ``(dq, dk, dv)`` shaped and typed like ``q``, ``k``, ``v`` (0 where no piece reaches).
    """

    check_pieces(pieces, q.shape[0], q.shape[2], k.shape[2])
    pieces = _runnable(pieces, backend)
    whole = [p for p in pieces if p.rows == (0, q.shape[0]) and p.q == (0, q.shape[2]) and p.k == (0, k.shape[2])]
    targets = [(q, False), (k, True), (v, True)]
    if len(pieces) == 1 and whole:
        grads = _piece_backward(pieces[0], dout, q, k, v, out, lse, scale, backend)  # views of the whole tensors
        return tuple(g.to(t.dtype) for g, (t, _) in zip(grads, targets))
    results = [torch.zeros_like(t) for t, _ in targets]
    # fp32 accumulators over the shared ranges only: (rows, range, (b1 - b0, h, hi - lo, D) fp32) per gradient
    accs = [
        [
            (
                r,
                (lo, hi),
                torch.zeros(r[1] - r[0], t.shape[1], hi - lo, t.shape[3], dtype=torch.float32, device=t.device),
            )
            for r, (lo, hi) in _shared_ranges(pieces, keys)
        ]
        for t, keys in targets
    ]
    for p in pieces:
        block = _piece_backward(p, dout, q, k, v, out, lse, scale, backend)
        for grad, result, acc, (_, keys) in zip(block, results, accs, targets):
            lo, hi = p.k if keys else p.q
            b0, b1 = p.rows
            mine = [(r, span, buf) for r, span, buf in acc if r[0] <= b0 and b1 <= r[1]]  # this piece's row group
            for r, (a, b), buf in mine:
                # the part of [lo, hi) inside a shared range [a, b) is summed in fp32 ...
                s, e = max(lo, a), min(hi, b)
                if s < e:
                    buf[b0 - r[0] : b1 - r[0], :, s - a : e - a].add_(grad[:, :, s - lo : e - lo])  # (as above)
            # ... and the rest is this piece's alone: its gradient, as the kernel returned it
            for s, e in _outside(lo, hi, [span for _, span, _ in mine]):
                result[b0:b1, :, s:e].copy_(grad[:, :, s - lo : e - lo])
    for result, acc in zip(results, accs):
        for (b0, b1), (a, b), buf in acc:
            result[b0:b1, :, a:b].copy_(buf)
    return tuple(results)


def pieces_output(q, k, v, pieces, *, scale: float, backend: str | None = None):
    """``(out, lse)`` of every piece: ``out`` in q's dtype, fp32 ``lse``, with fp32 accumulators only
    where pieces share query positions.

    The same numbers as :func:`pieces_forward` into fp32 accumulators over the whole sequence cast
    at the end: merging one block into an empty accumulator gives the block's output exactly (its
    weight is ``exp(0) = 1``; 0 where its lse is ``-inf``), so a query position one piece writes gets
    that piece's output as the kernel returned it, and positions several pieces write (window
    bands, several key chunks, packed tiles) are merged in fp32, in the same order, in accumulators
    spanning only those. One document needs no accumulator: the kernel's output is the result.
    Memory: the output in the compute dtype plus fp32 over the shared ranges, instead of an fp32
    ``(B, h_q, S_q, D)`` accumulator (twice the output in bf16) while the layer's attention runs.

    Args:
        q, k, v, pieces, scale, backend: as for :func:`pieces_forward`.

    Returns:
        ``(out, lse)``: ``(B, h_q, S_q, D)`` in q's dtype (0 where no piece reaches) and the fp32
        ``(B, h_q, S_q)`` log-sum-exp (``-inf`` there).
    """
    from . import merge_into

    check_pieces(pieces, q.shape[0], q.shape[2], k.shape[2])
    pieces = _runnable(pieces, backend)

    def run(p):
        o_b, l_b = _piece_forward(p, q, k, v, scale, backend)
        return o_b.masked_fill_(torch.isneginf(l_b).unsqueeze(-1), 0), l_b.float()  # rows with no key: 0

    if len(pieces) == 1 and pieces[0].rows == (0, q.shape[0]) and pieces[0].q == (0, q.shape[2]):
        o_b, l_b = run(pieces[0])
        return o_b.to(q.dtype), l_b
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
    # fp32 accumulators over the shared query ranges only: (rows, range, out (b1 - b0, h, b - a, D), lse)
    f32 = dict(dtype=torch.float32, device=q.device)
    accs = [
        (
            r,
            (a, b),
            torch.zeros(r[1] - r[0], q.shape[1], b - a, q.shape[3], **f32),
            torch.full((r[1] - r[0], q.shape[1], b - a), float("-inf"), **f32),
        )
        for r, (a, b) in _shared_ranges(pieces, keys=False)
    ]
    for p in pieces:
        o_b, l_b = run(p)
        (lo, hi), (b0, b1) = p.q, p.rows
        mine = [acc for acc in accs if acc[0][0] <= b0 and b1 <= acc[0][1]]  # this piece's row group
        for r, (a, b), o_acc, l_acc in mine:
            s, e = max(lo, a), min(hi, b)
            if s < e:  # merged in fp32 where other pieces write too ...
                rows = slice(b0 - r[0], b1 - r[0])
                merge_into(
                    o_acc[rows, :, s - a : e - a],
                    l_acc[rows, :, s - a : e - a],
                    o_b[:, :, s - lo : e - lo],
                    l_b[:, :, s - lo : e - lo],
                )
        for s, e in _outside(lo, hi, [acc[1] for acc in mine]):  # ... and the rest is this piece's alone
            out[b0:b1, :, s:e].copy_(o_b[:, :, s - lo : e - lo])
            lse[b0:b1, :, s:e].copy_(l_b[:, :, s - lo : e - lo])
    for (b0, b1), (a, b), o_acc, l_acc in accs:
        out[b0:b1, :, a:b].copy_(o_acc)
        lse[b0:b1, :, a:b].copy_(l_acc)
    return out, lse


def _outside(lo: int, hi: int, ranges) -> list[tuple[int, int]]:
    """The parts of ``[lo, hi)`` outside the sorted, disjoint ``ranges``."""
    parts, at = [], lo
    for a, b in ranges:
        if b <= at or a >= hi:
            continue
        if a > at:
            parts.append((at, a))
        at = max(at, b)
    if at < hi:
        parts.append((at, hi))
    return parts


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pieces, scale, backend):
        out, lse = pieces_output(q, k, v, pieces, scale=scale, backend=backend)  # out in the compute dtype
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.pieces, ctx.scale, ctx.backend = pieces, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = pieces_gradients(dout, q, k, v, out, lse, ctx.pieces, scale=ctx.scale, backend=ctx.backend)
        return dq, dk, dv, None, None, None


def varlen_attention(q, k, v, pieces, *, scale: float, backend: str | None = None) -> torch.Tensor:
    """Differentiable attention over ``pieces`` (queries no piece covers get 0).

    Args:
        q: ``(B, h_q, S_q, D)``; k, v: ``(B, h_kv, S_k, D)`` (cast to one compute dtype first:
            :func:`~hf_seqpar.kernels.compute_dtype`).
        pieces: :class:`Piece` list.
        scale: softmax scale.
        backend: force a kernel backend by name.

    Returns:
        ``(B, h_q, S_q, D)`` in the compute dtype.
    """
    from . import compute_dtype

    dtype = compute_dtype(q, k, v)
    return _VarlenAttention.apply(q.to(dtype), k.to(dtype), v.to(dtype), pieces, scale, backend)
