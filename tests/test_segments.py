"""Segments and attention pieces (no ranks): the O(S) plan against a dense reference mask.

Every structure a batch can have (padding anywhere, documents shorter than a shard or spanning
3+ shards, a document inside padding, sliding windows causal and bidirectional, rows of a batch
with different structures) is planned for the Ulysses view (the full sequence) and for every
(query shard, key shard) block of the ring layouts, executed with the variable-length kernels
and compared with float64 attention under the dense mask built here from the definitions
(valid key, same document, causality, window). Tolerance: fp32 kernels against float64 over at
most ~100 keys sit within ~1e-6; we allow 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from hf_seqpar.core.layout import Layout
from hf_seqpar.core.masks import document_ids
from hf_seqpar.core.segments import TILE, build_segments, plan_pieces
from hf_seqpar.kernels import reference_backward, reference_forward
from hf_seqpar.kernels.varlen import (
    PACK_SPAN,
    PACKED,
    Piece,
    check_pieces,
    pieces_backward,
    pieces_forward,
    unpack_pieces,
    varlen_attention,
)


def dense_allowed(valid, docs, causal, window):
    """(B, 1, S, S) bool from the definitions (the oracle; O(S^2), tests only). Queries at padding
    see nothing: their outputs are unspecified (no valid token reads them), SP gives 0."""
    s = valid.shape[1]
    q, k = torch.arange(s)[:, None], torch.arange(s)[None, :]
    allowed = torch.ones(s, s, dtype=torch.bool)
    if causal:
        allowed &= k <= q
        if window is not None:
            allowed &= k > q - window
    elif window is not None:  # Gemma3's bidirectional window: |q - k| < window
        allowed &= (q - k).abs() < window
    allowed = allowed[None] & valid[:, None, :] & valid[:, :, None]
    if docs is not None:
        allowed &= docs[:, :, None] == docs[:, None, :]
    return allowed[:, None]


def structure(kind: str, s: int):
    """(valid, doc_ids) of a batch of 2 rows."""
    valid = torch.ones(2, s, dtype=torch.bool)
    pos = torch.arange(s).repeat(2, 1)
    if kind == "short_docs":  # documents of 3..7 tokens, shorter than any shard
        lengths = [3, 7, 5, 4, 6] * s
        pos[0] = torch.cat([torch.arange(n) for n in lengths])[:s]
        pos[1] = torch.cat([torch.arange(n) for n in lengths[2:]])[:s]
    elif kind == "spanning":  # one document spans most of the row (3+ shards), short ones around it
        pos[0] = torch.cat([torch.arange(3), torch.arange(s - 8), torch.arange(5)])
    elif kind == "doc_in_padding":  # left padding, two documents, a gap of padding, one more document
        valid[0, :4] = False
        valid[0, s // 2 : s // 2 + 3] = False
        pos[0] = torch.cat([torch.arange(4), torch.arange(10), torch.arange(s - 14)])
        valid[1, s - 6 :] = False
    elif kind == "mixed_rows":  # row 0 packed, row 1 one document with right padding
        pos[0] = torch.cat([torch.arange(s // 3), torch.arange(s - s // 3)])
        valid[1, s - 5 :] = False
    elif kind != "plain":
        raise ValueError(kind)
    return valid, document_ids(pos)


KINDS = ["plain", "short_docs", "spanning", "doc_in_padding", "mixed_rows"]
MASKS = [(True, None), (True, 5), (False, None), (False, 4)]


def _qkv(s, seed=0, hq=4, hkv=2, d=8):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, hq, s, d, generator=g),
        torch.randn(2, hkv, s, d, generator=g),
        torch.randn(2, hkv, s, d, generator=g),
    )


def _check_against_reference(q, k, v, out, lse, grads, dout, allowed):
    ref_out, ref_lse = reference_forward(q, k, v, scale=0.3, mask=allowed)
    live = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~live)  # rows that see nothing are exactly that
    assert (out.double()[live] - ref_out[live]).abs().max() <= 1e-5
    assert (lse.double()[live] - ref_lse[live]).abs().max() <= 1e-5
    ref_grads = reference_backward(dout, q, k, v, ref_out, ref_lse, scale=0.3, mask=allowed)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert (g.double() - r).abs().max() <= 1e-4, f"d{name}"


@pytest.mark.parametrize("causal,window", MASKS, ids=lambda x: str(x))
@pytest.mark.parametrize("kind", KINDS)
def test_full_sequence_pieces_match_dense_reference(kind, causal, window):
    s = 48
    valid, docs = structure(kind, s)
    q, k, v = _qkv(s)
    pieces = plan_pieces(build_segments(valid, docs), [(0, s)], [(0, s)], causal, window)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = varlen_attention(qq, kk, vv, pieces, scale=0.3)
    dout = torch.randn_like(out) * valid[:, None, :, None]  # nothing flows into padding rows
    out.backward(dout)
    allowed = dense_allowed(valid, docs, causal, window)
    ref_out, ref_lse = reference_forward(q, k, v, scale=0.3, mask=allowed)
    live = torch.isfinite(ref_lse)
    assert (out.double()[live] - ref_out[live]).abs().max() <= 1e-5
    assert torch.equal(out[~live], torch.zeros_like(out[~live]))
    ref_grads = reference_backward(dout, q, k, v, ref_out, ref_lse, scale=0.3, mask=allowed)
    for name, t, r in zip("qkv", (qq, kk, vv), ref_grads):
        assert (t.grad.double() - r).abs().max() <= 1e-4, f"d{name}"


def _ring_blocks(q, k, v, dout, layout, segments, causal, window):
    """Every query shard of ``layout`` against every key shard, forward merged by lse then backward,
    as the ring runs them: ``(out, lse, (dq, dk, dv), tiles)`` in global order (tiles: packed pieces)."""
    p, (b, hq, _, d), hkv = layout.outer, q.shape, k.shape[1]
    out, lse = torch.zeros(q.shape), torch.full(q.shape[:3], float("-inf"))
    dq, dk, dv = torch.zeros(q.shape), torch.zeros(k.shape), torch.zeros(v.shape)
    idx = [layout.outer_indices(r) for r in range(p)]
    plans = {
        (r, src): plan_pieces(segments, layout.outer_chunks(r), layout.outer_chunks(src), causal, window)
        for r in range(p)
        for src in range(p)
    }
    for r in range(p):
        o_r, l_r = torch.zeros(b, hq, len(idx[r]), d), torch.full((b, hq, len(idx[r])), float("-inf"))
        for src in range(p):
            pieces_forward(q[:, :, idx[r]], k[:, :, idx[src]], v[:, :, idx[src]], plans[r, src], o_r, l_r, scale=0.3)
        out[:, :, idx[r]], lse[:, :, idx[r]] = o_r, l_r
    for r in range(p):
        for src in range(p):
            g = [torch.zeros(b, h, len(idx[i]), d) for h, i in ((hq, r), (hkv, src), (hkv, src))]
            pieces_backward(
                dout[:, :, idx[r]],
                q[:, :, idx[r]],
                k[:, :, idx[src]],
                v[:, :, idx[src]],
                out[:, :, idx[r]],
                lse[:, :, idx[r]],
                plans[r, src],
                *g,
                scale=0.3,
            )
            dq[:, :, idx[r]] += g[0]
            dk[:, :, idx[src]] += g[1]
            dv[:, :, idx[src]] += g[2]
    tiles = sum(piece.kind == PACKED for plan in plans.values() for piece in plan)
    return out, lse, (dq, dk, dv), tiles


@pytest.mark.parametrize("layout_kind,p", [("zigzag", 2), ("zigzag", 4), ("contiguous", 3)])
@pytest.mark.parametrize("causal,window", MASKS, ids=lambda x: str(x))
@pytest.mark.parametrize("kind", KINDS)
def test_ring_block_pieces_merge_to_dense_reference(kind, causal, window, layout_kind, p):
    """Every query shard against every key shard of the layout, merged by lse, is exact."""
    s = 48
    layout = Layout(layout_kind, s, p, p * (2 if layout_kind == "zigzag" else 1))
    valid, docs = structure(kind, s)
    q, k, v = _qkv(s, seed=1)
    dout = torch.randn_like(q) * valid[:, None, :, None]
    out, lse, grads, _ = _ring_blocks(q, k, v, dout, layout, build_segments(valid, docs), causal, window)
    _check_against_reference(q, k, v, out, lse, grads, dout, dense_allowed(valid, docs, causal, window))


@pytest.mark.parametrize("seed", range(8))
def test_ring_blocks_of_random_tiny_documents_with_tiles_are_exact(seed):
    """Packed tiles in the ring's blocks (random rows of 1-40-token documents, end padding, causal or
    windowed, the balanced/auto layouts that shard_batch picks for them, 2-4 ranks) are exact."""
    from hf_seqpar.core.balance import choose_layout

    gen = torch.Generator().manual_seed(seed)
    draw = lambda options: options[int(torch.randint(len(options), (1,), generator=gen))]  # noqa: E731
    s, p = draw([48, 61, 96, 130]), draw([2, 3, 4])
    lengths = torch.tensor([1, 2, 3, 1, 5, 9, 17, 40])[torch.randint(8, (2, s), generator=gen)]
    pos = torch.stack([torch.cat([torch.arange(int(n)) for n in row])[:s] for row in lengths])  # (2, S)
    valid = torch.ones(2, s, dtype=torch.bool)
    valid[1, s - draw([1, 3, 5]) :] = False
    causal, window = draw([(True, None), (True, 4), (False, None)])
    layout = choose_layout(draw(["balanced", "auto"]), s, p, 2 * p, valid=valid, doc_ids=document_ids(pos))
    pad = layout.padded_len - s
    valid, pos = torch.nn.functional.pad(valid, (0, pad), value=False), torch.nn.functional.pad(pos, (0, pad))
    docs = document_ids(pos)
    q, k, v = _qkv(layout.padded_len, seed=seed)
    dout = torch.randn_like(q) * valid[:, None, :, None]
    out, lse, grads, tiles = _ring_blocks(q, k, v, dout, layout, build_segments(valid, docs), causal, window)
    assert tiles > 0, "the case must exercise packed tiles"
    _check_against_reference(q, k, v, out, lse, grads, dout, dense_allowed(valid, docs, causal, window))


def test_windowed_long_row_is_tiled_and_every_mask_is_small():
    """A 4096-token row with a window of 300: masks only for band tiles, each at most
    TILE x (TILE + window) entries, and the work is the band's, not S^2."""
    s, w = 4096, 300
    segments = build_segments(torch.ones(1, s, dtype=torch.bool), None)
    pieces = plan_pieces(segments, [(0, s)], [(0, s)], True, w)
    masked = [p for p in pieces if p.kind == "masked"]
    assert masked and all((p.q[1] - p.q[0]) * (p.k[1] - p.k[0]) <= TILE * (TILE + w) for p in masked)
    band = sum(min(i + 1, w) for i in range(s))  # allowed entries of the band
    work = sum(p.work for p in pieces)
    assert band <= work <= band + s * TILE  # tiles compute at most one tile's worth of waste per row
    assert work < s * s // 4


