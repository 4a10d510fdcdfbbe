"""Ring attention: K/V blocks travel around the ring; partial outputs merge by log-sum-exp.

Liu et al. 2023, "Ring Attention with Blockwise Transformers", https://arxiv.org/abs/2310.01889.
Each of ``P`` steps computes the local queries against one rank's K/V block while the next block
is already in flight (``batch_isend_irecv``), so the transfer overlaps the compute. Forward
traffic per layer: ``(P - 1)`` times the local K/V bytes (kv heads sent as they are, never
repeated for GQA). The backward sends K/V around again and dK/dV accumulators (fp32) with them;
each block's gradients come from the flash backward with the rows' final ``out``/``lse``.

Which keys a query may see is planned per (query rank, key rank) block from the batch's segments
(:func:`~hf_seqpar.core.segments.plan_pieces`): padding, documents, causality and windows are exact,
each block is a few variable-length pieces (whole key ranges, causal diagonals, small window-band
tiles) and blocks with nothing to attend are skipped, all without an S x S tensor. With the
zigzag layout every rank does the same causal work on one document; on packed rows ``layout="auto"``
switches to the work-balanced layout (:mod:`hf_seqpar.core.balance`).

In the backward the dK/dV accumulators travel one hop per step like the K/V: each step computes
its block's gradients into fresh buffers while the accumulator of that block is still on its
way from the previous rank, then adds them and starts the next hop (as ring-flash-attention
does), so both transfers overlap a block's compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from hf_seqpar.core.balance import choose_layout
from hf_seqpar.core.comm import RingShift
from hf_seqpar.core.layout import LAYOUT_MULTIPLE, Layout
from hf_seqpar.core.segments import plan_pieces
from hf_seqpar.kernels import compute_dtype
from hf_seqpar.kernels.varlen import pieces_backward, pieces_forward
from hf_seqpar.strategies.base import CostFacts, Strategy

__all__ = ["RingStrategy", "RingOptions", "ring_attention", "ring_plans", "check_ring_kwargs", "check_ring_features"]


@dataclass(frozen=True)
class RingOptions:
    """Options of the ring strategy."""

    layout: str = "auto"
    """``"auto"`` (zigzag; the work-balanced layout for packed/padded rows zigzag leaves
    unbalanced), ``"zigzag"`` (every rank does the same causal work on one document),
    ``"balanced"`` or ``"contiguous"`` (:mod:`hf_seqpar.core.balance`)."""
    backend: str | None = None
    """Block-attention kernel (a name of ``hf_seqpar.kernels.BACKENDS``); None: per device and dtype."""


def ring_plans(batch, q_outer: int, layout: Layout, is_causal: bool, window: int | None) -> list:
    """Attention pieces of outer rank ``q_outer``'s queries against every outer rank's keys
    (``None`` where a block has nothing to attend), derived from the batch's segments in
    O(#segments) per block with no S x S tensor; cached on the batch (the same for all layers and
    for the backward)."""

    def build():
        q_chunks = layout.outer_chunks(q_outer)
        plans = [
            # small pieces packed into tiles (kernels/varlen.pack_pieces), as for Ulysses and Megatron-SP
            plan_pieces(batch.segments, q_chunks, layout.outer_chunks(src), is_causal, window)
            for src in range(layout.outer)
        ]
        return [p or None for p in plans]

    return batch.cached(("ring", q_outer, layout, is_causal, window), build)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plans, group, scale, backend, counter, layer):
        world, me = dist.get_world_size(group), dist.get_rank(group)
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        kv = [k, v]
        for step in range(world):
            shift = RingShift(kv, group, counter, "ring_kv.fwd", layer) if step < world - 1 else None
            pieces = plans[(me - step) % world]  # this step holds the K/V block of rank me - step
            if pieces is not None:
                pieces_forward(q, kv[0], kv[1], pieces, out, lse, scale=scale, backend=backend)
            if shift is not None:
                kv = shift.wait()
        out = out.to(q.dtype)  # saved in the activation dtype, as flash attention does
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plans, ctx.group, ctx.scale, ctx.backend, ctx.counter, ctx.layer = (
            plans,
            group,
            scale,
            backend,
            counter,
            layer,
        )
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, counter, layer = ctx.group, ctx.counter, ctx.layer
        world, me = dist.get_world_size(group), dist.get_rank(group)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv, travelling = [k, v], None  # travelling: the hop of the previous step's accumulators
        for step in range(world):
            shift = RingShift(kv, group, counter, "ring_kv.bwd", layer) if step < world - 1 else None
            pieces = ctx.plans[(me - step) % world]
            grads = [
                torch.zeros(k.shape, dtype=torch.float32, device=k.device),
                torch.zeros(v.shape, dtype=torch.float32, device=v.device),
            ]
            if pieces is not None:
                pieces_backward(
                    dout,
                    q,
                    kv[0],
                    kv[1],
                    out,
                    lse,
                    pieces,
                    dq,
                    grads[0],
                    grads[1],
                    scale=ctx.scale,
                    backend=ctx.backend,
                )
            if travelling is not None:  # this block's accumulators, from the previous rank
                grads = [acc.add_(g) for acc, g in zip(travelling.wait(), grads)]
            if world > 1:  # the accumulators travel with their K/V block; after P hops they are home
                travelling = RingShift(grads, group, counter, "ring_dkv.bwd", layer)
            else:
                dkv = grads
            if shift is not None:
                kv = shift.wait()
        if travelling is not None:
            dkv = travelling.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None, None


def check_ring_kwargs(module, kwargs) -> None:
    """Reject attention features ring attention does not implement, with the fix."""
    if kwargs.get("dropout", 0.0):
        raise NotImplementedError(
            f"ring attention has no attention dropout (got dropout={kwargs['dropout']}); set "
            "config.attention_dropout=0.0 or use strategy='ulysses'"
        )
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            "ring attention supports neither logit softcapping nor attention sinks; "
            "use strategy='ulysses' for this model"
        )


def check_ring_features(name: str, features) -> None:
    """Refuse, at enable time, the attention features ring attention does not implement (its
    kernels compute plain softmax attention with one head size), naming the fix."""
    missing = []
    if features.sinks:
        missing.append("per-head attention sinks (`sinks` / s_aux)")
    if features.softcap is not None:
        missing.append(f"logit softcapping (attn_logit_softcapping={features.softcap})")
    if features.qk_head_dim != features.v_head_dim:
        missing.append(
            f"value heads of another size ({features.v_head_dim}) than the query/key heads "
            f"({features.qk_head_dim}), as in multi-head latent attention"
        )
    if features.dropout:
        missing.append(f"attention dropout (attention_dropout={features.dropout}; set it to 0.0 to use {name})")
    if missing:
        raise NotImplementedError(
            f"strategy {name!r} cannot run this {features.model_type} model exactly: its ring attention kernels "
            f"have no {'; no '.join(missing)}. Use strategy='ulysses' (the model's own attention on whole "
            "sequences, split by heads; sp_size must divide the query heads)."
        )


def ring_attention(
    module, query, key, value, batch, group, q_outer: int, layout: Layout, *, backend=None, counter=None, **kwargs
):
    """Exact ring attention of the local queries over all ranks' keys.

    Args:
        module: the attention module (``is_causal``, ``layer_idx``).
        query: ``(B, h_q, S_q, D)``, the queries of outer shard ``q_outer`` of ``layout``.
        key: ``(B, h_kv, S_q, D)``.
        value: like ``key``.
        batch: the :class:`~hf_seqpar.core.sharding.SeqParBatch`.
        group: the ring's process group (``layout.outer`` ranks).
        q_outer: this rank's position in the ring.
        layout: the batch layout.
        backend: the block-attention backend (None: per block for the device and dtype).
        counter: the :class:`~hf_seqpar.core.comm.CommCounter` of the model.
        **kwargs: the attention keywords from the model (``scaling``, ``sliding_window``, ...).

    Returns:
        ``(B, h_q, S_q, D)``.
    """
    check_ring_kwargs(module, kwargs)
    plans = ring_plans(batch, q_outer, layout, getattr(module, "is_causal", True), kwargs.get("sliding_window"))
    scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
    # one compute dtype before anything travels (under autocast RoPE gives fp32 q/k, v is bf16):
    # the autocast dtype, as the model's own SDPA would use; autograd casts the gradients back
    dtype = compute_dtype(query, key, value)
    query, key, value = (t.to(dtype) for t in (query, key, value))
    return _RingAttention.apply(
        query, key, value, plans, group, scale, backend, counter, getattr(module, "layer_idx", None)
    )


class RingStrategy(Strategy):
    """``strategy="ring"``: zigzag, work-balanced or contiguous shards, K/V around the ring."""

    name = "ring"
    description = "ring attention: K/V blocks around the ring, lse merge, zigzag load balance"
    Options = RingOptions
    cost = CostFacts(degrees=lambda sp, options, heads: (1, sp, 1), min_sp=2)

    @classmethod
    def check_features(cls, features) -> None:
        check_ring_features(cls.name, features)

    @classmethod
    def seq_multiple(cls, sp: int, options) -> int:
        return sp * LAYOUT_MULTIPLE.get(options.layout, 2)  # auto/balanced: at least zigzag's (per batch)

    def make_layout(self, seq_len: int, valid=None, doc_ids=None) -> Layout:
        return choose_layout(
            self.options.layout, seq_len, self.sp_size, self.seq_multiple(self.sp_size, self.options), 1, valid, doc_ids
        )

    def attention(self, module, query, key, value, batch, **kwargs) -> torch.Tensor:
        out = ring_attention(
            module,
            query,
            key,
            value,
            batch,
            self.sp_group,
            self.sp_rank,
            batch.layout,
            backend=self.backend,
            counter=self.counter,
            **kwargs,
        )
        return out.transpose(1, 2)  # (B, h, S/P, D) -> (B, S/P, h, D)
