"""Shared fixtures: pools of gloo ranks (2 and 4), shared by every test module of the session.

Starting a pool costs seconds (each rank imports torch and transformers), so one pool per world
size serves the whole session: a module's first case starts it, later modules reuse it. A case
that fails (or times out) makes the harness restart the pool, so it cannot poison the next case;
the ranks are also recycled every :data:`MAX_CASES` cases. A module whose cases change what its
ranks keep (allocator settings, resident memory it measures) sets ``PRIVATE_POOLS = True`` and
gets pools of its own, started and closed with the module.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: Cases a shared pool runs before its ranks are restarted (bounds the process groups they keep).
MAX_CASES = 150


@pytest.fixture(scope="session")
def _shared_pools():
    pools: dict = {}
    yield pools
    for pool in pools.values():
        pool.close()


def _pool(request, shared: dict, world: int):
    from harness import RankPool

    if getattr(request.module, "PRIVATE_POOLS", False):
        pool = RankPool(world)
        yield pool
        pool.close()
        return
    if world not in shared:
        shared[world] = RankPool(world, max_cases=MAX_CASES)  # started by its first case
    yield shared[world]


@pytest.fixture(scope="module")
def pool2(request, _shared_pools):
    """Two gloo ranks (the session's shared pool, or the module's own with ``PRIVATE_POOLS``)."""
    yield from _pool(request, _shared_pools, 2)


@pytest.fixture(scope="module")
def pool4(request, _shared_pools):
    """Four gloo ranks (the session's shared pool, or the module's own with ``PRIVATE_POOLS``)."""
    yield from _pool(request, _shared_pools, 4)


@pytest.fixture
def pools(pool2, pool4):
    """The pool for a test parametrized with ``world`` (2 or 4)."""
    return {2: pool2, 4: pool4}
