"""Fast single-process tests: layouts, config validation, mask structure, head arithmetic."""

from __future__ import annotations

import pytest
import torch

import hf_seqpar
from hf_seqpar.config import SequenceParallelConfig, resolve
from hf_seqpar.core.layout import Layout
from hf_seqpar.core.masks import dense_mask, document_ids, flash_segments
from hf_seqpar.kernels import reference_attention
from hf_seqpar.strategies import STRATEGIES, strategy_class
from hf_seqpar.strategies.ulysses import HeadsNotDivisibleError, kv_replication


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("seq,p", [(1, 1), (7, 2), (32, 4), (33, 4), (100, 8), (5, 4)])
def test_layout_round_trip(kind, seq, p):
    mult = p * (2 if kind == "zigzag" else 1)
    lay = Layout(kind, seq, p, mult)
    assert lay.padded_len % mult == 0 and lay.padded_len - mult < seq <= lay.padded_len
    x = torch.randn(3, lay.padded_len, 5)
    x[:, seq:] = float("nan")  # padding must never reach the unsharded result
    shards = [lay.shard(x, r) for r in range(p)]
    assert all(s.shape == (3, lay.local_len, 5) for s in shards)
    back = lay.unshard(torch.cat(shards, dim=1))
    assert torch.equal(back, x[:, :seq])
    # every padded position is held by exactly one rank
    held = torch.cat([lay.local_indices(r) for r in range(p)])
    assert torch.equal(held.sort().values, torch.arange(lay.padded_len))


def test_zigzag_pairs_chunks():
    lay = Layout("zigzag", 16, 4, 8)
    assert lay.local_indices(0).tolist() == [0, 1, 14, 15]
    assert lay.local_indices(3).tolist() == [6, 7, 8, 9]


def test_layout_rejects_bad_multiple():
    with pytest.raises(ValueError, match="needs a multiple of 8"):
        Layout("zigzag", 10, 4, 4)
    with pytest.raises(ValueError, match="unknown layout"):
        Layout("striped", 10, 2, 2)
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        Layout("contiguous", 0, 2, 2)


def test_config_validation_gives_numbers():
    assert resolve(SequenceParallelConfig(sp_size=None), 8).sp_size == 8
    with pytest.raises(ValueError, match=r"world size 6 is not a multiple of sp_size=4.*\[1, 2, 3, 6\]"):
        resolve(SequenceParallelConfig(sp_size=4), 6)
    with pytest.raises(ValueError, match="positive integer"):
        SequenceParallelConfig(sp_size=0)
    with pytest.raises(ValueError, match="check_batch='sometimes'"):
        SequenceParallelConfig(check_batch="sometimes")
    with pytest.raises(ValueError, match="unknown strategy 'x'; valid strategies are"):
        SequenceParallelConfig(strategy="x")


def test_config_literals_name_what_the_package_has():
    import typing

    from hf_seqpar import config
    from hf_seqpar.core.layout import LAYOUT_CHOICES
    from hf_seqpar.kernels import BACKENDS

    assert set(config.BACKEND_NAMES) == set(BACKENDS) and set(config.LAYOUTS) == set(LAYOUT_CHOICES)
    hints = typing.get_type_hints(SequenceParallelConfig)
    assert typing.get_args(hints["layout"]) == (config.LayoutName, type(None))
    with pytest.raises(ValueError, match="backend='nope'"):
        SequenceParallelConfig(strategy="ring", backend="nope")
    from hf_seqpar.kernels import backend_named, select_backend

    resolved = backend_named("reference")  # a name is looked up once; blocks get the object
    assert resolved is BACKENDS["reference"] and select_backend(torch.device("cpu"), True, resolved) is resolved


def test_resolve_is_a_dry_run_without_a_process_group():
    import torch.distributed as dist
    from transformers import LlamaConfig

    assert not dist.is_initialized()
    model = LlamaConfig(num_attention_heads=6, num_key_value_heads=2, hidden_size=48)
    got = resolve(SequenceParallelConfig(strategy="auto"), 4, model)
    assert (got.sp_size, got.config.strategy, got.requested.strategy) == (4, "hybrid", "auto")
    assert "ulysses_size=2" in got.reason and "6 query heads" in got.reason
    assert resolve(SequenceParallelConfig(strategy="auto"), 4).strategy is None  # nothing to pick from
    with pytest.raises(ValueError, match="6 query heads, which sp_size=4 does not divide"):
        resolve(SequenceParallelConfig(), 4, model)
    config = SequenceParallelConfig(strategy="ring")
    assert resolve(config, 2).config.sp_size == 2 and config.sp_size is None  # the config is not modified


def test_heads_advice_is_true_for_the_world_and_the_heads():
    from transformers import LlamaConfig

    from hf_seqpar import HeadsNotDivisibleError

    def message(heads, sp, world):
        model = LlamaConfig(num_attention_heads=heads, num_key_value_heads=heads, hidden_size=8 * heads)
        with pytest.raises(HeadsNotDivisibleError) as err:
            resolve(SequenceParallelConfig(sp_size=sp), world, model)
        return str(err.value)

    # 3 heads on 2 ranks: hybrid would have no Ulysses degree > 1, and only sp_size 1 fits both
    assert "would run as ring" in message(3, 2, 2) and "ranks: [1] " in message(3, 2, 2)
    assert "ulysses_size=2 x ring_size=2" in message(6, 4, 8) and "ranks: [1, 2] " in message(6, 4, 8)


