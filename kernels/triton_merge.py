"""Fused log-sum-exp merge in Triton (one pass over the partial output, one program per row).

Same maths as :func:`hf_seqpar.kernels.merge.merge_into` (and the same -inf handling); used for
CUDA tensors when Triton is installed. The tests run it under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set before Triton is imported) against the torch version.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_merge_into"]


@triton.jit
def _merge_rows(out_ptr, lse_ptr, part_ptr, part_lse_ptr, dim, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    lse_a = tl.load(lse_ptr + row)
    lse_b = tl.load(part_lse_ptr + row).to(tl.float32)
    top = tl.maximum(lse_a, lse_b)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    new = safe_top + tl.log(tl.exp(lse_a - safe_top) + tl.exp(lse_b - safe_top))
    ref = tl.where(top == float("-inf"), 0.0, new)  # a row with nothing attended keeps weights 0
    w_a = tl.exp(lse_a - ref)
    w_b = tl.exp(lse_b - ref)
    cols = tl.arange(0, BLOCK)
    keep = cols < dim
    o_a = tl.load(out_ptr + row * dim + cols, mask=keep, other=0.0)
    o_b = tl.load(part_ptr + row * dim + cols, mask=keep, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * dim + cols, w_a * o_a + w_b * o_b, mask=keep)
    tl.store(lse_ptr + row, tl.where(top == float("-inf"), float("-inf"), new))


def triton_merge_into(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """In-place merge like :func:`~hf_seqpar.kernels.merge.merge_into`; ``out``/``lse`` must be
    contiguous fp32, ``out_b``/``lse_b`` are made contiguous."""
    if not (out.is_contiguous() and lse.is_contiguous() and out.dtype == lse.dtype == torch.float32):
        raise ValueError("triton_merge_into needs contiguous fp32 accumulators")
    dim = out.shape[-1]
    rows = lse.numel()
    _merge_rows[(rows,)](out, lse, out_b.contiguous(), lse_b.contiguous(), dim, BLOCK=triton.next_power_of_2(dim))
