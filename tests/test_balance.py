"""The work-balanced layout of packed rows (single process, no ranks): per-rank causal attention
work as the ring planner emits it, the layout's round trip, its padding bound, and what
``layout="auto"`` picks."""

from __future__ import annotations

import pytest
import torch

from hf_seqpar.core.balance import balanced_layout, choose_layout, imbalance, layout_report, rank_work, token_work
from hf_seqpar.core.layout import Layout
from hf_seqpar.core.masks import document_ids
from hf_seqpar.core.sharding import SeqParBatch
from hf_seqpar.kernels.varlen import unpack_pieces
from hf_seqpar.strategies.ring import ring_plans
from hf_seqpar.tools.rowbench import longtail_positions, skewed_positions

S = 8192
ROWS = {
    "skewed": lambda: skewed_positions(S),
    **{f"longtail_{s}": (lambda s=s: longtail_positions(S, s)) for s in range(3)},
}


def _rows(name):
    pos = ROWS[name]()
    return torch.ones_like(pos, dtype=torch.bool), document_ids(pos)


def _planned_work(layout: Layout, valid, docs) -> list[int]:
    """Score entries per ring rank, summed over the pieces the ring planner emits (what the
    kernels compute; tiles of tiny documents counted by their parts), for a causal batch in ``layout``."""
    pad = layout.pad
    valid = torch.cat([valid, torch.zeros(valid.shape[0], pad, dtype=torch.bool)], 1)
    docs = torch.cat([docs, (docs[:, -1:] + 1).expand(-1, pad)], 1)
    batch = SeqParBatch(None, layout, None, valid, docs)
    return [
        sum(piece.work for plan in ring_plans(batch, r, layout, True, None) if plan for piece in unpack_pieces(plan))
        for r in range(layout.outer)
    ]


@pytest.mark.parametrize("name", list(ROWS))
@pytest.mark.parametrize("p,inner", [(2, 1), (4, 1), (8, 1), (4, 2), (8, 2)])
def test_auto_layout_balances_packed_rows(name, p, inner):
    valid, docs = _rows(name)
    zigzag = Layout("zigzag", S, p, 2 * p, inner=inner)
    layout = choose_layout("auto", S, p, 2 * p, inner, valid, docs)
    assert layout.kind == "balanced"
    work = _planned_work(layout, valid, docs)
    zig = _planned_work(zigzag, valid, docs)
    assert sum(work) == sum(zig)  # the same causal work, only distributed differently
    assert imbalance(work) <= 1.05, (work, layout.spans)
    if name == "skewed":
        assert imbalance(zig) >= 1.75
    else:
        assert imbalance(zig) > 1.1  # these seeds leave whole-row zigzag unbalanced
    # the work model of the layout is the planner's: the same numbers, O(S) without pieces
    assert rank_work(layout, token_work(valid, docs)) == work
    assert layout.pad < layout.multiple and layout.multiple <= 16 * p


@pytest.mark.parametrize("seq,p,inner,k", [(37, 2, 1, 4), (100, 4, 2, 2), (250, 4, 1, 8), (64, 8, 2, 2)])
def test_balanced_layout_round_trip(seq, p, inner, k):
    docs = document_ids(torch.cat([torch.arange(seq // 3), torch.arange(seq - seq // 3)])[None])
    lay = balanced_layout(seq, p, token_work(torch.ones(1, seq, dtype=torch.bool), docs), inner, chunks_per_rank=k)
    assert lay.padded_len % (p * k) == 0 and lay.pad < p * k
    x = torch.randn(2, lay.padded_len, 3)
    x[:, seq:] = float("nan")
    shards = [lay.shard(x, r) for r in range(p)]
    assert all(s.shape == (2, lay.local_len, 3) for s in shards)
    assert torch.equal(lay.unshard(torch.cat(shards, 1)), x[:, :seq])
    assert torch.equal(lay.rank_order.sort().values, torch.arange(lay.padded_len))
    # a hybrid rank holds a contiguous piece of its ring rank's shard
    outer = lay.outer_indices(1 % lay.outer)
    assert torch.equal(torch.cat([lay.local_indices((1 % lay.outer) * inner + i) for i in range(inner)]), outer)


def test_one_document_balanced_is_zigzag_and_auto_keeps_zigzag():
    work = token_work(torch.ones(1, 64, dtype=torch.bool), None)
    lay = balanced_layout(64, 4, work, chunks_per_rank=2)
    zig = Layout("zigzag", 64, 4, 8)
    assert all(torch.equal(lay.outer_indices(r), zig.outer_indices(r)) for r in range(4))  # chunks 3, 4 merge
    assert choose_layout("auto", 64, 4, 8).kind == "zigzag"
    # documents that zigzag already balances keep zigzag (fewer pieces)
    even = document_ids((torch.arange(64) % 32)[None])
    assert choose_layout("auto", 64, 2, 4, 1, torch.ones(1, 64, dtype=torch.bool), even).kind == "zigzag"
    assert choose_layout("contiguous", 64, 2, 2).kind == "contiguous"


def test_token_work_counts_visible_keys():
    valid = torch.tensor([[1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    docs = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]])
    # row 0: doc 0 = 1,2,3 (a pad), doc 1 = 1,2; row 1: pad, doc 0 = 1,2, doc 1 = 1,2,3
    assert token_work(valid, docs).tolist() == [1, 3, 5, 1, 3, 5]
    report = layout_report(Layout("zigzag", 6, 1, 2), valid, docs)
    assert report["work_per_rank"] == [18.0] and report["work_max_over_mean"] == 1.0


def test_layout_rejects_bad_spans():
    with pytest.raises(ValueError, match="cover"):
        Layout("balanced", 8, 2, 4, spans=(((0, 4),), ((2, 6),)))
    with pytest.raises(ValueError, match="exactly for 'balanced'"):
        Layout("balanced", 8, 2, 4)


def test_plan_reports_the_rings_attention_balance():
    from hf_seqpar.tools.plan import Candidate, attention_balance

    ring = attention_balance(Candidate("ring", 4, 1, 4), 4096, "skewed")
    assert ring["layout"] == "balanced" and ring["work_max_over_mean"] <= 1.05
    assert ring["zigzag_work_max_over_mean"] >= 1.75
    assert attention_balance(Candidate("ring", 4, 1, 4), 4096, "single")["layout"] == "zigzag"
    assert attention_balance(Candidate("ulysses", 4, 4, 1), 4096, "skewed")["work_max_over_mean"] == 1.0