def test_config_typos_suggest_the_closest_key():
    from hf_seqpar import SequenceParallelPlugin

    with pytest.raises(ValueError, match=r"sp_sise -> did you mean sp_size\?"):
        SequenceParallelPlugin.from_dict({"sp_sise": 2})
    with pytest.raises(ValueError) as err:
        SequenceParallelPlugin.from_dict({"options": {"backend": "reference"}})
    assert "0.2" not in str(err.value)  # no version that this package has not reached


def test_strategy_table():
    assert set(STRATEGIES) == {"ulysses", "ring", "hybrid", "megatron"}
    for name, strat in STRATEGIES.items():
        assert strat.name == name and strat.description
        assert strategy_class(name) is strat
        for method in ("check_model", "make_layout", "attention", "apply", "remove"):
            assert callable(getattr(strat, method)), (name, method)


@pytest.mark.parametrize(
    "h,kv,p,rep", [(8, 8, 4, 1), (8, 2, 4, 2), (8, 1, 4, 4), (32, 8, 8, 1), (32, 8, 16, 2), (6, 3, 2, 2), (4, 4, 1, 1)]
)
def test_kv_replication_is_minimal_and_consistent(h, kv, p, rep):
    r = kv_replication(h, kv, p)
    assert r == rep
    kv_eff, groups = kv * r, h // kv
    assert kv_eff % p == 0
    # query head q on rank j must find its original kv head among that rank's expanded kv heads
    for q in range(h):
        rank = q // (h // p)
        local_kv = range(rank * kv_eff // p, (rank + 1) * kv_eff // p)
        e = q // (h // kv_eff)
        assert e in local_kv and e // r == q // groups


def test_kv_replication_rejects_heads():
    with pytest.raises(HeadsNotDivisibleError, match=r"12 query heads.*sp_size=8.*\[1, 2, 3, 4, 6, 12\]"):
        kv_replication(12, 4, 8)


def test_document_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13]])
    assert document_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2], [0] * 9]
    assert document_ids(torch.arange(9)[None].expand(2, 9)) is None


def test_flash_segments():
    valid = torch.tensor([[False, True, True, True], [True, True, False, False]])
    docs = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    cu, mx = flash_segments(valid, docs)
    assert cu.tolist() == [0, 1, 2, 4, 6, 8] and mx == 2
    cu, mx = flash_segments(torch.ones(2, 3, dtype=torch.bool), None)
    assert cu.tolist() == [0, 3, 6] and mx == 3


def test_dense_mask_matches_reference_semantics():
    """The sdpa mask built for a packed, padded, windowed row equals the rule written out."""
    from transformers.masking_utils import sdpa_mask

    s, w = 10, 3
    valid = torch.ones(1, s, dtype=torch.bool)
    valid[0, :2] = False
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])
    m = dense_mask(sdpa_mask, valid=valid, doc_ids=docs, is_causal=True, sliding_window=w, dtype=torch.float32)
    q, k = torch.arange(s)[:, None], torch.arange(s)[None, :]
    want = (k <= q) & (k > q - w) & (docs[0][:, None] == docs[0][None, :]) & valid[0][None, :]
    assert torch.equal(m[0, 0], want)
    assert (
        dense_mask(
            sdpa_mask,
            valid=torch.ones(2, s, dtype=torch.bool),
            doc_ids=None,
            is_causal=True,
            sliding_window=None,
            dtype=torch.float32,
        )
        is None
    )  # plain causal: is_causal fast path


def test_reference_attention_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    out, lse = reference_attention(q, k, v, causal)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(out.float(), want, atol=1e-5)
    assert torch.allclose(lse[..., 0], (q[..., 0, :] * k.repeat_interleave(2, 1)[..., 0, :]).sum(-1).double() / 8**0.5)


def test_public_api_names():
    for name in ("enable_sequence_parallel", "disable_sequence_parallel", "shard_batch", "gather_sequence"):
        assert callable(getattr(hf_seqpar, name))
    import importlib

    for sub in ("hf_seqpar.kernels", "hf_seqpar.patches"):  # installed under hf_seqpar, not top level
        assert importlib.import_module(sub).__name__ == sub


def test_pack_documents_restarts_positions_and_masks_document_starts():
    from hf_seqpar.core.data import pack_documents
    from hf_seqpar.core.masks import document_ids

    rows = list(pack_documents([b"abcde", b"xyz", b"0123456789"], 6))
    assert [r["position_ids"].tolist() for r in rows] == [[0, 1, 2, 3, 4, 0], [0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert rows[0]["labels"].tolist() == [-100, 98, 99, 100, 101, -100]  # no label across documents
    assert document_ids(rows[0]["position_ids"][None]).tolist() == [[0, 0, 0, 0, 0, 1]]
    assert len(list(pack_documents([b"abc"], 6))) == 0  # a tail shorter than a row is dropped