def test_packed_planning_is_linear_in_the_documents():
    """Planning a packed 128K row touches each document once: pieces == documents, and the
    segments hold one run per document (no S x S anything)."""
    s, doc = 131072, 1024
    pos = torch.arange(s) % doc
    segments = build_segments(torch.ones(1, s, dtype=torch.bool), document_ids(pos[None]))
    assert segments.num_runs == s // doc
    pieces = plan_pieces(segments, [(0, s)], [(0, s)], True, None)
    assert len(pieces) == s // doc and all(p.kind == "causal" for p in pieces)
    zig = Layout("zigzag", s, 4, 8)
    ring = [plan_pieces(segments, zig.outer_chunks(0), zig.outer_chunks(src), True, None) for src in range(4)]
    # rank 0 holds 2 of the 8 zigzag chunks, 16 documents each, and sees only its own documents
    assert sum(len(p) for p in ring) == s // 4 // doc


def test_pieces_outside_the_tensors_are_refused_before_any_kernel():
    with pytest.raises(ValueError, match="does not fit"):
        check_pieces([Piece((0, 1), (0, 5), (0, 9), "full")], 1, 5, 8)
    with pytest.raises(ValueError, match="does not fit"):
        check_pieces([Piece((0, 3), (0, 5), (0, 5), "full")], 2, 5, 5)
    with pytest.raises(ValueError, match="does not fit"):
        check_pieces([Piece((0, 1), (0, 5), (0, 4), "causal")], 1, 5, 5)
    check_pieces([Piece((0, 2), (1, 5), (0, 4), "causal")], 2, 5, 5)


