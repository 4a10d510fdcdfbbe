"""Shared fixtures: one pool of gloo ranks per world size and test module."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _pool(world: int):
    from harness import RankPool

    pool = RankPool(world)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool2():
    """Two gloo ranks, started once per test module."""
    yield from _pool(2)


@pytest.fixture(scope="module")
def pool4():
    """Four gloo ranks, started once per test module."""
    yield from _pool(4)


@pytest.fixture
def pools(pool2, pool4):
    """The pool for a test parametrized with ``world`` (2 or 4)."""
    return {2: pool2, 4: pool4}
