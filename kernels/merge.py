"""The log-sum-exp merge of partial attention outputs, written once.

Two partial softmax attentions over disjoint key sets, ``(o_a, lse_a)`` and ``(o_b, lse_b)``,
combine exactly into ``lse = log(e^lse_a + e^lse_b)`` and
``o = e^(lse_a - lse) o_a + e^(lse_b - lse) o_b`` (Milakov & Gimelshein 2018, "Online normalizer
calculation for softmax", https://arxiv.org/abs/1805.02867; the basis of flash and ring attention).
Both exponents are <= 0, so nothing overflows; rows with no key so far (``lse = -inf``) are handled
without NaN. Everything is fp32: merging in bf16 makes ring error grow with the ring size.
"""

from __future__ import annotations

import torch

__all__ = ["merge_into"]


def _triton():
    try:
        from .triton_merge import triton_merge_into
    except ImportError:  # Triton not installed
        return None
    return triton_merge_into


def merge_into(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Merge a partial result into an accumulator, in place (fused Triton kernel for contiguous
    CUDA accumulators when Triton is installed, else torch ops).

    Args:
        out: fp32 accumulator ``(B, H, S, D)``.
        lse: fp32 accumulator ``(B, H, S)`` (``-inf`` where nothing was attended yet).
        out_b: partial output ``(B, H, S, D)``, any float dtype.
        lse_b: partial log-sum-exp ``(B, H, S)`` (``-inf`` for rows with no key in this part).
    """
    if out.is_cuda and out.is_contiguous() and lse.is_contiguous() and (fused := _triton()) is not None:
        fused(out, lse, out_b, lse_b)
        return
    new = torch.logaddexp(lse, lse_b.float())
    ref = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # all -inf row: weights become 0
    w_a = torch.exp(lse - ref).unsqueeze(-1)
    w_b = torch.exp(lse_b.float() - ref).unsqueeze(-1)
    out.mul_(w_a).add_(w_b * out_b.float())
    lse.copy_(new)