def test_many_tiny_documents_run_in_few_exact_kernel_calls():
    """A row of 300 documents of 1-3 tokens: a few packed tiles (each at most PACK_SPAN square),
    not one kernel call per document, and still exact against float64 with the dense mask
    (forward and every gradient); a forced backend without masks runs the tiles' parts instead."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 4, (300,), generator=g).tolist()
    s = sum(lengths)
    docs = document_ids(torch.cat([torch.arange(n) for n in lengths])[None].repeat(2, 1))
    valid = torch.ones(2, s, dtype=torch.bool)
    valid[1, s - 7 :] = False  # the second row: right padding inside the last tiles
    pieces = plan_pieces(build_segments(valid, docs), [(0, s)], [(0, s)], True, None)
    packed = [p for p in pieces if p.kind == PACKED]
    assert len(pieces) <= 2 * (s // (PACK_SPAN // 2) + 1), len(pieces)  # 2 row groups, tiles >= half full
    assert all(p.q[1] - p.q[0] <= PACK_SPAN and p.k[1] - p.k[0] <= PACK_SPAN for p in packed)
    live_docs = 300 + docs[1][valid[1]].unique().numel()
    assert len(unpack_pieces(pieces)) == live_docs  # unpacked: one causal piece per document and row group
    q, k, v = _qkv(s, seed=4)
    dout = torch.randn_like(q) * valid[:, None, :, None]
    allowed = dense_allowed(valid, docs, True, None)
    for runnable in (pieces, unpack_pieces(pieces)):
        out, lse = torch.zeros(q.shape), torch.full(q.shape[:3], float("-inf"))
        pieces_forward(q, k, v, runnable, out, lse, scale=0.3)
        grads = [torch.zeros(t.shape) for t in (q, k, v)]
        pieces_backward(dout, q, k, v, out, lse, runnable, *grads, scale=0.3)
        _check_against_reference(q, k, v, out, lse, grads, dout, allowed)
