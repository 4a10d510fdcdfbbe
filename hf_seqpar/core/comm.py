"""Every collective hf_seqpar runs, and the byte counter that measures them.

All communication of the package goes through this module so that traffic can be measured
against theory (see :class:`CommCounter`). Each collective takes its process group explicitly;
nothing here holds a global group.

Byte accounting convention: ``bytes`` is what *this rank sends* to other ranks, i.e. the data
a rank keeps for itself is not counted. For an all-to-all over ``P`` ranks of a tensor of ``n``
bytes that is ``n * (P - 1) / P``; for an all-gather of a local ``n``-byte shard ``n * (P - 1)``
(ring-equivalent volume); for an all-reduce of ``n`` bytes ``2 * n * (P - 1) / P``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "CommCounter",
    "RingShift",
    "all_to_all",
    "all_reduce_sum",
    "all_gather_concat",
    "all_gather_object_fingerprints",
    "all_reduce_sum_replicated",
    "all_reduce_mean_",
    "broadcast_",
    "CollectiveMeter",
]


@dataclass
class CommCounter:
    """Counts bytes sent per collective and per layer; off by default.

    When ``enabled`` is False, :meth:`record` returns after one attribute check, so the
    cost on the hot path is negligible.
    """

    enabled: bool = False
    """Whether :meth:`record` accumulates anything."""
    by_op: dict = field(default_factory=lambda: defaultdict(int))
    """Bytes sent, keyed by operation name (e.g. ``"all_to_all.fwd"``)."""
    by_layer: dict = field(default_factory=lambda: defaultdict(int))
    """Bytes sent, keyed by ``(layer_idx, op)``; ``layer_idx`` is None outside layers."""
    calls: dict = field(default_factory=lambda: defaultdict(int))
    """Number of calls per operation name."""

    def record(self, op: str, nbytes: int, layer: int | None = None) -> None:
        """Add ``nbytes`` sent by operation ``op`` in layer ``layer`` (no-op when disabled)."""
        if not self.enabled:
            return
        self.by_op[op] += int(nbytes)
        self.by_layer[(layer, op)] += int(nbytes)
        self.calls[op] += 1

    @property
    def total(self) -> int:
        """Total bytes sent over all operations."""
        return sum(self.by_op.values())

    def reset(self) -> None:
        """Forget everything counted so far (keeps ``enabled``)."""
        self.by_op.clear()
        self.by_layer.clear()
        self.calls.clear()


# torch 2.13 renamed all_gather_into_tensor to all_gather_single; keep older releases working
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _record(counter: CommCounter | None, op: str, nbytes: float, layer: int | None) -> None:
    if counter is not None and counter.enabled:
        counter.record(op, int(nbytes), layer)


# --------------------------------------------------------------------------------------------
# all-to-all: scatter one dimension, gather another (Ulysses' sequence <-> head exchange)
# --------------------------------------------------------------------------------------------


def _all_to_all_raw(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Split ``x`` in ``P`` equal chunks along ``scatter_dim``, send chunk ``j`` to rank ``j``,
    and concatenate what arrives (in source-rank order) along ``gather_dim``."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    # (..., P*c, ...) -> (P, ..., c, ...): chunk j becomes the leading slice sent to rank j
    chunks = x.chunk(world, dim=scatter_dim)
    send = torch.stack(chunks, dim=0).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[p] is rank p's chunk; concatenate along gather_dim (shifted by the leading P dim)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, counter, layer):
        ctx.dims = (scatter_dim, gather_dim)
        ctx.group, ctx.counter, ctx.layer = group, counter, layer
        world = dist.get_world_size(group)
        _record(counter, "all_to_all.fwd", _nbytes(x) * (world - 1) / world, layer)
        return _all_to_all_raw(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        world = dist.get_world_size(ctx.group)
        _record(ctx.counter, "all_to_all.bwd", _nbytes(grad) * (world - 1) / world, ctx.layer)
        # The adjoint of an even all-to-all is the all-to-all with the two dims swapped.
        return _all_to_all_raw(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    scatter_dim: int,
    gather_dim: int,
    group,
    counter: CommCounter | None = None,
    layer: int | None = None,
) -> torch.Tensor:
    """Autograd-aware even all-to-all.

    Args:
        x: tensor whose ``scatter_dim`` is divisible by the group size ``P``.
        scatter_dim: dimension split into ``P`` chunks, chunk ``j`` going to rank ``j``.
        gather_dim: dimension along which received chunks are concatenated in rank order.
        group: the process group.
        counter: optional byte counter.
        layer: layer index recorded with the bytes.

    Returns:
        The exchanged tensor: ``scatter_dim`` divided by ``P``, ``gather_dim`` multiplied by ``P``.

    Raises:
        ValueError: if ``x.shape[scatter_dim]`` is not divisible by ``P``.
    """
    world = dist.get_world_size(group)
    if x.shape[scatter_dim] % world:
        raise ValueError(
            f"all_to_all: dim {scatter_dim} of size {x.shape[scatter_dim]} is not divisible by the group size {world}"
        )
    return _AllToAll.apply(x, scatter_dim, gather_dim, group, counter, layer)


# --------------------------------------------------------------------------------------------
# all-reduce (sum) whose backward is also a sum: the exact SP loss
# --------------------------------------------------------------------------------------------


def _summed(x: torch.Tensor, group, counter: CommCounter | None, op: str) -> torch.Tensor:
    """A copy of ``x`` all-reduced (sum) over ``group``, its bytes recorded under ``op``."""
    world = dist.get_world_size(group)
    _record(counter, op, 2 * _nbytes(x) * (world - 1) / world, None)
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, counter):
        ctx.group, ctx.counter = group, counter
        return _summed(x, group, counter, "all_reduce.fwd")

    @staticmethod
    def backward(ctx, grad):
        return _summed(grad, ctx.group, ctx.counter, "all_reduce.bwd"), None, None


def all_reduce_sum(x: torch.Tensor, group, counter: CommCounter | None = None) -> torch.Tensor:
    """Differentiable sum over the group; the gradient of every input is the sum of all
    ranks' output gradients (the derivative of ``y = sum_r x_r`` seen from every rank).

    Args:
        x: tensor to sum (same shape on every rank).
        group: process group.
        counter: optional byte counter.

    Returns:
        The sum over ranks, on every rank.
    """
    if dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group, counter)


# --------------------------------------------------------------------------------------------
# all-gather (no autograd): whole-sequence views for the user, batch checks
# --------------------------------------------------------------------------------------------


def all_gather_concat(x: torch.Tensor, dim: int, group, counter: CommCounter | None = None) -> torch.Tensor:
    """Gather equal-shaped shards from every rank and concatenate them along ``dim`` in rank
    order. Not differentiable (the result is detached).

    Args:
        x: this rank's shard.
        dim: concatenation dimension.
        group: process group.
        counter: optional byte counter.

    Returns:
        The concatenated tensor.
    """
    world = dist.get_world_size(group)
    x = x.detach()
    if world == 1:
        return x
    _record(counter, "all_gather", _nbytes(x) * (world - 1), None)
    # (P * n0, ...) buffer filled in rank order, then viewed as (P, n0, ...) and concatenated along `dim`
    flat = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(flat, x.contiguous(), group=group)
    return torch.cat(flat.view(world, *x.shape).unbind(0), dim=dim)


def all_gather_object_fingerprints(fp: torch.Tensor, group) -> torch.Tensor:
    """All-gather a small fixed-size int64 fingerprint from every rank: ``(P, len(fp))``."""
    world = dist.get_world_size(group)
    out = torch.empty((world * fp.numel(),), dtype=fp.dtype, device=fp.device)
    _all_gather_single(out, fp.reshape(-1).contiguous(), group=group)
    return out.view(world, fp.numel())


# --------------------------------------------------------------------------------------------
# ring point-to-point: send to the next rank, receive from the previous one
# --------------------------------------------------------------------------------------------


class RingShift:
    """Start sending ``tensors`` to the next rank of ``group`` and receiving the previous rank's
    (one batched ``batch_isend_irecv``); :meth:`wait` returns what arrived. Compute placed
    between the constructor and ``wait`` overlaps the transfer.

    Args:
        tensors: tensors to send (kept alive until :meth:`wait`).
        group: process group of the ring.
        counter: optional byte counter; ``op`` and ``layer`` label the bytes.
    """

    def __init__(self, tensors, group, counter: CommCounter | None = None, op: str = "ring", layer=None):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        nxt = dist.get_global_rank(group, (rank + 1) % world)
        prv = dist.get_global_rank(group, (rank - 1) % world)
        self.sent = [t.contiguous() for t in tensors]
        self.received = [torch.empty_like(t) for t in self.sent]
        _record(counter, op, sum(_nbytes(t) for t in self.sent), layer)
        ops = [dist.P2POp(dist.isend, t, nxt, group) for t in self.sent]
        ops += [dist.P2POp(dist.irecv, t, prv, group) for t in self.received]
        self.requests = dist.batch_isend_irecv(ops)

    def wait(self) -> list[torch.Tensor]:
        """Block until the exchange is done; return the received tensors."""
        for req in self.requests:
            req.wait()
        self.sent = None
        return self.received


# --------------------------------------------------------------------------------------------
# tensor parallel: a sum whose backward is the identity, and a meter for DTensor's collectives
# --------------------------------------------------------------------------------------------


class _AllReduceSumReplicated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, counter):
        return _summed(x, group, counter, "all_reduce_replicated.fwd")

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def all_reduce_sum_replicated(x: torch.Tensor, group, counter: CommCounter | None = None) -> torch.Tensor:
    """Sum over the group in forward, identity in backward (Megatron's "g" operator).

    For tensor parallelism: the ranks run one shared graph, the summed value is replicated and
    every rank starts backward from it with gradient 1, so each partial term receives gradient 1
    (not ``P`` as with :func:`all_reduce_sum`, whose ranks are independent replicas).

    Args:
        x: this rank's partial value (same shape on every rank).
        group: process group.
        counter: optional byte counter.

    Returns:
        The sum over ranks, on every rank.
    """
    if dist.get_world_size(group) == 1:
        return x
    return _AllReduceSumReplicated.apply(x, group, counter)


def broadcast_(x: torch.Tensor, group, counter: CommCounter | None = None) -> torch.Tensor:
    """In-place broadcast from the group's first rank (no autograd).

    Returns:
        ``x``, now holding group rank 0's values.
    """
    world = dist.get_world_size(group)
    if world > 1:
        _record(counter, "broadcast", _nbytes(x) if dist.get_rank(group) == 0 else 0, None)
        dist.broadcast(x, group=group, group_src=0)
    return x


def all_reduce_mean_(x: torch.Tensor, group, counter: CommCounter | None = None) -> torch.Tensor:
    """In-place mean over the group (no autograd), e.g. gradients over data-parallel replicas.

    Returns:
        ``x``, now holding the mean.
    """
    world = dist.get_world_size(group)
    if world > 1:
        _record(counter, "all_reduce_mean", 2 * _nbytes(x) * (world - 1) / world, None)
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        x.div_(world)
    return x


#: Functional collectives (what DTensor runs) -> bytes this rank sends, from the input's bytes
#: ``n`` and the group size ``p`` (same convention as the collectives above).
_FUNCOL_SENT = {
    "all_gather_into_tensor": lambda n, p: n * (p - 1),  # input: the local shard
    "reduce_scatter_tensor": lambda n, p: n * (p - 1) / p,  # input: the full, unreduced tensor
    "all_reduce": lambda n, p: 2 * n * (p - 1) / p,
    "all_to_all_single": lambda n, p: n * (p - 1) / p,
}
_FUNCOL_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd")


class CollectiveMeter(TorchDispatchMode):
    """Counts the collectives that run *inside* other libraries (DTensor redistributions of
    torch's tensor-parallel styles) into a :class:`CommCounter`.

    hf_seqpar's own collectives count themselves; the ones DTensor issues cannot be routed
    through this module, so this dispatch mode observes every functional collective that is
    actually executed while it is active and records the bytes of its real input tensor, under
    ``"tp_<op>.<phase>"`` and the current layer. Whoever drives it sets :attr:`layer` and
    :attr:`phase` (Megatron-SP does it with module and tensor hooks). :meth:`start` /
    :meth:`stop` nest, so a forward hook and a user's ``with meter:`` can both use it.

    Args:
        counter: where to record.
        group_sizes: ``{process group name: size}`` of the groups whose collectives count.
    """

    def __init__(self, counter: CommCounter, group_sizes: dict[str, int]):
        super().__init__()
        self.counter, self.group_sizes = counter, group_sizes
        self.layer: int | None = None
        self.phase = "fwd"
        self._depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar into collectives first; we see those
        if func.namespace in _FUNCOL_NAMESPACES and func._opname in _FUNCOL_SENT:
            size = self.group_sizes.get(args[-1] if isinstance(args[-1], str) else None)
            if size is not None:
                sent = _FUNCOL_SENT[func._opname](_nbytes(args[0]), size)
                _record(self.counter, f"tp_{func._opname}.{self.phase}", sent, self.layer)
        return func(*args, **kwargs)

    def start(self) -> None:
        """Begin observing (nested calls only count once)."""
        if self._depth == 0:
            self.__enter__()
        self._depth += 1

    def stop(self) -> None:
        """End one :meth:`start`."""
        self._depth -= 1
        if self._depth == 0:
            self.__exit__(None, None, None)
