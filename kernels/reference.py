"""Float64 reference attention with an explicit boolean mask (a test oracle)."""

from __future__ import annotations

import torch

__all__ = ["reference_attention"]


def reference_attention(q, k, v, allowed: torch.Tensor | None = None, scale: float | None = None):
    """Plain softmax attention in float64, returning the output and the log-sum-exp.

    Args:
        q: ``(B, h_q, S_q, D)``.
        k: ``(B, h_kv, S_k, D)`` with ``h_q % h_kv == 0`` (grouped-query attention, no copy made
            by the caller).
        v: like ``k``.
        allowed: bool, broadcastable to ``(B, h_q, S_q, S_k)``; True where a query may attend.
        scale: softmax scale, default ``D ** -0.5``.

    Returns:
        ``(out, lse)``: ``(B, h_q, S_q, D)`` float64 and ``(B, h_q, S_q)`` float64; rows with no
        allowed key give ``out = 0`` and ``lse = -inf``.
    """
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    # (B, h_kv, S, D) -> (B, h_q, S, D): query head h uses kv head h // groups
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].clamp_min(torch.finfo(torch.float64).min)).nan_to_num(0.0)
    return probs @ v, lse
