"""Where a step's peak resident memory is set: the peak while each autograd node of the backward runs.

:class:`NodePeaks` puts a pre-hook on every node of the backward graph (walked from the loss): when
the engine is about to run a node, the hook reads ``VmHWM`` (the peak since the previous node
started: that node's own computation, the accumulation of its outputs into their consumers' input
buffers and a checkpoint's recomputation it triggered) and resets it (``/proc/self/clear_refs``).
Per node *name* (``MmBackward0``, ``SliceBackward0``, ``_VarlenAttentionBackward``, ...) it keeps
the largest; the forward is one more entry. The node of the largest is where the step's peak was
set, and a node's own peak shows what a change inside it saves even where the step peaks elsewhere.

It only observes: hooks see the gradients between nodes and keep none, so the step's peak with and
without it is the same (``tests/test_memtrace.py``). (A ``TorchDispatchMode`` around every operation
would say more, but it is not an observer: the engine then adds gradients out of place, as a
tensor seen from Python has more than one user, and a tile gradient assembly then holds one more
gradient of the whole sequence.) Linux only.
"""

from __future__ import annotations

from .bench import _PeakRSS, status_bytes

__all__ = ["NodePeaks", "FORWARD"]

#: The entry of everything before the backward (the forward and the loss).
FORWARD = "forward"


class NodePeaks:
    """Per autograd node name, the largest resident memory while it ran (absolute bytes).

    Args:
        root: the loss's ``grad_fn``; hooks go on every node reachable from it. Call right before
            ``backward()``: the peak so far (``VmHWM`` since the caller's reset) is the forward's.
    """

    def __init__(self, root):
        self.peaks: dict[str, int] = {}
        self._running = FORWARD
        self._handles = _hook_graph(root, self._enter)

    def _enter(self, name: str) -> None:
        """A node is about to run: the peak since the previous one started is the previous one's."""
        self._record(status_bytes("VmHWM"))
        self._running = name
        _PeakRSS.reset()

    def _record(self, peak: int) -> None:
        self.peaks[self._running] = max(self.peaks.get(self._running, 0), peak)

    def close(self) -> dict[str, int]:
        """After the backward: record the last node, remove the hooks, return :attr:`peaks`."""
        self._record(status_bytes("VmHWM"))
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.peaks

    @property
    def site(self) -> str:
        """The node (or :data:`FORWARD`) with the largest peak."""
        return max(self.peaks, key=self.peaks.get)


def _hook_graph(root, enter) -> list:
    """A pre-hook calling ``enter(node name)`` on every node reachable from ``root``; the handles."""
    seen, todo, handles = set(), [root], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        handles.append(node.register_prehook(_prehook(enter, node.name())))
        todo.extend(f for f, _ in node.next_functions)
    return handles


def _prehook(enter, name: str):
    def hook(grad_outputs):
        enter(name)

    return hook
