"""Float64 reference attention: the oracle the other backends are tested against.

The backward is written out (the flash-attention backward, Dao et al. 2022,
https://arxiv.org/abs/2205.14135, Alg. 2) so it can take the *global* ``out`` and ``lse`` of a
row while seeing only one block of keys, exactly as ring attention needs.
"""

from __future__ import annotations

import torch

__all__ = ["reference_attention", "reference_forward", "reference_backward", "allowed_mask", "window_visible"]


def window_visible(q_idx: torch.Tensor, kv_idx: torch.Tensor, is_causal: bool, sliding_window: int | None):
    """Which keys a query may see by position alone (causality and sliding window), as transformers'
    masks define it; ``q_idx`` and ``kv_idx`` broadcast against each other.

    - causal: ``kv <= q``; with a window also ``kv > q - window`` (``sliding_window_overlay``:
      the query and the ``window - 1`` keys before it).
    - not causal (e.g. Gemma3 with ``use_bidirectional_attention=True``): every key; with a window
      ``|q - kv| < window`` (Gemma3's ``_bidirectional_window_overlay`` OR-ed onto the causal window
      mask: ``window - 1`` keys on each side).

    Returns:
        A bool tensor of the broadcast shape.
    """
    if is_causal:
        allowed = kv_idx <= q_idx
        if sliding_window is not None:
            allowed = allowed & (kv_idx > q_idx - sliding_window)
        return allowed
    if sliding_window is not None:
        return (q_idx - kv_idx).abs() < sliding_window
    return (q_idx >= 0) & (kv_idx >= 0)  # everything, in the broadcast shape


def allowed_mask(sq: int, sk: int, causal: bool, window: int | None, mask: torch.Tensor | None, device=None):
    """Bool ``(B|1, 1, sq, sk)``: True where a query may attend (top-left aligned causality,
    ``window``: keys with ``q - window < k``)."""
    q = torch.arange(sq, device=device)[:, None]
    k = torch.arange(sk, device=device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        allowed &= k <= q
    if window is not None:
        allowed &= k > q - window
    allowed = allowed[None, None]
    return allowed if mask is None else allowed & mask


def _scores(q, k, scale):
    groups = q.shape[1] // k.shape[1]
    # (B, h_kv, S, D) -> (B, h_q, S, D): query head h uses kv head h // groups
    k = k.double().repeat_interleave(groups, dim=1)
    return torch.einsum("bhqd,bhkd->bhqk", q.double(), k) * scale


def reference_forward(q, k, v, *, scale, causal=False, window=None, mask=None):
    """``(out, lse)`` in float64; rows with no allowed key give ``out = 0``, ``lse = -inf``."""
    allowed = allowed_mask(q.shape[2], k.shape[2], causal, window, mask, q.device)
    s = _scores(q, k, scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    v = v.double().repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    return p @ v, lse


def reference_backward(dout, q, k, v, out, lse, *, scale, causal=False, window=None, mask=None):
    """``(dq, dk, dv)`` in float64 for one block of keys, given the row's final ``out``/``lse``."""
    groups = q.shape[1] // k.shape[1]
    allowed = allowed_mask(q.shape[2], k.shape[2], causal, window, mask, q.device)
    s = _scores(q, k, scale).masked_fill(~allowed, float("-inf"))
    p = torch.exp(s - lse.double()[..., None]).nan_to_num(0.0)  # (B, h_q, Sq, Sk)
    dout, vr = dout.double(), v.double().repeat_interleave(groups, dim=1)
    kr = k.double().repeat_interleave(groups, dim=1)
    dv = p.transpose(-1, -2) @ dout  # (B, h_q, Sk, D)
    dp = dout @ vr.transpose(-1, -2)
    ds = p * (dp - (dout * out.double()).sum(-1, keepdim=True))
    dq = ds @ kr * scale
    dk = ds.transpose(-1, -2) @ q.double() * scale
    # sum the query heads of each kv group: (B, h_q, Sk, D) -> (B, h_kv, Sk, D)
    fold = lambda t: t.unflatten(1, (k.shape[1], groups)).sum(2)  # noqa: E731
    return dq, fold(dk), fold(dv)


def reference_attention(q, k, v, allowed: torch.Tensor | None = None, scale: float | None = None):
    """Plain attention in float64 with an explicit bool mask (True = attend).

    Args:
        q: ``(B, h_q, S_q, D)``.
        k: ``(B, h_kv, S_k, D)``, ``h_q % h_kv == 0``.
        v: like ``k``.
        allowed: bool broadcastable to ``(B, h_q, S_q, S_k)``.
        scale: default ``D ** -0.5``.

    Returns:
        ``(out, lse)`` float64.
    """
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    return reference_forward(q, k, v, scale=scale, mask=allowed)
