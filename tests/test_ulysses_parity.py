"""Ulysses on 2 and 4 gloo ranks against the unsharded HF model, in the same test
(tolerances: see ``cases.check_parity``)."""

from __future__ import annotations

import pytest

import cases

CASES = cases.PARITY_CASES
_check = cases.check_parity


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", list(CASES))
def test_ulysses_matches_unsharded(pools, world, case):
    _check(pools[world].run(cases.parity, "ulysses", **CASES[case]))


def test_dp2_x_sp2_matches_unsharded(pool4):
    """4 ranks as 2 data-parallel replicas of SP=2 (same batch on both replicas)."""
    _check(pool4.run(cases.parity, "ulysses", sp_size=2, batch_kw=dict(kind="padding")))


def test_sp1_is_the_plain_model(pool2):
    """sp_size=1 (pure data parallel) still goes through the hooks and stays exact."""
    _check(pool2.run(cases.parity, "ulysses", sp_size=1, batch_kw=dict(kind="packed")))


def test_comm_bytes_match_theory(pool2, pool4):
    """The byte counter sees exactly the Ulysses all-to-all volume per layer."""
    for pool in (pool2, pool4):
        for r in pool.run(cases.ulysses_traffic):
            assert r["measured"] == r["theory"], r
            assert r["per_layer_equal"], r
