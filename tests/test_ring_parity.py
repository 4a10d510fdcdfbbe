"""Ring (2 and 4 ranks) and hybrid (4 ranks as 2 x 2) against the unsharded HF model, the
ring's measured traffic against theory, and the causal work balance of the zigzag layout."""

from __future__ import annotations

import cases
import pytest
import torch

from hf_seqpar.core.layout import Layout
from hf_seqpar.core.sharding import SeqParBatch
from hf_seqpar.kernels.varlen import unpack_pieces
from hf_seqpar.strategies.ring import ring_plans

CASES = cases.PARITY_CASES


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_ring_matches_unsharded(pools, world, case):
    cases.check_parity(pools[world].run(cases.parity, "ring", **CASES[case]))


@pytest.mark.parametrize("case", list(CASES))
def test_hybrid_2x2_matches_unsharded(pool4, case):
    kw = dict(CASES[case])
    kw["options"] = dict(ulysses_size=2, **kw.get("options", {}))
    cases.check_parity(pool4.run(cases.parity, "hybrid", **kw))


@pytest.mark.parametrize("world", [2, 4])
def test_ring_contiguous_layout_and_reference_backend(pools, world):
    cases.check_parity(
        pools[world].run(cases.parity, "ring", options=dict(layout="contiguous"), batch_kw=dict(kind="packed", seq=37))
    )
    cases.check_parity(
        pools[world].run(cases.parity, "ring", options=dict(backend="reference"), batch_kw=dict(kind="padding"))
    )


#: Packed rows under the work-balanced layout (forced, and picked by layout="auto"), with a
#: window and GQA: loss, logits and every gradient against the unsharded model.
BALANCED_CASES = {
    "skewed_auto": dict(batch_kw=dict(kind="skewed", seq=96)),
    "longtail_balanced": dict(batch_kw=dict(kind="longtail", seq=160, seed=3), options=dict(layout="balanced")),
    "skewed_window_gqa": dict(
        model_kw=dict(family="mistral", sliding_window=9, heads=4, kv_heads=2),
        batch_kw=dict(kind="skewed", seq=80),
        options=dict(layout="balanced"),
    ),
}


@pytest.mark.parametrize("case", list(BALANCED_CASES))
def test_balanced_layout_matches_unsharded(pool2, pool4, case):
    runs = [(pool2, "ring", {}), (pool4, "ring", {}), (pool4, "hybrid", dict(ulysses_size=2))]
    for pool, strategy, extra in runs:
        kw = dict(BALANCED_CASES[case])
        kw["options"] = {**kw.get("options", {}), **extra}
        results = pool.run(cases.parity, strategy, **kw)
        cases.check_parity(results)
        kind, chunks = results[0]["layout"]
        assert kind == "balanced" and chunks >= 2, (strategy, results[0]["layout"])


def test_auto_picks_hybrid_for_6_heads_on_4_ranks(pool4):
    """6 heads on 4 ranks: Ulysses cannot split them, auto runs hybrid 2 x 2, exactly."""
    cases.check_parity(
        pool4.run(cases.parity, "auto", model_kw=dict(heads=6, kv_heads=3), batch_kw=dict(kind="packed"))
    )


def test_ring_bytes_match_theory(pool2, pool4):
    skewed = dict(kind="skewed", seq=96)  # the balanced layout: more spans per rank, the same bytes
    runs = [
        (pool2, "ring", None, None),
        (pool4, "ring", None, None),
        (pool4, "hybrid", dict(ulysses_size=2), None),
        (pool2, "ring", None, skewed),
        (pool4, "hybrid", dict(ulysses_size=2), skewed),
    ]
    for pool, strategy, options, batch_kw in runs:
        results = pool.run(cases.ring_traffic, strategy, options, batch_kw)
        assert results[0]["layout"] == ("balanced" if batch_kw else "zigzag")
        for r in results:
            assert all(b == r["fwd_theory"] for b in r["fwd"]), (strategy, r)
            assert all(b == r["bwd_theory"] for b in r["bwd"]), (strategy, r)
            assert r["fwd_theory"] > 0


def _work(layout: Layout, window=None, packed=False) -> list[tuple[int, int]]:
    """(causal score entries, skipped blocks) per rank for a causal batch in ``layout`` (tiles of tiny
    documents counted by their parts)."""
    s = layout.padded_len
    valid = torch.ones(1, s, dtype=torch.bool)
    docs = (torch.arange(s) * 3 // s)[None] if packed else None
    batch = SeqParBatch(None, layout, torch.arange(s)[None], valid, docs)
    out = []
    for rank in range(layout.sp_size):
        plans = ring_plans(batch, rank, layout, True, window)
        out.append(
            (
                sum(piece.work for p in plans if p is not None for piece in unpack_pieces(p)),
                sum(p is None for p in plans),
            )
        )
    return out


@pytest.mark.parametrize("p", [2, 4, 8])
def test_zigzag_balances_causal_work(p):
    zig = _work(Layout("zigzag", 64 * p, p, 2 * p))
    assert len({w for w, _ in zig}) == 1, zig  # every rank computes exactly the same work
    contiguous = _work(Layout("contiguous", 64 * p, p, p))
    assert contiguous[-1][0] > (p - 0.5) * contiguous[0][0]  # contiguous: the last rank does ~P times more
    assert [skipped for _, skipped in contiguous] == list(range(p - 1, -1, -1))  # future blocks skipped
    # total work is the causal triangle either way (nothing computed twice, nothing masked computed)
    n = 64 * p
    assert sum(w for w, _ in zig) == sum(w for w, _ in contiguous) == n * (n + 1) // 2


def test_blocks_outside_window_or_document_are_skipped():
    lay = Layout("contiguous", 256, 8, 8)
    windowed = _work(lay, window=16)  # a 16-token window reaches at most one block back
    assert all(skipped >= 6 for _, skipped in windowed[2:])
    packed = _work(lay, packed=True)  # 3 documents: no block attends across a document boundary
    assert sum(s for _, s in packed) > sum(s for _, s in _work(lay))


@pytest.mark.parametrize("strategy", ["ring"])
def test_gather_of_an_earlier_batch_uses_its_own_layout_or_raises(pool2, strategy):
    """A 31-token batch's logits gathered after a 32-token batch (same shard size)."""
    cases.check_gather_earlier_batch(pool2.run(cases.gather_earlier_batch, strategy))
