"""Multi-rank CPU test harness: a pool of gloo ranks started once, many cases run inside it.

Starting a rank costs seconds (importing torch and transformers), so a test module starts one
:class:`RankPool` per world size and sends it case functions. Each case runs on every rank; the
pool returns the per-rank results or raises with the traceback of every failing rank. A rank that
fails while its peers wait in a collective cannot hang the suite: the pool stops waiting after the
failure (peers are terminated and the pool restarts for the next case), and gloo's own timeout
bounds every collective.
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

#: Seconds a case may run before the pool gives up on it.
CASE_TIMEOUT = float(os.environ.get("HF_SEQPAR_TEST_CASE_TIMEOUT", "300"))
#: Seconds to wait for the peers of a failed rank to report before terminating them.
PEER_GRACE = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tasks, results, sys_path) -> None:
    sys.path[:] = sys_path
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    except Exception:  # report instead of dying silently
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - every failure must reach the parent
            results.put((rank, False, f"rank {rank}:\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class RankFailure(AssertionError):
    """One or more ranks raised (their tracebacks are in the message)."""


class RankPool:
    """``world`` gloo ranks on CPU, each with one thread.

    Args:
        world: number of ranks.
        max_cases: restart the ranks after this many cases (None: never). A pool shared by many test
            modules recycles its ranks so that what cases leave behind (every ``enable_sequence_parallel``
            builds process groups whose sockets stay open: a hybrid mesh holds ~12 file descriptors)
            cannot pile up without bound.
    """

    def __init__(self, world: int, max_cases: int | None = None):
        self.world = world
        self.max_cases = max_cases
        self.cases_run = 0
        self.procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(self.world)]
        port = _free_port()
        self.procs = [
            ctx.Process(
                target=_worker, args=(r, self.world, port, self.tasks[r], self.results, list(sys.path)), daemon=True
            )
            for r in range(self.world)
        ]
        for p in self.procs:
            p.start()
        ready = self._collect(timeout=180)
        bad = [msg for ok, msg in ready.values() if not ok]
        bad += [f"rank {r} did not start in 180 s" for r in range(self.world) if r not in ready]
        if bad:
            self.close()
            raise RankFailure("rank start-up failed:\n" + "\n".join(bad))

    def _collect(self, timeout: float) -> dict:
        out: dict = {}
        deadline = timeout
        while len(out) < self.world:
            try:
                rank, ok, value = self.results.get(timeout=deadline)
            except queue.Empty:
                break
            out[rank] = (ok, value)
            if not ok:
                deadline = PEER_GRACE  # peers may be blocked in a collective with the failed rank
        return out

    def run(self, fn, *args, **kwargs) -> list:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order.

        ``fn`` must be importable (a module-level function). Raises :class:`RankFailure` with
        the traceback of every failed rank, and restarts the pool if any rank failed or timed out.
        """
        recycle = self.max_cases is not None and self.cases_run >= self.max_cases
        if recycle or not self.procs or not all(p.is_alive() for p in self.procs):
            self.close()
            self.cases_run = 0
            try:
                self._start()
            except RankFailure:  # the free port may have been taken before the ranks bound it
                self._start()
        self.cases_run += 1
        for q in self.tasks:
            q.put((fn, args, kwargs))
        got = self._collect(CASE_TIMEOUT)
        failures = [value for ok, value in (got[r] for r in sorted(got)) if not ok]
        missing = [r for r in range(self.world) if r not in got]
        if failures or missing:
            self.close()
            note = f"\nranks that never reported (terminated): {missing}" if missing else ""
            raise RankFailure(f"{fn.__name__} failed on {len(failures)} rank(s):\n" + "\n".join(failures) + note)
        return [got[r][1] for r in range(self.world)]

    def close(self) -> None:
        """Stop every rank (politely, then by force)."""
        for q in getattr(self, "tasks", []):
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs:
            p.join(timeout=3)
            if p.is_alive():
                p.terminate()
                p.join(timeout=3)
        self.procs = []
